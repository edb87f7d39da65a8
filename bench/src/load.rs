//! The load generator: real WebSocket clients (masked frames, checked
//! handshakes) for each workload. Every loop is bounded by a deadline and
//! every wait by a timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::origin::CHUNK;
use crate::pool::Pool;
use crate::sys;
use crate::ws::{self, op, Frame, Parser, Prng};

/// Longest wait for any single reply.
const STEP: Duration = Duration::from_secs(10);

/// A WebSocket client connection.
pub struct Client {
    s: TcpStream,
    parser: Parser,
    ready: std::collections::VecDeque<Frame>,
    buf: Vec<u8>,
    out: Vec<u8>,
    rng: Prng,
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no progress in {STEP:?}")),
    }
}

impl Client {
    /// Connects and upgrades on `path`.
    pub async fn connect(addr: SocketAddr, path: &str, seed: u64) -> Result<Client, String> {
        let mut s = timed("connect", TcpStream::connect(addr)).await?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let (req, key) = ws::upgrade_request(&addr.to_string(), path, seed);
        timed("send request", s.write_all(req.as_bytes())).await?;
        let mut buf = vec![0u8; 256 << 10];
        let mut have = 0;
        let end = loop {
            let n = timed("read 101", s.read(&mut buf[have..])).await?;
            if n == 0 {
                return Err("closed before the 101".into());
            }
            have += n;
            if let Some(e) = ws::head_end(&buf[..have]) {
                break e;
            }
            if have > 16 << 10 {
                return Err("answer head too large".into());
            }
        };
        ws::check_101(&buf[..end], &key)?;
        let mut c = Client {
            s,
            parser: Parser::default(),
            ready: Default::default(),
            buf,
            out: Vec::new(),
            rng: Prng::new(seed ^ 0x9e37_79b9_7f4a_7c15),
        };
        let ahead = c.buf[end..have].to_vec();
        c.feed(&ahead, true)?;
        Ok(c)
    }

    fn feed(&mut self, data: &[u8], keep_binary: bool) -> Result<(), String> {
        let ready = &mut self.ready;
        self.parser.feed(data, keep_binary, |f| ready.push_back(f))
    }

    /// Sends one masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        self.out.clear();
        let key = self.rng.mask();
        ws::put_header(&mut self.out, opcode, payload.len(), Some(key));
        ws::put_masked(&mut self.out, payload, key, 0);
        timed("send", self.s.write_all(&self.out)).await
    }

    /// The next kept frame (binary payloads kept if `keep_binary`).
    pub async fn recv(&mut self, keep_binary: bool) -> Result<Frame, String> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Ok(f);
            }
            let n = timed("receive", self.s.read(&mut self.buf)).await?;
            if n == 0 {
                return Err("connection closed".into());
            }
            let data = std::mem::take(&mut self.buf);
            let r = self.feed(&data[..n], keep_binary);
            self.buf = data;
            r?;
        }
    }

    /// Sends a close frame and waits for the answer (or the end).
    pub async fn close(mut self) {
        if self.send(op::CLOSE, &1000u16.to_be_bytes()).await.is_ok() {
            while let Ok(f) = self.recv(false).await {
                if f.opcode == op::CLOSE {
                    break;
                }
            }
        }
    }
}

/// Sends `n` bytes in masked 1 MiB frames on `w`, with a fresh key each.
async fn send_bulk(w: &mut (impl AsyncWriteExt + Unpin), n: u64, seed: u64) -> Result<(), String> {
    let mut rng = Prng::new(seed);
    let mut payload = vec![0u8; CHUNK];
    rng.fill(&mut payload);
    let mut frame = Vec::with_capacity(CHUNK + 14);
    let mut left = n;
    while left > 0 {
        let len = (left as usize).min(CHUNK);
        let key = rng.mask();
        frame.clear();
        ws::put_header(&mut frame, op::BINARY, len, Some(key));
        ws::put_masked(&mut frame, &payload[..len], key, 0);
        timed("bulk send", w.write_all(&frame)).await?;
        left -= len as u64;
    }
    let key = rng.mask();
    timed(
        "send done",
        w.write_all(&ws::frame(op::TEXT, b"done", Some(key))),
    )
    .await
}

/// One measured run: its wall time, the machine's busy CPU time, and counts.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Wall time.
    pub secs: f64,
    /// Machine busy CPU time over the run.
    pub cpu_us: f64,
    /// Messages (W2, W3), sessions (W4) or bytes (W1) completed.
    pub count: f64,
    /// Round-trip times in ns (W2), sorted.
    pub rtt_ns: Vec<u32>,
    /// Failures seen (sessions that did not complete).
    pub errors: u64,
    /// Extra readings (W3): proxy RSS and kernel memory per connection.
    pub rss_per_conn: f64,
    /// Kernel socket memory per connection, bytes.
    pub kernel_per_conn: f64,
    /// CPU time of the proxy's own processes over the whole call, in µs
    /// (NaN for direct); set by the caller, who knows the proxy.
    pub proxy_cpu_us: f64,
}

