//! A reader that stalls and then catches up, in both directions at once,
//! loses no byte and reorders none on any path.
//!
//! Each side streams a counting pattern (byte offset / 8 as little-endian
//! u64s), so a missing or repeated skb shows as the exact offset where the
//! pattern breaks. Each reader first sleeps, so the sender gets far ahead:
//! on sockmap that is what moves a direction out of the kernel mid-stream
//! (the detach in `datapath::sockmap`), and the test checks that it did.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The per-direction bound: a quarter of the default, so that a 400 ms
/// stall puts the sender far past half of it on every path.
const BOUND: u64 = 8 << 20;
/// Bytes each side sends per round.
const LEN: u64 = 48 << 20;
/// How long each reader waits before it starts reading.
const STALL: Duration = Duration::from_millis(400);
const ROUNDS: usize = 6;
/// A round that takes longer than this has stalled for good.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

/// How many daemon log lines contain every one of `needles`.
fn log_lines(s: &Sluice, needles: &[&str]) -> usize {
    s.logs()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

async fn round(proxy: SocketAddr, l: &TcpListener) -> [(Option<u64>, u64); 2] {
    let ((c, _), (o, _, _)) = tokio::join!(raw_client(proxy, b""), raw_origin(l, b""));
    let (c_rd, c_wr) = TcpStream::into_split(c);
    let (o_rd, o_wr) = TcpStream::into_split(o);
    // Every mode's own path carries the round (see `quiet`).
    quiet().await;
    let work = async {
        let (_, _, at_origin, at_client) = tokio::join!(
            send_pattern(c_wr, LEN, 1 << 20),
            send_pattern(o_wr, LEN, 1 << 20),
            check_pattern(o_rd, STALL, 1 << 20),
            check_pattern(c_rd, STALL, 1 << 20)
        );
        [at_origin, at_client]
    };
    tokio::time::timeout(ROUND_LIMIT, work)
        .await
        .expect("a round stalled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_catches_up_without_loss_on_every_path() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let oa = l.local_addr().unwrap();
    for mode in modes() {
        let s = Sluice::start_bounded(mode, oa, BOUND);
        for r in 0..ROUNDS {
            let [to_origin, to_client] = round(s.addr, &l).await;
            for (name, (bad, read)) in [
                ("client -> origin", to_origin),
                ("origin -> client", to_client),
            ] {
                assert_eq!(
                    bad,
                    None,
                    "{mode:?} round {r}: {name} pattern breaks at byte {bad:?}\n{}",
                    s.logs()
                );
                assert_eq!(
                    read, LEN,
                    "{mode:?} round {r}: {name} read {read} of {LEN} bytes"
                );
            }
        }
        s.wait_log_count(&["closed:"], ROUNDS, Duration::from_secs(5));
        let own = format!("datapath={}", expected_path(mode));
        let carried = log_lines(&s, &["closed:", &own]);
        assert_eq!(
            carried,
            ROUNDS,
            "{mode:?}: not every round on its path:\n{}",
            s.logs()
        );
        if mode == Mode::Sockmap {
            // Every session has logged its close, so every move is logged too.
            // The stall really moved directions out of the kernel mid-stream.
            let moved = log_lines(&s, &["continues in user space"]);
            eprintln!(
                "slow reader {mode:?}: {moved} directions moved to user space in {ROUNDS} rounds"
            );
            assert!(
                moved >= ROUNDS,
                "only {moved} directions moved to user space:\n{}",
                s.logs()
            );
            assert!(!s.logs().contains("resetting"), "{}", s.logs());
            // Both directions streamed in user space, so the pair left the
            // maps for the next relay mid-stream (unless a round's last
            // bytes came first), and the pattern above still held.
            let left = log_lines(&s, &["connection leaves sockmap for the"]);
            eprintln!("slow reader {mode:?}: {left} of {ROUNDS} pairs left the maps mid-stream");
            assert!(left >= 1, "no pair left the maps:\n{}", s.logs());
        }
        eprintln!(
            "slow reader {mode:?}: {ROUNDS} rounds of 2 x {} MiB exact",
            LEN >> 20
        );
    }
}

/// The client half-closes right after the hand-off; the origin then streams
/// into it while it stalls. On sockmap the FIN leaves the origin's socket half-closed, where
/// it could no longer leave the kernel, so the origin -> client direction
/// moves to user space before the FIN goes out (and is held back there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_with_a_stalled_reader_gets_every_byte_on_every_path() {
    const HALF_ROUNDS: usize = 3;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let oa = l.local_addr().unwrap();
    for mode in modes() {
        let s = Sluice::start_bounded(mode, oa, BOUND);
        for r in 0..HALF_ROUNDS {
            let ((c, _), (o, _, _)) = tokio::join!(raw_client(s.addr, b""), raw_origin(&l, b""));
            let (c_rd, mut c_wr) = TcpStream::into_split(c);
            let (mut o_rd, o_wr) = TcpStream::into_split(o);
            // After the hand-off: a socket that is no longer ESTABLISHED
            // cannot join the sockhash (the pair would fall back to uring),
            // and tcpsplice joins only an open session.
            quiet().await;
            c_wr.shutdown().await.unwrap();
            let work = async {
                let origin = async {
                    let mut b = [0u8; 64];
                    let n = o_rd.read(&mut b).await.unwrap();
                    assert_eq!(n, 0, "the origin expected EOF first");
                    send_pattern(o_wr, LEN, 1 << 20).await;
                };
                tokio::join!(origin, check_pattern(c_rd, STALL, 1 << 20)).1
            };
            let (bad, read) = tokio::time::timeout(ROUND_LIMIT, work)
                .await
                .expect("a round stalled");
            assert_eq!(
                bad,
                None,
                "{mode:?} round {r}: pattern breaks at byte {bad:?}\n{}",
                s.logs()
            );
            assert_eq!(read, LEN, "{mode:?} round {r}: read {read} of {LEN} bytes");
        }
        s.wait_log_count(&["closed:"], HALF_ROUNDS, Duration::from_secs(5));
        let own = format!("datapath={}", expected_path(mode));
        let carried = log_lines(&s, &["closed:", &own]);
        if mode != Mode::Sockmap {
            // (On sockmap a round may fall back to uring; checked below.)
            assert_eq!(
                carried,
                HALF_ROUNDS,
                "{mode:?}: not every round on its path:\n{}",
                s.logs()
            );
        }
        if mode == Mode::Sockmap {
            s.wait_log_count(&["closed:"], HALF_ROUNDS, Duration::from_secs(5));
            let moved = log_lines(
                &s,
                &["origin -> client: the other direction half-closed; this direction continues in user space"],
            );
            let kernel = log_lines(&s, &["closed:", "datapath=sockmap"]);
            assert!(
                kernel >= 1,
                "no round was relayed by sockmap:\n{}",
                s.logs()
            );
            assert_eq!(moved, kernel, "{}", s.logs());
            assert!(!s.logs().contains("resetting"), "{}", s.logs());
        }
        eprintln!(
            "half-closed slow reader {mode:?}: {HALF_ROUNDS} rounds of {} MiB exact",
            LEN >> 20
        );
    }
}
