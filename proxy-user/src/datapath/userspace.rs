//! The plain user-space relay: tokio, readiness first, then one large read
//! into the worker thread's scratch buffer and a write straight from it.
//! A direction whose read moves at least `SPLICE_STAY` is streaming, and
//! moves its next bytes with `splice(2)` through a pooled pipe instead
//! (`pipe`), until a splice moves less than that.
//!
//! An idle connection holds no buffer and no pipe; only bytes the target
//! would not take at once are copied into the direction's own, short-lived
//! buffer. Works everywhere. Half-close: EOF on one side becomes
//! `shutdown(SHUT_WR)` on the other after every byte read has been written;
//! the second EOF needs no `shutdown`, as the close that follows sends that
//! FIN. A FIN that is already in when its last bytes are read leaves with
//! them, in one segment (`MSG_MORE`, then `shutdown`). A reset or error on
//! either side resets both.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::pipe::Pipe;
use super::{CloseReason, Pair, Side};
use crate::accounting::Accounting;
use crate::sockopt;

/// Size of each worker thread's read buffer: large reads mean few
/// syscalls per byte on bulk transfers.
const SCRATCH: usize = 1 << 20;

/// A streaming direction keeps splicing while each splice moves at least
/// this much; below it, the bytes come in messages, and a copy costs less
/// than two splices. (W1 at full size, alternating binaries, three runs
/// each: one way 0.72-0.75x direct with splice against 0.64-0.73x with
/// copies, both ways 0.67-0.76x against 0.60-0.65x, 371-420 CPU-µs/MiB
/// against 430-469. Under the host's BBR pacing an earlier splice relay
/// had measured worse than copies.)
pub(super) const SPLICE_STAY: usize = 64 << 10;

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; SCRATCH]);
}

/// What one read-and-write step did.
enum Step {
    /// The source sent FIN.
    Eof,
    /// Bytes written at once (the rest are in `pending`), and whether the
    /// read moved at least [`SPLICE_STAY`] (a bulk transfer is under way).
    Moved(usize, bool),
    /// Not readable after all.
    Again,
    /// Bytes written at once, all of them, and the source's FIN right
    /// behind them: the FIN is still to be sent, and rides on them.
    Last(usize),
    /// Bytes written at once (the rest are in `pending`), and then the
    /// source failed: they still go out before the pair is reset.
    Failing(usize),
}

/// How a pump stopped without an error.
#[derive(Debug, PartialEq, Eq)]
enum Finish {
    /// The source sent FIN, and it was passed on.
    Eof,
    /// Both directions were idle past the promotion time.
    Promoted,
}

/// Relays until both directions have closed, or one side reset.
pub async fn relay(pair: Pair, acct: Arc<Accounting>) -> CloseReason {
    let Pair {
        client,
        client_ahead,
        origin,
        origin_ahead,
    } = pair;
    let result = pumps(&client, &origin, (client_ahead, origin_ahead), &acct, None).await;
    ended(result.map(|_| ()), &client, &origin)
}

/// Relays like [`relay`] until the connection is `after` old and both
/// directions are idle at once (nothing read and not yet written); then
/// stops and hands the pair back, with no bytes in flight, for the sockmap
/// path. A connection that closes first, or that stays busy in one
/// direction, is carried to its end here.
pub async fn relay_until_idle(
    pair: Pair,
    acct: Arc<Accounting>,
    after: Duration,
) -> Result<CloseReason, Pair> {
    let Pair {
        client,
        client_ahead,
        origin,
        origin_ahead,
    } = pair;
    let promo = Promotion::default();
    let both = pumps(
        &client,
        &origin,
        (client_ahead, origin_ahead),
        &acct,
        Some(&promo),
    );
    // One timer per connection, not one per wait.
    let due = async {
        tokio::time::sleep(after).await;
        promo.due.store(true, Ordering::Relaxed);
        promo.notify.notify_waiters();
        std::future::pending::<std::convert::Infallible>().await
    };
    let result = tokio::select! {
        r = both => r,
        never = due => match never {},
    };
    match result {
        Ok((Finish::Promoted, Finish::Promoted)) => Err(Pair {
            client,
            client_ahead: bytes::Bytes::new(),
            origin,
            origin_ahead: bytes::Bytes::new(),
        }),
        other => Ok(ended(other.map(|_| ()), &client, &origin)),
    }
}

