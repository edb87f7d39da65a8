//! The eBPF sockmap path: after the hand-off the kernel moves the bytes.
//! [`super::DataPaths::relay`] hands a connection here once it is old
//! enough and idle (`limits.promote_after_ms`; 0: at the 101).
//!
//! Requires Linux 5.19+ (verdict-only sockmap for TCP, `bpf_get_socket_cookie`
//! in sk_skb, ring buffers, mmapable arrays), CAP_BPF and CAP_NET_ADMIN.
//! Every socket of a pair sits in `TARGETS` (redirect targets, no program)
//! for the whole connection; a socket whose incoming bytes the kernel relays
//! also sits in `SOCKS`, which carries the verdict. User space stays in the
//! loop only for the three things a naive relay gets wrong
//! (`shared/datapath-facts.md`):
//!
//! 1. **Bytes that came with the handshake.** The handshake's read-ahead is
//!    written first, then each socket's TCP queue is read empty in one large
//!    read (a bounded read before can leave an skb half-read, and the
//!    verdict would see it whole and send its head twice). After the sockets join the
//!    maps, `SO_RCVLOWAT` makes TCP call `sk_data_ready` once, so skbs that
//!    arrived in between go through the verdict at once, in order, instead of
//!    waiting for the next segment.
//! 2. **Backpressure.** The verdict counts what it redirects per direction
//!    and asks user space to look every quarter of the soft bound (half of
//!    `limits.max_buffer_per_direction`). If the target's receiver is more
//!    than an eighth of that bound behind (a stream, which the kernel's
//!    redirect moves slower than user space), the source leaves the
//!    verdict's map for good: its bytes then stay in its receive queue,
//!    TCP's window holds the sender back, and user space relays the rest
//!    once every redirected byte has entered the target's send queue (the
//!    same fence as for FIN), so the order holds.
//!
//!    The detach must not race the verdict. A delete from user space can
//!    land while `tcp_read_skb` is walking the receive queue; the skbs it
//!    takes after that meet no program and `sk_psock_verdict_recv` drops
//!    them. An earlier version that deleted from user space lost one 64 KiB
//!    skb in a CI run. The race is rare (the window is one verdict run, and
//!    the `slow_reader` test did not hit it in 72 user-space deletes), so no
//!    test can show it is gone; the locking below rules it out. So the delete is done by
//!    the `sock_ops` program, in the header-option callback that
//!    `tcp_current_mss` runs with the socket locked, outside that loop; user
//!    space brings it about with a zero-length `send` on the source (Linux
//!    5.10+ for the callback). The program is attached to the daemon's
//!    cgroup (v2) and arms only the sockets the daemon connects or accepts
//!    on its listeners. A socket shut down for writing can no longer be
//!    detached this way (`send` fails before TCP computes the MSS), so
//!    before a FIN goes out to a socket whose own direction is still in the
//!    kernel, that direction moves to user space (`send_fin`). Passing skbs to the socket's own queue, or putting
//!    a socket back into the map, returned stale bytes in short runs on
//!    Linux 6.18, so a direction never returns to the kernel. As a last
//!    resort the verdict enforces a hard limit
//!    (`limits.sockmap_max_queued`) and the pair is reset if user space
//!    could not react before it. A direction that moved for backpressure
//!    streams, and its pair is done with the kernel: the other direction
//!    moves too, and once both are fenced the pair leaves the maps and goes
//!    on in the next relay (io_uring, else the user-space one) with the
//!    bytes read but not yet sent. That relay moves a stream with fewer
//!    wake-ups than this module's `pump`.
//! 3. **Half-close.** On FIN from the source, user space waits until every
//!    redirected byte has entered the target's send queue
//!    (`bytes_acked + SIOCOUTQ` of the target) and only then shuts the target
//!    down for writing. A reset on one side resets the other.
//!
//! The verdict never passes bytes to the socket's own queue on purpose
//! (only when a redirect fails at close).

use std::collections::HashMap as StdHashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf, SockHash};

use super::shared_map::{SharedArray, Slots};
use aya::maps::Array as BpfArray;
use aya::programs::{CgroupAttachMode, SkSkb, SockOps};
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    DirCtl, DirStats, Event, EventKind, DETACH_DONE, DETACH_REQUESTED, MAP_CTL, MAP_DETACH,
    MAP_EVENTS, MAP_OWNER, MAP_PORTS, MAP_SLOTS, MAP_SOCKS, MAP_STATS, MAP_TARGETS, MAX_SOCKETS,
    PROG_SOCKOPS, PROG_VERDICT,
};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use super::ebpf::{from_object_error, lock, map, program, readable, take_map, ObjectError};
use super::pipe::Pipe;
use super::{userspace, CloseReason, Fallback, Pair, Side};
use crate::accounting::Accounting;
use crate::sockopt;

/// Why the sockmap path could not start.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    /// Loading the object, or one of its programs or maps, failed.
    #[error(transparent)]
    Object(ObjectError),
    /// No cgroup v2 hierarchy to attach the sock_ops program to.
    #[error("cgroup v2: {0}")]
    Cgroup(String),
    /// Every slot is in use: the connection falls back to the next path.
    #[error("all {0} sockmap connections are in use (limits.sockmap_max_connections)")]
    Full(u32),
    /// An epoll or tokio call failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

