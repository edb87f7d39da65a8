//! Socket options and ioctls the data paths need, as safe functions.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// The prefix of Linux's `struct tcp_info` up to `tcpi_bytes_received`
/// (Linux 4.1+); libc's struct stops before `tcpi_bytes_acked`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct TcpInfo {
    /// `tcpi_state`, `ca_state`, `retransmits`, `probes`, `backoff`,
    /// `options`, `wscale`, `flags`.
    pub head: [u8; 8],
    /// `tcpi_rto` ... `tcpi_total_retrans`: 24 u32 fields.
    pub mid: [u32; 24],
    /// `tcpi_pacing_rate`.
    pub pacing_rate: u64,
    /// `tcpi_max_pacing_rate`.
    pub max_pacing_rate: u64,
    /// `tcpi_bytes_acked`: bytes the peer acknowledged (RFC 4898).
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`.
    pub bytes_received: u64,
}

impl TcpInfo {
    /// The TCP state (`TCP_ESTABLISHED` is 1).
    pub fn state(&self) -> u8 {
        self.head[0]
    }

    /// `tcpi_options`: the `TCPI_OPT_*` bits the connection negotiated.
    pub fn options(&self) -> u8 {
        self.head[5]
    }

    /// The window scale the peer announced (its windows are shifted by it).
    pub fn snd_wscale(&self) -> u8 {
        self.head[6] & 0x0f
    }

    /// The window scale this socket announced (the peer shifts ours by it).
    pub fn rcv_wscale(&self) -> u8 {
        self.head[6] >> 4
    }

    /// `tcpi_snd_mss`: the most payload this socket puts in a segment: the
    /// smaller of its path's and the peer's announced MSS, less the TCP
    /// options every segment carries (timestamps), and at most half the
    /// largest window the peer offered.
    pub fn snd_mss(&self) -> u32 {
        self.mid[2]
    }

    /// The TCP option bytes every segment of this connection carries: 12
    /// with timestamps (10 and two NOPs), else none.
    pub fn option_bytes(&self) -> u32 {
        if self.options() & TCPI_OPT_TIMESTAMPS != 0 {
            12
        } else {
            0
        }
    }

    /// `tcpi_pmtu`: the path MTU of this socket's route.
    pub fn pmtu(&self) -> u32 {
        self.mid[13]
    }

    /// `tcpi_advmss`: the most payload this socket lets its peer put in a
    /// segment: the MSS it announced (its route's MTU less the IP and TCP
    /// headers, or `TCP_MAXSEG`'s) less the options every segment carries.
    pub fn advmss(&self) -> u32 {
        self.mid[19]
    }
}

/// `tcpi_options` bit: TCP timestamps are on.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// `tcpi_options` bit: window scaling is on.
pub const TCPI_OPT_WSCALE: u8 = 4;
/// `tcpi_options` bit: timestamps count microseconds (Linux 6.7+, per route).
pub const TCPI_OPT_USEC_TS: u8 = 64;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn getsockopt<T: Default>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut v = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: v is a valid, writable T and len is its size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut T).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// `SO_COOKIE`: the kernel's unique, never-reused id of a socket (Linux 4.12+).
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// `TCP_INFO`.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    getsockopt::<TcpInfo>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: both requests write one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) })?;
    Ok(v as u64)
}

/// `SIOCOUTQ`: bytes in the send queue, not yet acknowledged.
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// `SIOCOUTQNSD`: bytes in the send queue not sent yet.
pub fn notsent(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SIOCOUTQNSD: libc::c_ulong = 0x894B;
    ioctl_int(fd, SIOCOUTQNSD)
}

/// `SIOCINQ`: bytes in the TCP receive queue not yet read.
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Every byte ever written into this socket: acknowledged plus still
/// queued (on the connecting side the SYN counts too, so compare
/// differences). Read in this order, a concurrent ACK can
/// only make the sum smaller, never larger than the truth.
pub fn bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcp_info(fd)?.bytes_acked;
    Ok(acked + outq(fd)?)
}

/// Puts a socket into TCP repair mode (`TCP_REPAIR`, Linux 3.5+,
/// CAP_NET_ADMIN), or takes it out without the window probe that leaving
/// repair mode normally sends (`TCP_REPAIR_OFF_NO_WP`, Linux 4.19+). In
/// repair mode TCP sends no data, and `close` sends neither FIN nor RST.
pub fn set_repair(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    const TCP_REPAIR: i32 = 19;
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, if on { 1 } else { -1 })
}

/// In repair mode: (`rcv_nxt`, `write_seq`), the next sequence number the
/// socket expects from its peer and the next it would send.
pub fn queue_seqs(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_QUEUE_SEQ: i32 = 21;
    const TCP_RECV_QUEUE: i32 = 1;
    const TCP_SEND_QUEUE: i32 = 2;
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let rcv = getsockopt::<u32>(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let snd = getsockopt::<u32>(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)?;
    Ok((rcv, snd))
}

/// In repair mode, `TCP_MAXSEG` reads `mss_clamp`: the MSS the peer
/// announced in its SYN (bounded by this socket's `TCP_MAXSEG`, if set).
/// Out of it, `TCP_MAXSEG` reads the send MSS, which also halves with the
/// largest window the peer offered.
pub fn peer_mss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mss: libc::c_int = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)?;
    Ok(u32::try_from(mss).unwrap_or(0))
}

/// `TCP_TIMESTAMP`: the socket's TCP timestamp clock now (its offset
/// included), in the units its TSvals count.
pub fn tcp_timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    const TCP_TIMESTAMP: i32 = 24;
    getsockopt::<u32>(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP)
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, v: libc::c_int) -> io::Result<()> {
    // SAFETY: v is a valid int and the length is its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// `SO_ERROR`: the pending socket error, cleared by reading it.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    socket2::SockRef::from(&fd).take_error()
}

/// Makes the next close send RST instead of FIN (`SO_LINGER` 0).
pub fn set_reset_on_close(fd: BorrowedFd<'_>) {
    // A failure only means the peer sees FIN instead of RST.
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// Sizes both socket buffers to a quarter of `bound` each, so that one
/// direction (source receive buffer, target send buffer, and on the sockmap
/// path the redirect credit) stays within `bound` counting skb overhead.
pub fn bound_buffers(fd: BorrowedFd<'_>, bound: u64) {
    // The kernel doubles the value for its bookkeeping overhead.
    let each = usize::try_from(bound / 8).unwrap_or(usize::MAX);
    let s = socket2::SockRef::from(&fd);
    let _ = s.set_recv_buffer_size(each);
    let _ = s.set_send_buffer_size(each);
}

/// `TCP_QUICKACK` 0: the kernel's interactive ("pingpong") mode, in which
/// an ACK waits for data going the other way to ride on, up to the
/// delayed-ACK timeout (40 ms or more), instead of taking a packet of its
/// own. A proxy answers a request only after a round trip to the origin,
/// so the ACK of the upgrade request otherwise goes alone (HAProxy's
/// `tcp-smart-accept`). Set on the listener, after `listen()` (which
/// resets the ACK state); accepted sockets inherit it. A failure only
/// costs a packet.
pub fn delay_acks(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).set_quickack(false);
}

/// `TCP_QUICKACK` 1: leaves the mode [`delay_acks`] set, once the
/// handshake is answered. In it, a direction that carries data only one
/// way has its ACKs held for the delayed-ACK timeout, which the kernel
/// doubles each time it runs out (up to the RTO): the sender's RTT
/// estimate grows with it, and so does its loss recovery (a spliced W2
/// at 1,000 connections had its p99 about 10 ms over direct's, median of
/// 8 side-by-side quick runs, against about 0 without). A failure only
/// costs that.
pub fn quick_acks(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).set_quickack(true);
}

/// `TCP_DEFER_ACCEPT` on a socket about to connect: the last ACK of its
/// TCP handshake waits (up to 200 ms) to ride on the first data, the
/// forwarded request (HAProxy's `tcp-smart-connect`; Linux 2.6+). Unlike
/// [`delay_acks`], the socket's ACKs are as usual afterwards. A failure
/// only costs a packet.
pub fn delay_handshake_ack(fd: BorrowedFd<'_>) {
    let _ = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, 1);
}

/// `TCP_DEFER_ACCEPT` of one second on a listener (nginx's `deferred`,
/// HAProxy's `defer-accept`; Linux 2.4+): `accept` returns a connection
/// only once its first bytes are in, so the proxy is not woken twice per
/// client and never reads a socket that has nothing yet. A WebSocket
/// client speaks first. One that does not is accepted after about a
/// second of SYN-ACK retransmissions, and then meets the handshake
/// timeout as before. A failure only costs that wake-up.
pub fn defer_accept(fd: BorrowedFd<'_>) {
    let _ = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, 1);
}

/// `TCP_MAXSEG` before `connect`: the MSS the SYN announces, so the
/// most the peer puts in a segment (Linux 2.2+). A failure only leaves
/// the route's.
pub fn set_mss(fd: BorrowedFd<'_>, mss: u32) {
    let _ = setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_MAXSEG,
        libc::c_int::try_from(mss).unwrap_or(libc::c_int::MAX),
    );
}

/// `shutdown(SHUT_WR)`: send FIN after everything queued.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write)
}

/// Borrows a raw fd the caller owns for the duration of the borrow.
///
/// # Safety
/// `fd` must stay open while the result is used.
pub unsafe fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: forwarded to the caller.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn tcp_info_layout_counts_bytes() {
        assert_eq!(std::mem::size_of::<TcpInfo>(), 136);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        // The client side counts its SYN as acknowledged: use differences.
        let w0 = bytes_written(a.as_fd()).unwrap();
        a.write_all(&[7u8; 1000]).unwrap();
        let mut buf = [0u8; 1000];
        b.read_exact(&mut buf).unwrap();
        // Wait for the ACK to come back on loopback.
        for _ in 0..100 {
            if outq(a.as_fd()).unwrap() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(bytes_written(a.as_fd()).unwrap() - w0, 1000);
        assert_eq!(tcp_info(a.as_fd()).unwrap().bytes_acked - w0, 1000);
        assert_eq!(tcp_info(b.as_fd()).unwrap().bytes_received, 1000);
        assert_eq!(tcp_info(a.as_fd()).unwrap().state(), 1);
        assert_ne!(cookie(a.as_fd()).unwrap(), cookie(b.as_fd()).unwrap());
        assert_eq!(inq(b.as_fd()).unwrap(), 0);
    }
}