/// Both directions of a pair (`ahead`: the client's bytes, then the
/// origin's), until both have passed their FIN on or one side failed.
async fn pumps(
    client: &TcpStream,
    origin: &TcpStream,
    ahead: (bytes::Bytes, bytes::Bytes),
    acct: &Accounting,
    promo: Option<&Promotion>,
) -> Result<(Finish, Finish), Side> {
    let first_fin = AtomicBool::new(false);
    tokio::try_join!(
        pump(client, origin, ahead.0, acct, true, &first_fin, promo),
        pump(origin, client, ahead.1, acct, false, &first_fin, promo)
    )
}

/// How a relay that ran to its end closed.
fn ended(result: Result<(), Side>, client: &TcpStream, origin: &TcpStream) -> CloseReason {
    match result {
        Ok(()) => CloseReason::Done,
        Err(side) => {
            // Closing with SO_LINGER 0 sends RST, so a reset reaches the peer.
            use std::os::fd::AsFd;
            sockopt::set_reset_on_close(client.as_fd());
            sockopt::set_reset_on_close(origin.as_fd());
            CloseReason::Reset(side)
        }
    }
}

/// What the two pumps of one connection share while it may be promoted.
/// Both run in one task, so between two awaits nothing else touches it;
/// the atomics only make the shared borrow `Send`.
#[derive(Default)]
struct Promotion {
    /// The connection is old enough.
    due: AtomicBool,
    /// Pumps idle past `due`, waiting for the other.
    parked: AtomicU8,
    /// Both were idle at once: stop.
    decided: AtomicBool,
    /// Wakes the pumps when `due` or `decided` is set.
    notify: Notify,
}

impl Promotion {
    /// Waits until `r` is readable (`Ok(false)`), or until both directions
    /// are idle past the promotion time (`Ok(true)`).
    async fn wait(&self, r: &TcpStream) -> std::io::Result<bool> {
        loop {
            if self.decided.load(Ordering::Relaxed) {
                return Ok(true);
            }
            let woken = self.notify.notified();
            if !self.due.load(Ordering::Relaxed) {
                tokio::select! {
                    biased;
                    res = read_ready(r) => return res.map(|()| false),
                    () = woken => continue,
                }
            }
            if self.parked.fetch_add(1, Ordering::Relaxed) == 1 {
                self.decided.store(true, Ordering::Relaxed);
                self.notify.notify_waiters();
                return Ok(true);
            }
            tokio::select! {
                biased;
                // Only `decided` is announced after `due`; the loop's top
                // returns. Should it be anything else, this pump unparks.
                () = woken => {
                    if !self.decided.load(Ordering::Relaxed) {
                        self.parked.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                res = read_ready(r) => {
                    // Readable, but the decision is final: the bytes stay
                    // in the socket for the next path.
                    if self.decided.load(Ordering::Relaxed) {
                        return Ok(true);
                    }
                    self.parked.fetch_sub(1, Ordering::Relaxed);
                    return res.map(|()| false);
                }
            }
        }
    }
}

/// Waits until `s` is readable. `poll_read_ready` keeps one waker per
/// socket and replaces the previous one (the handshake's reads used the
/// same slot); `readable()` would queue a waiter on every call instead.
async fn read_ready(s: &TcpStream) -> std::io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// One read into `buf`; see [`read_clearing`].
fn read_once(r: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    read_clearing(r, || {
        let n = socket2::SockRef::from(r).recv(as_uninit(buf))?;
        Ok((n, n == buf.len()))
    })
}

/// Runs `op`, one read from `r` that says how many bytes it took and
/// whether it filled its room. A read that did not fill its room emptied
/// the receive queue, so tokio's readiness is cleared at once (as nginx
/// does): otherwise the next round would spend a syscall only to learn
/// `EAGAIN`, one per message.
fn read_clearing(
    r: &TcpStream,
    mut op: impl FnMut() -> std::io::Result<(usize, bool)>,
) -> std::io::Result<usize> {
    let mut got = None;
    let res = r.try_io(tokio::io::Interest::READABLE, || {
        let (n, full) = op()?;
        if n == 0 || full {
            return Ok(n);
        }
        got = Some(n);
        Err(std::io::ErrorKind::WouldBlock.into())
    });
    match (res, got) {
        (_, Some(n)) => Ok(n),
        (res, None) => res,
    }
}

/// Whether `s`'s peer has sent FIN, from the readiness tokio already
/// holds (epoll's `EPOLLRDHUP`; it survives the clearing of `READABLE`):
/// no syscall.
fn fin_seen(s: &TcpStream) -> bool {
    use std::future::Future;
    let ready = std::pin::pin!(s.ready(tokio::io::Interest::READABLE));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(ready.poll(&mut cx), std::task::Poll::Ready(Ok(r)) if r.is_read_closed())
}

/// One non-blocking send to `w`; with `more` (`MSG_MORE`), the bytes wait
/// in the socket for the FIN that `shutdown` adds, so both leave in one
/// segment.
fn send_more(w: &TcpStream, buf: &[u8], more: bool) -> std::io::Result<usize> {
    if !more {
        return w.try_write(buf);
    }
    w.try_io(tokio::io::Interest::WRITABLE, || {
        socket2::SockRef::from(w).send_with_flags(buf, libc::MSG_MORE)
    })
}

/// A byte buffer as the uninitialised view `recv` takes; it is initialised,
/// so nothing is lost.
fn as_uninit(buf: &mut [u8]) -> &mut [std::mem::MaybeUninit<u8>] {
    // SAFETY: same layout; initialised bytes are valid MaybeUninit<u8>, and
    // recv only writes bytes.
    unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) }
}

