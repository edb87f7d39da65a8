//! `IORING_OP_SPLICE` for the io_uring relay, which tokio-uring does not
//! offer: each worker has a second, small ring of its own for splices,
//! driven from the same thread through tokio's reactor.
//!
//! Kernel minimums: Linux 5.7 for `IORING_OP_SPLICE`, 5.6 for
//! `IORING_OP_POLL_ADD` and linked requests. The kernel always runs a
//! splice on an io-wq worker thread (its prep sets `REQ_F_FORCE_ASYNC`),
//! and a splice from a socket with an empty queue would hold that thread
//! until data comes. So every splice from a socket is linked behind a
//! `POLL_ADD` for `POLLIN`, which waits without a thread. A direction's
//! rounds (poll, fill, drain) go in as one chain of hard links, which one
//! io-wq worker runs in order without coming back to user space; the
//! splices are hard-linked, because a short splice (the usual kind) would
//! cut a plain link.
//!
//! A splice names its files by number, and io-wq resolves them when it runs
//! the request. An operation whose future is dropped while in flight (a
//! reset on the other direction) therefore keeps what owns its fds alive
//! until its completion arrives, so no number is closed and reused under it.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;

/// Entries in each worker's splice ring. A chain must fit whole (3 per
/// round); a queue without room for it is submitted first.
const ENTRIES: u32 = 256;
/// Entries in its completion queue (more complete in a burst; they wait in
/// the kernel's overflow list, see `Ring::reap_from`).
const CQ_ENTRIES: u32 = 4096;
/// `user_data` of a request whose completion nobody waits for (a cancel).
const UNWATCHED: u64 = u64::MAX;

/// What keeps an operation's fds open while the kernel may still use them.
pub type KeepAlive = Rc<dyn Any>;

enum Slot {
    Free,
    /// In flight, with the task to wake.
    Waiting(Option<Waker>, KeepAlive),
    /// Completed, result not yet taken.
    Done(i32),
    /// In flight, and its future was dropped.
    Orphan(KeepAlive),
}

/// One worker's splice ring.
struct Ring {
    uring: RefCell<IoUring>,
    /// `uring`'s fd.
    fd: RawFd,
    slots: RefCell<Slots>,
}

/// Operations by `user_data`, and the indices free for reuse.
#[derive(Default)]
struct Slots {
    all: Vec<Slot>,
    free: Vec<usize>,
}

impl Slots {
    fn take(&mut self, keep: KeepAlive) -> usize {
        let i = self.free.pop().unwrap_or_else(|| {
            self.all.push(Slot::Free);
            self.all.len() - 1
        });
        self.all[i] = Slot::Waiting(None, keep);
        i
    }

    fn release(&mut self, i: usize) {
        self.all[i] = Slot::Free;
        self.free.push(i);
    }
}

/// The ring, as the reactor sees it: by its fd, which it keeps open.
struct RingFd(Rc<Ring>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd
    }
}

thread_local! {
    static RING: RefCell<Option<Rc<Ring>>> = const { RefCell::new(None) };
}

