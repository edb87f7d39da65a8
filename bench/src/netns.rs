//! The run's own network namespace: the targets, the origin and the load
//! generator talk over a loopback that only this run uses, under TCP
//! settings the run names rather than the host's.
//!
//! Why: this machine kind defaults to BBR without the `fq` qdisc, so TCP
//! paces every stream itself. On loopback that held one direct stream to
//! 19-27 Gbit/s at 410-469 CPU-µs/MiB, against 41-46 Gbit/s at 156-273
//! with cubic (W1 runs, quick and full). Paced, the direct row is not the
//! physical limit the ratios are taken against, and it moves with whatever
//! the host was tuned for. Linux 2.6.24+ (`CLONE_NEWNET`), root.

use std::fs;

/// Congestion control inside the namespace: the kernel's own default,
/// which does not pace.
pub const CONGESTION: &str = "cubic";

const CC_PATH: &str = "/proc/sys/net/ipv4/tcp_congestion_control";
/// Which algorithms a namespace other than the host's may make its default
/// (a host-wide list, only in the host's namespace). A kernel built with
/// BBR as its default leaves cubic off it ("reno bbr" on this machine kind).
const ALLOWED_PATH: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// Where this run's sockets live, for the report.
#[derive(Debug, Clone)]
pub struct Network {
    /// In a namespace of its own (`false`: the host's).
    pub own: bool,
    /// With the peers of [`Remote`].
    pub remote: bool,
    /// With [`Remote`], the origin on the targets' host instead
    /// (`--origin-here`).
    pub origin_here: bool,
    /// Congestion control the run's sockets use.
    pub congestion: String,
    /// The host's congestion control.
    pub host_congestion: String,
    /// Why the run stayed in the host's namespace, if it tried to leave.
    pub why_host: Option<String>,
}

impl Network {
    /// One line for the report's header.
    pub fn describe(&self) -> String {
        if self.remote && self.origin_here {
            format!(
                "Network: clients on another host, the origin on the proxy's: the load \
                 generator (10.77.1.2) in a namespace of the run's own, joined by a veth pair \
                 (MTU 1500) to the targets' (10.77.1.1), where the origin listens on 10.77.1.1 \
                 too (the proxies reach it over `lo`, as an app behind its edge proxy); direct \
                 is the clients' connection to it; ephemeral ports 1024-65535 and tcp_tw_reuse \
                 1 in each. TCP congestion control {} (the host's is {}, which stays as it \
                 was).",
                self.congestion, self.host_congestion
            )
        } else if self.remote {
            format!(
                "Network: peers on other hosts: the load generator (10.77.1.2), the targets \
                 (10.77.1.1 and 10.77.2.1) and the origin (10.77.2.2) each in a namespace of \
                 the run's own, joined by veth pairs (MTU 1500); direct is the clients' \
                 packets routed through the targets' namespace; ephemeral ports 1024-65535 and \
                 tcp_tw_reuse 1 in each, as on an edge host. TCP congestion control {} \
                 (the host's is {}, which stays as it was).",
                self.congestion, self.host_congestion
            )
        } else if self.own {
            format!(
                "Network: a namespace of the run's own (loopback only), TCP congestion control \
                 {} (the host's is {}, which stays as it was).",
                self.congestion, self.host_congestion
            )
        } else {
            let why = self
                .why_host
                .as_deref()
                .map_or(String::new(), |w| format!(" ({w})"));
            format!(
                "Network: the host's namespace{why}, TCP congestion control {}.",
                self.congestion
            )
        }
    }
}

/// The host's namespace, as it is.
pub fn host(why: Option<String>) -> Network {
    let cc = current_congestion();
    Network {
        own: false,
        remote: false,
        origin_here: false,
        congestion: cc.clone(),
        host_congestion: cc,
        why_host: why,
    }
}

/// Moves the calling thread into a new network namespace with loopback up
/// and [`CONGESTION`]. Threads and processes it starts afterwards inherit
/// it, so call it before any of them. Without the privilege to, the thread
/// stays in the host's namespace and the result says why; `Err` only if it
/// left but loopback would not come up (nothing could connect).
pub fn enter() -> Result<Network, String> {
    enter_with(false).map(|(net, _)| net)
}

