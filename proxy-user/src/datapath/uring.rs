//! The io_uring relay: one thread runs a tokio-uring runtime and relays
//! every connection handed to it with `IORING_OP_READ`/`IORING_OP_WRITE`.
//!
//! Requires Linux 5.11+ (tokio-uring) and `kernel.io_uring_disabled = 0`;
//! [`probe`] checks the ring and the opcodes at start-up.
//! Half-close and reset behave as in the user-space relay.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_uring::net::TcpStream;

use super::{userspace, CloseReason, Fallback, Pair, Side};
use crate::accounting::Accounting;
use crate::sockopt;

/// Size of each direction's buffer.
const BUF: usize = 64 << 10;

struct Job {
    client: std::net::TcpStream,
    client_ahead: Bytes,
    origin: std::net::TcpStream,
    origin_ahead: Bytes,
    acct: Arc<Accounting>,
    done: oneshot::Sender<CloseReason>,
}

/// Checks that io_uring can be set up here and has the opcodes the relay uses.
pub fn probe() -> io::Result<()> {
    use io_uring::opcode;
    let ring = io_uring::IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    // IORING_REGISTER_PROBE: Linux 5.6+.
    ring.submitter().register_probe(&mut probe)?;
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
    Ok(())
}

/// Handle to the io_uring relay thread.
pub struct UringRelay {
    tx: mpsc::UnboundedSender<Job>,
}

impl UringRelay {
    /// Probes io_uring and starts the relay thread.
    pub fn start() -> Result<UringRelay, String> {
        probe().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("sluice-uring".into())
            .spawn(move || tokio_uring::start(serve(rx)))
            .map_err(|e| e.to_string())?;
        Ok(UringRelay { tx })
    }

    /// Relays one connection; gives the pair back if the relay thread is gone.
    pub async fn relay(
        &self,
        pair: Pair,
        acct: Arc<Accounting>,
    ) -> Result<CloseReason, Box<Fallback>> {
        let Pair {
            client,
            client_ahead,
            origin,
            origin_ahead,
        } = pair;
        let (client, origin) = match (to_blocking_std(client), to_blocking_std(origin)) {
            (Ok(c), Ok(o)) => (c, o),
            (Err(e), _) | (_, Err(e)) => return Ok(CloseReason::Internal(e.to_string())),
        };
        let (done, wait) = oneshot::channel();
        let job = Job {
            client,
            client_ahead,
            origin,
            origin_ahead,
            acct,
            done,
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            let back = (|| {
                Ok::<_, io::Error>(Pair {
                    client: userspace::from_std(job.client)?,
                    client_ahead: job.client_ahead,
                    origin: userspace::from_std(job.origin)?,
                    origin_ahead: job.origin_ahead,
                })
            })();
            return match back {
                Ok(p) => Err(Fallback::new(p, "the io_uring thread has stopped")),
                Err(e) => Ok(CloseReason::Internal(e.to_string())),
            };
        }
        Ok(wait
            .await
            .unwrap_or_else(|_| CloseReason::Internal("io_uring relay task ended".into())))
    }
}

/// io_uring must not see O_NONBLOCK, or reads fail with EAGAIN instead of waiting.
fn to_blocking_std(s: tokio::net::TcpStream) -> io::Result<std::net::TcpStream> {
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

async fn serve(mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = rx.recv().await {
        tokio_uring::spawn(run(job));
    }
}

async fn run(job: Job) {
    let client = TcpStream::from_std(job.client);
    let origin = TcpStream::from_std(job.origin);
    let acct = &job.acct;
    let result = futures_util::future::try_join(
        pump(&client, &origin, job.client_ahead, acct, true),
        pump(&origin, &client, job.origin_ahead, acct, false),
    )
    .await;
    let reason = match result {
        Ok(_) => CloseReason::Done,
        Err(side) => {
            // A read still in flight on the other socket holds a reference
            // to it, so close alone would not reset it. SHUT_RD ends that
            // read; the last reference then closes with SO_LINGER 0 (RST).
            for s in [&client, &origin] {
                sockopt::set_reset_on_close(fd_of(s));
                let _ = socket2::SockRef::from(&fd_of(s)).shutdown(std::net::Shutdown::Read);
            }
            CloseReason::Reset(side)
        }
    };
    drop(client);
    drop(origin);
    let _ = job.done.send(reason);
}

fn fd_of(s: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd belongs to `s`, which outlives the borrow.
    unsafe { sockopt::borrow(s.as_raw_fd()) }
}

async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    ahead: Bytes,
    acct: &Accounting,
    to_origin: bool,
) -> Result<(), Side> {
    let (src_side, dst_side) = if to_origin {
        (Side::Client, Side::Origin)
    } else {
        (Side::Origin, Side::Client)
    };
    if !ahead.is_empty() {
        let n = ahead.len() as u64;
        dst.write_all(ahead.to_vec())
            .await
            .0
            .map_err(|_| dst_side)?;
        acct.add(to_origin, n);
    }
    let mut buf = PooledBuf::take();
    loop {
        let mut b = buf.0.take().unwrap_or_default();
        b.clear();
        let (res, b) = src.read(b).await;
        buf.0 = Some(b);
        let n = res.map_err(|_| src_side)?;
        if n == 0 {
            let _ = dst.shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        let (res, b) = dst.write_all(buf.0.take().unwrap_or_default()).await;
        buf.0 = Some(b);
        res.map_err(|_| dst_side)?;
        acct.add(to_origin, n as u64);
    }
}

// Relay buffers are never freed: the pool grows to the peak number of busy
// directions and stays there. Freeing them into the shared heap and
// allocating again fragmented it and let RSS creep with the connection count.
thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A relay buffer that goes back to the pool when dropped. While an
/// operation owns the buffer this holds `None`; a cancelled operation keeps
/// it, and it is freed rather than pooled.
struct PooledBuf(Option<Vec<u8>>);

impl PooledBuf {
    fn take() -> PooledBuf {
        let b = POOL.with(|p| p.borrow_mut().pop());
        PooledBuf(Some(b.unwrap_or_else(|| Vec::with_capacity(BUF))))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            POOL.with(|p| {
                if b.capacity() == BUF {
                    p.borrow_mut().push(b);
                }
            });
        }
    }
}