/// Whether this worker has a splice ring (setting one up if not yet): a
/// worker that cannot have one copies instead.
pub fn available() -> bool {
    thread_local! {
        static GAVE_UP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if GAVE_UP.with(|g| g.get()) {
        return false;
    }
    match ring() {
        Ok(_) => true,
        Err(e) => {
            GAVE_UP.with(|g| g.set(true));
            tracing::warn!("io_uring splice ring unavailable on this worker, copying instead: {e}");
            false
        }
    }
}

/// This worker's ring, set up (with its completion task) on first use.
/// Must run inside the worker's `LocalSet`.
fn ring() -> io::Result<Rc<Ring>> {
    if let Some(r) = RING.with(|r| r.borrow().clone()) {
        return Ok(r);
    }
    // Room for a burst of completions: every idle direction has a poll in
    // flight here. `IORING_SETUP_CQSIZE`: Linux 5.5+.
    let uring = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .build(ENTRIES)
        .or_else(|_| IoUring::new(ENTRIES))?;
    let ring = Rc::new(Ring {
        fd: uring.as_raw_fd(),
        uring: RefCell::new(uring),
        slots: RefCell::new(Slots::default()),
    });
    // SAFETY: `RingFd` holds the ring, so its fd stays open and the same
    // for as long as the registration lives.
    let fd = unsafe {
        AsyncFd::register_with_interest(RingFd(Rc::clone(&ring)), tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)?;
    tokio::task::spawn_local(complete(fd));
    RING.with(|r| *r.borrow_mut() = Some(Rc::clone(&ring)));
    Ok(ring)
}

/// Hands completions to their waiters, for as long as the worker runs.
async fn complete(fd: AsyncFd<RingFd>) {
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        if guard.get_inner().0.reap() == 0 {
            guard.clear_ready();
        }
    }
}

impl Ring {
    /// Takes every completion queued; returns how many.
    fn reap(&self) -> usize {
        self.reap_from(&mut self.uring.borrow_mut())
    }

    fn reap_from(&self, uring: &mut IoUring) -> usize {
        let mut n = 0;
        loop {
            n += self.take_completions(uring);
            // Completions that found the queue full wait in the kernel's
            // overflow list (Linux 5.5+) until an enter with GETEVENTS moves
            // them in, which `submit` does when the ring flags an overflow.
            // Without this, a burst (thousands of idle directions' polls
            // ending at once) leaves sockets in CLOSE-WAIT until the next
            // submission, which may never come.
            if !uring.submission().cq_overflow() || uring.submit().is_err() {
                return n;
            }
        }
    }

    fn take_completions(&self, uring: &mut IoUring) -> usize {
        let mut slots = self.slots.borrow_mut();
        let mut n = 0;
        for cqe in uring.completion() {
            n += 1;
            let Ok(i) = usize::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(slot) = slots.all.get_mut(i) else {
                continue;
            };
            match std::mem::replace(slot, Slot::Done(cqe.result())) {
                Slot::Waiting(waker, _keep) => {
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                Slot::Orphan(_keep) => slots.release(i),
                other => *slot = other,
            }
        }
        n
    }

    /// Queues `entries` as one batch and submits them; each entry marked
    /// `true` reports through the [`Op`] returned for it, in order.
    fn submit(
        self: &Rc<Self>,
        entries: &[(squeue::Entry, bool)],
        keep: &KeepAlive,
    ) -> io::Result<Vec<Op>> {
        let mut ops = Vec::with_capacity(entries.len());
        let queued = self.queue(entries, keep, &mut ops);
        // On an error the ops go only now, once the ring is no longer
        // borrowed: dropping one queues its cancel.
        queued.map(|()| ops)
    }

    /// [`Ring::submit`]'s work, with the ring borrowed.
    fn queue(
        self: &Rc<Self>,
        entries: &[(squeue::Entry, bool)],
        keep: &KeepAlive,
        ops: &mut Vec<Op>,
    ) -> io::Result<()> {
        let mut uring = self.uring.borrow_mut();
        // A link chain must not be split between two submissions (the
        // kernel would end it at the first): make room for all of it.
        let (room, capacity) = {
            let sq = uring.submission();
            (sq.capacity() - sq.len(), sq.capacity())
        };
        if entries.len() > capacity {
            return Err(io::Error::other("io_uring chain longer than the queue"));
        }
        if room < entries.len() {
            self.enter(&mut uring)?;
        }
        for (e, watched) in entries {
            let slot = watched.then(|| self.slots.borrow_mut().take(Rc::clone(keep)));
            let e = e.clone().user_data(slot.map_or(UNWATCHED, |i| i as u64));
            // SAFETY: the entry names only fds, which `keep` holds open
            // until the completion; it points at no memory of ours.
            if unsafe { uring.submission().push(&e) }.is_err() {
                // Not after the room check. Nothing will complete this slot.
                if let Some(i) = slot {
                    self.slots.borrow_mut().release(i);
                }
                return Err(io::Error::other("io_uring submission queue full"));
            }
            if let Some(i) = slot {
                ops.push(Op {
                    ring: Rc::clone(self),
                    slot: Some(i),
                });
            }
        }
        // If this fails, what was queued goes in with the next submission.
        self.enter(&mut uring)
    }

    /// Hands the queued entries to the kernel, retrying what is transient
    /// (a signal, no memory for requests, completions backed up: those are
    /// reaped first). Past that, the ring is broken and the caller's pair
    /// is reset.
    fn enter(&self, uring: &mut IoUring) -> io::Result<()> {
        let mut tries = 0;
        loop {
            match uring.submit() {
                Ok(_) => return Ok(()),
                Err(e)
                    if tries < 100
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) =>
                {
                    tries += 1;
                    self.reap_from(uring);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// An operation in flight; resolves to its result (a byte count, or the
/// error from the kernel).
pub struct Op {
    ring: Rc<Ring>,
    /// `None` once the result was taken (the index may serve another).
    slot: Option<usize>,
}

impl Future for Op {
    type Output = io::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(i) = self.slot else {
            return Poll::Ready(Err(io::Error::other(
                "io_uring operation polled after it ended",
            )));
        };
        let ring = Rc::clone(&self.ring);
        let mut slots = ring.slots.borrow_mut();
        match &mut slots.all[i] {
            Slot::Done(res) => {
                let res = *res;
                slots.release(i);
                self.slot = None;
                Poll::Ready(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                })
            }
            Slot::Waiting(waker, _) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Slot::Free | Slot::Orphan(_) => {
                Poll::Ready(Err(io::Error::other("io_uring slot lost its operation")))
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let Some(i) = self.slot else {
            return;
        };
        let mut slots = self.ring.slots.borrow_mut();
        match std::mem::replace(&mut slots.all[i], Slot::Free) {
            Slot::Waiting(_, keep) => {
                slots.all[i] = Slot::Orphan(keep);
                // Interrupts a splice blocked in io-wq (on a peer that does
                // not read), so the sockets close, and reset, at once.
                // Linux 5.5+. If it cannot be queued, the splice ends when
                // its socket does.
                let cancel = opcode::AsyncCancel::new(i as u64)
                    .build()
                    .user_data(UNWATCHED);
                let mut uring = self.ring.uring.borrow_mut();
                // SAFETY: a cancel names a user_data, no memory.
                if unsafe { uring.submission().push(&cancel) }.is_ok() {
                    let _ = uring.submit();
                }
            }
            // Done and never asked for.
            _ => slots.release(i),
        }
    }
}

const FLAGS: u32 = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;

/// `rounds` rounds of a streaming direction, as one chain that one io-wq
/// worker runs: in each, once `src` is readable (data, FIN or an error),
/// splice up to `len` bytes from it into the pipe, then splice what the
/// pipe holds on to `dst` (waiting for room in `dst`'s send buffer as a
/// blocking socket does). Returns each round's poll, fill and drain: a
/// fill's `Ok(0)` is the end of stream; a drain may move less than its
/// fill (splice the rest before the next round's bytes).
pub fn rounds(
    src: RawFd,
    (pipe_r, pipe_w): (RawFd, RawFd),
    dst: RawFd,
    len: u32,
    rounds: usize,
    keep: &KeepAlive,
) -> io::Result<Vec<Op>> {
    let mut chain = Vec::with_capacity(3 * rounds);
    for r in 0..rounds {
        let poll = opcode::PollAdd::new(types::Fd(src), libc::POLLIN as u32).build();
        // Hard links after a fill or drain: a short one (any that does not
        // fill the pipe) must not cut the chain. A plain link after the
        // poll, which completes with a mask unless it is cancelled: then
        // (a dropped chain) the rest of the chain is cancelled with it.
        let fill = opcode::Splice::new(types::Fd(src), -1, types::Fd(pipe_w), -1, len)
            .flags(FLAGS)
            .build();
        let drain = opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(dst), -1, len)
            .flags(FLAGS)
            .build();
        let last = r + 1 == rounds;
        chain.push((poll.flags(squeue::Flags::IO_LINK), true));
        chain.push((fill.flags(squeue::Flags::IO_HARDLINK), true));
        chain.push((
            if last {
                drain
            } else {
                drain.flags(squeue::Flags::IO_HARDLINK)
            },
            true,
        ));
    }
    ring()?.submit(&chain, keep)
}

/// Waits until `src` is readable (data, FIN or an error) without holding a
/// buffer or a thread: an idle direction of the relay waits here, and the
/// worker's pooled buffers serve only directions with bytes to move.
/// `IORING_OP_POLL_ADD`: Linux 5.1+.
pub fn readable(src: RawFd, keep: &KeepAlive) -> io::Result<Op> {
    let poll = opcode::PollAdd::new(types::Fd(src), libc::POLLIN as u32).build();
    one(poll, keep)
}

/// Splices up to `len` bytes from the pipe's read end `pipe_r` into `dst`.
pub fn drain(pipe_r: RawFd, dst: RawFd, len: u32, keep: &KeepAlive) -> io::Result<Op> {
    let splice = opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(dst), -1, len)
        .flags(FLAGS)
        .build();
    one(splice, keep)
}

/// Submits one operation on this worker's ring.
fn one(entry: squeue::Entry, keep: &KeepAlive) -> io::Result<Op> {
    ring()?
        .submit(&[(entry, true)], keep)?
        .pop()
        .ok_or_else(|| io::Error::other("io_uring operation without its result"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::pipe::tests::pair;
    use crate::datapath::pipe::Pipe;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// Whether the splice ring can run here; as root (CI) it must.
    fn available() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match crate::datapath::uring::probe() {
            Ok(true) => true,
            Ok(false) | Err(_) if !root => {
                eprintln!(
                    "skipped: io_uring splice (Linux 5.7+) is not available to this \
                     unprivileged user; CI runs as root"
                );
                false
            }
            other => panic!("io_uring splice must be available as root: {other:?}"),
        }
    }

    /// A chain of `n` rounds from `src` through `pipe` to `dst`.
    fn chain(src: &TcpStream, pipe: &Pipe, dst: &TcpStream, n: usize, keep: &KeepAlive) -> Vec<Op> {
        rounds(
            src.as_raw_fd(),
            pipe.ends(),
            dst.as_raw_fd(),
            1 << 20,
            n,
            keep,
        )
        .unwrap()
    }

    #[test]
    fn rounds_move_bytes_socket_to_pipe_to_socket_in_order() {
        if !available() {
            return;
        }
        tokio_uring::start(async {
            let (mut writer, src) = pair();
            let (dst, mut reader) = pair();
            let pipe = Pipe::take().expect("a pipe");
            let want: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
            writer.write_all(&want).unwrap();
            drop(writer);
            let keep: KeepAlive = Rc::new(());
            let mut moved = 0;
            let mut rounds_run = 0;
            loop {
                let ops = chain(&src, &pipe, &dst, 2, &keep);
                assert_eq!(ops.len(), 6);
                let mut eof = false;
                for (k, op) in ops.into_iter().enumerate() {
                    let res = op.await;
                    match k % 3 {
                        0 => assert!(res.unwrap() > 0, "poll gives a mask"),
                        1 => eof |= res.unwrap() == 0,
                        _ => match res {
                            Ok(m) => moved += m,
                            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EAGAIN)),
                        },
                    }
                }
                rounds_run += 2;
                if eof {
                    break;
                }
                assert!(rounds_run < 1000, "no end of stream after {moved} bytes");
            }
            assert_eq!(moved, want.len());
            drop(dst);
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            assert!(got == want, "bytes changed on the way");
            // Every slot is free again.
            let r = ring().unwrap();
            let slots = r.slots.borrow();
            assert_eq!(slots.free.len(), slots.all.len());
        });
    }

    #[test]
    fn completions_past_the_queue_are_fetched_from_the_overflow_list() {
        if !available() {
            return;
        }
        tokio_uring::start(async {
            // A readable socket: every poll on it completes at submission,
            // so more than the completion queue holds arrive before any is
            // reaped, and the rest wait in the kernel's overflow list.
            let (mut writer, src) = pair();
            writer.write_all(b"x").unwrap();
            let keep: KeepAlive = Rc::new(());
            let n = CQ_ENTRIES as usize + 500;
            let ops: Vec<Op> = (0..n)
                .map(|_| readable(src.as_raw_fd(), &keep).unwrap())
                .collect();
            let all = futures_util::future::join_all(ops);
            let done = tokio::time::timeout(Duration::from_secs(5), all)
                .await
                .expect("completions stuck in the overflow list");
            assert_eq!(done.len(), n);
            for r in done {
                assert!(r.unwrap() & libc::POLLIN as usize != 0, "poll gives POLLIN");
            }
        });
    }

    /// Sets its flag when dropped.
    struct Flag(Rc<std::cell::Cell<bool>>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    #[test]
    fn a_dropped_chain_is_cancelled_and_keeps_its_fds_until_then() {
        if !available() {
            return;
        }
        tokio_uring::start(async {
            // The source stays idle: the chain waits in its first poll.
            let (_writer, src) = pair();
            let (dst, _reader) = pair();
            let pipe = Pipe::take().expect("a pipe");
            let dropped = Rc::new(std::cell::Cell::new(false));
            let keep: KeepAlive = Rc::new(Flag(Rc::clone(&dropped)));
            let ops = chain(&src, &pipe, &dst, 3, &keep);
            drop(keep);
            assert!(!dropped.get());
            drop(ops);
            // The cancels end the chain; its completions release `keep`.
            let t0 = std::time::Instant::now();
            while !dropped.get() {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "chain still holds its fds"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let r = ring().unwrap();
            let slots = r.slots.borrow();
            assert_eq!(slots.free.len(), slots.all.len());
        });
    }
}
