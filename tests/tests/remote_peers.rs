//! Peers on other hosts, as at an edge: the client and the origin each in
//! a network namespace of their own, the proxy in a third, joined to each
//! by a veth pair. The proxy's namespace does not forward packets, so every
//! byte goes through the proxy; on the tcpsplice path, through the
//! program's rewrite and its redirect out of the other peer's interface.
//!
//! On every path, a Python `websockets` client sends random 1 MiB binary
//! messages and small text ones to a Python `websockets` echo origin, and
//! compares each echo; the close line must name the mode's own path.
//! `the_three_relay_traps_between_hosts` covers the traps of
//! `../shared/datapath-facts.md` across hosts, on every path.
//!
//! The same runs with the origin on the proxy's host (on its loopback, and
//! on its own address): tcpsplice joins these too.
//!
//! Three cases tcpsplice does not join, says why, and leaves to the relay: a
//! client on the proxy's host with an origin elsewhere (the client's
//! segments on `lo` are too large for the origin's link), an origin link
//! with a smaller MTU than the client's, and an origin that announces a
//! smaller MSS than the client may send.
//!
//! Needs root (`ip netns`); run without it, the test says so and returns.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use sluice_e2e::*;

/// Random 1 MiB messages each way per session.
const BULK_MIB: u32 = 32;
const PROXY: &str = "10.77.1.1:8080";
const ORIGIN: &str = "10.77.2.2:9000";

/// Three namespaces (client, proxy, origin) and the veth pairs between
/// them; removed on drop, with whatever still runs in them.
struct Topology {
    prefix: String,
}

