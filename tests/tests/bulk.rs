//! Byte-exact bulk: 1 GiB each way at the same time on one connection,
//! SHA-256 compared at both ends, on every data path. The throughput of each
//! path is printed beside a direct connection (information, not a target:
//! speed targets live in `cargo xtask bench`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use sluice_e2e::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const MSG: usize = 1 << 20;
const TOTAL: usize = 1 << 30;

fn cfg() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(4 << 20))
        .max_frame_size(Some(4 << 20))
}

/// Says hello, lets the session be [`quiet`] (every path then carries it),
/// then sends TOTAL bytes of seeded data and hashes what it receives;
/// returns (hash of sent, hash of received, bytes received).
async fn exchange<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    seed: u64,
) -> ([u8; 32], [u8; 32], usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    ws.send(Message::text("hello")).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t == "hello" => {}
        other => panic!("no hello: {other:?}"),
    }
    quiet().await;
    let (mut tx, mut rx) = ws.split();
    let send = tokio::spawn(async move {
        let mut prng = Prng::new(seed);
        let mut h = Sha256::new();
        for _ in 0..TOTAL / MSG {
            let mut buf = vec![0u8; MSG];
            prng.fill(&mut buf);
            h.update(&buf);
            tx.send(Message::binary(buf)).await.unwrap();
        }
        (h.finalize().into(), tx)
    });
    let mut h = Sha256::new();
    let mut got = 0;
    while got < TOTAL {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => {
                got += b.len();
                h.update(&b);
            }
            other => panic!("bulk stream broke after {got} bytes: {other:?}"),
        }
    }
    let (sent, mut tx) = send.await.unwrap();
    let _ = tx.close().await;
    (sent, h.finalize().into(), got)
}

async fn bulk_origin() -> (
    SocketAddr,
    tokio::task::JoinHandle<([u8; 32], [u8; 32], usize)>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async_with_config(s, Some(cfg()))
            .await
            .unwrap();
        exchange(ws, 0xB0B).await
    });
    (addr, h)
}

/// One run; returns Gbit/s of both directions together.
async fn run(url_for: impl FnOnce(SocketAddr) -> (String, Option<Sluice>), what: &str) -> f64 {
    let (origin, oh) = bulk_origin().await;
    let (url, sluice) = url_for(origin);
    let start = Instant::now();
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(cfg()), false)
        .await
        .unwrap();
    let client = exchange(ws, 0xA11CE);
    let (c, o) = tokio::time::timeout(Duration::from_secs(180), async { tokio::join!(client, oh) })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: bulk timed out\n{}",
                sluice.as_ref().map(|s| s.logs()).unwrap_or_default()
            )
        });
    let secs = start.elapsed().as_secs_f64();
    let (c_sent, c_recv, c_got) = c;
    let (o_sent, o_recv, o_got) = o.unwrap();
    assert_eq!(c_got, TOTAL, "{what}: client byte count");
    assert_eq!(o_got, TOTAL, "{what}: origin byte count");
    assert_eq!(c_sent, o_recv, "{what}: client->origin SHA-256 differs");
    assert_eq!(o_sent, c_recv, "{what}: origin->client SHA-256 differs");
    let gbps = (2 * TOTAL) as f64 * 8.0 / secs / 1e9;
    eprintln!("bulk {what}: 2 x 1 GiB in {secs:.2} s = {gbps:.2} Gbit/s (both directions)");
    if let Some(s) = sluice {
        let line = s.wait_log("closed:", Duration::from_secs(10));
        assert!(line.contains("bytes_in=1073"), "{what}: {line}");
        s.assert_own_path(&line);
    }
    gbps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_is_byte_exact_on_every_path() {
    let direct = run(|o| (format!("ws://{o}/"), None), "direct").await;
    for mode in modes() {
        let gbps = run(
            |o| {
                // On sockmap this reader (it hashes as it goes) falls behind,
                // so directions move to user space mid-transfer: the byte
                // order across that move is checked here too.
                let s = Sluice::start(mode, o);
                (s.url(), Some(s))
            },
            &format!("{mode:?}"),
        )
        .await;
        eprintln!("bulk {mode:?}: {:.0}% of direct", gbps / direct * 100.0);
    }
}