/// W1: `n` bytes one way (client to origin), or both ways at once, after
/// [`SETTLE`] of rest.
pub async fn bulk(addr: SocketAddr, n: u64, both: bool) -> Result<Run, String> {
    let path = if both {
        format!("/bulk?n={n}")
    } else {
        "/sink".to_string()
    };
    let mut c = Client::connect(addr, &path, n).await?;
    // Settled, as a long-lived session is; then the origin may send.
    tokio::time::sleep(SETTLE).await;
    if both {
        c.send(op::TEXT, b"start").await?;
    }
    let cpu0 = sys::cpu_busy_us();
    let t0 = Instant::now();
    let Client {
        s, parser, ready, ..
    } = c;
    if !ready.is_empty() {
        return Err("unexpected frame before the bulk run".into());
    }
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move { send_bulk(&mut w, n, 1).await.map(|_| w) });
    let mut parser = parser;
    let mut buf = vec![0u8; 256 << 10];
    let mut got: Option<u64> = None;
    while got.is_none() || (both && parser.binary_bytes < n) {
        let k = timed("bulk receive", r.read(&mut buf)).await?;
        if k == 0 {
            return Err("connection closed during the bulk run".into());
        }
        let mut err = None;
        parser.feed(&buf[..k], false, |f| {
            if f.opcode == op::TEXT {
                match String::from_utf8_lossy(&f.payload)
                    .strip_prefix("got ")
                    .and_then(|x| x.parse().ok())
                {
                    Some(v) => got = Some(v),
                    None => err = Some(format!("unexpected text {:?}", f.payload)),
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_us = (sys::cpu_busy_us() - cpu0) as f64;
    let w = writer.await.map_err(|e| e.to_string())??;
    if got != Some(n) {
        return Err(format!("origin received {got:?} bytes, sent {n}"));
    }
    let moved = if both { 2 * n } else { n };
    drop((r, w));
    Ok(Run {
        secs,
        cpu_us,
        count: moved as f64,
        ..Run::default()
    })
}

/// Opens `n` echo clients, at most `par` handshakes at a time.
async fn open_many(addr: SocketAddr, n: usize, par: usize) -> Result<Vec<Client>, String> {
    let sem = Arc::new(tokio::sync::Semaphore::new(par));
    let mut hs = Vec::with_capacity(n);
    for i in 0..n {
        let sem = sem.clone();
        hs.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            Client::connect(addr, "/echo", i as u64 + 1).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for h in hs {
        out.push(h.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

/// One closed-loop echo: send, wait for the same bytes back.
async fn echo_once(c: &mut Client, msg: &[u8]) -> Result<(), String> {
    c.send(op::BINARY, msg).await?;
    loop {
        let f = c.recv(true).await?;
        if f.opcode == op::BINARY {
            if f.payload != msg {
                return Err("echo differs from what was sent".into());
            }
            return Ok(());
        }
    }
}

/// How long W1's and W2's connections rest before the measured run:
/// WebSocket sessions live for minutes or hours, so these workloads
/// measure them settled. Sluice's kernel paths join a session once it is
/// `limits.promote_after_ms` (200) old and idle; the other targets do not
/// change with time.
pub const SETTLE: Duration = Duration::from_millis(500);

/// W2: `conns` clients in a closed loop of `size`-byte messages for `dur`,
/// after one echo each and [`SETTLE`] of rest. Client `i` lives on `pool`
/// thread `i` (see [`Pool`] for why).
pub async fn echo(
    pool: &Pool,
    addr: SocketAddr,
    conns: usize,
    size: usize,
    dur: Duration,
) -> Result<Run, String> {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(100));
    let settled = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let go = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let mut hs = Vec::with_capacity(conns);
    for i in 0..conns {
        let (handshakes, settled, go) = (handshakes.clone(), settled.clone(), go.clone());
        hs.push(pool.spawn(i, async move {
            let mut msg = vec![0u8; size];
            Prng::new(i as u64 + 7).fill(&mut msg);
            let mut rtt = Vec::new();
            // Unmeasured: the upgrade and one echo, then the rest (the
            // barriers keep every connection in step, failed ones too; a
            // failure shows once they pass).
            let first = async {
                let mut c = {
                    let _p = handshakes.acquire_owned().await;
                    Client::connect(addr, "/echo", i as u64 + 1).await?
                };
                echo_once(&mut c, &msg).await?;
                Ok::<_, String>(c)
            }
            .await;
            settled.wait().await;
            go.wait().await;
            let mut c = first?;
            let end = Instant::now() + dur;
            let mut res = Ok(());
            while Instant::now() < end {
                let t = Instant::now();
                if let Err(e) = echo_once(&mut c, &msg).await {
                    res = Err(e);
                    break;
                }
                rtt.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
            if res.is_ok() {
                c.close().await;
            }
            res.map(|_| rtt)
        }));
    }
    settled.wait().await;
    tokio::time::sleep(SETTLE).await;
    go.wait().await;
    let cpu0 = sys::cpu_busy_us();
    let t0 = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_err = None;
    for h in hs {
        match h.await.map_err(|e| e.to_string())? {
            Ok(r) => all.extend(r),
            Err(e) => {
                errors += 1;
                first_err.get_or_insert(e);
            }
        }
    }
    // Closing handshakes are not part of the measured time.
    let secs = t0.elapsed().as_secs_f64().min(dur.as_secs_f64()).max(1e-9);
    let cpu_us = (sys::cpu_busy_us() - cpu0) as f64;
    if let Some(e) = first_err {
        return Err(format!("{errors} of {conns} connections failed: {e}"));
    }
    all.sort_unstable();
    Ok(Run {
        secs,
        cpu_us,
        count: all.len() as f64,
        rtt_ns: all,
        ..Run::default()
    })
}

/// W3: `conns` mostly idle clients, each echoing 32 bytes once a second,
/// held for `hold`. `rss` reads the proxy's resident memory.
pub async fn idle(
    addr: SocketAddr,
    conns: usize,
    hold: Duration,
    rss: impl Fn() -> u64,
) -> Result<Run, String> {
    let rss0 = rss();
    let k0 = sys::kernel_socket_mem();
    let clients = open_many(addr, conns, 200).await?;
    let go = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let mut hs = Vec::with_capacity(conns);
    for (i, mut c) in clients.into_iter().enumerate() {
        let go = go.clone();
        hs.push(tokio::spawn(async move {
            let msg = [b'x'; 32];
            go.wait().await;
            let start = Instant::now();
            // Spread the sends over the second.
            let offset = Duration::from_micros((i as u64 * 7919) % 1_000_000);
            let mut sent = 0u64;
            let mut tick = start + offset;
            while tick < start + hold {
                tokio::time::sleep_until(tick.into()).await;
                echo_once(&mut c, &msg).await?;
                sent += 1;
                tick += Duration::from_secs(1);
            }
            Ok::<_, String>((c, sent))
        }));
    }
    go.wait().await;
    let cpu0 = sys::cpu_busy_us();
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(conns);
    let mut count = 0;
    for h in hs {
        let (c, sent) = h.await.map_err(|e| e.to_string())??;
        count += sent;
        clients.push(c);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_us = (sys::cpu_busy_us() - cpu0) as f64;
    // Read memory while every connection is still open.
    let rss1 = rss();
    let k1 = sys::kernel_socket_mem();
    drop(clients);
    Ok(Run {
        secs,
        cpu_us,
        count: count as f64,
        rss_per_conn: rss1.saturating_sub(rss0) as f64 / conns as f64,
        kernel_per_conn: k1.saturating_sub(k0) as f64 / conns as f64,
        ..Run::default()
    })
}

/// W4: `par` clients, each in a loop of new sessions (connect, upgrade, one
/// 16-byte echo, close handshake) for `dur`.
pub async fn handshakes(addr: SocketAddr, par: usize, dur: Duration) -> Result<Run, String> {
    let cpu0 = sys::cpu_busy_us();
    let t0 = Instant::now();
    let end = t0 + dur;
    let mut hs = Vec::new();
    for w in 0..par {
        hs.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut last_err) = (0u64, 0u64, None);
            let mut i = 0u64;
            while Instant::now() < end {
                i += 1;
                let one = async {
                    let mut c = Client::connect(addr, "/echo", (w as u64) << 32 | i).await?;
                    echo_once(&mut c, b"0123456789abcdef").await?;
                    c.close().await;
                    Ok::<_, String>(())
                };
                match one.await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        last_err = Some(e);
                    }
                }
            }
            (ok, failed, last_err)
        }));
    }
    let (mut count, mut errors, mut last) = (0u64, 0u64, None);
    for h in hs {
        let (ok, failed, e) = h.await.map_err(|e| e.to_string())?;
        count += ok;
        errors += failed;
        if e.is_some() {
            last = e;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_us = (sys::cpu_busy_us() - cpu0) as f64;
    if count == 0 {
        return Err(format!(
            "no session completed: {}",
            last.unwrap_or_default()
        ));
    }
    Ok(Run {
        secs,
        cpu_us,
        count: count as f64,
        errors,
        ..Run::default()
    })
}
