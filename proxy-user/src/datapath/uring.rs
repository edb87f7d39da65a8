//! The io_uring relay: each worker thread runs a tokio-uring runtime and
//! relays the connections it accepted as local tasks on its own rings
//! (thread per core, as on the other paths). [`super::DataPaths::relay`]
//! hands a connection here once it is old enough and idle
//! (`limits.promote_after_ms`; 0: at the 101).
//!
//! A direction starts with `IORING_OP_READ`/`IORING_OP_WRITE` through a
//! small buffer. Once a read fills it, the direction streams: it splices
//! socket → pooled pipe → socket in chains of `ROUNDS` rounds that one
//! io-wq worker runs without coming back to user space (`uring_splice`),
//! until a splice moves less than `SPLICE_STAY`.
//! Quick W1 runs, 8 alternating rounds of 5 repetitions (`sluice-bench
//! --quick --targets direct,sluice-uring --workloads w1 --reps 5`), median
//! ratio to direct, one way / both ways: 0.62x / 0.55x with reads and
//! writes of up to 4 MiB; 0.77x / 0.77x with chains of 8 rounds (4 rounds:
//! 0.76x / 0.70x in another 8; 1 round: 0.62x / 0.69x). Without a pipe
//! (limits), or without `IORING_OP_SPLICE`, a busy direction reads and
//! writes through a buffer of up to 4 MiB instead.
//!
//! The cost of splices here: the sockets are blocking (io_uring reads need
//! that), so a drain into a reader that stalls mid-stream holds its io-wq
//! worker thread until the reader takes the bytes or the pair ends. An
//! idle direction holds neither a thread nor a buffer: once a wait for
//! bytes has taken `IDLE` or more, the next waits in an
//! `IORING_OP_POLL_ADD` on the second ring and takes a pooled buffer only
//! when bytes are there (without that ring it waits in a read, holding its
//! buffer).
//!
//! Requires Linux 5.11+ (tokio-uring) and `kernel.io_uring_disabled = 0`;
//! splices need 5.7+ (`IORING_OP_SPLICE`). [`probe`] checks the ring and
//! the opcodes at start-up. Half-close and reset behave as in the
//! user-space relay.

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::pipe::{self, Pipe};
use super::uring_splice::{self, KeepAlive};
use super::{CloseReason, DataPath, OnClose, Pair, Side};
use crate::accounting::Accounting;
use crate::sockopt;

/// Size of a direction's buffer while its reads come back short (taken from
/// the worker's pool while the direction has bytes to move).
const SMALL: usize = 32 << 10;
/// A streaming direction keeps splicing while each splice moves at least
/// this much; then it goes back to reads (as in the user-space relay).
const SPLICE_STAY: usize = 64 << 10;
/// A direction whose last wait for bytes took this long is idle: its next
/// wait is a poll, without a buffer (see `pump`).
const IDLE: Duration = Duration::from_millis(250);
/// Rounds (poll, fill, drain) per chain handed to io-wq: each chain costs
/// a wake-up of an io-wq worker and one of this thread (see the module
/// docs for what 1, 4 and 8 measured).
const ROUNDS: usize = 8;
/// Most a direction's buffer grows to once a read has filled the small one,
/// where it cannot splice:
/// large reads and writes mean few ring round trips per byte on bulk. W1 in
/// quick runs, one way and both ways against direct: 0.52x and 0.50x with
/// 64 KiB for every read; 0.67-0.71x and 0.48x with 256 KiB; 0.73-0.87x and
/// 0.52-0.57x with 1 MiB; 0.71-0.87x and 0.55-0.65x with 4 MiB (userspace
/// beside it: 0.73-0.80x and 0.52-0.69x). Never more than half of
/// `limits.max_buffer_per_direction`, which the socket buffers share.
const LARGE: usize = 4 << 20;
/// How many large buffers a worker keeps for the next busy direction. More
/// are freed (glibc maps buffers this size on their own, so the memory goes
/// back at once): a burst of bulk connections must not pin its peak.
const LARGE_KEPT: usize = 4;
/// How many small buffers a worker keeps for directions that wake up
/// (2 MiB). The rest are freed: a burst must not pin its peak. 300 busy
/// connections relayed, then closed: the daemon's RSS came back from a
/// peak of 26.4 MB to 10.9 (4.9 before the burst); keeping every small
/// buffer, it stayed at 25.6. W3, which takes and gives back a buffer per
/// message, did not creep: 3.08-3.12 KiB per idle connection against
/// 3.47-3.51 keeping them all (full size, alternating).
const SMALL_KEPT: usize = 64;

