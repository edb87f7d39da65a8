//! Harness for the end-to-end tests: runs the real `sluice` binary in each
//! data-path mode, starts real WebSocket origins (tokio-tungstenite, Python
//! `websockets`), and offers raw-socket helpers for the cases a WebSocket
//! library hides (pipelined bytes, half-close, reset).
//!
//! Every test runs once per [`Mode`]. Sockmap and the unprivileged run need
//! root; without it they are skipped with a printed reason. Under CI (root)
//! nothing is skipped, and a mode that fails to come up fails the test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use sha1::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// How sluice runs in one pass of a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `--datapath sockmap`, as root.
    Sockmap,
    /// `--datapath uring`.
    Uring,
    /// `--datapath userspace`.
    Userspace,
    /// `--datapath tcpsplice`, as root.
    Tcpsplice,
    /// `--datapath auto` as user nobody with every capability dropped:
    /// auto must pick a non-eBPF path and say why in its ready line.
    Unprivileged,
}

impl Mode {
    /// The mode's name in `SLUICE_TEST_MODES`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Unprivileged => "unprivileged",
            m => m.flag(),
        }
    }

    /// The `--datapath` value.
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Sockmap => "sockmap",
            Mode::Uring => "uring",
            Mode::Userspace => "userspace",
            Mode::Tcpsplice => "tcpsplice",
            Mode::Unprivileged => "auto",
        }
    }
}

/// The path a session of `mode` closes on, as the access log names it,
/// once it had a quiet moment (see [`quiet`]).
pub fn expected_path(mode: Mode) -> &'static str {
    match mode {
        Mode::Unprivileged => "userspace",
        m => m.flag(),
    }
}

/// How long [`quiet`] waits.
pub const QUIET: Duration = Duration::from_millis(100);

/// A quiet moment in a session, as real sessions have them: sockmap and
/// uring joined their path at the 101 already (the tests promote at 0),
/// tcpsplice joins at the first idle moment after a grace period of about
/// 10 ms. After it, every mode's own path carries the session, so a test
/// that pauses here tests that path and not the user-space relay.
pub async fn quiet() {
    tokio::time::sleep(QUIET).await;
}

/// True when the tests run as root (as CI does).
pub fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The modes this run covers; prints why any is skipped.
/// `SLUICE_TEST_MODES=sockmap,uring` narrows a development run (say, to
/// repeat one path's tests); CI never sets it.
pub fn modes() -> Vec<Mode> {
    let mut all = vec![Mode::Uring, Mode::Userspace, Mode::Unprivileged];
    if is_root() {
        all.insert(0, Mode::Sockmap);
        all.insert(1, Mode::Tcpsplice);
    } else {
        eprintln!(
            "SKIP sockmap and tcpsplice modes: not running as root, so eBPF cannot load; \
             CI runs as root and covers them. The unprivileged mode runs as the current user."
        );
    }
    if let Ok(only) = std::env::var("SLUICE_TEST_MODES") {
        all.retain(|m| only.split(',').any(|w| w.trim() == m.name()));
        eprintln!("SLUICE_TEST_MODES={only}: running only {all:?}");
    }
    all
}

/// Path of the sluice binary: `$SLUICE_BIN`, else the workspace's release build.
pub fn sluice_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/sluice");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p proxy-user` or run `cargo xtask test`",
        p.display()
    );
    p
}

/// A free loopback port (bound and released; the window for a clash is tiny).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running sluice process; SIGTERM on drop.
pub struct Sluice {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The mode it runs in.
    pub mode: Mode,
    /// Its "sluice ready" log line.
    pub ready_line: String,
    logs: Arc<Mutex<Vec<String>>>,
    _config: Option<PathBuf>,
}

impl Sluice {
    /// Starts sluice from flags in front of `origin`.
    pub fn start(mode: Mode, origin: SocketAddr) -> Sluice {
        Sluice::start_flags(mode, origin, Vec::new())
    }

    /// Starts sluice from flags in front of `origin`, with the promotion to
    /// sockmap or uring after `ms` (userspace ignores it).
    pub fn start_promoting(mode: Mode, origin: SocketAddr, ms: u64) -> Sluice {
        let extra = vec!["--promote-after-ms".to_string(), ms.to_string()];
        Sluice::start_flags(mode, origin, extra)
    }