/// As [`enter`], and then the peers of [`Remote`]: two more namespaces,
/// joined to the calling thread's by veth pairs. `Err` if any step fails
/// (a run asked for peers elsewhere cannot stand in for them on loopback).
pub fn enter_remote() -> Result<(Network, Remote), String> {
    let (net, remote) = enter_with(true)?;
    match remote {
        Some(r) => Ok((net, r)),
        None => Err(format!(
            "--remote needs namespaces of the run's own: {}",
            net.describe()
        )),
    }
}

fn enter_with(remote: bool) -> Result<(Network, Option<Remote>), String> {
    let host_cc = current_congestion();
    // Opened in the host's namespace: the list is only visible there.
    let allowed = AllowedForAWhile::add(CONGESTION);
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        return Ok((host(Some(format!("unshare(CLONE_NEWNET): {e}"))), None));
    }
    loopback_up().map_err(|e| format!("bringing loopback up in the run's namespace: {e}"))?;
    // While the host's list allows cubic in every namespace.
    let peers = if remote {
        Some(Remote::set_up()?)
    } else {
        None
    };
    let set = fs::write(CC_PATH, CONGESTION);
    // The namespace keeps its default; the host's list is as it was.
    drop(allowed);
    let congestion = match set {
        Ok(()) => CONGESTION.to_string(),
        Err(e) => {
            eprintln!("sluice-bench: cannot set {CONGESTION} in the run's namespace ({e})");
            current_congestion()
        }
    };
    let net = Network {
        own: true,
        remote: peers.is_some(),
        origin_here: false,
        congestion,
        host_congestion: host_cc,
        why_host: None,
    };
    Ok((net, peers))
}

/// The address the targets listen on in a `--remote` run (their side of
/// the clients' link).
pub const PROXY_IP: [u8; 4] = [10, 77, 1, 1];
/// The origin's address in a `--remote` run.
pub const ORIGIN_IP: [u8; 4] = [10, 77, 2, 2];

/// Peers on other hosts, as at an edge: the load generator and the origin
/// each in a namespace of its own, joined to the targets' (the run's own,
/// see [`enter`]) by a veth pair: `10.77.1.2` (clients) to `10.77.1.1`,
/// and `10.77.2.1` to `10.77.2.2` (origin). The targets' namespace
/// forwards, so the direct row is the clients' packets routed to the
/// origin. A thread moves between them with [`Remote::enter`]; sockets
/// stay in the namespace they were made in, and threads and processes
/// start in their creator's. Removed on drop.
pub struct Remote {
    /// The namespaces made so far (removed on drop).
    names: Vec<String>,
    clients: Option<fs::File>,
    proxy: fs::File,
    origin: Option<fs::File>,
}

/// One of [`Remote`]'s namespaces.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The load generator's.
    Clients,
    /// The targets' (the run's own namespace).
    Proxy,
    /// The origin's.
    Origin,
}