struct Job {
    client: std::net::TcpStream,
    client_ahead: Bytes,
    origin: std::net::TcpStream,
    origin_ahead: Bytes,
    acct: Arc<Accounting>,
    large: usize,
    splice: bool,
}

thread_local! {
    /// Whether this thread runs a tokio-uring runtime ([`worker_runtime`]).
    static WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets up a worker's tokio-uring runtime and records that this thread has
/// one (the relay spawns into its `LocalSet`).
///
/// With `IORING_SETUP_COOP_TASKRUN` (Linux 5.19+) a completion that arrives
/// while the worker runs is handled at its next kernel entry; without it
/// the kernel interrupts the worker at once (an IPI, a VM exit on a virtual
/// machine). Older kernels refuse the flag, and the ring is set up without it.
pub fn worker_runtime() -> io::Result<tokio_uring::Runtime> {
    let rt = tokio_uring::Runtime::new(
        tokio_uring::builder().uring_builder(tokio_uring::uring_builder().setup_coop_taskrun()),
    )
    .or_else(|e| {
        tracing::info!("io_uring ring without COOP_TASKRUN (Linux 5.19+): {e}");
        tokio_uring::Runtime::new(&tokio_uring::builder())
    })?;
    WORKER.with(|w| w.set(true));
    Ok(rt)
}

/// Checks that io_uring can be set up here and has the opcodes the relay
/// needs; `Ok(true)` if it has those for splices too (Linux 5.7+).
pub fn probe() -> io::Result<bool> {
    use io_uring::opcode;
    let ring = io_uring::IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    // IORING_REGISTER_PROBE: Linux 5.6+.
    ring.submitter().register_probe(&mut probe)?;
    let splice = [
        opcode::Splice::CODE,
        opcode::PollAdd::CODE,
        opcode::AsyncCancel::CODE,
    ]
    .iter()
    .all(|c| probe.is_supported(*c));
    for (code, name) in [
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::Write::CODE, "IORING_OP_WRITE"),
        (opcode::Close::CODE, "IORING_OP_CLOSE"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{name} not supported"),
            ));
        }
    }
    Ok(splice)
}

/// The io_uring relay, once [`probe`] found io_uring usable. Connections
/// relay on the worker thread that accepted them (see [`worker_runtime`]).
pub struct UringRelay {
    /// Size of a busy direction's buffer, when it copies.
    large: usize,
    /// Whether a busy direction splices ([`probe`]).
    splice: bool,
}

impl UringRelay {
    /// Probes io_uring. `bound` is `limits.max_buffer_per_direction`.
    pub fn start(bound: u64) -> Result<UringRelay, String> {
        let splice = probe().map_err(|e| e.to_string())?;
        Ok(UringRelay {
            large: large_for(bound),
            splice,
        })
    }

    /// Whether this thread has a ring to relay on: a worker whose runtime
    /// set one up (see [`worker_runtime`]).
    pub fn here(&self) -> bool {
        WORKER.with(|w| w.get())
    }