    fn start_flags(mode: Mode, origin: SocketAddr, extra: Vec<String>) -> Sluice {
        let addr = free_addr();
        let mut args = vec![
            "--listen".to_string(),
            addr.to_string(),
            "--origin".into(),
            origin.to_string(),
        ];
        args.extend(extra);
        Sluice::spawn(mode, addr, args, None, None)
    }

    /// Starts sluice inside the network namespace `netns` (`ip netns
    /// exec`), listening on `addr` in front of `origin`.
    pub fn start_in_netns(mode: Mode, netns: &str, addr: SocketAddr, origin: SocketAddr) -> Sluice {
        let args = vec![
            "--listen".to_string(),
            addr.to_string(),
            "--origin".into(),
            origin.to_string(),
        ];
        Sluice::spawn(mode, addr, args, None, Some(netns))
    }

    /// Starts sluice in front of `origin` with `limits.max_buffer_per_direction
    /// = bound`.
    pub fn start_bounded(mode: Mode, origin: SocketAddr, bound: u64) -> Sluice {
        Sluice::start_config(mode, |addr| {
            format!(
                "[limits]\nmax_buffer_per_direction = {bound}\n[[listeners]]\nlisten = \"{addr}\"\norigin = \"{origin}\"\n"
            )
        })
    }

    /// Starts sluice from a TOML config; `make` gets the listen address.
    pub fn start_config(mode: Mode, make: impl FnOnce(SocketAddr) -> String) -> Sluice {
        Sluice::start_config_logging(mode, "info", make)
    }

    /// As [`Sluice::start_config`], with a log filter (as `RUST_LOG`).
    pub fn start_config_logging(
        mode: Mode,
        filter: &str,
        make: impl FnOnce(SocketAddr) -> String,
    ) -> Sluice {
        let addr = free_addr();
        let path = std::env::temp_dir().join(format!(
            "sluice-test-{}-{}.toml",
            std::process::id(),
            addr.port()
        ));
        std::fs::write(&path, make(addr)).unwrap();
        // Readable by the unprivileged user too.
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let args = vec![
            "--config".to_string(),
            path.display().to_string(),
            "--log".into(),
            filter.into(),
        ];
        Sluice::spawn(mode, addr, args, Some(path), None)
    }

