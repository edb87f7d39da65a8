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
        if self.own {
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
    let host_cc = current_congestion();
    // Opened in the host's namespace: the list is only visible there.
    let allowed = AllowedForAWhile::add(CONGESTION);
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        return Ok(host(Some(format!("unshare(CLONE_NEWNET): {e}"))));
    }
    loopback_up().map_err(|e| format!("bringing loopback up in the run's namespace: {e}"))?;
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
    Ok(Network {
        own: true,
        congestion,
        host_congestion: host_cc,
        why_host: None,
    })
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
