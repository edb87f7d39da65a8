//! A connection that cannot join the sockmap path falls back to the next path
//! (uring), says so in the log, and is relayed just as well. The test caps
//! the sockmap path at one connection (`limits.sockmap_max_connections`), so
//! the second of two open sessions must fall back.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sluice_e2e::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_falls_back_from_a_full_sockmap() {
    if !is_root() {
        eprintln!("SKIP: the sockmap path needs root to load eBPF; CI runs as root and covers it");
        return;
    }
    let (origin, _h) = echo_origin().await;
    let s = Sluice::start_config(Mode::Sockmap, |a| {
        format!(
            "[limits]\nsockmap_max_connections = 1\n\
             [[listeners]]\nlisten = \"{a}\"\norigin = \"{origin}\"\n"
        )
    });
    let (mut first, _) = tokio_tungstenite::connect_async(s.url()).await.unwrap();
    // The first session is in the sockmap before the second one arrives.
    echo(&mut first, 1).await;
    let (mut second, _) = tokio_tungstenite::connect_async(s.url()).await.unwrap();
    echo(&mut second, 2).await;
    let line = s.wait_log("falls back from sockmap", Duration::from_secs(5));
    assert!(
        line.contains("all 1 sockmap connections are in use"),
        "{line}"
    );
    // Both still carry messages, in both orders.
    echo(&mut first, 3).await;
    echo(&mut second, 4).await;
    second.close(None).await.unwrap();
    while second.next().await.is_some() {}
    drop(second);
    let line = s.wait_log("closed:", Duration::from_secs(5));
    assert!(line.contains("datapath=uring"), "{line}");
    assert!(line.contains("closed: closed"), "{line}");
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    drop(first);
    let line = s.wait_log("datapath=sockmap", Duration::from_secs(5));
    assert!(line.contains("closed: closed"), "{line}");

    // The slot comes back: after its short rest a new session joins the sockmap.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut third, _) = tokio_tungstenite::connect_async(s.url()).await.unwrap();
    echo(&mut third, 5).await;
    third.close(None).await.unwrap();
    while third.next().await.is_some() {}
    drop(third);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = s.logs();
    let closes: Vec<&str> = logs.lines().filter(|l| l.contains("closed:")).collect();
    assert_eq!(closes.len(), 3, "{logs}");
    assert!(closes[2].contains("datapath=sockmap"), "{logs}");
    assert_eq!(
        logs.matches("falls back from sockmap").count(),
        1,
        "only the second session may fall back:\n{logs}"
    );
}

/// Sends a text and a 1 MiB binary message and expects them back.
async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, n: u8)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let text = format!("message {n}");
    ws.send(Message::text(text.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    let mut bin = vec![0u8; 1 << 20];
    Prng::new(u64::from(n)).fill(&mut bin);
    ws.send(Message::binary(bin.clone())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert!(b[..] == bin[..], "message {n} changed"),
        other => panic!("message {n}: {other:?}"),
    }
}
