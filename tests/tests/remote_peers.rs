//! Peers on other hosts, as at an edge: the client and the origin each in
//! a network namespace of their own, the proxy in a third, joined to each
//! by a veth pair. The proxy's namespace does not forward packets, so every
//! byte goes through the proxy; on the tcpsplice path, through the
//! program's rewrite and its redirect out of the other peer's interface.
//!
//! On every path, a Python `websockets` client sends random 1 MiB binary
//! messages and small text ones to a Python `websockets` echo origin, and
//! compares each echo; the close line must name the mode's own path.
//! Two cases tcpsplice does not join, says why, and leaves to the relay: the
//! origin on the proxy's own loopback (one peer on this host, one
//! elsewhere), and an origin link with a smaller MTU than the client's.
//!
//! Needs root (`ip netns`); run without it, the test says so and returns.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
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
        let t = Topology {
            prefix: format!("sluice-t{}", std::process::id()),
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
        let out = Command::new("timeout")
            .args(["120", "ip", "netns", "exec", &self.ns("cli"), "python3"])
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
    let origin_addr: SocketAddr = ORIGIN.parse().unwrap();
    let _origin = PyOrigin::start_at(Some(&t.ns("org")), origin_addr);
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
            for iface in ["c1", "o1"] {
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
            "{mode:?}: connections stayed open in the proxy's namespace"
        );
    }
}

#[test]
fn a_session_with_one_peer_on_this_host_stays_in_the_relay() {
    // The origin on the proxy's own loopback; the client elsewhere.
    stays_in_the_relay(
        |t| (t.ns("px"), "127.0.0.1:9000".parse().unwrap()),
        "one peer is on this host",
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
        "smaller MTU on one side",
    );
}

/// A session tcpsplice must not join: `place` sets the topology up and
/// says where the origin runs; the relay carries the session whole, and
/// the log says `why`.
fn stays_in_the_relay(place: impl FnOnce(&Topology) -> (String, SocketAddr), why: &str) {
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
    let got = t.client(&format!("ws://{PROXY}/"));
    assert_eq!(got, all_echoed(), "{}", s.logs());
    let line = s.wait_log("closed:", Duration::from_secs(10));
    assert!(line.contains("closed: closed"), "{line}");
    assert!(line.contains("datapath=userspace"), "{line}");
    s.wait_log(why, Duration::from_secs(5));
}
