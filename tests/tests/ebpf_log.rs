//! aya-log records from the verdict program reach the daemon's log. The
//! verdict logs at debug level each time a direction reaches its refill
//! mark (every eighth of `sockmap_max_queued`), so a client pushing a few
//! marks' worth makes it speak.

use std::time::Duration;

use sluice_e2e::*;
use tokio::io::AsyncWriteExt;
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
            "[limits]\nsockmap_max_queued = 16777216\n[[listeners]]\nlisten = \"{a}\"\norigin = \"{oa}\"\n"
        )
    });
    let (c, o) = tokio::join!(raw_client(s.addr, b""), raw_origin(&l, b""));
    let ((mut c, _), (_o, _, _)) = (c, o);
    // 8 MiB passes four marks of 2 MiB, well short of the 16 MiB valve.
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..8 {
        if tokio::time::timeout(Duration::from_millis(500), c.write_all(&chunk))
            .await
            .is_err()
        {
            break;
        }
    }
    let line = s.wait_log("reached its refill mark", Duration::from_secs(10));
    assert!(line.contains("DEBUG"), "{line}");
}
