//! What a session costs in TCP segments on the proxy's two legs, counted by
//! the peers' kernels (`tcpi_segs_in`). Short sessions are mostly
//! handshakes and closes, so each ACK that goes alone is a good share of
//! their packets (W4 in the bench: 28 segments per session through nginx,
//! 25 through Sluice).
//!
//! - The ACK of the client's request rides on the 101, and the ACK that
//!   ends the TCP handshake with the origin rides on the forwarded request
//!   (HAProxy's `tcp-smart-accept` and `tcp-smart-connect`).
//! - A FIN that reaches the user-space relay with the last bytes leaves
//!   with them, in one segment.

use std::os::fd::AsRawFd;
use std::time::Duration;

use sluice_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Segments this socket has received so far (`tcpi_segs_in`, Linux 4.2+).
fn segs_in(s: &TcpStream) -> u32 {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_segs_in
    }
}

/// Rounds per mode in the ACK test; a delayed ACK may go alone when its
/// 40 ms timer fires first (a stalled CI machine), so a few may miss.
const ROUNDS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_acks_ride_on_data_on_every_path() {
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let (mut lone_client_acks, mut lone_origin_acks) = (0, 0);
        for round in 0..ROUNDS {
            let origin = async {
                let (mut o, _) = l.accept().await.unwrap();
                let (head, _) = read_head(&mut o).await;
                // The SYN and the request; the handshake's last ACK rode
                // on the request.
                let segs = segs_in(&o);
                o.write_all(switching_protocols(&head).as_bytes())
                    .await
                    .unwrap();
                (o, segs)
            };
            let client = async {
                let mut c = TcpStream::connect(s.addr).await.unwrap();
                let before = segs_in(&c);
                c.write_all(upgrade_request(&s.addr.to_string()).as_bytes())
                    .await
                    .unwrap();
                let (head, _) = read_head(&mut c).await;
                assert!(head.starts_with("HTTP/1.1 101"), "{mode:?}: {head}");
                let segs = segs_in(&c) - before;
                (c, segs)
            };
            let ((_o, origin_segs), (_c, client_segs)) =
                tokio::time::timeout(Duration::from_secs(20), async {
                    tokio::join!(origin, client)
                })
                .await
                .unwrap_or_else(|_| panic!("{mode:?} round {round}: timed out\n{}", s.logs()));
            // The 101 alone, or an ACK of the request before it.
            assert!(
                (1..=2).contains(&client_segs),
                "{mode:?}: {client_segs} segments"
            );
            lone_client_acks += usize::from(client_segs == 2);
            assert!(
                (2..=3).contains(&origin_segs),
                "{mode:?}: {origin_segs} segments"
            );
            lone_origin_acks += usize::from(origin_segs == 3);
        }
        assert!(
            lone_client_acks <= 2,
            "{mode:?}: the ACK of the request went alone in {lone_client_acks} of {ROUNDS} sessions"
        );
        assert!(
            lone_origin_acks <= 2,
            "{mode:?}: the origin's handshake ended with an ACK alone in \
             {lone_origin_acks} of {ROUNDS} sessions"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fin_behind_the_last_bytes_leaves_with_them() {
    for mode in modes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let run = async {
            let origin = async {
                let (o, _, _) = raw_origin(&l, b"").await;
                o
            };
            let (o, (mut c, _)) = tokio::join!(origin, raw_client(s.addr, b""));
            quiet().await;
            let before = segs_in(&c);
            // A close frame and the FIN in one segment: MSG_MORE holds the
            // bytes until shutdown adds the FIN.
            let close = frame(8, &1000u16.to_be_bytes(), false);
            let sock = socket2::SockRef::from(&o);
            assert_eq!(
                sock.send_with_flags(&close, libc::MSG_MORE).unwrap(),
                close.len()
            );
            sock.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, close, "{mode:?}");
            let segs = segs_in(&c) - before;
            drop(c);
            let mut rest = Vec::new();
            let mut o = o;
            o.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{mode:?}");
            segs
        };
        let segs = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: timed out\n{}", s.logs()));
        // The bytes and the FIN in one segment wherever user space relays
        // (and on tcpsplice, which passes the origin's segment whole).
        // sockmap redirects the bytes in the kernel before user space sees
        // the FIN, and the uring relay learns of it one read later: two
        // segments there, which this does not assert.
        if matches!(mode, Mode::Sockmap | Mode::Uring) {
            eprintln!("{mode:?}: the close frame and the FIN came in {segs} segment(s)");
        } else {
            assert_eq!(
                segs, 1,
                "{mode:?}: the close frame and the FIN came in {segs} segments"
            );
        }
    }
}
