//! aya-log records from the verdict program reach the daemon's log. The
//! verdict logs at debug level each time a direction reaches its refill
//! mark (every eighth of `sockmap_max_queued`, here 8 MiB: below the 16 MiB
//! at which a direction moves to user space), so a client pushing a few
//! marks' worth makes it speak. Bytes that arrive before the socket joins
//! the map go through user space and never meet the verdict, and how many
//! that is depends on timing; so the client pushes until the record shows
//! (bounded), into an origin that reads everything.

use std::time::Duration;

use sluice_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdict_log_records_reach_the_daemon_log() {
    if !is_root() {
        eprintln!("SKIP: the sockmap path needs root to load eBPF; CI runs as root and covers it");
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let oa = l.local_addr().unwrap();
    let filter = "info,sluice_ebpf=debug,proxy_ebpf=debug";
    let s = Sluice::start_config_logging(Mode::Sockmap, filter, |a| {
        format!(
            "[limits]\nsockmap_max_queued = 67108864\n[[listeners]]\nlisten = \"{a}\"\norigin = \"{oa}\"\n"
        )
    });
    let (c, o) = tokio::join!(raw_client(s.addr, b""), raw_origin(&l, b""));
    let ((mut c, _), (mut o, _, _)) = (c, o);
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        while let Ok(n @ 1..) = o.read(&mut buf).await {
            total += n as u64;
        }
        total
    });
    const NEEDLE: &str = "reached its refill mark";
    // At most the client socket's receive buffer (8 MiB) goes through user
    // space before the join, so 64 MiB leaves several marks to the verdict.
    let chunk = vec![7u8; 1 << 20];
    let mut sent = 0u64;
    while sent < 64 << 20 && !s.logs().contains(NEEDLE) {
        tokio::time::timeout(Duration::from_secs(10), c.write_all(&chunk))
            .await
            .unwrap_or_else(|_| panic!("the relay stopped taking bytes\n{}", s.logs()))
            .expect("client write");
        sent += chunk.len() as u64;
    }
    let line = s.wait_log(NEEDLE, Duration::from_secs(10));
    assert!(line.contains("DEBUG"), "{line}");
    c.shutdown().await.expect("client FIN");
    let got = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the origin got its FIN")
        .expect("drain task");
    assert_eq!(got, sent, "the origin got every byte the client sent");
}
