//! The plain user-space relay: tokio, one buffer per direction.
//!
//! Works everywhere. Half-close: EOF on one side becomes `shutdown(SHUT_WR)`
//! on the other after every byte read has been written. A reset or error on
//! either side resets both.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::{CloseReason, Pair, Side};
use crate::accounting::Accounting;
use crate::sockopt;

/// Size of each direction's buffer.
const BUF: usize = 64 << 10;

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
    mut r: ReadHalf<'_>,
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
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await.map_err(|_| src)?;
        if n == 0 {
            // Ignore ENOTCONN: the peer may have reset meanwhile; the other
            // direction reports that.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(|_| dst)?;
        acct.add(to_origin, n as u64);
    }
}

/// Re-wraps a std stream (from a path that gave up) for this relay.
pub fn from_std(s: std::net::TcpStream) -> std::io::Result<TcpStream> {
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}
