//! The origin every target talks to: a WebSocket server on its own tokio
//! runtime. What it does depends on the request path:
//!
//! - `/echo`: sends every data message back (unmasked, same opcode);
//! - `/sink`: counts binary bytes and, on a text `done`, answers `got N`;
//! - `/bulk?n=N`: sends N binary bytes in 1 MiB frames while it sinks like `/sink`.
//!
//! A close frame is answered with a close frame, then the connection ends.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ws::{self, op, Frame, Parser};

/// Size of the frames `/bulk` sends and of every read buffer.
pub const CHUNK: usize = 1 << 20;
const READ_BUF: usize = 256 << 10;

/// A running origin; dropping it stops its runtime.
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl Origin {
    /// Starts on `ip` (a free port) with `threads` worker threads.
    pub fn start(threads: usize, ip: [u8; 4]) -> std::io::Result<Origin> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("origin")
            .enable_all()
            .build()?;
        let listener = rt.block_on(async {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from((ip, 0)).into())?;
            s.listen(4096)?;
            s.set_nonblocking(true)?;
            TcpListener::from_std(s.into())
        })?;
        let addr = listener.local_addr()?;
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = serve(s).await;
                });
            }
        });
        Ok(Origin { addr, _rt: rt })
    }
}

async fn serve(mut s: TcpStream) -> Result<(), String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 8192];
    let mut have = 0;
    let end = loop {
        let n = s.read(&mut buf[have..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        if let Some(e) = ws::head_end(&buf[..have]) {
            break e;
        }
        if have == buf.len() {
            return Err("request head too large".into());
        }
    };
    let req = ws::parse_request(&buf[..end])?;
    s.write_all(req.answer.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let ahead = buf[end..have].to_vec();
    if req.path.starts_with("/echo") {
        echo(s, ahead).await
    } else if let Some(q) = req.path.strip_prefix("/bulk?n=") {
        let n: u64 = q.parse().map_err(|_| "bad n")?;
        let (r, mut w) = s.into_split();
        // The client says when: a session that settled first (see
        // `load::SETTLE`) streams only then.
        let (go, start) = tokio::sync::oneshot::channel::<()>();
        let sender = tokio::spawn(async move {
            start.await.ok()?;
            let mut frame = Vec::with_capacity(CHUNK + 14);
            let mut payload = vec![0u8; CHUNK];
            ws::Prng::new(n).fill(&mut payload);
            let mut left = n;
            while left > 0 {
                let len = (left as usize).min(CHUNK);
                frame.clear();
                ws::put_header(&mut frame, op::BINARY, len, None);
                frame.extend_from_slice(&payload[..len]);
                if w.write_all(&frame).await.is_err() {
                    return None;
                }
                left -= len as u64;
            }
            Some(w)
        });
        sink(r, ahead, sender, Some(go)).await
    } else {
        let (r, w) = s.into_split();
        sink(r, ahead, tokio::spawn(async move { Some(w) }), None).await
    }
}

async fn echo(mut s: TcpStream, ahead: Vec<u8>) -> Result<(), String> {
    let mut p = Parser::default();
    let mut buf = vec![0u8; READ_BUF];
    let mut out = Vec::new();
    let mut closing = false;
    let mut data = ahead;
    loop {
        p.feed(&data, true, |f| match f.opcode {
            op::CLOSE => {
                out.extend(ws::frame(op::CLOSE, &f.payload, None));
                closing = true;
            }
            op::PING => out.extend(ws::frame(op::PONG, &f.payload, None)),
            op::PONG => {}
            _ => out.extend(ws::frame(f.opcode, &f.payload, None)),
        })?;
        if !out.is_empty() {
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
        if closing {
            let _ = s.shutdown().await;
            return Ok(());
        }
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        data.clear();
        data.extend_from_slice(&buf[..n]);
    }
}

/// Reads and counts what the client sends; answers `done` with the count.
/// A `start` text frame lets `go` (the bulk sender) begin.
async fn sink(
    mut r: tokio::net::tcp::OwnedReadHalf,
    ahead: Vec<u8>,
    sender: tokio::task::JoinHandle<Option<tokio::net::tcp::OwnedWriteHalf>>,
    mut go: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    let mut p = Parser::default();
    let mut buf = vec![0u8; READ_BUF];
    let mut kept: Vec<Frame> = Vec::new();
    p.feed(&ahead, false, |f| kept.push(f))?;
    let mut sender = Some(sender);
    let mut w = None;
    loop {
        for f in kept.drain(..) {
            let reply = match f.opcode {
                op::TEXT if f.payload == b"start" => {
                    if let Some(go) = go.take() {
                        let _ = go.send(());
                    }
                    continue;
                }
                op::TEXT if f.payload == b"done" => {
                    ws::frame(op::TEXT, format!("got {}", p.binary_bytes).as_bytes(), None)
                }
                op::CLOSE => ws::frame(op::CLOSE, &f.payload, None),
                op::PING => ws::frame(op::PONG, &f.payload, None),
                _ => continue,
            };
            // Replies go after whatever the bulk sender still has to send.
            if w.is_none() {
                let h = sender.take().ok_or("sender gone")?;
                w = Some(h.await.map_err(|e| e.to_string())?.ok_or("send failed")?);
            }
            let wr = w.as_mut().expect("set above");
            wr.write_all(&reply).await.map_err(|e| e.to_string())?;
            if f.opcode == op::CLOSE {
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
        let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        p.feed(&buf[..n], false, |f| kept.push(f))?;
    }
}
