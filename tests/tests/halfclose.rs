//! Half-close and reset, on every data path. After a real handshake the
//! bytes are not inspected, so the peers use raw sockets to control FIN
//! and RST exactly.
//!
//! - After the client sends FIN, the origin sees EOF only after it has
//!   received every byte, and the same the other way. A slow reader makes
//!   sure bytes are still queued inside the proxy when FIN arrives.
//! - A reset on one side reaches the other.
//!
//! Each session has a quiet moment first, so that every mode's own path
//! carries it (see [`quiet`]); the close lines say which one did.

use std::time::Duration;

use sluice_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const N: usize = 256 << 20;

/// Writes N seeded bytes, then FIN.
async fn send_then_fin(mut s: tokio::net::tcp::OwnedWriteHalf, seed: u64) {
    let mut prng = Prng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..N / buf.len() {
        prng.fill(&mut buf);
        s.write_all(&buf).await.unwrap();
    }
    s.shutdown().await.unwrap();
}

/// Reads to EOF (slowly at first) and checks every byte; returns the count.
async fn read_to_eof(mut s: tokio::net::tcp::OwnedReadHalf, seed: u64, ahead: Vec<u8>) -> usize {
    // Let the proxy's queues fill before reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut prng = Prng::new(seed);
    let mut want = vec![0u8; 1 << 20];
    let mut want_pos = want.len();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 << 10];
    let mut check = |data: &[u8], got: &mut usize| {
        for &b in data {
            if want_pos == want.len() {
                prng.fill(&mut want);
                want_pos = 0;
            }
            assert_eq!(b, want[want_pos], "first wrong byte at offset {got}");
            want_pos += 1;
            *got += 1;
        }
    };
    check(&ahead, &mut got);
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return got;
        }
        check(&buf[..n], &mut got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_arrives_after_every_byte_on_every_path() {
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let run = async {
            let (c, o) = tokio::join!(raw_client(s.addr, b""), raw_origin(&l, b""));
            let ((c, c_ahead), (o, _, o_ahead)) = (c, o);
            let (cr, cw) = c.into_split();
            let (or, ow) = o.into_split();
            quiet().await;
            // Client -> origin first, then origin -> client, each ending in FIN.
            let (got_o, ()) = tokio::join!(read_to_eof(or, 1, o_ahead), send_then_fin(cw, 1));
            assert_eq!(got_o, N, "{mode:?}: origin got {got_o} of {N} before EOF");
            let (got_c, ()) = tokio::join!(read_to_eof(cr, 2, c_ahead), send_then_fin(ow, 2));
            assert_eq!(got_c, N, "{mode:?}: client got {got_c} of {N} before EOF");
        };
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: timed out\n{}", s.logs()));
        let line = s.wait_log("closed:", Duration::from_secs(10));
        assert!(line.contains("closed: closed"), "{mode:?}: {line}");
        s.assert_own_path(&line);
    }
}

async fn expect_reset(s: &mut TcpStream, who: &str, mode: Mode) {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(0),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{mode:?}: {who} saw nothing"));
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{mode:?}: {who} should see a reset, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_reaches_the_other_side_on_every_path() {
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        for resetter in ["client", "origin"] {
            let (c, o) = tokio::join!(raw_client(s.addr, b""), raw_origin(&l, b""));
            let ((mut c, _), (mut o, _, _)) = (c, o);
            // Some traffic first, so the pair is in its data path.
            c.write_all(&frame(2, b"ping", true)).await.unwrap();
            let mut b = [0u8; 10];
            o.read_exact(&mut b).await.unwrap();
            quiet().await;
            let (victim, who) = if resetter == "client" {
                c.set_zero_linger().unwrap();
                drop(c);
                (&mut o, "origin")
            } else {
                o.set_zero_linger().unwrap();
                drop(o);
                (&mut c, "client")
            };
            expect_reset(victim, who, mode).await;
        }
        let line = s.wait_log("reset by origin", Duration::from_secs(5));
        assert!(line.contains("reset by origin"), "{mode:?}: {line}");
        s.assert_own_path(&line);
        let line = s.wait_log("reset by client", Duration::from_secs(5));
        s.assert_own_path(&line);
    }
}

/// A session through `s` to an origin on `l`, after a quiet moment: the
/// stream of `side` ("client" or "origin"), the other one, and its name.
async fn sides(s: &Sluice, l: &TcpListener, side: &str) -> (TcpStream, TcpStream, &'static str) {
    let (c, o) = tokio::join!(raw_client(s.addr, b""), raw_origin(l, b""));
    let ((c, _), (o, _, _)) = (c, o);
    quiet().await;
    if side == "client" {
        (c, o, "origin")
    } else {
        (o, c, "client")
    }
}

/// Bytes sent right before a reset still arrive, and then the reset: the
/// user-space relay may read both in one wake-up (the reset is reported
/// once, after the bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_bytes_before_a_reset_arrive_first_on_every_path() {
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        for resetter in ["client", "origin"] {
            let (mut r, mut victim, who) = sides(&s, &l, resetter).await;
            let last = frame(2, b"last words", resetter == "client");
            r.write_all(&last).await.unwrap();
            r.set_zero_linger().unwrap();
            drop(r);
            let mut got = vec![0u8; last.len()];
            tokio::time::timeout(Duration::from_secs(10), victim.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("{mode:?}: {who} saw nothing"))
                .unwrap_or_else(|e| panic!("{mode:?}: {who} lost the last bytes: {e}"));
            assert_eq!(got, last, "{mode:?}: {who}");
            expect_reset(&mut victim, who, mode).await;
        }
        // Each reset was taken by the mode's own path, not user space.
        for by in ["reset by client", "reset by origin"] {
            s.assert_own_path(&s.wait_log(by, Duration::from_secs(5)));
        }
    }
}

/// A reset while a direction streams (on `uring` and `userspace`, in its
/// splice rounds) reaches the reader on the other side, after the bytes
/// relayed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_reaches_the_other_side_on_every_path() {
    const BEFORE: usize = 64 << 20;
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        for streamer in ["client", "origin"] {
            let (mut w, mut victim, who) = sides(&s, &l, streamer).await;
            let stream = async move {
                let buf = vec![7u8; 1 << 20];
                for _ in 0..BEFORE / buf.len() {
                    w.write_all(&buf).await.unwrap();
                }
                w.set_zero_linger().unwrap();
                drop(w);
            };
            let (_, ()) = tokio::join!(expect_reset(&mut victim, who, mode), stream);
        }
        let line = s.wait_log("reset by origin", Duration::from_secs(5));
        assert!(line.contains("reset by origin"), "{mode:?}: {line}");
        s.assert_own_path(&line);
    }
}
