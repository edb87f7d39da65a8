//! The eBPF sockmap path: after the hand-off the kernel moves the bytes.
//!
//! Requires Linux 5.19+ (verdict-only sockmap for TCP, `bpf_get_socket_cookie`
//! in sk_skb, ring buffers), CAP_BPF and CAP_NET_ADMIN. User space stays in
//! the loop only for the three things a naive relay gets wrong
//! (`shared/datapath-facts.md`):
//!
//! 1. **Bytes that came with the handshake.** Hyper's read-ahead is written
//!    first, then each socket's TCP queue is read empty in one large read
//!    (hyper's small reads can leave an skb half-read, and the verdict would
//!    see it whole and send its head twice). After both sockets join the
//!    sockhash, `SO_RCVLOWAT` makes TCP call `sk_data_ready` once, so skbs
//!    that arrived in between go through the verdict at once, in order,
//!    instead of waiting for the next segment.
//! 2. **Backpressure.** Each direction has a credit: the verdict redirects
//!    only while `redirected <= limit`, and user space moves `limit` up as the
//!    target's receiver acknowledges bytes (`tcpi_bytes_acked`). Past it the
//!    verdict passes skbs to the source's own queue, charged to its receive
//!    buffer, so TCP closes the window towards the sender. User space writes
//!    those bytes on and the verdict resumes once all of them are written.
//! 3. **Half-close.** On FIN from the source, user space waits until every
//!    redirected byte has entered the target's send queue
//!    (`bytes_acked + SIOCOUTQ` of the target) and only then shuts the target
//!    down for writing. A reset on one side resets the other.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    DirCtl, DirStats, Event, EventKind, MAP_CTL, MAP_EVENTS, MAP_SOCKS, MAP_STATS, PROG_VERDICT,
};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use super::{userspace, CloseReason, Pair, Side};
use crate::accounting::Accounting;
use crate::sockopt;