    /// Starts relaying one connection on this worker's ring ([`Self::here`]
    /// must hold), in a local task that calls `closed` when the connection
    /// ends. The caller runs in that worker's `LocalSet` (the server spawns
    /// every connection there on a worker with a ring).
    pub fn spawn(&self, pair: Pair, acct: Arc<Accounting>, closed: OnClose) {
        let Pair {
            client,
            client_ahead,
            origin,
            origin_ahead,
        } = pair;
        let (client, origin) = match (to_blocking_std(client), to_blocking_std(origin)) {
            (Ok(c), Ok(o)) => (c, o),
            (Err(e), _) | (_, Err(e)) => {
                return closed(DataPath::Uring, CloseReason::Internal(e.to_string()))
            }
        };
        let job = Job {
            client,
            client_ahead,
            origin,
            origin_ahead,
            acct,
            large: self.large,
            splice: self.splice,
        };
        // A task of its own, as the relay's futures are !Send; the caller's
        // task ends, so an idle connection holds this one task only.
        let mut closed = CloseOnDrop(Some(closed));
        tokio::task::spawn_local(async move { closed.close(run(job).await) });
    }
}

/// A relay task's close phase, run once: when the relay ends, or from the
/// drop if the task ends without a reason (it panicked, or the runtime
/// shut down under it).
struct CloseOnDrop(Option<OnClose>);

impl CloseOnDrop {
    fn close(&mut self, reason: CloseReason) {
        if let Some(c) = self.0.take() {
            c(DataPath::Uring, reason);
        }
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.close(CloseReason::Internal("io_uring relay task ended".into()));
    }
}

/// io_uring must not see O_NONBLOCK, or reads fail with EAGAIN instead of waiting.
fn to_blocking_std(s: tokio::net::TcpStream) -> io::Result<std::net::TcpStream> {
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

async fn run(job: Job) -> CloseReason {
    let client = Rc::new(TcpStream::from_std(job.client));
    let origin = Rc::new(TcpStream::from_std(job.origin));
    let conn = Conn {
        acct: &job.acct,
        large: job.large,
        splice: job.splice,
        first_fin: Cell::new(false),
    };
    let result = futures_util::future::try_join(
        pump(&client, &origin, job.client_ahead, true, &conn),
        pump(&origin, &client, job.origin_ahead, false, &conn),
    )
    .await;
    let reason = match result {
        Ok(_) => CloseReason::Done,
        Err(side) => {
            // A read, or a splice chain's poll, still in flight on the other
            // socket holds a reference to it, so close alone would not reset
            // it. SHUT_RD ends that wait; the last reference then closes with
            // SO_LINGER 0 (RST).
            for s in [&*client, &*origin] {
                sockopt::set_reset_on_close(fd_of(s));
                let _ = socket2::SockRef::from(&fd_of(s)).shutdown(std::net::Shutdown::Read);
            }
            CloseReason::Reset(side)
        }
    };
    drop(client);
    drop(origin);
    reason
}

/// What the two directions of one connection share.
struct Conn<'a> {
    acct: &'a Accounting,
    large: usize,
    splice: bool,
    /// An EOF was passed on already (see [`pass_fin`]).
    first_fin: Cell<bool>,
}

/// Passes an EOF on as a FIN to `dst`. Only the first needs `shutdown`:
/// at the second both pumps are done, `run` returns at once, and closing a
/// socket whose bytes were all read sends the FIN (one syscall less per
/// session, as on the user-space path). A failure (the peer reset
/// meanwhile) is the other direction's to report.
fn pass_fin(dst: &TcpStream, first_fin: &Cell<bool>) {
    if !first_fin.replace(true) {
        let _ = dst.shutdown(std::net::Shutdown::Write);
    }
}

fn fd_of(s: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd belongs to `s`, which outlives the borrow.
    unsafe { sockopt::borrow(s.as_raw_fd()) }
}

