//! A burst of closes: thousands of idle sessions whose clients all go away
//! at once. Every session must log its close and the daemon's fds must come
//! back to where they were, on every path.
//!
//! On uring, every idle direction waits in a poll on its worker's splice
//! ring, and the burst completes them all within milliseconds. (Here the
//! workers keep up: with the overflow fetch in `Ring::reap_from` removed
//! and a 512-entry completion queue, this test still passed. The unit test
//! `completions_past_the_queue_are_fetched_from_the_overflow_list` covers
//! that case.)

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sluice_e2e::*;
use tokio_tungstenite::tungstenite::Message;

/// Sessions in the burst, if the fd limit allows (each holds two fds here
/// and two in sluice).
const MOST: usize = 5000;
/// Opened at once.
const CONCURRENCY: usize = 64;

/// Raises this process's soft fd limit to the hard one (sluice inherits it
/// and raises its own anyway); returns how many sessions fit.
fn sessions_that_fit() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit and setrlimit to use.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    // Client and origin sockets here, plus room for the harness.
    let fit = (r.rlim_cur.saturating_sub(256) / 2) as usize;
    if fit < MOST {
        eprintln!(
            "the fd limit ({}) fits {fit} sessions, not {MOST}",
            r.rlim_cur
        );
    }
    fit.min(MOST)
}

/// Open fds of `pid` but io_uring rings: each worker sets up its splice ring
/// on the first session that needs it, which need not come before the
/// baseline.
fn fds_but_rings(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy() != "anon_inode:[io_uring]")
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_sessions_closing_at_once_leave_no_fds_behind() {
    let n = sessions_that_fit();
    assert!(n >= 1000, "the fd limit leaves room for only {n} sessions");
    let (origin, _h) = echo_origin().await;
    for mode in modes() {
        let s = Sluice::start(mode, origin);
        let pid = s.pid();
        let closes = || s.logs().matches("access: closed: ").count();
        // One session first, so the sluice's lazily set-up state is there.
        let (mut ws, _) = tokio_tungstenite::connect_async(&s.url()).await.unwrap();
        ws.send(Message::text("x")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
        drop(ws);
        eventually(
            "the first session's close line",
            Duration::from_secs(10),
            || closes() == 1,
        )
        .await;
        let fd0 = fds_but_rings(pid);

        let mut opening = tokio::task::JoinSet::new();
        for i in 0..CONCURRENCY {
            let url = s.url();
            let count = n / CONCURRENCY + usize::from(i < n % CONCURRENCY);
            opening.spawn(async move {
                let mut mine = Vec::with_capacity(count);
                for _ in 0..count {
                    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
                    ws.send(Message::text("x")).await.unwrap();
                    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
                    mine.push(ws);
                }
                mine
            });
        }
        let mut clients = Vec::with_capacity(n);
        let opened = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(r) = opening.join_next().await {
                clients.extend(r.unwrap());
            }
        })
        .await;
        assert!(
            opened.is_ok(),
            "{mode:?}: opening {n} sessions timed out\n{}",
            s.logs()
        );
        assert_eq!(clients.len(), n);
        // Long enough for every direction to count as idle (on uring: to
        // wait in a poll, without a buffer).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let open = fds_but_rings(pid);
        assert!(
            open >= fd0 + 2 * n,
            "{mode:?}: {n} open sessions, but sluice holds {open} fds against {fd0} before"
        );

        // Every client closes its socket at once (FIN, no close frame).
        drop(clients);
        let mut last = (0, 0);
        let back = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                last = (fds_but_rings(pid), closes());
                if last == (fd0, n + 1) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            back.is_ok(),
            "{mode:?}: 30 s after {n} clients closed, sluice holds {} fds (before: {fd0}) \
             and logged {} of {} closes",
            last.0,
            last.1,
            n + 1
        );
        eprintln!("idle burst {mode:?}: {n} sessions closed, fds back to {fd0}");
    }
}
