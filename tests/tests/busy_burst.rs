//! A burst of busy sessions leaves no memory pinned: 400 sessions echo
//! 16 KiB messages for 2 s and close; the daemon's fds then come back
//! exactly, and its RSS to within 8 MiB, of where they were after a
//! warm-up, on every path. The
//! burst's relay buffers alone come to 25 MiB (800 directions × 32 KiB on
//! uring, which keeps only a few for the next busy directions).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sluice_e2e::*;
use tokio_tungstenite::tungstenite::Message;

const BURST: usize = 400;
const WARM_UP: usize = 40;
const MESSAGE: usize = 16 << 10;
/// What the burst may leave behind: allocator high-water marks and the
/// buffers a worker keeps.
const SLACK: u64 = 8 << 20;

/// `n` sessions that each echo `MESSAGE`-byte messages until `busy` has
/// passed, then close. Returns the messages echoed.
async fn burst(url: &str, n: usize, busy: Duration) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    for i in 0..n {
        let (url, start) = (url.to_string(), start.clone());
        tasks.spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
            let msg = vec![i as u8; MESSAGE];
            // Busy all at once: every direction holds a buffer together.
            start.wait().await;
            let end = Instant::now() + busy;
            let mut echoed = 0;
            while Instant::now() < end {
                ws.send(Message::binary(msg.clone())).await.unwrap();
                let back = ws.next().await.unwrap().unwrap();
                assert_eq!(back.into_data().as_ref(), &msg[..]);
                echoed += 1;
            }
            ws.close(None).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
            echoed
        });
    }
    let mut echoed = 0;
    while let Some(r) = tasks.join_next().await {
        echoed += r.unwrap();
    }
    echoed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_busy_sessions_leaves_no_memory_pinned_on_every_path() {
    let (origin, _h) = echo_origin().await;
    for mode in modes() {
        let s = Sluice::start(mode, origin);
        let pid = s.pid();
        // What every worker sets up once, at its first sessions (on uring a
        // second ring each), with as many sessions as the burst but none
        // busy; then the allocator's and the pools' ordinary working set.
        for (n, busy) in [
            (BURST, Duration::ZERO),
            (WARM_UP, Duration::from_millis(500)),
        ] {
            tokio::time::timeout(Duration::from_secs(60), burst(&s.url(), n, busy))
                .await
                .unwrap_or_else(|_| panic!("{mode:?}: warm-up timed out\n{}", s.logs()));
        }
        // Past a spliced close's linger.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (fd0, rss0) = (fd_count(pid), rss(pid));
        let echoed = tokio::time::timeout(
            Duration::from_secs(120),
            burst(&s.url(), BURST, Duration::from_secs(2)),
        )
        .await
        .unwrap_or_else(|_| panic!("{mode:?}: burst timed out\n{}", s.logs()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (fd1, rss1) = (fd_count(pid), rss(pid));
        eprintln!(
            "busy_burst {mode:?}: {BURST} sessions echoed {echoed} x {MESSAGE} B; \
             fds {fd0} -> {fd1}, rss {rss0} -> {rss1} bytes"
        );
        assert!(echoed >= BURST, "{mode:?}: only {echoed} echoes");
        assert_eq!(fd1, fd0, "{mode:?}: fds leaked");
        assert!(
            rss1 <= rss0 + SLACK,
            "{mode:?}: the burst left {} MiB pinned (rss {rss0} -> {rss1})",
            (rss1.saturating_sub(rss0)) >> 20
        );
        let logs = s.logs();
        let closed = logs.matches("closed: closed").count();
        let others: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("closed:") && !l.contains("closed: closed"))
            .take(10)
            .collect();
        assert!(
            closed >= WARM_UP + 2 * BURST,
            "{mode:?}: only {closed} sessions closed cleanly; others:\n{}",
            others.join("\n")
        );
    }
}