    fn spawn(
        mode: Mode,
        addr: SocketAddr,
        mut args: Vec<String>,
        config: Option<PathBuf>,
        netns: Option<&str>,
    ) -> Sluice {
        args.extend(["--datapath".to_string(), mode.flag().to_string()]);
        // Every sockmap, uring and tcpsplice test joins its path at the
        // 101 (tcpsplice: at its first idle moment), so that the hand-off
        // and that path are what it tests; `start_promoting` tests the delay.
        if matches!(mode, Mode::Sockmap | Mode::Uring | Mode::Tcpsplice)
            && !args.iter().any(|a| a == "--promote-after-ms")
        {
            args.extend(["--promote-after-ms".to_string(), "0".to_string()]);
        }
        let bin = sluice_bin();
        // `nsenter` enters the namespace and execs the rest, so the child's
        // pid is still sluice's. (`ip netns exec` would also mount a fresh
        // `/sys`, without the cgroup2 file system sockmap attaches to.)
        let in_netns = |prog: &dyn AsRef<std::ffi::OsStr>| match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(prog);
                c
            }
            None => Command::new(prog),
        };
        let mut cmd = if mode == Mode::Unprivileged && is_root() {
            let mut c = in_netns(&"setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
            ])
            .arg(&bin);
            c
        } else {
            in_netns(&bin)
        };
        // `SLUICE_TEST_LOG` (a filter, as `RUST_LOG`) shows more of the
        // daemon's log, a development aid.
        let filter = std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into());
        cmd.args(&args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("sluice ready") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let ready_line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sluice ({mode:?}) did not become ready:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let s = Sluice {
            child,
            addr,
            mode,
            ready_line,
            logs,
            _config: config,
        };
        match mode {
            Mode::Unprivileged => {
                for ebpf in ["datapath sockmap", "datapath tcpsplice"] {
                    assert!(
                        !s.ready_line.contains(ebpf),
                        "unprivileged auto must not pick an eBPF path: {}",
                        s.ready_line
                    );
                }
                assert!(
                    s.ready_line.contains("(auto: "),
                    "the ready line must say why auto chose its path: {}",
                    s.ready_line
                );
            }
            m => assert!(
                s.ready_line.contains(&format!("datapath {}", m.flag())),
                "{m:?}: {}",
                s.ready_line
            ),
        }
        s
    }

    /// Asserts that a close log line names this mode's own path (see
    /// [`expected_path`]): the session was carried by the path under test.
    pub fn assert_own_path(&self, line: &str) {
        let path = format!("datapath={}", expected_path(self.mode));
        assert!(
            line.contains(&path),
            "{:?} was carried by another path: {line}",
            self.mode
        );
    }

    /// Process id (of setpriv's exec'd sluice in the unprivileged mode).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            if let Some(l) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < end,
                "no log line with {needle:?} within {within:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` log lines contain every one of `needles`
    /// (log lines reach stderr in batches, up to 20 ms late), and returns
    /// how many do.
    pub fn wait_log_count(&self, needles: &[&str], n: usize, within: Duration) -> usize {
        let end = Instant::now() + within;
        loop {
            let count = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .count();
            if count >= n || Instant::now() >= end {
                return count;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `ws://` URL of the listener.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- sluice log ({:?}) ---\n{}", self.mode, self.logs());
        }
        if std::env::var_os("SLUICE_TEST_PATHS").is_some() {
            // Which path carried the sessions (a development aid).
            let logs = self.logs();
            let count = |p: &str| logs.matches(&format!("datapath={p} ")).count();
            eprintln!(
                "paths {:?}: {} closes: sockmap {}, tcpsplice {}, uring {}, userspace {}",
                self.mode,
                logs.matches("closed:").count(),
                count("sockmap"),
                count("tcpsplice"),
                count("uring"),
                count("userspace")
            );
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tokio-tungstenite echo origin: echoes text and binary messages, picks
/// the first offered subprotocol, answers pings and closes as the library does.
pub async fn echo_origin() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                #[expect(
                    clippy::result_large_err,
                    reason = "tungstenite's callback signature fixes the error type"
                )]
                let cb = |req: &Request, mut resp: Response| {
                    if let Some(p) = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.split(',').next())
                    {
                        resp.headers_mut().insert(
                            "sec-websocket-protocol",
                            HeaderValue::from_str(p.trim()).unwrap(),
                        );
                    }
                    Ok(resp)
                };
                let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .max_message_size(Some(64 << 20))
                    .max_frame_size(Some(64 << 20));
                let Ok(mut ws) =
                    tokio_tungstenite::accept_hdr_async_with_config(s, cb, Some(cfg)).await
                else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, h)
}

/// A Python `websockets` origin (echo, permessage-deflate on by default).
pub struct PyOrigin {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl PyOrigin {
    /// Starts `peers/ws_peer.py server`.
    pub fn start() -> PyOrigin {
        PyOrigin::start_at(None, free_addr())
    }

