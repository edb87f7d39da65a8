//! `sluice-demo-origin`: a small WebSocket echo server for `cargo xtask run`.
//! Echoes every text and binary message; picks the first subprotocol offered.

use std::net::SocketAddr;

use anyhow::Result;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// WebSocket echo server.
#[derive(Parser)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind(cli.listen).await?;
    eprintln!("demo origin: WebSocket echo on ws://{}/", cli.listen);
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, _) = r?;
                tokio::spawn(async move {
                    #[expect(
                        clippy::result_large_err,
                        reason = "tungstenite's callback signature fixes the error type"
                    )]
                    let pick = |req: &Request, mut resp: Response| {
                        if let Some(p) = req
                            .headers()
                            .get("sec-websocket-protocol")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|s| s.split(',').next())
                            .and_then(|p| HeaderValue::from_str(p.trim()).ok())
                        {
                            resp.headers_mut().insert("sec-websocket-protocol", p);
                        }
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, pick).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