impl Topology {
    fn new() -> Topology {
        // Tests of this file may run at once (plain `cargo test`).
        static MADE: AtomicU32 = AtomicU32::new(0);
        let t = Topology {
            prefix: format!(
                "sluice-t{}-{}",
                std::process::id(),
                MADE.fetch_add(1, Ordering::SeqCst)
            ),
        };
        let (c, p, o) = (t.ns("cli"), t.ns("px"), t.ns("org"));
        for ns in [&c, &p, &o] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Names are per namespace: the pairs are made inside theirs.
        for (peer, near, far, net) in [(&c, "c0", "c1", 1), (&o, "o0", "o1", 2)] {
            ip(&[
                "link", "add", near, "netns", peer, "type", "veth", "peer", "name", far, "netns",
                &p,
            ]);
            let peer_addr = format!("10.77.{net}.2/24");
            let proxy_addr = format!("10.77.{net}.1/24");
            ip(&["-n", peer, "addr", "add", &peer_addr, "dev", near]);
            ip(&["-n", &p, "addr", "add", &proxy_addr, "dev", far]);
            ip(&["-n", peer, "link", "set", near, "up"]);
            ip(&["-n", &p, "link", "set", far, "up"]);
            let gw = format!("10.77.{net}.1");
            ip(&["-n", peer, "route", "add", "default", "via", &gw]);
        }
        t
    }

    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }

    /// Runs the Python client's `bulk` conversation from the client's
    /// namespace; its JSON line.
    fn client(&self, url: &str) -> String {
        self.client_in("cli", url)
    }

    /// The same from namespace `which`.
    fn client_in(&self, which: &str, url: &str) -> String {
        let out = Command::new("timeout")
            .args(["120", "ip", "netns", "exec", &self.ns(which), "python3"])
            .arg(peer_script())
            .args(["bulk", url, &BULK_MIB.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .expect("run the Python client");
        assert!(out.status.success(), "the Python client failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The proxy namespace's established TCP connections (not listeners).
    fn proxy_connections(&self) -> usize {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("px"),
                "ss",
                "-Htn",
                "state",
                "established",
            ])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for w in ["cli", "px", "org"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(w)])
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the client prints when every echo matched.
fn all_echoed() -> String {
    format!(r#"{{"bulk": {BULK_MIB}, "small": 200, "text": "hello", "close_code": 1000}}"#)
}

/// The `bytes_in=` figure of a close line.
fn bytes_in(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("bytes_in="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no bytes_in in {line}"))
}

#[test]
fn every_path_carries_a_session_between_peers_on_other_hosts() {
    if !is_root() {
        eprintln!("SKIP: network namespaces need root; CI runs as root");
        return;
    }
    let t = Topology::new();
    every_path_carries(&t, "org", ORIGIN.parse().unwrap(), &["c1", "o1"]);
}

/// The client elsewhere, the origin on the proxy's host (an app behind its
/// edge proxy): on tcpsplice the client's packets go into `lo`'s receive
/// path, and the origin's leave by the client's interface. The origin
/// listens on the proxy's loopback, then on the proxy's own address on
/// the clients' link (also reached over `lo`).
#[test]
fn every_path_carries_a_session_to_an_origin_on_the_proxys_host() {
    if !is_root() {
        eprintln!("SKIP: network namespaces need root; CI runs as root");
        return;
    }
    let t = Topology::new();
    for origin in ["127.0.0.1:9000", "10.77.1.1:9001"] {
        every_path_carries(&t, "px", origin.parse().unwrap(), &["c1"]);
    }
}

/// On every path, the client's `bulk` conversation with a Python origin
/// at `origin_addr` in namespace `origin_ns` (of `t`): every echo, a close
/// line of the mode's own path counting what was sent, and no connection
/// left in the proxy's namespace. On tcpsplice, the log names `ifaces`
/// among those the program is on.
fn every_path_carries(t: &Topology, origin_ns: &str, origin_addr: SocketAddr, ifaces: &[&str]) {
    let _origin = PyOrigin::start_at(Some(&t.ns(origin_ns)), origin_addr);
    for mode in modes() {
        let s = Sluice::start_in_netns(mode, &t.ns("px"), PROXY.parse().unwrap(), origin_addr);
        let got = t.client(&format!("ws://{PROXY}/"));
        assert_eq!(got, all_echoed(), "{mode:?}\n{}", s.logs());
        let line = s.wait_log("closed:", Duration::from_secs(10));
        assert!(line.contains("closed: closed"), "{mode:?}: {line}");
        s.assert_own_path(&line);
        assert!(
            bytes_in(&line) >= u64::from(BULK_MIB) << 20,
            "{mode:?}: the close line counts less than was sent: {line}"
        );
        if mode == Mode::Tcpsplice {
            for iface in ifaces {
                assert!(
                    s.logs().contains(iface),
                    "the program is not attached to {iface}:\n{}",
                    s.logs()
                );
            }
        }
        // Spliced sockets close after their linger (1 s); relayed ones at once.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while t.proxy_connections() > 0 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            t.proxy_connections(),
            0,
            "{mode:?} to {origin_addr}: connections stayed open in the proxy's namespace"
        );
    }
}

/// Bytes each way in [`the_three_relay_traps_between_hosts`]: more than
/// [`HELD`], so a path without backpressure would take it all in.
const STREAM: u64 = 256 << 20;
/// How long the origin leaves its socket unread.
const STALL: Duration = Duration::from_secs(1);
/// Most the client may write while the origin reads nothing: the peers'
/// and a relay's socket buffers and its bounded buffer
/// (`limits.max_buffer_per_direction`, 32 MiB by default), with room. A
/// relay without backpressure takes in everything (the naive sockmap relay
/// took 2.2 GiB in 5 s).
const HELD: u64 = 96 << 20;

/// The three traps of a naive sockmap relay, on every path, with peers on
/// other hosts (tcpsplice: through the redirect):
/// - bytes that came with the handshake (a client frame pipelined after the
///   request, an origin frame in the 101's segment) arrive first;
/// - backpressure: while the origin reads nothing for a second, the client
///   gets at most [`HELD`] of [`STREAM`] out;
/// - half-close: each side sends [`STREAM`] bytes of a counting pattern and
///   FIN at once, and each sees EOF only after every byte, in order.
#[test]
fn the_three_relay_traps_between_hosts() {
    if !is_root() {
        eprintln!("SKIP: network namespaces need root; CI runs as root");
        return;
    }
    relay_traps(&Topology::new(), "org", "10.77.2.2:9001".parse().unwrap());
}

/// The same with the origin on the proxy's loopback (tcpsplice: the
/// client's packets go out of `lo` to it).
#[test]
fn the_three_relay_traps_with_the_origin_on_the_proxys_host() {
    if !is_root() {
        eprintln!("SKIP: network namespaces need root; CI runs as root");
        return;
    }
    relay_traps(&Topology::new(), "px", "127.0.0.1:9001".parse().unwrap());
}

/// The three traps on every path, with the origin at `origin_addr` in
/// namespace `origin_ns` of `t`, and the client in its own.
fn relay_traps(t: &Topology, origin_ns: &str, origin_addr: SocketAddr) {
    // How far the client's pattern got: the client's thread writes it, the
    // origin's reads it when its stall ends. One per run: the tests of
    // this file may run at once.
    let client_written: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let client_frame = frame(2, b"pipelined after the request", true);
    let origin_frame = frame(2, b"in the 101's segment", false);
    let (listening, ready) = std::sync::mpsc::channel();
    let n = modes().len();
    let origin = {
        let (client_frame, origin_frame) = (client_frame.clone(), origin_frame.clone());
        in_netns(&t.ns(origin_ns), move || async move {
            let l = tokio::net::TcpListener::bind(origin_addr).await.unwrap();
            listening.send(()).unwrap();
            // One session per mode.
            let mut sessions = Vec::new();
            for _ in 0..n {
                let (o, _, ahead) = raw_origin(&l, &origin_frame).await;
                sessions.push(origin_side(o, ahead, &client_frame, client_written).await);
            }
            sessions
        })
    };
    ready.recv().unwrap();
    for mode in modes() {
        let s = Sluice::start_in_netns(mode, &t.ns("px"), PROXY.parse().unwrap(), origin_addr);
        let (client_frame, origin_frame) = (client_frame.clone(), origin_frame.clone());
        client_written.store(0, Ordering::SeqCst);
        let got = in_netns(&t.ns("cli"), move || async move {
            let (c, ahead) = raw_client(PROXY.parse().unwrap(), &client_frame).await;
            let (mut cr, cw) = c.into_split();
            let ahead = read_exactly(&mut cr, ahead, origin_frame.len()).await;
            assert_eq!(ahead, origin_frame, "the origin's frame first");
            quiet().await;
            let (_, checked) = tokio::join!(
                send_pattern_counted(cw, STREAM, 64 << 10, client_written),
                check_pattern(cr, Duration::ZERO, 256 << 10),
            );
            checked
        })
        .join()
        .unwrap_or_else(|_| panic!("{mode:?}: the client failed\n{}", s.logs()));
        assert_eq!(got, (None, STREAM), "{mode:?}: origin -> client");
        let line = s.wait_log("closed:", Duration::from_secs(10));
        s.assert_own_path(&line);
    }
    let sessions = origin.join().expect("the origin");
    assert_eq!(sessions.len(), modes().len(), "one session per mode");
    for (mode, (held, checked)) in modes().into_iter().zip(sessions) {
        eprintln!(
            "remote traps {mode:?}, origin {origin_addr}: the client got {} KiB of {} MiB out \
             during the stall",
            held >> 10,
            STREAM >> 20
        );
        assert!(
            held <= HELD,
            "{mode:?}: the client wrote {held} bytes while the origin read nothing"
        );
        assert_eq!(checked, (None, STREAM), "{mode:?}: client -> origin");
    }
}

/// The origin's half of a session: the client's frame first, then a
/// stall, then the pattern to EOF while sending its own. Returns what the
/// client had written (`client_written`) when the stall ended, and the
/// check of what came.
async fn origin_side(
    o: tokio::net::TcpStream,
    ahead: Vec<u8>,
    client_frame: &[u8],
    client_written: &AtomicU64,
) -> (u64, (Option<u64>, u64)) {
    let (mut or, ow) = o.into_split();
    let ahead = read_exactly(&mut or, ahead, client_frame.len()).await;
    assert_eq!(ahead, client_frame, "the client's frame first");
    // The client's pattern starts after its quiet moment; the origin's
    // after the same moment, so both directions stream at once.
    quiet().await;
    let sent = tokio::spawn(send_pattern(ow, STREAM, 1 << 20));
    tokio::time::sleep(STALL).await;
    let written = client_written.load(Ordering::SeqCst);
    let checked = check_pattern(or, Duration::ZERO, 256 << 10).await;
    sent.await.unwrap();
    (written, checked)
}

/// Reads until `have` holds `n` bytes; returns exactly those (the test's
/// peers send nothing else before the pattern).
async fn read_exactly(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    mut have: Vec<u8>,
    n: usize,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    while have.len() < n {
        let mut buf = vec![0u8; n - have.len()];
        let got = r.read(&mut buf).await.unwrap();
        assert!(got > 0, "EOF before the handshake's bytes");
        have.extend_from_slice(&buf[..got]);
    }
    have
}

#[test]
fn a_client_on_the_proxys_host_with_an_origin_elsewhere_stays_in_the_relay() {
    // The client's segments on `lo` are up to 64 KiB; the origin's link
    // takes 1,500 bytes.
    stays_in_the_relay(
        |t| (t.ns("org"), ORIGIN.parse().unwrap()),
        "px",
        "-byte packets, and the other takes 1500",
    );
}

#[test]
fn peers_whose_paths_differ_in_mtu_stay_in_the_relay() {
    // The origin's link takes smaller packets than the client's sends.
    stays_in_the_relay(
        |t| {
            ip(&["-n", &t.ns("px"), "link", "set", "o1", "mtu", "1400"]);
            ip(&["-n", &t.ns("org"), "link", "set", "o0", "mtu", "1400"]);
            (t.ns("org"), ORIGIN.parse().unwrap())
        },
        "cli",
        "smaller MTU or MSS on one side",
    );
}

#[test]
fn an_origin_that_announces_a_smaller_mss_stays_in_the_relay() {
    // Both links take 1,500 bytes, but the origin announces an MSS of
    // 1,000 (its route's `advmss`): the client's 1,448-byte segments must
    // not reach it as they are.
    stays_in_the_relay(
        |t| {
            // The proxy's origin socket is on the origin's link: its route.
            let org = t.ns("org");
            let route = "10.77.2.0/24 dev o0 proto kernel scope link src 10.77.2.2 advmss 1000";
            let mut args = vec!["-n", &org, "route", "replace"];
            args.extend(route.split(' '));
            ip(&args);
            (t.ns("org"), ORIGIN.parse().unwrap())
        },
        "cli",
        "-byte packets, and the other takes 1040",
    );
}

/// A session tcpsplice must not join: `place` sets the topology up and
/// says where the origin runs, the client runs in namespace `client_ns`;
/// the relay carries the session whole, and the log says `why`.
fn stays_in_the_relay(
    place: impl FnOnce(&Topology) -> (String, SocketAddr),
    client_ns: &str,
    why: &str,
) {
    if !is_root() {
        eprintln!("SKIP: network namespaces need root; CI runs as root");
        return;
    }
    if !modes().contains(&Mode::Tcpsplice) {
        eprintln!("SKIP: this run does not cover tcpsplice");
        return;
    }
    let t = Topology::new();
    let (origin_ns, origin_addr) = place(&t);
    let _origin = PyOrigin::start_at(Some(&origin_ns), origin_addr);
    let s = Sluice::start_in_netns(
        Mode::Tcpsplice,
        &t.ns("px"),
        PROXY.parse().unwrap(),
        origin_addr,
    );
    let got = t.client_in(client_ns, &format!("ws://{PROXY}/"));
    assert_eq!(got, all_echoed(), "{}", s.logs());
    let line = s.wait_log("closed:", Duration::from_secs(10));
    assert!(line.contains("closed: closed"), "{line}");
    assert!(line.contains("datapath=userspace"), "{line}");
    s.wait_log(why, Duration::from_secs(5));
}
