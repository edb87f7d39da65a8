//! The proxies under test, started on loopback ports in front of the origin,
//! and stopped (with everything they started) when dropped. nginx, HAProxy
//! and Caddy come from Debian's packages, installed here if missing.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a row of the results measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The client talks to the origin itself: the physical limit.
    Direct,
    /// Sluice with `--datapath <path>`.
    Sluice(&'static str),
    /// nginx with the usual WebSocket `proxy_pass` settings.
    Nginx,
    /// HAProxy in HTTP mode; it tunnels after the 101.
    Haproxy,
    /// Caddy's `reverse_proxy`, which upgrades on its own.
    Caddy,
}

impl Kind {
    /// The row name.
    pub fn name(self) -> String {
        match self {
            Kind::Direct => "direct".into(),
            Kind::Sluice(p) => format!("sluice-{p}"),
            Kind::Nginx => "nginx".into(),
            Kind::Haproxy => "haproxy".into(),
            Kind::Caddy => "caddy".into(),
        }
    }

    /// The binary it needs, if any.
    fn program(self) -> Option<&'static str> {
        match self {
            Kind::Nginx => Some("/usr/sbin/nginx"),
            Kind::Haproxy => Some("/usr/sbin/haproxy"),
            Kind::Caddy => Some("/usr/bin/caddy"),
            _ => None,
        }
    }

    /// Its Debian package.
    fn package(self) -> Option<&'static str> {
        match self {
            Kind::Nginx => Some("nginx"),
            Kind::Haproxy => Some("haproxy"),
            Kind::Caddy => Some("caddy"),
            _ => None,
        }
    }
}

/// Installs the Debian packages of `kinds` that are missing. Package
/// scripts are kept from starting their services (the harness starts its
/// own instances). Returns a note per kind that is still missing.
pub fn ensure_installed(kinds: &[Kind]) -> Vec<(Kind, String)> {
    let missing: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| k.program().is_some_and(|p| !Path::new(p).exists()))
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return missing
            .into_iter()
            .map(|k| (k, "not installed, and installing needs root".to_string()))
            .collect();
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists()
        && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok()
        && Command::new("chmod")
            .args(["755", "/usr/sbin/policy-rc.d"])
            .status()
            .is_ok_and(|s| s.success());
    let install = |k: Kind| {
        let pkg = k.package().expect("only packaged kinds are missing");
        let run = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        run() || {
            let _ = Command::new("apt-get")
                .args(["update", "-q"])
                .stdout(Stdio::null())
                .status();
            run()
        }
    };
    let mut notes = Vec::new();
    for k in missing {
        eprintln!("installing {} (Debian package)", k.name());
        if !install(k) {
            notes.push((
                k,
                format!("`apt-get install {}` failed", k.package().unwrap_or("?")),
            ));
        }
    }
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    notes
}

/// A free port on `ip` (bound, then released).
pub fn free_addr(ip: std::net::IpAddr) -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    l.local_addr()
}

/// A running target.
pub struct Target {
    /// What it is.
    pub kind: Kind,
    /// Where clients connect.
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: Option<PathBuf>,
    /// The working directory's [`OWNER`] file, locked while this run lives.
    _owner: Option<std::fs::File>,
}

