//! The plain user-space relay: tokio, readiness first, then one large read
//! into the worker thread's scratch buffer and a write straight from it.
//!
//! An idle connection holds no buffer; only bytes the target would not take
//! at once are copied into the direction's own, short-lived buffer. Works
//! everywhere. Half-close: EOF on one side becomes `shutdown(SHUT_WR)`
//! on the other after every byte read has been written. A reset or error on
//! either side resets both.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::{CloseReason, Pair, Side};
use crate::accounting::Accounting;
use crate::sockopt;

/// Size of each worker thread's read buffer: large reads mean few
/// syscalls per byte on bulk transfers.
const SCRATCH: usize = 1 << 20;

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; SCRATCH]);
}

/// What one read-and-write step did.
enum Step {
    /// The source sent FIN.
    Eof,
    /// Bytes read and written at once; the rest are in `pending`.
    Moved(usize),
    /// Not readable after all.
    Again,
}

/// Relays until both directions have closed, or one side reset.
pub async fn relay(pair: Pair, acct: Arc<Accounting>) -> CloseReason {
    let Pair {
        mut client,
        client_ahead,
        mut origin,
        origin_ahead,
    } = pair;
    let result = {
        let (cr, cw) = client.split();
        let (or, ow) = origin.split();
        tokio::try_join!(
            pump(cr, ow, &client_ahead, &acct, true),
            pump(or, cw, &origin_ahead, &acct, false)
        )
    };
    match result {
        Ok(_) => CloseReason::Done,
        Err(side) => {
            // Closing with SO_LINGER 0 sends RST, so a reset reaches the peer.
            use std::os::fd::AsFd;
            sockopt::set_reset_on_close(client.as_fd());
            sockopt::set_reset_on_close(origin.as_fd());
            CloseReason::Reset(side)
        }
    }
}

/// Copies one direction; `Err` names the side whose socket failed.
async fn pump(
    r: ReadHalf<'_>,
    mut w: WriteHalf<'_>,
    ahead: &[u8],
    acct: &Accounting,
    to_origin: bool,
) -> Result<(), Side> {
    let (src, dst) = if to_origin {
        (Side::Client, Side::Origin)
    } else {
        (Side::Origin, Side::Client)
    };
    if !ahead.is_empty() {
        w.write_all(ahead).await.map_err(|_| dst)?;
        acct.add(to_origin, ahead.len() as u64);
    }
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if !pending.is_empty() {
            w.write_all(&pending).await.map_err(|_| dst)?;
            acct.add(to_origin, pending.len() as u64);
            // Drop the buffer: an idle connection should hold none.
            pending = Vec::new();
        }
        r.readable().await.map_err(|_| src)?;
        let step = BUF.with(|b| {
            let mut b = b.borrow_mut();
            let n = match r.try_read(&mut b) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Step::Again),
                Err(_) => return Err(src),
            };
            let mut off = 0;
            while off < n {
                match w.try_write(&b[off..n]) {
                    Ok(k) => off += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err(dst),
                }
            }
            pending.extend_from_slice(&b[off..n]);
            Ok(Step::Moved(off))
        })?;
        match step {
            Step::Eof => {
                // Ignore ENOTCONN: the peer may have reset meanwhile; the
                // other direction reports that.
                let _ = w.shutdown().await;
                return Ok(());
            }
            Step::Moved(n) => acct.add(to_origin, n as u64),
            Step::Again => {}
        }
    }
}

/// Re-wraps a std stream (from a path that gave up) for this relay.
pub fn from_std(s: std::net::TcpStream) -> std::io::Result<TcpStream> {
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}