/// Writes all of `buf`, waiting for room as needed.
async fn write_all(s: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        std::future::poll_fn(|cx| s.poll_write_ready(cx)).await?;
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies one direction; `Err` names the side whose socket failed. With
/// `promo`, it may stop while idle (see [`relay_until_idle`]).
/// `first_fin`: shared by the two pumps of a pair; set by the one that
/// passes the first FIN on.
async fn pump(
    r: &TcpStream,
    w: &TcpStream,
    ahead: bytes::Bytes,
    acct: &Accounting,
    to_origin: bool,
    first_fin: &AtomicBool,
    promo: Option<&Promotion>,
) -> Result<Finish, Side> {
    let (src, dst) = if to_origin {
        (Side::Client, Side::Origin)
    } else {
        (Side::Origin, Side::Client)
    };
    if !ahead.is_empty() {
        write_all(w, &ahead).await.map_err(|_| dst)?;
        acct.add(to_origin, ahead.len() as u64);
    }
    drop(ahead);
    let mut pending: Vec<u8> = Vec::new();
    // The last read or splice moved at least SPLICE_STAY: a bulk transfer
    // is under way.
    let mut streaming = false;
    // No pipe to be had here (limits): this direction copies.
    let mut no_pipe = false;
    // The source failed right behind bytes still in `pending`: they go
    // out first, then the pair is reset.
    let mut failed = false;
    loop {
        if !pending.is_empty() {
            write_all(w, &pending).await.map_err(|_| dst)?;
            acct.add(to_origin, pending.len() as u64);
            pending.clear();
        }
        if failed {
            return Err(src);
        }
        if !streaming {
            // About to wait for data: an idle connection holds no buffer.
            // A bulk transfer keeps it instead of allocating on every round.
            pending = Vec::new();
        }
        match promo {
            // Idle here: nothing read is left unwritten (a streaming
            // direction too: its last splice reached `w`). A session that
            // goes quiet right after a burst is promoted then.
            Some(p) => {
                if p.wait(r).await.map_err(|_| src)? {
                    return Ok(Finish::Promoted);
                }
            }
            _ => read_ready(r).await.map_err(|_| src)?,
        }
        // A streaming direction splices, if this worker can have a pipe.
        let spliced = match (streaming && !no_pipe).then(Pipe::take) {
            Some(Some(pipe)) => Some(splice_step(r, w, pipe, src, dst).await?),
            Some(None) => {
                no_pipe = true;
                None
            }
            None => None,
        };
        let step = match spliced {
            Some(step) => step,
            None => BUF.with(|b| {
                let mut b = b.borrow_mut();
                let mut n = match read_once(r, &mut b) {
                    Ok(0) => return Ok(Step::Eof),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Step::Again),
                    Err(_) => return Err(src),
                };
                // The FIN came with these bytes: read it now (the read the
                // next round would make), so it rides on them.
                let (mut fin, mut reset) = (false, false);
                if n < b.len() && fin_seen(r) {
                    match read_once(r, &mut b[n..]) {
                        Ok(0) => fin = true,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // A reset: the socket reports it once, so it is
                        // kept for after the bytes already read.
                        Err(_) => reset = true,
                    }
                }
                let mut off = 0;
                while off < n {
                    match send_more(w, &b[off..n], fin) {
                        Ok(k) => off += k,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => return Err(dst),
                    }
                }
                pending.extend_from_slice(&b[off..n]);
                if reset {
                    return Ok(Step::Failing(off));
                }
                if fin && off == n {
                    return Ok(Step::Last(n));
                }
                // Not all taken: `pending` is written (which pushes what
                // MSG_MORE held back), and the next read sees the EOF.
                Ok(Step::Moved(off, n >= SPLICE_STAY))
            })?,
        };
        match step {
            Step::Eof => {
                // The second FIN needs no `shutdown`: both pumps are done,
                // the relay returns at once, and closing a socket whose
                // bytes were all read sends the FIN (one syscall less per
                // session). Ignore ENOTCONN: the peer may have reset
                // meanwhile; the other direction reports that.
                if !first_fin.swap(true, Ordering::Relaxed) {
                    use std::os::fd::AsFd;
                    let _ = sockopt::shutdown_write(w.as_fd());
                }
                return Ok(Finish::Eof);
            }
            Step::Last(n) => {
                acct.add(to_origin, n as u64);
                first_fin.store(true, Ordering::Relaxed);
                // Sends the held-back bytes with the FIN in one segment.
                // Worth its syscall even for the second FIN: a packet costs
                // more. A failure means the peer reset; the other
                // direction reports that.
                use std::os::fd::AsFd;
                let _ = sockopt::shutdown_write(w.as_fd());
                return Ok(Finish::Eof);
            }
            Step::Failing(n) => {
                acct.add(to_origin, n as u64);
                failed = true;
            }
            Step::Moved(n, more) => {
                acct.add(to_origin, n as u64);
                streaming = more;
            }
            Step::Again => streaming = false,
        }
    }
}

