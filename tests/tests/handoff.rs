//! Bytes that come with the handshake arrive first and in order, on every
//! data path: a client frame pipelined in the same write as the request, and
//! an origin frame in the same TCP segment as the 101, each followed by more
//! frames later. Also the case where nothing follows: the early bytes must
//! not wait for a next segment that never comes.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sluice_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_frame_pipelined_after_the_request_arrives_first() {
    for mode in modes() {
        // A real WebSocket origin: it must read the pipelined frame as the
        // first message, then the ones sent after the 101.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let origin = tokio::spawn(async move {
            let (st, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(st).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..3 {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => got.push(t.to_string()),
                    other => panic!("origin: unexpected {other:?}"),
                }
            }
            ws.send(Message::text("done")).await.unwrap();
            got
        });
        let run = async {
            let first = frame(1, b"early", true);
            let (mut c, rest) = raw_client(s.addr, &first).await;
            assert!(
                rest.is_empty(),
                "{mode:?}: nothing may precede the origin's reply"
            );
            c.write_all(&frame(1, b"second", true)).await.unwrap();
            c.write_all(&frame(1, b"third", true)).await.unwrap();
            let mut reply = [0u8; 6];
            c.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply, b"\x81\x04done", "{mode:?}");
            origin.await.unwrap()
        };
        let got = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: timed out\n{}", s.logs()));
        assert_eq!(got, ["early", "second", "third"], "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_frame_in_the_101_segment_arrives_first() {
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let origin = tokio::spawn(async move {
            // The 101 and the first frame leave in one write, one segment.
            let (mut o, _, _) = raw_origin(&l, &frame(1, b"with-101", false)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            o.write_all(&frame(1, b"later-1", false)).await.unwrap();
            o.write_all(&frame(1, b"later-2", false)).await.unwrap();
            // Keep the socket open until the client is done.
            let mut b = [0u8; 1];
            let _ = o.read(&mut b).await;
        });
        let run = async {
            let (ws, _) = tokio_tungstenite::connect_async(s.url()).await.unwrap();
            let mut ws = ws;
            let mut got = Vec::new();
            for _ in 0..3 {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => got.push(t.to_string()),
                    other => panic!("client: unexpected {other:?}"),
                }
            }
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: timed out\n{}", s.logs()));
        assert_eq!(got, ["with-101", "later-1", "later-2"], "{mode:?}");
        origin.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_do_not_wait_for_a_next_segment() {
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let run = async {
            // The origin answers 101 plus one frame and then stays silent;
            // the client sends its frame right behind the 101 and waits.
            let origin = async {
                let (mut o, _, rest) = raw_origin(&l, &frame(2, b"hello-client", false)).await;
                let want = frame(2, b"hello-origin", true);
                let mut got = rest;
                while got.len() < want.len() {
                    let mut b = [0u8; 64];
                    let n = o.read(&mut b).await.unwrap();
                    assert!(n > 0, "origin: closed early");
                    got.extend_from_slice(&b[..n]);
                }
                assert_eq!(got, want);
                o
            };
            let client = async {
                let (mut c, rest) = raw_client(s.addr, &frame(2, b"hello-origin", true)).await;
                let want = frame(2, b"hello-client", false);
                let mut got = rest;
                while got.len() < want.len() {
                    let mut b = [0u8; 64];
                    let n = c.read(&mut b).await.unwrap();
                    assert!(n > 0, "client: closed early");
                    got.extend_from_slice(&b[..n]);
                }
                assert_eq!(got, want);
                c
            };
            tokio::join!(origin, client)
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: early bytes were held back\n{}", s.logs()));
    }
}

/// A client that pipelines 4 MiB behind its request while the origin takes
/// 300 ms to answer: most of it waits in the proxy's receive queue at the
/// hand-off, far more than one read of the hand-off's buffer. It must all
/// arrive, once and in order, on every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pipelined_burst_arrives_whole_and_in_order() {
    const BURST: usize = 4 << 20;
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let mut burst = vec![0u8; BURST];
        Prng::new(7).fill(&mut burst);
        let want = burst.clone();
        let origin = tokio::spawn(async move {
            let (mut st, _) = l.accept().await.unwrap();
            // Let the burst pile up before the 101.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (head, mut got) = read_head(&mut st).await;
            st.write_all(switching_protocols(&head).as_bytes())
                .await
                .unwrap();
            let mut chunk = vec![0u8; 1 << 16];
            while got.len() < BURST {
                let n = st.read(&mut chunk).await.unwrap();
                assert!(n > 0, "origin: EOF after {} bytes", got.len());
                got.extend_from_slice(&chunk[..n]);
            }
            // Hold the connection until the client has seen the answer.
            st.write_all(b"ok").await.unwrap();
            let _ = st.read(&mut chunk).await;
            got
        });
        let run = async {
            let (mut c, rest) = raw_client(s.addr, &burst).await;
            let mut ok = rest;
            while ok.len() < 2 {
                let mut b = [0u8; 2];
                let n = c.read(&mut b).await.unwrap();
                assert!(n > 0, "client: EOF before the answer");
                ok.extend_from_slice(&b[..n]);
            }
            assert_eq!(ok, b"ok", "{mode:?}");
            drop(c);
            origin.await.unwrap()
        };
        let got = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: timed out\n{}", s.logs()));
        assert_eq!(got.len(), BURST, "{mode:?}");
        let at = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(at, None, "{mode:?}: bytes differ from offset {at:?}");
    }
}