from_object_error!(SockmapError);

const EV_IN: u32 = 1;
const EV_REFILL: u32 = 2;
const EV_RDHUP: u32 = 4;
const EV_HUP: u32 = 8;
const EV_ERR: u32 = 16;
const EV_OUT: u32 = 32;
const EV_OVERRUN: u32 = 64;

/// How long a connection waits before looking again while it is waiting on
/// the kernel (redirect queue draining, target full).
const POLL: Duration = Duration::from_millis(2);
/// Bytes one [`Dir::pump`] call moves at most before the connection's loop
/// looks at its other direction (whose marks the kernel may be passing)
/// and lets the worker's other connections run: about a millisecond at the
/// 25-34 Gbit/s user space relayed in W1 here.
const PUMP_BUDGET: u64 = 4 << 20;
/// A receiver more than this share of the soft bound behind at a mark is
/// taking a stream: the kernel's redirect (its backlog worker) moves one
/// slower than the user-space relay, so the direction moves at once
/// rather than at the bound. W1 quick, 256 MiB one way, from the daemon's
/// log (the bulk starts 500 ms after the 101): waiting for the bound kept
/// 13-27% of the run's time in the kernel (20-35 MB behind, then the
/// fence), this kept 4-9 ms of about 70.
const STREAM_SHARE: u64 = 8;
/// A direction that has no slot yet.
const NO_SLOT: u32 = u32::MAX;
/// Read buffer of a drain; allocated only while a direction passes.
const DRAIN_BUF: usize = 1 << 20;
/// Buffer for the few bytes queued at the hand-off or after a FIN: below
/// glibc's mmap threshold (128 KiB), so it comes from the heap.
const SMALL_BUF: usize = 64 << 10;

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
    targets: SockHash<MapData, u64>,
    slots: BpfHashMap<MapData, u64, u32>,
    detach: BpfHashMap<MapData, u64, u32>,
    ports: BpfHashMap<MapData, u32, u8>,
    free: Slots,
}

/// The loaded verdict program, its maps, and the monitors that wake
/// connections.
pub struct Sockmap {
    maps: Mutex<Maps>,
    ctl: SharedArray<DirCtl>,
    stats: SharedArray<DirStats>,
    registry: Mutex<StdHashMap<u64, (Arc<Signal>, usize)>>,
    epoll: OwnedFd,
    valve: u64,
    soft: u64,
    max_connections: u32,
    /// Keeps the program attached for the life of the process.
    _ebpf: Mutex<Ebpf>,
}