async fn pump(
    src: &Rc<TcpStream>,
    dst: &Rc<TcpStream>,
    ahead: Bytes,
    to_origin: bool,
    conn: &Conn<'_>,
) -> Result<(), Side> {
    let (acct, large, splice, first_fin) = (conn.acct, conn.large, conn.splice, &conn.first_fin);
    let (src_side, dst_side) = if to_origin {
        (Side::Client, Side::Origin)
    } else {
        (Side::Origin, Side::Client)
    };
    if !ahead.is_empty() {
        let n = ahead.len() as u64;
        write_all(dst, ahead.to_vec())
            .await
            .0
            .map_err(|_| dst_side)?;
        acct.add(to_origin, n);
    }
    // Whether this worker's second ring can poll (and splice).
    let ring = splice && uring_splice::available();
    let keep: KeepAlive = Rc::clone(src) as KeepAlive;
    let mut buf = PooledBuf::take(SMALL, large);
    // No splices here (no IORING_OP_SPLICE, no splice ring on this worker,
    // or no pipe under the limits): a busy direction copies through `large`.
    let mut no_pipe = !splice;
    // The last read came back short: the source's queue is empty.
    let mut drained = true;
    // The last wait for bytes took at least `IDLE` (a new connection counts
    // as idle: most WebSocket connections are, most of the time).
    let mut slow = true;
    loop {
        let waiting = Instant::now();
        if drained && slow && ring {
            // An idle direction waits in a poll with its buffer back in the
            // pool: a read in flight would pin the buffer's touched pages
            // for as long as the direction stays idle (W3 in a fresh
            // process: 12.3 against 4.1-4.5 KiB per idle connection; 3.9
            // when every wait polled). A busy one reads at once, which
            // saves a ring round trip per message (W2 64 B: about a fifth
            // of the rate when every read waited in a poll first).
            let size = buf.0.as_ref().map_or(SMALL, Vec::capacity);
            drop(buf);
            uring_splice::readable(src.as_raw_fd(), &keep)
                .map_err(|_| src_side)?
                .await
                .map_err(|_| src_side)?;
            buf = PooledBuf::take(size, large);
        }
        let mut b = buf.0.take().unwrap_or_default();
        b.clear();
        let (res, b) = src.read(b).await;
        let size = b.capacity();
        buf.0 = Some(b);
        let n = res.map_err(|_| src_side)?;
        if n == 0 {
            pass_fin(dst, first_fin);
            return Ok(());
        }
        drained = n < size;
        slow = waiting.elapsed() >= IDLE;
        let (res, b) = write_all(dst, buf.0.take().unwrap_or_default()).await;
        buf.0 = Some(b);
        res.map_err(|_| dst_side)?;
        acct.add(to_origin, n as u64);
        // A full read: more is queued, and the direction streams.
        if n == size && !no_pipe {
            match uring_splice::available().then(Pipe::take).flatten() {
                Some(pipe) => {
                    let ep = Rc::new(Episode {
                        src: Rc::clone(src),
                        dst: Rc::clone(dst),
                        pipe,
                    });
                    // Boxed: inline, this rare state would set the size of
                    // every connection's task.
                    let streamed =
                        Box::pin(stream(ep, acct, to_origin, large, (src_side, dst_side)));
                    match streamed.await? {
                        Streamed::Eof => {
                            pass_fin(dst, first_fin);
                            return Ok(());
                        }
                        Streamed::Slowed => {}
                    }
                    if size != SMALL {
                        buf = PooledBuf::take(SMALL, large);
                    }
                    drained = true;
                    continue;
                }
                None => no_pipe = true,
            }
        }
        let want = next_size(n, size, large);
        if want != size {
            buf = PooledBuf::take(want, large);
        }
    }
}