    /// Starts `peers/ws_peer.py server` on `addr`, inside the network
    /// namespace `netns` if given.
    pub fn start_at(netns: Option<&str>, addr: SocketAddr) -> PyOrigin {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        let mut child = cmd
            .arg(peer_script())
            .args(["server", &addr.port().to_string(), &addr.ip().to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed for the Python websockets peer");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY", "python origin did not start");
        PyOrigin { child, addr }
    }
}

impl Drop for PyOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tests/peers/ws_peer.py`.
pub fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/ws_peer.py")
}

/// `Sec-WebSocket-Accept` for `key`, computed independently of sluice.
pub fn accept_key(key: &str) -> String {
    let mut h = sha1::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The fixed key the raw helpers use.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A well-formed upgrade request head.
pub fn upgrade_request(host: &str) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads up to the end of an HTTP head; returns (head, bytes after it).
pub async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("head timed out")
            .unwrap();
        assert!(
            n > 0,
            "connection closed inside a head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects to `addr`, sends `request` (+ `extra` in the same write), and
/// checks the 101. Returns the stream and any bytes after the 101.
pub async fn raw_client(addr: SocketAddr, extra: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = upgrade_request(&addr.to_string()).into_bytes();
    req.extend_from_slice(extra);
    s.write_all(&req).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "expected 101, got {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("sec-websocket-accept: {}", accept_key(KEY)).to_ascii_lowercase()),
        "{head}"
    );
    (s, rest)
}

/// The origin's 101 head for a forwarded upgrade request head.
pub fn switching_protocols(request_head: &str) -> String {
    let key = request_head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .expect("no key in the forwarded request");
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    )
}

/// Accepts one connection on `l`, reads the upgrade request and answers 101
/// (with `extra` in the same write). Returns the stream, the request head and
/// any bytes after it.
pub async fn raw_origin(l: &TcpListener, extra: &[u8]) -> (TcpStream, String, Vec<u8>) {
    let (mut s, _) = l.accept().await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    let mut resp = switching_protocols(&head).into_bytes();
    resp.extend_from_slice(extra);
    s.write_all(&resp).await.unwrap();
    (s, head, rest)
}

/// A WebSocket frame (FIN set), masked as a client must, unmasked as a server.
pub fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Deterministic pseudo-random bytes (xorshift64*), for byte-exact checks.
pub struct Prng(u64);

impl Prng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Prng {
        Prng(seed | 1)
    }
    /// Fills `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Host memory in use, from /proc/meminfo, as free(1) counts "used":
/// MemTotal - MemFree - Buffers - Cached - SReclaimable, in bytes. Socket
/// buffers (slab and page fragments) land here; page cache does not.
pub fn host_mem_used() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    field("MemTotal:")
        .saturating_sub(field("MemFree:"))
        .saturating_sub(field("Buffers:"))
        .saturating_sub(field("Cached:"))
        .saturating_sub(field("SReclaimable:"))
}

/// TCP memory from /proc/net/sockstat, in bytes.
pub fn tcp_mem() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let pages = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let mut it = l.split_whitespace();
            it.position(|w| w == "mem")?;
            it.next()?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    pages * 4096
}

/// Open fds of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process (`VmRSS`), in bytes.
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Waits for `f` to become true, polling; panics with `what` after `within`.
pub async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The counting pattern that bulk tests stream: byte offset / 8 as
/// little-endian u64s, so a missing or repeated skb shows as the exact
/// offset where it breaks. Fills `buf` with the bytes at `offset`.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        *b = ((at / 8).to_le_bytes())[(at % 8) as usize];
    }
}

/// Streams `len` bytes of [`pattern`] in `chunk`-sized writes, then FIN.
pub async fn send_pattern(s: tokio::net::tcp::OwnedWriteHalf, len: u64, chunk: usize) {
    send_pattern_counted(s, len, chunk, &std::sync::atomic::AtomicU64::new(0)).await;
}

/// As [`send_pattern`], adding each write to `written` once it returns, so
/// that another task can see how far the writer got (how much a stalled
/// reader let through).
pub async fn send_pattern_counted(
    mut s: tokio::net::tcp::OwnedWriteHalf,
    len: u64,
    chunk: usize,
    written: &std::sync::atomic::AtomicU64,
) {
    let mut buf = vec![0u8; chunk];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern(off, &mut buf[..n]);
        s.write_all(&buf[..n]).await.unwrap();
        off += n as u64;
        written.store(off, std::sync::atomic::Ordering::SeqCst);
    }
    s.shutdown().await.unwrap();
}

/// Runs `f` on a thread of its own inside the network namespace
/// `/run/netns/<ns>`, on a current-thread runtime: the sockets it makes
/// live in that namespace.
pub fn in_netns<T, F>(
    ns: &str,
    f: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; only this thread moves.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f())
    })
}

/// Waits `stall`, then reads to EOF in `chunk`-sized reads; returns the
/// first offset where [`pattern`] breaks, if any, and the bytes read.
pub async fn check_pattern(
    mut s: tokio::net::tcp::OwnedReadHalf,
    stall: Duration,
    chunk: usize,
) -> (Option<u64>, u64) {
    tokio::time::sleep(stall).await;
    let mut buf = vec![0u8; chunk];
    let mut want = vec![0u8; chunk];
    let mut off = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return (None, off);
        }
        pattern(off, &mut want[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
            return (Some(off + i as u64), off);
        }
        off += n as u64;
    }
}