impl Target {
    /// Starts `kind` on a free port of `listen`, in front of `origin`;
    /// `sluice` is the daemon's binary.
    pub fn start(
        kind: Kind,
        listen: std::net::IpAddr,
        origin: SocketAddr,
        sluice: &Path,
    ) -> Result<Target, String> {
        if kind == Kind::Direct {
            return Ok(Target {
                kind,
                addr: origin,
                child: None,
                dir: None,
                _owner: None,
            });
        }
        let addr = free_addr(listen).map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!(
            "sluice-bench-{}-{}",
            std::process::id(),
            kind.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let owner = lock_owner(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut cmd = match kind {
            Kind::Direct => unreachable!("handled above"),
            Kind::Sluice(path) => {
                let mut c = Command::new(sluice);
                c.args(["--listen", &addr.to_string()])
                    .args(["--origin", &origin.to_string()])
                    .args(["--datapath", path]);
                // Set and not empty (`=` alone, or `=0`, leaves it off).
                if std::env::var("SLUICE_BENCH_REUSE_PORT").is_ok_and(|v| !v.is_empty() && v != "0")
                {
                    c.arg("--reuse-port");
                }
                c
            }
            Kind::Nginx => {
                std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, addr, origin))
                    .map_err(|e| e.to_string())?;
                let mut c = Command::new("/usr/sbin/nginx");
                c.arg("-p").arg(&dir).arg("-c").arg(dir.join("nginx.conf"));
                c
            }
            Kind::Haproxy => {
                std::fs::write(dir.join("haproxy.cfg"), haproxy_conf(addr, origin))
                    .map_err(|e| e.to_string())?;
                let mut c = Command::new("/usr/sbin/haproxy");
                c.arg("-db").arg("-f").arg(dir.join("haproxy.cfg"));
                c
            }
            Kind::Caddy => {
                std::fs::write(dir.join("Caddyfile"), caddy_conf(addr, origin))
                    .map_err(|e| e.to_string())?;
                let mut c = Command::new("/usr/bin/caddy");
                c.args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(dir.join("Caddyfile"))
                    .env("HOME", &dir)
                    .env("XDG_DATA_HOME", &dir)
                    .env("XDG_CONFIG_HOME", &dir);
                c
            }
        };
        let log = std::fs::File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        die_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", kind.name()))?;
        let mut t = Target {
            kind,
            addr,
            child: Some(child),
            dir: Some(dir),
            _owner: Some(owner),
        };
        t.wait_listening()?;
        Ok(t)
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!(
                        "{} exited with {st}: {}",
                        self.kind.name(),
                        self.log_tail()
                    ));
                }
            }
            if Instant::now() > end {
                return Err(format!(
                    "{} does not listen on {} after 15 s: {}",
                    self.kind.name(),
                    self.addr,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of what it printed.
    pub fn log_tail(&self) -> String {
        let Some(d) = &self.dir else {
            return String::new();
        };
        let s = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// How many lines its log has so far.
    pub fn log_len(&self) -> usize {
        let Some(d) = &self.dir else {
            return 0;
        };
        std::fs::read_to_string(d.join("stderr.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Up to `most` warnings and errors its log printed after line `from`:
    /// what a failed run leaves behind (Sluice and nginx use these words).
    pub fn problems_since(&self, from: usize, most: usize) -> Vec<String> {
        let Some(d) = &self.dir else {
            return Vec::new();
        };
        std::fs::read_to_string(d.join("stderr.log"))
            .unwrap_or_default()
            .lines()
            .skip(from)
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("[warn]")
                    || l.contains("[error]")
            })
            .take(most)
            .map(str::to_string)
            .collect()
    }

    /// How many lines of its log so far contain each of `needles`, read
    /// once (two access lines per session make it long).
    pub fn log_counts<const N: usize>(&self, needles: [&str; N]) -> [usize; N] {
        let mut n = [0; N];
        let Some(d) = &self.dir else {
            return n;
        };
        let text = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
        for l in text.lines() {
            for (c, needle) in n.iter_mut().zip(needles) {
                *c += usize::from(l.contains(needle));
            }
        }
        n
    }

    /// Resident memory of the proxy's processes (0 for direct).
    pub fn rss(&self) -> u64 {
        self.child
            .as_ref()
            .map_or(0, |c| crate::sys::rss_tree(c.id()))
    }

    /// CPU time its processes have run so far, in ns (`None` for direct);
    /// see [`crate::sys::cpu_tree_ns`].
    pub fn cpu_ns(&self) -> Option<u64> {
        self.child.as_ref().map(|c| crate::sys::cpu_tree_ns(c.id()))
    }

    /// Whether its process is still alive (direct always is).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Target {
    /// Stops the target and starts it afresh (same kind, a new port), so a
    /// measurement of what connections cost is not flattered by memory that
    /// earlier workloads left free or pooled in the process.
    pub fn restart(&mut self, origin: SocketAddr, sluice: &Path) -> Result<(), String> {
        self.stop();
        // The old value, already stopped, drops here with nothing left to do.
        *self = Target::start(self.kind, self.addr.ip(), origin, sluice)?;
        Ok(())
    }

    /// Stops the process tree and removes the working directory.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pids = crate::sys::tree(c.id());
            // SIGTERM the whole tree (nginx and HAProxy stop their workers
            // on it), then make sure.
            for &p in &pids {
                // SAFETY: plain kill(2) on pids we started.
                unsafe { libc::kill(p as i32, libc::SIGTERM) };
            }
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            for &p in &pids {
                if Path::new(&format!("/proc/{p}")).exists() {
                    // SAFETY: as above.
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
            }
            let _ = c.wait();
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The file in a working directory that its run holds an exclusive
/// `flock` on while it lives.
const OWNER: &str = ".owner";

/// Creates and locks `dir`'s [`OWNER`] file; the lock lasts as long as the
/// returned file is open (the kernel drops it when the run dies, however
/// it dies). Not inherited by the targets (`O_CLOEXEC`).
fn lock_owner(dir: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::File::create(dir.join(OWNER))?;
    if !try_lock(&f)? {
        return Err(std::io::Error::other("another run holds this directory"));
    }
    Ok(f)
}

/// `flock(LOCK_EX | LOCK_NB)`: whether the lock was taken.
fn try_lock(f: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether the run that made working directory `dir` is gone: nobody holds
/// its [`OWNER`] lock. A lock works across pid namespaces that share the
/// temp dir, where a pid in the name could belong to anyone; a directory
/// without the file (made before it existed) falls back to that pid.
fn abandoned(dir: &Path, pid: u32) -> bool {
    match std::fs::File::open(dir.join(OWNER)) {
        Ok(f) => matches!(try_lock(&f), Ok(true)),
        Err(_) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
    }
}

/// Removes the working directories that runs killed before their cleanup
/// left in the temp dir (`sluice-bench-<pid>-<target>` whose run is gone,
/// see [`abandoned`]).
pub fn sweep_stale_dirs() {
    sweep_stale_dirs_in(&std::env::temp_dir());
}

fn sweep_stale_dirs_in(tmp: &Path) {
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("sluice-bench-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if abandoned(&e.path(), pid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Makes the process `cmd` starts get SIGTERM when the thread that starts
/// it ends: a bench killed with SIGTERM or SIGKILL (no `Drop` runs then)
/// still leaves no proxy running. nginx's and HAProxy's workers follow
/// their master. The signal comes when the *thread* that forked exits
/// (prctl(2)), so targets are started on the run's main thread only.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec, and
    // makes only async-signal-safe calls (prctl, getppid, kill).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl took effect.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        });
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

fn nginx_conf(dir: &Path, addr: SocketAddr, origin: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;
worker_processes auto;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 32768; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen {addr} backlog=4096;
        location / {{
            proxy_pass http://{origin};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"
    )
}

fn haproxy_conf(addr: SocketAddr, origin: SocketAddr) -> String {
    format!(
        "global
    # HAProxy raises its fd limit to about twice maxconn; keep it within
    # what an unprivileged hard limit (often 20000) allows.
    maxconn 9950
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
frontend ws
    bind {addr}
    default_backend origin
backend origin
    server o {origin}
"
    )
}

fn caddy_conf(addr: SocketAddr, origin: SocketAddr) -> String {
    // Without `bind`, Caddy listens on the port of every address, which an
    // outgoing connection from another of this host's addresses may hold.
    let ip = addr.ip();
    format!(
        "{{
    admin off
    auto_https off
}}
http://{addr} {{
    bind {ip}
    reverse_proxy {origin}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_target_ends_when_the_thread_that_started_it_ends() {
        // Started from a thread that then ends, as if the bench were killed.
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            die_with_parent(&mut cmd);
            cmd.spawn().expect("spawn sleep")
        })
        .join()
        .expect("the spawning thread");
        let end = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break Some(st);
            }
            if Instant::now() > end {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the target outlived the thread that started it by 5 s");
        };
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    }

    #[test]
    fn only_directories_whose_run_is_gone_are_swept() {
        let tmp = std::env::temp_dir().join(format!("sweep-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let dir = |name: &str| {
            let d = tmp.join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        // A live run's directory, under a pid this process cannot see (as
        // from another pid namespace): its lock keeps it.
        let live = dir("sluice-bench-4000000-nginx");
        let held = lock_owner(&live).unwrap();
        // A dead run's: its lock file is there, nobody holds it.
        let dead = dir("sluice-bench-4000001-nginx");
        drop(lock_owner(&dead).unwrap());
        // An older run's, without the file, of a pid that is gone.
        let old = dir("sluice-bench-4000002-haproxy");
        // Not ours at all.
        let other = dir("something-else");
        sweep_stale_dirs_in(&tmp);
        assert!(live.exists(), "a live run's directory was removed");
        assert!(!dead.exists(), "a dead run's directory was kept");
        assert!(!old.exists(), "a dead old-style run's directory was kept");
        assert!(other.exists());
        drop(held);
        sweep_stale_dirs_in(&tmp);
        assert!(!live.exists(), "kept after its run let go");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