impl Sockmap {
    /// Loads and attaches the verdict and sock_ops programs and starts the
    /// monitor tasks. `soft` is the per-direction memory bound: a direction
    /// whose receiver falls a sixteenth of it behind (a stream) moves to
    /// user space, with backpressure. `valve` is the hard limit the kernel
    /// enforces, past which the pair is reset (reached only if user space
    /// is too late).
    /// `max_connections` caps the pairs it carries at once (two slots each).
    pub fn load(soft: u64, valve: u64, max_connections: u32) -> Result<Arc<Sockmap>, SockmapError> {
        bump_memlock();
        // Debug records from the kernel only when someone will read them.
        let level: u8 = if tracing::level_filters::LevelFilter::current()
            >= tracing::level_filters::LevelFilter::DEBUG
        {
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
        let socks: SockHash<MapData, u64> = take_map(&mut ebpf, MAP_SOCKS)?;
        let prog: &mut SkSkb = program(&mut ebpf, PROG_VERDICT)?;
        prog.load()?;
        prog.attach(socks.fd())?;
        let mut owner: BpfArray<MapData, u32> = take_map(&mut ebpf, MAP_OWNER)?;
        owner.set(0, std::process::id(), 0)?;
        let cgroup = own_cgroup2()?;
        let ops: &mut SockOps = program(&mut ebpf, PROG_SOCKOPS)?;
        ops.load()?;
        // As a BPF link (Linux 5.7+), which takes no flags and always lets
        // other programs (another daemon's, say) share the cgroup.
        ops.attach(cgroup, CgroupAttachMode::Single)?;
        let detach = take_map(&mut ebpf, MAP_DETACH)?;
        let ports = take_map(&mut ebpf, MAP_PORTS)?;
        let targets = take_map(&mut ebpf, MAP_TARGETS)?;
        let slots = take_map(&mut ebpf, MAP_SLOTS)?;
        let ctl = SharedArray::new(map(&mut ebpf, MAP_CTL)?, MAX_SOCKETS)?;
        let stats = SharedArray::new(map(&mut ebpf, MAP_STATS)?, MAX_SOCKETS)?;
        let events: RingBuf<MapData> = take_map(&mut ebpf, MAP_EVENTS)?;
        // SAFETY: plain syscall; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: ep is a new fd that we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let sm = Arc::new(Sockmap {
            maps: Mutex::new(Maps {
                socks,
                targets,
                slots,
                detach,
                ports,
                free: Slots::new(max_connections.saturating_mul(2).min(MAX_SOCKETS)),
            }),
            ctl,
            stats,
            registry: Mutex::new(StdHashMap::new()),
            epoll,
            valve,
            // Half the per-direction bound: after the move to user space the
            // source's receive buffer and the drain buffer take the rest.
            soft: (soft / 2).min(valve / 2).max(1 << 16),
            max_connections,
            _ebpf: Mutex::new(ebpf),
        });
        tokio::spawn(ring_monitor(sm.clone(), readable(events)?));
        tokio::spawn(epoll_monitor(sm.clone(), readable(sm.epoll.try_clone()?)?));
        if let Some(l) = logger {
            tokio::spawn(log_monitor(readable(l)?));
        }
        Ok(sm)
    }

    /// Arms the sockets accepted on `port` (a listener of this daemon) for
    /// the detach. Call it before accepting on the port.
    pub fn serve_port(&self, port: u16) -> Result<(), SockmapError> {
        Ok(lock(&self.maps).ports.insert(u32::from(port), 1, 0)?)
    }

    /// Takes `src` out of `SOCKS` through the sock_ops program (see the
    /// module docs): true if it left, with every byte either redirected or
    /// still in its receive queue.
    fn detach(&self, cookie: u64, src: BorrowedFd<'_>) -> bool {
        if lock(&self.maps)
            .detach
            .insert(cookie, DETACH_REQUESTED, 0)
            .is_err()
        {
            return false;
        }
        // Zero bytes: TCP computes the MSS under the socket lock and sends
        // nothing. A socket past ESTABLISHED/CLOSE_WAIT returns EPIPE first.
        // SAFETY: a valid fd; a zero-length buffer is never read.
        unsafe {
            libc::send(
                src.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        let mut m = lock(&self.maps);
        let state = m.detach.get(&cookie, 0).ok();
        let _ = m.detach.remove(&cookie);
        state == Some(DETACH_DONE)
    }

    fn dispatch(&self, cookie: u64, bits: u32) {
        let hit = lock(&self.registry).get(&cookie).cloned();
        if let Some((sig, side)) = hit {
            sig.raise(side, bits);
        }
    }

    /// Watches a socket for FIN, errors and send space; with `readable`
    /// also for data (only for a source user space reads; a source in
    /// `SOCKS` would wake us for every segment).
    fn epoll_ctl(
        &self,
        op: i32,
        fd: BorrowedFd<'_>,
        cookie: u64,
        readable: bool,
    ) -> io::Result<()> {
        let mut events = libc::EPOLLRDHUP | libc::EPOLLOUT | libc::EPOLLET;
        if readable {
            events |= libc::EPOLLIN;
        }
        let mut ev = libc::epoll_event {
            events: events as u32,
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
    /// read-ahead bytes already delivered) if it cannot join the sockhash,
    /// and once both its directions stream in user space
    /// ([`Fallback::planned`], with the bytes read and not yet sent).
    pub async fn relay(
        self: &Arc<Self>,
        pair: Pair,
        acct: Arc<Accounting>,
    ) -> Result<CloseReason, Box<Fallback>> {
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
        // The handshake's bounded reads may have taken part of an skb; the verdict
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
        acct.add(true, client_ahead.len() as u64 + c_queued);
        acct.add(false, origin_ahead.len() as u64 + o_queued);
        // Every byte counted so far, what user space relayed before the
        // promotion included: the kernel's counts add to these.
        let ahead = <[u64; 2]>::from(acct.totals());
        let give_back = |c: std::net::TcpStream, o: std::net::TcpStream, why: String| match (
            userspace::from_std(c),
            userspace::from_std(o),
        ) {
            (Ok(client), Ok(origin)) => Err(Fallback::new(
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
            for i in 0..2 {
                let fd = fds[i].as_fd();
                if sockopt::tcp_info(fd)?.state() != 1 {
                    return Err(io::Error::other("socket is no longer established"));
                }
                cookies[i] = sockopt::cookie(fd)?;
                base[i] = sockopt::bytes_written(fd)?;
            }
            Ok((cookies, base))
        })();
        let (cookies, base) = match prep {
            Ok(v) => v,
            Err(e) => {
                let [c, o] = fds;
                return give_back(c, o, e.to_string());
            }
        };
        let signal = Arc::new(Signal::default());
        // Direction 0: client -> origin (source 0), direction 1: origin -> client.
        let mut dirs = [
            Dir::new(0, cookies, base[1], self.soft, self.valve),
            Dir::new(1, cookies, base[0], self.soft, self.valve),
        ];
        {
            let mut reg = lock(&self.registry);
            reg.insert(cookies[0], (signal.clone(), 0));
            reg.insert(cookies[1], (signal.clone(), 1));
        }
        let joined = (|| {
            let mut m = lock(&self.maps);
            for d in dirs.iter_mut() {
                d.slot = m
                    .free
                    .take()
                    .ok_or(SockmapError::Full(self.max_connections))?;
                self.ctl.store(
                    d.slot,
                    &DirCtl {
                        peer_cookie: d.peer,
                        refill_at: d.mark(),
                        limit: d.valve,
                    },
                );
                self.stats.reset(d.slot);
                m.slots.insert(d.cookie, d.slot, 0)?;
            }
            for (i, fd) in fds.iter().enumerate() {
                self.epoll_ctl(libc::EPOLL_CTL_ADD, fd.as_fd(), cookies[i], false)?;
            }
            for (i, fd) in fds.iter().enumerate() {
                m.targets.insert(cookies[i], fd.as_raw_fd(), 0)?;
            }
            Ok::<_, SockmapError>(())
        })();
        if let Err(e) = joined {
            // Nothing was redirected yet: no program runs for these sockets.
            self.leave(&dirs, &fds);
            let [c, o] = fds;
            return give_back(c, o, e.to_string());
        }
        for d in dirs.iter_mut() {
            // A source that cannot join SOCKS (say, its peer already sent FIN
            // and it left ESTABLISHED) is relayed by user space instead.
            let joined = lock(&self.maps)
                .socks
                .insert(d.cookie, fds[d.src].as_raw_fd(), 0);
            match joined {
                Ok(()) => {
                    d.active = true;
                    kick(fds[d.src].as_fd());
                }
                Err(e) => {
                    tracing::debug!("{} socket relays in user space: {e}", side_name(d.src));
                    let _ = self.epoll_ctl(libc::EPOLL_CTL_MOD, fds[d.src].as_fd(), d.cookie, true);
                }
            }
        }
        let ended = self.run(&mut dirs, &fds, &signal, &acct, ahead).await;
        let stats = self.leave(&dirs, &fds);
        acct.set(
            ahead[0] + stats[0].redirected + dirs[0].user_written,
            ahead[1] + stats[1].redirected + dirs[1].user_written,
            stats[0].last_ns.max(stats[1].last_ns),
        );
        let reason = match ended {
            Ended::Closed(reason) => reason,
            Ended::Left => {
                // Out of every map, with nothing in the kernel's hands: the
                // next relay takes the sockets and the bytes read but not
                // yet written, which it sends first (and counts).
                let [d0, d1] = &mut dirs;
                match (d0.take_held(), d1.take_held()) {
                    (Ok(c), Ok(o)) => {
                        let why = format!(
                            "both directions stream in user space ({} and {} bytes read and \
                             not yet sent go first)",
                            c.len(),
                            o.len()
                        );
                        let [client, origin] = fds;
                        return match (userspace::from_std(client), userspace::from_std(origin)) {
                            (Ok(client), Ok(origin)) => Err(Fallback::planned(
                                Pair {
                                    client,
                                    client_ahead: c.into(),
                                    origin,
                                    origin_ahead: o.into(),
                                },
                                why,
                            )),
                            (Err(e), _) | (_, Err(e)) => Ok(CloseReason::Internal(e.to_string())),
                        };
                    }
                    (Err(e), _) | (_, Err(e)) => CloseReason::Internal(format!(
                        "reading a pipe to hand the connection to user space: {e}"
                    )),
                }
            }
        };
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

    /// The connection's event loop after the pair joined the maps.
    async fn run(
        &self,
        dirs: &mut [Dir; 2],
        fds: &[std::net::TcpStream; 2],
        signal: &Signal,
        acct: &Accounting,
        ahead: [u64; 2],
    ) -> Ended {
        loop {
            let bits = [
                signal.bits[0].swap(0, Ordering::AcqRel),
                signal.bits[1].swap(0, Ordering::AcqRel),
            ];
            for (side, b) in bits.iter().enumerate() {
                if b & (EV_ERR | EV_HUP) != 0 {
                    if let Ok(Some(e)) = sockopt::take_error(fds[side].as_fd()) {
                        tracing::debug!("{} socket failed: {e}", side_name(side));
                        if let Some(d) = dirs.iter_mut().find(|d| d.src == side) {
                            d.settle_before_reset(self, fds).await;
                        }
                        return Ended::Closed(CloseReason::Reset(side_of(side)));
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
                if sb & EV_OVERRUN != 0 {
                    return Ended::Closed(CloseReason::Reset(d.overrun()));
                }
                let step = if d.active && sb & EV_REFILL != 0 {
                    d.check_valve(self, fds)
                } else {
                    Ok(())
                };
                let wake = sb & EV_IN != 0 || bits[d.dst] & EV_OUT != 0;
                let step = step.and_then(|()| {
                    if !d.active || d.fin_seen || wake || d.holds_bytes() {
                        d.pump(self, fds)
                    } else {
                        Ok(())
                    }
                });
                if let Err(side) = step {
                    return Ended::Closed(CloseReason::Reset(side));
                }
                d.account(acct, ahead[d.src]);
            }
            for i in 0..2 {
                if dirs[i].fin_due {
                    self.send_fin(dirs, i, fds);
                }
            }
            if dirs.iter().all(|d| d.done) {
                return Ended::Closed(CloseReason::Done);
            }
            // A direction streams in user space: the other follows it out
            // of the kernel, and the pair leaves for the next relay, which
            // moves a stream with fewer wake-ups than `pump` (W1 both ways,
            // see `Ended::Left`).
            for i in 0..2 {
                let (d, other) = this_and_other(dirs, i);
                // `soft` is u64::MAX once a move failed: not tried again.
                if d.streaming
                    && !d.active
                    && other.active
                    && !other.done
                    && !other.fin_seen
                    && other.soft != u64::MAX
                {
                    other.demote(self, fds, "the other direction streams in user space");
                }
            }
            if dirs.iter().all(Dir::may_leave) {
                return Ended::Left;
            }
            if dirs.iter().any(|d| !d.done && d.more) {
                tokio::task::yield_now().await;
                continue;
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

    /// Ends direction `i`: shuts its target down for writing. That target is
    /// the source of the other direction, and a socket past ESTABLISHED and
    /// CLOSE_WAIT can no longer be detached (the zero-length `send` fails
    /// before TCP computes the MSS). So if the other direction is still in
    /// the kernel and its sender may still send, it moves to user space
    /// first, where a slow receiver holds that sender back.
    fn send_fin(&self, dirs: &mut [Dir; 2], i: usize, fds: &[std::net::TcpStream; 2]) {
        let (d, other) = this_and_other(dirs, i);
        // A source that has sent FIN takes in nothing more: no need to move.
        if other.active && !other.done && !other.fin_seen {
            other.demote(self, fds, "the other direction half-closed");
        }
        let _ = sockopt::shutdown_write(fds[d.dst].as_fd());
        d.fin_due = false;
        d.done = true;
    }

    /// Takes a pair's sockets out of every map and monitor; returns their
    /// final counters.
    fn leave(&self, dirs: &[Dir; 2], fds: &[std::net::TcpStream; 2]) -> [DirStats; 2] {
        let mut out = [DirStats::default(); 2];
        let cookies = [dirs[0].cookie, dirs[1].cookie];
        {
            let mut m = lock(&self.maps);
            for c in &cookies {
                let _ = m.socks.remove(c);
            }
            for c in &cookies {
                let _ = m.targets.remove(c);
            }
            for (i, d) in dirs.iter().enumerate() {
                if d.slot == NO_SLOT {
                    continue;
                }
                out[i] = self.stats.load(d.slot);
                let _ = m.slots.remove(&d.cookie);
                m.free.give(d.slot);
            }
        }
        for (i, fd) in fds.iter().enumerate() {
            let _ = self.epoll_ctl(libc::EPOLL_CTL_DEL, fd.as_fd(), cookies[i], false);
        }
        let mut reg = lock(&self.registry);
        for c in &cookies {
            reg.remove(c);
        }
        out
    }
}

/// Direction `i` and the other one, both mutable.
fn this_and_other(dirs: &mut [Dir; 2], i: usize) -> (&mut Dir, &mut Dir) {
    let [first, second] = dirs;
    if i == 0 {
        (first, second)
    } else {
        (second, first)
    }
}

fn side_of(i: usize) -> Side {
    if i == 0 {
        Side::Client
    } else {
        Side::Origin
    }
}

fn side_name(i: usize) -> &'static str {
    if i == 0 {
        "client"
    } else {
        "origin"
    }
}

fn reset_both(c: &tokio::net::TcpStream, o: &tokio::net::TcpStream, side: Side) -> CloseReason {
    sockopt::set_reset_on_close(c.as_fd());
    sockopt::set_reset_on_close(o.as_fd());
    CloseReason::Reset(side)
}

/// How long a reset waits for bytes redirected before it (see
/// `Dir::settle_before_reset`).
const RESET_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// How a pair's time in the maps ended.
enum Ended {
    /// The connection is over.
    Closed(CloseReason),
    /// Both directions left the kernel and every redirected byte reached
    /// its target: the pair goes on in the next relay (io_uring, or the
    /// user-space one). Kept in `pump`, a moved W1 bulk direction ran
    /// 0.61x direct both ways against the user-space relay's 0.71x (run
    /// Y), one way 0.71x against 0.79x.
    Left,
}

/// One direction: bytes arriving on `src` go out of `dst`.
struct Dir {
    src: usize,
    dst: usize,
    /// Cookie of the source: its key in `SOCKS`, `TARGETS` and `SLOTS`.
    cookie: u64,
    peer: u64,
    /// Index of this direction's control and counters.
    slot: u32,
    /// Bytes in `dst` before the hand-off (`bytes_acked + SIOCOUTQ`).
    base_dst: u64,
    /// Bytes that may sit between the source and `dst`'s receiver before
    /// the connection is reset.
    valve: u64,
    /// Bytes that may sit between the source and `dst`'s receiver before
    /// the direction moves to user space; `u64::MAX` once a move failed.
    soft: u64,
    /// Bytes user space wrote to `dst` since the hand-off.
    user_written: u64,
    /// The verdict's count, as last read.
    redirected: u64,
    /// The hard cap on `redirected` last given to the kernel.
    limit: u64,
    /// The source is in `SOCKS`: the kernel relays this direction.
    active: bool,
    buf: Vec<u8>,
    pending: std::ops::Range<usize>,
    /// A streaming direction moved to user space splices its bytes
    /// socket -> pipe -> socket, as the user-space path's busy directions
    /// do; the pipe goes back to the worker's pool when the source runs dry.
    pipe: Option<Pipe>,
    /// No pipe to be had (limits): this direction copies through `buf`.
    no_pipe: bool,
    /// Moved to user space, and its bytes stream (a backpressure move, or
    /// a read of at least [`userspace::SPLICE_STAY`] since): it splices
    /// from then on. One moved at a half-close with a few bytes left
    /// copies, and takes no pipe.
    streaming: bool,
    /// Out of the kernel, and every byte it redirected is in `dst`'s send
    /// queue: the fence holds for good, and `pump` stops asking (it cost a
    /// `TCP_INFO` and a `SIOCOUTQ` on every second splice of a moved bulk
    /// direction).
    settled: bool,
    /// Waiting on the kernel (redirect queue draining, target full) with no
    /// event to say when it is done: look again after [`POLL`].
    waiting: bool,
    /// The last pump stopped at [`PUMP_BUDGET`]: more may be readable, and
    /// no event will say so.
    more: bool,
    fin_seen: bool,
    eof: bool,
    /// Every byte is out; `dst` is to be shut down for writing.
    fin_due: bool,
    done: bool,
}

impl Dir {
    fn new(src: usize, cookies: [u64; 2], base_dst: u64, soft: u64, valve: u64) -> Dir {
        Dir {
            src,
            dst: 1 - src,
            cookie: cookies[src],
            peer: cookies[1 - src],
            slot: NO_SLOT,
            base_dst,
            valve,
            soft,
            user_written: 0,
            redirected: 0,
            limit: valve,
            active: false,
            buf: Vec::new(),
            pending: 0..0,
            pipe: None,
            no_pipe: false,
            streaming: false,
            settled: false,
            waiting: false,
            more: false,
            fin_seen: false,
            eof: false,
            fin_due: false,
            done: false,
        }
    }

    /// Where the verdict next asks user space to look: a quarter of the soft
    /// bound on, so a slow receiver is noticed before it is a bound behind.
    fn mark(&self) -> u64 {
        self.redirected + (self.soft / 4).min(self.valve / 8)
    }

    /// Needs another look soon without an event to prompt it.
    fn busy(&self) -> bool {
        self.holds_bytes() || self.waiting || (self.fin_seen && !self.done)
    }

    /// Out of the kernel for good, fenced, and not yet at its end: the
    /// rest of this direction can go to another relay.
    fn may_leave(&self) -> bool {
        !self.active && self.settled && !self.eof && !self.fin_due && !self.done
    }

    /// The bytes read from the source and not yet written to `dst`, in
    /// order (what the pipe holds was read before `pending`).
    fn take_held(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        if let Some(mut p) = self.pipe.take() {
            p.drain_into(&mut out)?;
            p.put_back();
        }
        let pending = std::mem::take(&mut self.pending);
        if !pending.is_empty() {
            out.extend_from_slice(&self.buf[pending]);
        }
        self.buf = Vec::new();
        Ok(out)
    }

    /// Bytes read from the source and not yet written to `dst`.
    fn holds_bytes(&self) -> bool {
        !self.pending.is_empty() || self.pipe.as_ref().is_some_and(|p| p.held() > 0)
    }

    /// Everything written into `dst` for this direction.
    fn sent(&self) -> u64 {
        self.base_dst + self.redirected + self.user_written
    }

    /// Whether `dst` has yet to take in bytes sent its way: redirected ones
    /// may still sit in the psock's backlog (a work item sends them). What
    /// a FIN (`pump`) and a reset (`settle_before_reset`) wait on.
    fn dst_behind(&mut self, sm: &Sockmap, dst: BorrowedFd<'_>) -> io::Result<bool> {
        self.redirected = sm.stats.load(self.slot).redirected;
        Ok(sockopt::bytes_written(dst)? < self.sent())
    }

    /// The source was reset: bytes the kernel redirected from it before
    /// the reset may still be in the psock's backlog, on their way into
    /// `dst` (a work item sends them). Resetting `dst` now would drop them,
    /// so wait until `dst` has taken them in, as a FIN does (see `pump`),
    /// for at most [`RESET_SETTLE`]: a receiver that stopped reading
    /// cannot hold the reset back.
    async fn settle_before_reset(&mut self, sm: &Sockmap, fds: &[std::net::TcpStream; 2]) {
        if self.slot == NO_SLOT {
            return;
        }
        let end = std::time::Instant::now() + RESET_SETTLE;
        while matches!(self.dst_behind(sm, fds[self.dst].as_fd()), Ok(true))
            && std::time::Instant::now() < end
        {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// At a mark: if `dst`'s receiver is behind by more than the soft bound,
    /// move this direction to user space (backpressure); past the hard valve
    /// (user space was too late), give up on the connection. Else move the
    /// kernel's hard limit on to a valve past what the receiver
    /// acknowledged, and set the next mark.
    fn check_valve(&mut self, sm: &Sockmap, fds: &[std::net::TcpStream; 2]) -> Result<(), Side> {
        self.redirected = sm.stats.load(self.slot).redirected;
        let acked = sockopt::tcp_info(fds[self.dst].as_fd())
            .map_err(|_| side_of(self.dst))?
            .bytes_acked;
        let in_flight = self.sent().saturating_sub(acked);
        if in_flight > self.valve {
            return Err(self.overrun());
        }
        if in_flight > self.soft / STREAM_SHARE {
            let why = format!(
                "receiver {in_flight} bytes behind at a check (a stream: more than a \
                 {}th of limits.max_buffer_per_direction)",
                2 * STREAM_SHARE
            );
            self.demote(sm, fds, &why);
            if !self.active {
                self.streaming = true;
                return Ok(());
            }
        }
        self.limit = self
            .limit
            .max((acked + self.valve).saturating_sub(self.base_dst + self.user_written));
        sm.ctl.store(
            self.slot,
            &DirCtl {
                peer_cookie: self.peer,
                refill_at: self.mark(),
                limit: self.limit,
            },
        );
        Ok(())
    }

    /// Takes the source out of the verdict's map for good: the kernel stops
    /// taking its bytes, they stay in its receive queue, and TCP's window
    /// holds the sender back. User space relays the rest of this direction
    /// (`pump`), after everything already redirected has entered `dst`'s
    /// send queue, so the order holds. If the source cannot leave safely
    /// (not armed, or no longer established), the kernel keeps relaying it
    /// under the hard valve.
    fn demote(&mut self, sm: &Sockmap, fds: &[std::net::TcpStream; 2], why: &str) {
        if !sm.detach(self.cookie, fds[self.src].as_fd()) {
            tracing::warn!(
                "{} -> {}: {why}, but the {} socket cannot leave the kernel path \
                 safely; it stays there under limits.sockmap_max_queued",
                side_name(self.src),
                side_name(self.dst),
                side_name(self.src)
            );
            self.soft = u64::MAX;
            return;
        }
        self.active = false;
        let _ = sm.epoll_ctl(
            libc::EPOLL_CTL_MOD,
            fds[self.src].as_fd(),
            self.cookie,
            true,
        );
        tracing::info!(
            "{} -> {}: {why}; this direction continues in user space, with backpressure",
            side_name(self.src),
            side_name(self.dst),
        );
    }

    /// Logs why the pair is reset and names the side to blame.
    fn overrun(&self) -> Side {
        tracing::warn!(
            "{} receiver is more than {} bytes behind (sockmap_max_queued): resetting",
            side_name(self.dst),
            self.valve
        );
        side_of(self.dst)
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

    /// Relays what user space must: all of a direction whose source could
    /// not join `SOCKS`, and the end of every direction (EOF, then FIN once
    /// nothing is left in flight).
    /// Never blocks. `Err` names the side whose socket failed.
    fn pump(&mut self, sm: &Sockmap, fds: &[std::net::TcpStream; 2]) -> Result<(), Side> {
        let (src, dst) = (fds[self.src].as_fd(), fds[self.dst].as_fd());
        self.waiting = false;
        self.more = false;
        let stop_at = self.user_written + PUMP_BUDGET;
        loop {
            if let Some(p) = self.pipe.as_mut() {
                while p.held() > 0 {
                    match p.drain_to(dst.as_raw_fd()) {
                        Ok(n) => self.user_written += n as u64,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) => {
                            tracing::debug!("splice to {} failed: {e}", side_name(self.dst));
                            return Err(side_of(self.dst));
                        }
                    }
                }
            }
            while !self.pending.is_empty() {
                match send(dst, &self.buf[self.pending.clone()]) {
                    Ok(n) => {
                        self.pending.start += n;
                        self.user_written += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => {
                        tracing::debug!("send to {} failed: {e}", side_name(self.dst));
                        return Err(side_of(self.dst));
                    }
                }
            }
            // User-space bytes may go out only after every redirected byte
            // has entered `dst`'s send queue. Once the source is out of the
            // map the verdict redirects no more, so one pass settles it.
            if !self.settled {
                if self.dst_behind(sm, dst).map_err(|_| side_of(self.dst))? {
                    self.waiting = true;
                    return Ok(());
                }
                self.settled = !self.active;
            }
            if self.eof {
                // `run` sends the FIN, after moving the other direction out
                // of the kernel if it is still there.
                self.fin_due = true;
                self.buf = Vec::new();
                if let Some(p) = self.pipe.take() {
                    p.put_back();
                }
                return Ok(());
            }
            if self.active && !self.fin_seen {
                // The kernel relays; nothing for user space to read.
                return Ok(());
            }
            if self.user_written >= stop_at {
                // A source that never runs dry would keep this loop from
                // the other direction's marks (a both-ways run passed the
                // hard limit so, 1 run in 15) and from other connections.
                self.more = true;
                return Ok(());
            }
            if !self.active && self.streaming && !self.no_pipe {
                // Moved to user space and streaming: the bytes go through a
                // pipe, by reference, as on the user-space path. The copy
                // buffer (empty here) is not kept beside it.
                self.buf = Vec::new();
                match self.pipe.take().or_else(Pipe::take) {
                    None => self.no_pipe = true,
                    Some(mut p) => {
                        match p.fill_from(src.as_raw_fd()) {
                            Ok(0) => {
                                p.put_back();
                                self.eof = true;
                            }
                            Ok(_) => self.pipe = Some(p),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                // Idle: the empty pipe goes back to the pool.
                                p.put_back();
                                self.waiting = self.fin_seen;
                                return Ok(());
                            }
                            Err(e) => {
                                tracing::debug!("splice from {} failed: {e}", side_name(self.src));
                                return Err(side_of(self.src));
                            }
                        }
                        continue;
                    }
                }
            }
            if self.buf.capacity() == 0 {
                // A direction moved to user space, not yet known to stream
                // (a read this large makes it splice): a large buffer.
                // After a FIN little or nothing is queued, and a 1 MiB
                // buffer would be an mmap and a munmap (with a TLB
                // shootdown on every CPU) per session.
                let cap = if self.active { SMALL_BUF } else { DRAIN_BUF };
                self.buf = Vec::with_capacity(cap);
            }
            match recv_spare(src, &mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.pending = 0..n;
                    // Streaming for good: switching back to copies after
                    // a short splice took W1 one way from 0.63x to 0.55x
                    // direct (medians of 9 and 7 runs).
                    self.streaming |= !self.active && n >= userspace::SPLICE_STAY;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.buf = Vec::new();
                    // FIN is in but its data is still on its way to us.
                    self.waiting = self.fin_seen;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!("recv from {} failed: {e}", side_name(self.src));
                    return Err(side_of(self.src));
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

/// Moves whatever sits in `src`'s TCP queue to `dst`, reading until the
/// queue is empty. `Err` names the side whose socket failed.
async fn take_queued(
    src: &tokio::net::TcpStream,
    dst: &mut tokio::net::TcpStream,
    src_side: Side,
) -> Result<u64, Side> {
    let fd = src.as_fd();
    // Usually nothing is queued: no buffer at all then.
    let queued = sockopt::inq(fd).map_err(|_| src_side)?;
    if queued == 0 {
        return Ok(0);
    }
    // Usually a frame or two: a buffer for twice what is queued, from the
    // heap (not a fresh mmap per session). Reads go on until one comes back
    // short: only then is the queue empty, and a partly read skb is never
    // left behind. Uninitialised: only what arrives is touched.
    let want = usize::try_from(queued.saturating_mul(2)).unwrap_or(DRAIN_BUF);
    let mut buf: Vec<u8> = Vec::with_capacity(want.clamp(SMALL_BUF, DRAIN_BUF));
    let mut total = 0u64;
    loop {
        match recv_spare(fd, &mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                dst.write_all(&buf).await.map_err(|_| src_side.flip())?;
                total += n as u64;
                if n < buf.capacity() {
                    return Ok(total);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(_) => return Err(src_side),
        }
    }
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

/// The directory of this process's cgroup in the v2 hierarchy: the sockets
/// it creates (and accepts, which inherit the listener's) run the cgroup's
/// sock_ops programs.
fn own_cgroup2() -> Result<std::fs::File, SockmapError> {
    let read =
        |p: &str| std::fs::read_to_string(p).map_err(|e| SockmapError::Cgroup(format!("{p}: {e}")));
    let dir = cgroup2_dir(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)
        .map_err(|m| SockmapError::Cgroup(m.to_string()))?;
    std::fs::File::open(&dir).map_err(|e| SockmapError::Cgroup(format!("{dir}: {e}")))
}

/// Where this process's cgroup v2 directory is, from `/proc/self/cgroup`
/// (`0::<path>`) and `/proc/self/mountinfo` (the `cgroup2` mount; its root
/// field is not `/` inside a container with its own cgroup namespace).
fn cgroup2_dir(cgroup: &str, mountinfo: &str) -> Result<String, &'static str> {
    let rel = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 hierarchy")?
        .trim_end();
    // mountinfo: id parent dev root mountpoint opts [tags] - fstype src opts
    let (root, mount) = mountinfo
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split(' ').next()? != "cgroup2" {
                return None;
            }
            let mut f = pre.split(' ').skip(3);
            Some((f.next()?, f.next()?))
        })
        .ok_or("cgroup2 is not mounted")?;
    let below = match rel.strip_prefix(root) {
        Some(r) if root != "/" => r,
        _ => rel,
    };
    Ok(format!(
        "{}/{}",
        mount.trim_end_matches('/'),
        below.trim_start_matches('/')
    )
    .trim_end_matches('/')
    .to_string())
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
            let bits = match ev.kind {
                k if k == EventKind::Refill as u32 => EV_REFILL,
                k if k == EventKind::Overrun as u32 => EV_OVERRUN,
                // A failed redirect passed bytes to the source's queue.
                _ => EV_IN,
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
                if e & libc::EPOLLIN != 0 {
                    bits |= EV_IN;
                }
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

#[cfg(test)]
mod tests {
    use super::cgroup2_dir;

    const HYBRID: &str = "\
33 25 0:28 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:19 - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_cgroup_under_the_cgroup2_mount() {
        let cg = "4:memory:/x\n0::/\n";
        assert_eq!(cgroup2_dir(cg, HYBRID).unwrap(), "/sys/fs/cgroup/unified");
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_dir("0::/system.slice/sluice.service\n", unified).unwrap(),
            "/sys/fs/cgroup/system.slice/sluice.service"
        );
        // A container whose cgroup2 mount is rooted at its own cgroup.
        let ns = "50 40 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_dir("0::/kubepods/pod1/app\n", ns).unwrap(),
            "/sys/fs/cgroup/app"
        );
    }

    #[test]
    fn says_why_without_cgroup2() {
        assert_eq!(
            cgroup2_dir("4:memory:/x\n", HYBRID),
            Err("this process is in no cgroup v2 hierarchy")
        );
        let v1 = HYBRID.lines().next().unwrap();
        assert_eq!(cgroup2_dir("0::/\n", v1), Err("cgroup2 is not mounted"));
    }
}