impl Remote {
    /// Made from the targets' namespace, which the calling thread is in.
    fn set_up() -> Result<Remote, String> {
        let pid = std::process::id();
        let proxy = fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| format!("the run's namespace: {e}"))?;
        let mut made = Remote {
            names: Vec::new(),
            clients: None,
            proxy,
            origin: None,
        };
        for (net, tag, near, far) in [(1, "clients", "c0", "c1"), (2, "origin", "o0", "o1")] {
            let name = format!("sluice-bench-{pid}-{tag}");
            let name = name.as_str();
            ip(&["netns", "add", name])?;
            made.names.push(name.to_string());
            ip(&[
                "link", "add", far, "type", "veth", "peer", "name", near, "netns", name,
            ])?;
            ip(&["addr", "add", &format!("10.77.{net}.1/24"), "dev", far])?;
            ip(&["link", "set", far, "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("10.77.{net}.2/24"),
                "dev",
                near,
            ])?;
            ip(&["-n", name, "link", "set", near, "up"])?;
            ip(&[
                "-n",
                name,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{net}.1"),
            ])?;
            let f = fs::File::open(format!("/run/netns/{name}"))
                .map_err(|e| format!("/run/netns/{name}: {e}"))?;
            // Its own congestion control, as the run's namespace has.
            let cc = std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| e.to_string())?;
                    fs::write(CC_PATH, CONGESTION).map_err(|e| e.to_string())?;
                    edge_ports()
                })
                .join()
                .unwrap_or_else(|_| Err("the thread setting it panicked".into()))
            });
            if let Err(e) = cc {
                eprintln!("sluice-bench: cannot set up TCP in {name}: {e}");
            }
            if net == 1 {
                made.clients = Some(f);
            } else {
                made.origin = Some(f);
            }
        }
        fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("forwarding in the run's namespace: {e}"))?;
        edge_ports().map_err(|e| format!("ports in the run's namespace: {e}"))?;
        Ok(made)
    }

    /// Moves the calling thread into `side`'s namespace.
    pub fn enter(&self, side: Side) -> Result<(), String> {
        let f = match side {
            Side::Clients => self.clients.as_ref(),
            Side::Proxy => Some(&self.proxy),
            Side::Origin => self.origin.as_ref(),
        }
        .ok_or_else(|| format!("the {side:?} namespace was not made"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the {side:?} namespace: {e}"))
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// What an edge host that opens many connections to one origin sets: the
/// whole ephemeral port range, and `tcp_tw_reuse` for every connection
/// (Linux's default, 2, reuses TIME_WAIT ports on loopback only). W3 opens
/// 9,900 connections per repetition from one address to one origin port;
/// the ports of a repetition's closed ones would otherwise sit in
/// TIME_WAIT for a minute, and the third repetition ran out (502s).
fn edge_ports() -> Result<(), String> {
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535"),
        ("/proc/sys/net/ipv4/tcp_tw_reuse", "1"),
    ] {
        fs::write(path, value).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

/// Removes the `--remote` namespaces of runs whose process is gone (killed
/// before their [`Remote`] was dropped).
pub fn sweep_stale() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("sluice-bench-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| {
            format!(
                "ip {}: {e} (iproute2 is needed for --remote)",
                args.join(" ")
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The host's list of allowed algorithms with one more in it, put back as
/// it was on drop (through the file opened before the thread left the
/// host's namespace).
struct AllowedForAWhile {
    file: Option<(fs::File, String)>,
}

impl AllowedForAWhile {
    fn add(cc: &str) -> AllowedForAWhile {
        use std::io::Write;
        let Ok(before) = fs::read_to_string(ALLOWED_PATH) else {
            return AllowedForAWhile { file: None };
        };
        let before = before.trim().to_string();
        if before.split_whitespace().any(|a| a == cc) {
            return AllowedForAWhile { file: None };
        }
        let Ok(mut f) = fs::OpenOptions::new().write(true).open(ALLOWED_PATH) else {
            return AllowedForAWhile { file: None };
        };
        if f.write_all(format!("{before} {cc}").as_bytes()).is_err() {
            return AllowedForAWhile { file: None };
        }
        AllowedForAWhile {
            file: Some((f, before)),
        }
    }
}

impl Drop for AllowedForAWhile {
    fn drop(&mut self) {
        use std::io::{Seek, Write};
        if let Some((f, before)) = &mut self.file {
            let put_back = f.rewind().and_then(|()| f.write_all(before.as_bytes()));
            if let Err(e) = put_back {
                eprintln!("sluice-bench: cannot put {ALLOWED_PATH} back to \"{before}\": {e}");
            }
        }
    }
}

fn current_congestion() -> String {
    fs::read_to_string(CC_PATH)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// `ip link set lo up`, by `SIOCSIFFLAGS`.
fn loopback_up() -> std::io::Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open and req is a valid ifreq for these requests.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_gets_its_own_loopback_and_leaves_the_host_as_it_was() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a network namespace needs root (CAP_SYS_ADMIN)");
            return;
        }
        let host_before = current_congestion();
        let allowed_before = fs::read_to_string(ALLOWED_PATH).unwrap();
        let host_lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host_port = host_lo.local_addr().unwrap().port();
        // Only the thread that calls enter() moves; the test's own stays.
        let (net, reached_host, echoed) = std::thread::spawn(move || {
            let net = enter().expect("entering a namespace as root");
            let reached_host = std::net::TcpStream::connect(("127.0.0.1", host_port)).is_ok();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            use std::io::{Read, Write};
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            (net, reached_host, b == *b"ping")
        })
        .join()
        .unwrap();
        assert!(net.own, "{}", net.describe());
        assert_eq!(net.congestion, CONGESTION);
        assert_eq!(net.host_congestion, host_before);
        assert!(!reached_host, "the namespace's loopback is not the host's");
        assert!(echoed, "loopback is up inside the namespace");
        assert_eq!(
            current_congestion(),
            host_before,
            "the host's setting is untouched"
        );
        assert_eq!(
            fs::read_to_string(ALLOWED_PATH).unwrap(),
            allowed_before,
            "the host's allowed list is as it was"
        );
    }
}