/// Why the sockmap path could not start.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    /// Loading the object failed (no privileges, no BTF, verifier).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// Loading or attaching the verdict program failed.
    #[error("verdict program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// A map is missing or has the wrong type.
    #[error("map: {0}")]
    Map(#[from] aya::maps::MapError),
    /// The object lacks a map or program by that name.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// An epoll or tokio call failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

const EV_PASSED: u32 = 1;
const EV_REFILL: u32 = 2;
const EV_RDHUP: u32 = 4;
const EV_HUP: u32 = 8;
const EV_ERR: u32 = 16;
const EV_OUT: u32 = 32;

/// How long a connection waits before looking again while it is waiting on
/// the kernel (redirect queue draining, target full).
const POLL: Duration = Duration::from_millis(2);
/// Read buffer of a drain; allocated only while a direction passes.
const DRAIN_BUF: usize = 256 << 10;

/// Wake-ups for one connection: event bits per socket (0 client, 1 origin).
#[derive(Default)]
struct Signal {
    bits: [AtomicU32; 2],
    notify: Notify,
}

impl Signal {
    fn raise(&self, side: usize, bits: u32) {
        self.bits[side].fetch_or(bits, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

struct Maps {
    socks: SockHash<MapData, u64>,
    ctl: BpfHashMap<MapData, u64, DirCtl>,
    stats: BpfHashMap<MapData, u64, DirStats>,
}

/// The loaded verdict program, its maps, and the monitors that wake
/// connections.
pub struct Sockmap {
    maps: Mutex<Maps>,
    registry: Mutex<StdHashMap<u64, (Arc<Signal>, usize)>>,
    epoll: OwnedFd,
    bound: u64,
    /// Keeps the program attached for the life of the process.
    _ebpf: Mutex<Ebpf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sockmap {
    /// Loads and attaches the verdict program and starts the monitor tasks.
    /// `bound` is the memory one direction may hold.
    pub fn load(bound: u64) -> Result<Arc<Sockmap>, SockmapError> {
        bump_memlock();
        // Debug records from the kernel only when someone will read them.
        let level: u8 = if tracing::enabled!(tracing::Level::DEBUG) {
            aya_log::Level::Debug as u8
        } else {
            aya_log::Level::Warn as u8
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(aya::include_bytes_aligned!(env!("SLUICE_EBPF_OBJ")))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("eBPF log records will not reach this log: {e}");
                None
            }
        };
        let socks: SockHash<MapData, u64> = ebpf
            .take_map(MAP_SOCKS)
            .ok_or(SockmapError::Missing(MAP_SOCKS))?
            .try_into()?;
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_VERDICT)
            .ok_or(SockmapError::Missing(PROG_VERDICT))?
            .try_into()?;
        prog.load()?;
        prog.attach(socks.fd())?;
        let ctl = ebpf
            .take_map(MAP_CTL)
            .ok_or(SockmapError::Missing(MAP_CTL))?
            .try_into()?;
        let stats = ebpf
            .take_map(MAP_STATS)
            .ok_or(SockmapError::Missing(MAP_STATS))?
            .try_into()?;
        let events: RingBuf<MapData> = ebpf
            .take_map(MAP_EVENTS)
            .ok_or(SockmapError::Missing(MAP_EVENTS))?
            .try_into()?;
        // SAFETY: plain syscall; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: ep is a new fd that we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let sm = Arc::new(Sockmap {
            maps: Mutex::new(Maps { socks, ctl, stats }),
            registry: Mutex::new(StdHashMap::new()),
            epoll,
            bound,
            _ebpf: Mutex::new(ebpf),
        });
        tokio::spawn(ring_monitor(sm.clone(), readable(events)?));
        tokio::spawn(epoll_monitor(sm.clone(), readable(sm.epoll.try_clone()?)?));
        if let Some(l) = logger {
            tokio::spawn(log_monitor(readable(l)?));
        }
        Ok(sm)
    }

    fn dispatch(&self, cookie: u64, bits: u32) {
        let hit = lock(&self.registry).get(&cookie).cloned();
        if let Some((sig, side)) = hit {
            sig.raise(side, bits);
        }
    }

    fn epoll_ctl(&self, op: i32, fd: BorrowedFd<'_>, cookie: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLOUT | libc::EPOLLET) as u32,
            u64: cookie,
        };
        // SAFETY: valid fds and a valid event struct.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Relays one connection in the kernel. Gives the pair back (with the
    /// read-ahead bytes already delivered) if it cannot join the sockhash.
    pub async fn relay(
        self: &Arc<Self>,
        pair: Pair,
        acct: Arc<Accounting>,
    ) -> Result<CloseReason, (Pair, String)> {
        let Pair {
            mut client,
            client_ahead,
            mut origin,
            origin_ahead,
        } = pair;
        // Trap 3: what came with the handshake goes first.
        if origin.write_all(&client_ahead).await.is_err() {
            return Ok(reset_both(&client, &origin, Side::Origin));
        }
        if client.write_all(&origin_ahead).await.is_err() {
            return Ok(reset_both(&client, &origin, Side::Client));
        }
        // Hyper's small reads may have taken part of an skb; the verdict
        // would later see that skb whole and send its head twice. One large
        // read empties each TCP queue, so whatever is left is whole skbs.
        let c_queued = match take_queued(&client, &mut origin, Side::Client).await {
            Ok(n) => n,
            Err(side) => return Ok(reset_both(&client, &origin, side)),
        };
        let o_queued = match take_queued(&origin, &mut client, Side::Origin).await {
            Ok(n) => n,
            Err(side) => return Ok(reset_both(&client, &origin, side)),
        };
        let ahead = [
            client_ahead.len() as u64 + c_queued,
            origin_ahead.len() as u64 + o_queued,
        ];
        acct.add(true, ahead[0]);
        acct.add(false, ahead[1]);
        let give_back = |c: std::net::TcpStream, o: std::net::TcpStream, why: String| match (
            userspace::from_std(c),
            userspace::from_std(o),
        ) {
            (Ok(client), Ok(origin)) => Err((
                Pair {
                    client,
                    client_ahead: Default::default(),
                    origin,
                    origin_ahead: Default::default(),
                },
                why,
            )),
            (Err(e), _) | (_, Err(e)) => Ok(CloseReason::Internal(e.to_string())),
        };
        let (c, o) = match (client.into_std(), origin.into_std()) {
            (Ok(c), Ok(o)) => (c, o),
            (Err(e), _) | (_, Err(e)) => return Ok(CloseReason::Internal(e.to_string())),
        };
        let fds = [c, o];
        let prep = (|| {
            let mut cookies = [0u64; 2];
            let mut base = [0u64; 2];
            let mut credit = [0u64; 2];
            for i in 0..2 {
                let fd = fds[i].as_fd();
                if sockopt::tcp_info(fd)?.state() != 1 {
                    return Err(io::Error::other("socket is no longer established"));
                }
                cookies[i] = sockopt::cookie(fd)?;
                base[i] = sockopt::bytes_written(fd)?;
                // Payload in flight between the source and the target's
                // receiver; with the source's receive buffer (bound/4) and
                // skb overhead (up to 2x payload) it stays within the bound.
                credit[i] = self.bound / 4;
            }
            Ok((cookies, base, credit))
        })();
        let (cookies, base, credit) = match prep {
            Ok(v) => v,
            Err(e) => {
                let [c, o] = fds;
                return give_back(c, o, e.to_string());
            }
        };
        let signal = Arc::new(Signal::default());
        // Direction 0: client -> origin (source 0), direction 1: origin -> client.
        let mut dirs = [
            Dir::new(0, cookies, base[1], credit[0]),
            Dir::new(1, cookies, base[0], credit[1]),
        ];
        {
            let mut reg = lock(&self.registry);
            reg.insert(cookies[0], (signal.clone(), 0));
            reg.insert(cookies[1], (signal.clone(), 1));
        }
        let joined = (|| {
            let mut m = lock(&self.maps);
            for d in &dirs {
                m.ctl.insert(d.cookie, d.ctl(d.credit, 0), 0)?;
                m.stats.insert(d.cookie, DirStats::default(), 0)?;
            }
            for (i, fd) in fds.iter().enumerate() {
                self.epoll_ctl(libc::EPOLL_CTL_ADD, fd.as_fd(), cookies[i])?;
            }
            m.socks.insert(cookies[0], fds[0].as_raw_fd(), 0)?;
            Ok::<_, SockmapError>(())
        })();
        if let Err(e) = joined {
            self.leave(&cookies, &fds);
            let [c, o] = fds;
            return give_back(c, o, e.to_string());
        }
        let second = lock(&self.maps)
            .socks
            .insert(cookies[1], fds[1].as_raw_fd(), 0);
        if let Err(e) = second {
            // The client socket is in the map, but its peer is not: every
            // redirect fails, so the verdict passes all it gets to the
            // client's own queue, in order, and a user-space relay on both
            // sockets stays correct. It leaves the map at close.
            kick(fds[0].as_fd());
            tracing::warn!("origin socket cannot join the sockhash ({e}); relaying in user space");
            let [c, o] = fds;
            let (c2, o2) = match (c.try_clone(), o.try_clone()) {
                (Ok(c2), Ok(o2)) => (c2, o2),
                (Err(e), _) | (_, Err(e)) => {
                    self.leave(&cookies, &[c, o]);
                    return Ok(CloseReason::Internal(e.to_string()));
                }
            };
            let reason = match (userspace::from_std(c), userspace::from_std(o)) {
                (Ok(client), Ok(origin)) => {
                    let p = Pair {
                        client,
                        client_ahead: Default::default(),
                        origin,
                        origin_ahead: Default::default(),
                    };
                    userspace::relay(p, acct).await
                }
                (Err(e), _) | (_, Err(e)) => CloseReason::Internal(e.to_string()),
            };
            self.leave(&cookies, &[c2, o2]);
            return Ok(reason);
        }

        for fd in &fds {
            kick(fd.as_fd());
        }
        let reason = self.run(&mut dirs, &fds, &signal, &acct, ahead).await;
        let stats = self.leave(&cookies, &fds);
        acct.set(
            ahead[0] + stats[0].redirected + dirs[0].user_written,
            ahead[1] + stats[1].redirected + dirs[1].user_written,
            stats[0].last_ns.max(stats[1].last_ns),
        );
        if let CloseReason::Reset(_) | CloseReason::Internal(_) = reason {
            for fd in &fds {
                sockopt::set_reset_on_close(fd.as_fd());
            }
        }
        if stats[0].redirect_errors + stats[1].redirect_errors > 0 {
            tracing::debug!(
                "{} redirects found no peer",
                stats[0].redirect_errors + stats[1].redirect_errors
            );
        }
        Ok(reason)
    }

    /// The connection's event loop after both sockets joined the sockhash.
    async fn run(
        &self,
        dirs: &mut [Dir; 2],
        fds: &[std::net::TcpStream; 2],
        signal: &Signal,
        acct: &Accounting,
        ahead: [u64; 2],
    ) -> CloseReason {
        loop {
            let bits = [
                signal.bits[0].swap(0, Ordering::AcqRel),
                signal.bits[1].swap(0, Ordering::AcqRel),
            ];
            for (side, b) in bits.iter().enumerate() {
                if b & (EV_ERR | EV_HUP) != 0 {
                    if let Ok(Some(e)) = sockopt::take_error(fds[side].as_fd()) {
                        tracing::debug!("socket {side} failed: {e}");
                        return CloseReason::Reset(if side == 0 {
                            Side::Client
                        } else {
                            Side::Origin
                        });
                    }
                }
            }
            for d in dirs.iter_mut() {
                if d.done {
                    continue;
                }
                let sb = bits[d.src];
                if sb & EV_RDHUP != 0 {
                    d.fin_seen = true;
                }
                if sb & EV_REFILL != 0 && !d.busy() {
                    if let Err(e) = d.write_ctl(self, fds) {
                        return CloseReason::Internal(e.to_string());
                    }
                }
                if sb & (EV_PASSED | EV_RDHUP) != 0 || bits[d.dst] & EV_OUT != 0 || d.busy() {
                    if let Err(side) = d.pump(self, fds) {
                        return CloseReason::Reset(side);
                    }
                }
                d.account(acct, ahead[d.src]);
            }
            if dirs.iter().all(|d| d.done) {
                return CloseReason::Done;
            }
            if dirs.iter().any(|d| !d.done && d.busy()) {
                tokio::select! {
                    _ = signal.notify.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            } else {
                signal.notify.notified().await;
            }
        }
    }

    /// Takes a pair's sockets out of every map and monitor; returns their
    /// final counters.
    fn leave(&self, cookies: &[u64; 2], fds: &[std::net::TcpStream; 2]) -> [DirStats; 2] {
        let mut out = [DirStats::default(); 2];
        {
            let mut m = lock(&self.maps);
            for c in cookies {
                let _ = m.socks.remove(c);
            }
            for (i, c) in cookies.iter().enumerate() {
                out[i] = m.stats.get(c, 0).unwrap_or_default();
                let _ = m.stats.remove(c);
                let _ = m.ctl.remove(c);
            }
        }
        for (i, fd) in fds.iter().enumerate() {
            let _ = self.epoll_ctl(libc::EPOLL_CTL_DEL, fd.as_fd(), cookies[i]);
        }
        let mut reg = lock(&self.registry);
        for c in cookies {
            reg.remove(c);
        }
        out
    }
}

/// Moves whatever sits in `src`'s TCP queue to `dst` with one read large
/// enough for all of it. `Err` names the side whose socket failed.
async fn take_queued(
    src: &tokio::net::TcpStream,
    dst: &mut tokio::net::TcpStream,
    src_side: Side,
) -> Result<u64, Side> {
    let fd = src.as_fd();
    // Usually nothing is queued: no buffer at all then.
    if sockopt::inq(fd).map_err(|_| src_side)? == 0 {
        return Ok(0);
    }
    // The queue holds at most about SO_RCVBUF bytes; twice that takes it
    // whole even if more arrives meanwhile. Uninitialised: only what
    // arrives is touched.
    let rcvbuf = socket2::SockRef::from(&fd).recv_buffer_size().unwrap_or(0);
    let mut buf: Vec<u8> = Vec::with_capacity(DRAIN_BUF.max(rcvbuf * 2));
    match recv_spare(fd, &mut buf) {
        Ok(n) => {
            dst.write_all(&buf).await.map_err(|_| src_side.flip())?;
            Ok(n as u64)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(_) => Err(src_side),
    }
}

/// Registers an fd-owning object with tokio for readability.
fn readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: each `T` here owns its fd (a map, an OwnedFd, the logger's
    // ring) and keeps it open and unchanged until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

fn reset_both(c: &tokio::net::TcpStream, o: &tokio::net::TcpStream, side: Side) -> CloseReason {
    sockopt::set_reset_on_close(c.as_fd());
    sockopt::set_reset_on_close(o.as_fd());
    CloseReason::Reset(side)
}

/// One direction: bytes arriving on `src` go out of `dst`.
struct Dir {
    src: usize,
    dst: usize,
    /// Sockhash key of the source, which keys this direction's entries.
    cookie: u64,
    peer: u64,
    /// Bytes in `dst` before the hand-off (`bytes_acked + SIOCOUTQ`).
    base_dst: u64,
    credit: u64,
    /// Bytes user space wrote to `dst` since the hand-off.
    user_written: u64,
    /// Bytes user space read from `src` since the hand-off: all of them
    /// passed by the verdict, because the TCP queue was empty when `src`
    /// joined the sockhash and the verdict empties it on every arrival.
    passed_read: u64,
    /// `passed_read` as last published to the kernel (`DirCtl::drained`).
    drained: u64,
    redirected: u64,
    buf: Vec<u8>,
    pending: std::ops::Range<usize>,
    /// `dst`'s redirect queue was not yet empty at the last look, or passed
    /// bytes were counted but not yet readable.
    waiting: bool,
    fin_seen: bool,
    eof: bool,
    done: bool,
}

impl Dir {
    fn new(src: usize, cookies: [u64; 2], base_dst: u64, credit: u64) -> Dir {
        Dir {
            src,
            dst: 1 - src,
            cookie: cookies[src],
            peer: cookies[1 - src],
            base_dst,
            credit,
            user_written: 0,
            passed_read: 0,
            drained: 0,
            redirected: 0,
            buf: Vec::new(),
            pending: 0..0,
            waiting: false,
            fin_seen: false,
            eof: false,
            done: false,
        }
    }

    /// Needs another look soon without an event to prompt it.
    fn busy(&self) -> bool {
        !self.pending.is_empty() || self.waiting || (self.fin_seen && !self.done)
    }

    fn ctl(&self, limit: u64, refill_at: u64) -> DirCtl {
        DirCtl {
            peer_cookie: self.peer,
            limit,
            refill_at,
            drained: self.drained,
        }
    }

    /// Publishes `drained` and a limit that keeps what sits between
    /// the source and `dst`'s receiver (redirect queue plus `dst`'s send
    /// queue) within the credit.
    fn write_ctl(&self, sm: &Sockmap, fds: &[std::net::TcpStream; 2]) -> io::Result<()> {
        let acked = sockopt::tcp_info(fds[self.dst].as_fd())?.bytes_acked;
        let limit = (acked + self.credit).saturating_sub(self.base_dst + self.user_written);
        let refill_at = limit.saturating_sub(self.credit / 2);
        lock(&sm.maps)
            .ctl
            .insert(self.cookie, self.ctl(limit, refill_at), 0)
            .map_err(io::Error::other)
    }

    fn stats(&self, sm: &Sockmap) -> DirStats {
        lock(&sm.maps)
            .stats
            .get(&self.cookie, 0)
            .unwrap_or_default()
    }

    fn account(&self, acct: &Accounting, ahead: u64) {
        let total = ahead + self.redirected + self.user_written;
        let counter = if self.src == 0 {
            &acct.client_to_origin
        } else {
            &acct.origin_to_client
        };
        counter.fetch_max(total, Ordering::Relaxed);
    }

    /// Moves what the verdict passed to user space on to `dst`, in order, and
    /// propagates FIN once nothing is left in flight. Never blocks.
    /// `Err` names the side whose socket failed.
    fn pump(&mut self, sm: &Sockmap, fds: &[std::net::TcpStream; 2]) -> Result<(), Side> {
        let side = |i: usize| if i == 0 { Side::Client } else { Side::Origin };
        let (src, dst) = (fds[self.src].as_fd(), fds[self.dst].as_fd());
        loop {
            while !self.pending.is_empty() {
                match send(dst, &self.buf[self.pending.clone()]) {
                    Ok(n) => {
                        self.pending.start += n;
                        self.user_written += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => {
                        tracing::debug!("send to {} failed: {e}", self.dst);
                        return Err(side(self.dst));
                    }
                }
            }
            let st = self.stats(sm);
            self.redirected = st.redirected;
            // Passed bytes may be written only after every redirected byte
            // has entered `dst`'s send queue.
            let written = sockopt::bytes_written(dst).map_err(|_| side(self.dst))?;
            self.waiting = written < self.base_dst + st.redirected + self.user_written;
            if self.waiting {
                return Ok(());
            }
            if self.eof {
                let _ = sockopt::shutdown_write(dst);
                self.done = true;
                self.buf = Vec::new();
                return Ok(());
            }
            if self.passed_read == st.passed && !self.fin_seen {
                // Everything passed is read and written: the verdict may
                // redirect again.
                if self.drained != self.passed_read {
                    self.drained = self.passed_read;
                    self.write_ctl(sm, fds).map_err(|_| side(self.dst))?;
                }
                self.buf = Vec::new();
                return Ok(());
            }
            if self.passed_read == st.passed {
                // Only FIN is expected: peek one byte instead of allocating.
                match recv(src, &mut [0u8; 1], libc::MSG_PEEK) {
                    Ok(0) => {
                        self.eof = true;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.waiting = true;
                        return Ok(());
                    }
                    Err(_) => return Err(side(self.src)),
                }
            }
            if self.buf.capacity() == 0 {
                self.buf = Vec::with_capacity(DRAIN_BUF);
            }
            match recv_spare(src, &mut self.buf) {
                // The socket reports EOF once FIN is in, even while passed
                // skbs still wait in the psock's work queue: only count it
                // when every passed byte has been read.
                Ok(0) if self.passed_read == self.stats(sm).passed => self.eof = true,
                Ok(0) => {
                    self.waiting = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.passed_read += n as u64;
                    self.pending = 0..n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Counted by the verdict but not queued yet (or FIN
                    // seen before its data): look again shortly.
                    self.waiting = true;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!("recv from {} failed: {e}", self.src);
                    return Err(side(self.src));
                }
            }
        }
    }
}

/// Makes TCP run `sk_data_ready` now (`tcp_set_rcvlowat`, Linux 4.17+), so
/// the verdict takes skbs that arrived before the socket joined the map.
fn kick(fd: BorrowedFd<'_>) {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and an int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receives into `buf`'s whole capacity without zeroing it first; `buf`'s
/// length becomes what arrived.
fn recv_spare(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    // SAFETY: recv writes at most `capacity` bytes into the spare capacity.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.capacity(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised the first n bytes.
    unsafe { buf.set_len(n as usize) };
    Ok(n as usize)
}

fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn bump_memlock() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct; failure is harmless on 5.11+.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
}

async fn ring_monitor(sm: Arc<Sockmap>, mut ring: AsyncFd<RingBuf<MapData>>) {
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            tracing::error!("sockmap event ring failed; connections fall back to polling");
            return;
        };
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole Event; read_unaligned copes
            // with the ring's 8-byte alignment either way.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let bits = if ev.kind == EventKind::Passed as u32 {
                EV_PASSED
            } else {
                EV_REFILL
            };
            sm.dispatch(ev.cookie, bits);
        }
        guard.clear_ready();
    }
}

async fn epoll_monitor(sm: Arc<Sockmap>, ep: AsyncFd<OwnedFd>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        let Ok(mut guard) = ep.readable().await else {
            tracing::error!("sockmap epoll monitor failed");
            return;
        };
        loop {
            // SAFETY: events is a valid buffer of that many entries.
            let n = unsafe {
                libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 0)
            };
            if n <= 0 {
                break;
            }
            for ev in &events[..n as usize] {
                let e = ev.events as i32;
                let mut bits = 0;
                if e & libc::EPOLLRDHUP != 0 {
                    bits |= EV_RDHUP;
                }
                if e & libc::EPOLLHUP != 0 {
                    bits |= EV_HUP;
                }
                if e & libc::EPOLLERR != 0 {
                    bits |= EV_ERR;
                }
                if e & libc::EPOLLOUT != 0 {
                    bits |= EV_OUT;
                }
                let cookie = ev.u64;
                sm.dispatch(cookie, bits);
            }
            if (n as usize) < events.len() {
                break;
            }
        }
        guard.clear_ready();
    }
}

async fn log_monitor(mut l: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>) {
    loop {
        let Ok(mut guard) = l.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