/// Writes all of `buf` to `dst`, one `IORING_OP_WRITE` per partial write.
/// tokio-uring's own `write_all` does the same through two more nested
/// futures: 272 bytes of state against this one's 144, in each direction
/// of every relayed connection (`-Zprint-type-sizes`).
async fn write_all(dst: &TcpStream, mut buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let mut at = 0;
    while at < buf.len() {
        let (res, slice) = dst.write(buf.slice(at..)).submit().await;
        buf = slice.into_inner();
        match res {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
            Ok(n) => at += n,
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}

/// What a streaming direction's splices hold: its two sockets and its pipe
/// (kept open while a splice is in flight, see `uring_splice`).
struct Episode {
    src: Rc<TcpStream>,
    dst: Rc<TcpStream>,
    pipe: Pipe,
}

/// How a run of splices ended.
enum Streamed {
    /// The source sent FIN.
    Eof,
    /// A chain's last fill moved less than [`SPLICE_STAY`]: back to reads.
    Slowed,
}

/// Splices one direction, socket to pipe to socket through io-wq, while
/// each chain's last fill moves at least [`SPLICE_STAY`]; the pipe goes
/// back to the worker's pool after. Every byte taken from the source has
/// reached the destination's send queue when this returns `Ok`.
async fn stream(
    ep: Rc<Episode>,
    acct: &Accounting,
    to_origin: bool,
    large: usize,
    (src_side, dst_side): (Side, Side),
) -> Result<Streamed, Side> {
    let ends = ep.pipe.ends();
    let (src, dst) = (ep.src.as_raw_fd(), ep.dst.as_raw_fd());
    let keep: KeepAlive = Rc::clone(&ep) as KeepAlive;
    // No more in the pipe than a copying direction would hold (half of
    // `limits.max_buffer_per_direction`).
    let cap = u32::try_from(pipe::CAPACITY.min(large)).unwrap_or(u32::MAX);
    // Bytes in the pipe, not yet passed on.
    let mut held = 0usize;
    let how = loop {
        let ops = uring_splice::rounds(src, ends, dst, cap, ROUNDS, &keep).map_err(|_| src_side)?;
        let mut ops = ops.into_iter();
        let (mut eof, mut last) = (false, 0);
        while let (Some(poll), Some(fill), Some(drain)) = (ops.next(), ops.next(), ops.next()) {
            let (polled, filled, drained) = (poll.await, fill.await, drain.await);
            polled.map_err(|_| src_side)?;
            let n = match filled {
                // Past the end of stream every fill moves 0 bytes.
                Ok(n) => {
                    eof |= n == 0;
                    n
                }
                // The pipe was full: a drain had left bytes in it.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
                Err(_) => return Err(src_side),
            };
            held += n;
            let m = match drained {
                Ok(m) => m.min(held),
                // The pipe was empty.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
                Err(_) => return Err(dst_side),
            };
            held -= m;
            acct.add(to_origin, m as u64);
            last = n;
        }
        // What a drain left in the pipe goes on before the next chain.
        while held > 0 {
            let len = u32::try_from(held).unwrap_or(u32::MAX);
            let m = uring_splice::drain(ends.0, dst, len, &keep)
                .map_err(|_| dst_side)?
                .await
                .map_err(|_| dst_side)?;
            if m == 0 {
                return Err(dst_side);
            }
            held -= m.min(held);
            acct.add(to_origin, m as u64);
        }
        if eof {
            break Streamed::Eof;
        }
        if last < SPLICE_STAY {
            break Streamed::Slowed;
        }
    };
    drop(keep);
    // Every splice has completed, so this is the last reference.
    if let Ok(ep) = Rc::try_unwrap(ep) {
        ep.pipe.put_back();
    }
    Ok(how)
}

/// A busy direction's buffer size under `limits.max_buffer_per_direction`
/// = `bound`: half of it, within `SMALL..=LARGE`.
fn large_for(bound: u64) -> usize {
    usize::try_from(bound / 2)
        .unwrap_or(usize::MAX)
        .clamp(SMALL, LARGE)
}

/// The buffer size for a direction's next read, after a read of `n` bytes
/// into `size`. A full read means more is queued: go large. A read the
/// small buffer would have held means the burst is over: give the large one
/// back for another direction.
fn next_size(n: usize, size: usize, large: usize) -> usize {
    if n == size {
        large
    } else if n <= SMALL {
        SMALL
    } else {
        size
    }
}

// Small relay buffers are kept up to `SMALL_KEPT`, large ones up to
// `LARGE_KEPT`. Freeing every small buffer into the heap and allocating
// again fragmented it and let RSS creep with the connection count; keeping
// every one pinned a burst's peak for good.
thread_local! {
    static POOLS: std::cell::RefCell<[Vec<Vec<u8>>; 2]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Which pool holds buffers of `size`, if any (`large` is the process's
/// busy-direction size).
fn pool_of(size: usize, large: usize) -> Option<usize> {
    if size == SMALL {
        Some(0)
    } else if size == large {
        Some(1)
    } else {
        None
    }
}

/// A relay buffer that goes back to its pool when dropped. While an
/// operation owns the buffer this holds `None`; a cancelled operation keeps
/// it, and it is freed rather than pooled.
struct PooledBuf(Option<Vec<u8>>, usize);

impl PooledBuf {
    /// A buffer of `size` bytes' capacity (`SMALL` or `large`).
    fn take(size: usize, large: usize) -> PooledBuf {
        let b = pool_of(size, large).and_then(|i| POOLS.with(|p| p.borrow_mut()[i].pop()));
        PooledBuf(Some(b.unwrap_or_else(|| Vec::with_capacity(size))), large)
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            if let Some(i) = pool_of(b.capacity(), self.1) {
                POOLS.with(|p| {
                    let pool = &mut p.borrow_mut()[i];
                    let kept = if i == 0 { SMALL_KEPT } else { LARGE_KEPT };
                    if pool.len() < kept {
                        pool.push(b);
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direction_grows_on_a_full_read_and_shrinks_after_the_burst() {
        // Small reads keep the small buffer.
        assert_eq!(next_size(100, SMALL, LARGE), SMALL);
        // A full small read: more is queued.
        assert_eq!(next_size(SMALL, SMALL, LARGE), LARGE);
        // Still busy, partly full: stay large.
        assert_eq!(next_size(SMALL + 1, LARGE, LARGE), LARGE);
        assert_eq!(next_size(LARGE, LARGE, LARGE), LARGE);
        // A read the small buffer would have held: back to small.
        assert_eq!(next_size(SMALL, LARGE, LARGE), SMALL);
        assert_eq!(next_size(1, LARGE, LARGE), SMALL);
    }

    #[test]
    fn the_large_size_stays_within_half_the_bound() {
        assert_eq!(large_for(32 << 20), LARGE);
        assert_eq!(large_for(256 << 10), 128 << 10);
        assert_eq!(large_for(1 << 20), 512 << 10);
        assert_eq!(large_for(u64::MAX), LARGE);
    }

    #[test]
    fn a_worker_keeps_only_a_few_buffers_of_each_size() {
        let large = 64 << 10;
        let busy: Vec<PooledBuf> = (0..LARGE_KEPT + 3)
            .map(|_| PooledBuf::take(large, large))
            .collect();
        let small: Vec<PooledBuf> = (0..SMALL_KEPT + 10)
            .map(|_| PooledBuf::take(SMALL, large))
            .collect();
        drop(busy);
        drop(small);
        let (kept_small, kept_large) = POOLS.with(|p| {
            let p = p.borrow();
            (p[0].len(), p[1].len())
        });
        assert_eq!(kept_large, LARGE_KEPT);
        assert_eq!(kept_small, SMALL_KEPT);
    }

    #[test]
    fn pools_take_only_their_two_sizes() {
        assert_eq!(pool_of(SMALL, LARGE), Some(0));
        assert_eq!(pool_of(LARGE, LARGE), Some(1));
        assert_eq!(pool_of(128 << 10, 128 << 10), Some(1));
        assert_eq!(pool_of(64 << 10, LARGE), None);
    }
}