/// One splice from `r` into `pipe`, then on to `w` until the pipe is
/// empty; the pipe goes back to the pool. `Moved(n, more)`: `more` if the
/// splice moved at least [`SPLICE_STAY`]. Every byte taken from `r` has
/// reached `w`'s send queue when this returns `Ok`; on `Err` the pipe is
/// closed with whatever it held, and the pair is reset.
async fn splice_step(
    r: &TcpStream,
    w: &TcpStream,
    mut pipe: Pipe,
    src: Side,
    dst: Side,
) -> Result<Step, Side> {
    use std::os::fd::AsRawFd;
    let res = read_clearing(r, || {
        let n = pipe.fill_from(r.as_raw_fd())?;
        Ok((n, pipe.held() == super::pipe::CAPACITY))
    });
    let n = match res {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            pipe.put_back();
            return Ok(Step::Again);
        }
        Err(_) => return Err(src),
    };
    if n == 0 {
        pipe.put_back();
        return Ok(Step::Eof);
    }
    while pipe.held() > 0 {
        std::future::poll_fn(|cx| w.poll_write_ready(cx))
            .await
            .map_err(|_| dst)?;
        match w.try_io(tokio::io::Interest::WRITABLE, || {
            pipe.drain_to(w.as_raw_fd())
        }) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(dst),
        }
    }
    pipe.put_back();
    Ok(Step::Moved(n, n >= SPLICE_STAY))
}

/// Re-wraps a std stream (from a path that gave up) for this relay.
pub fn from_std(s: std::net::TcpStream) -> std::io::Result<TcpStream> {
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}
