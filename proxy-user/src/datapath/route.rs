//! One route lookup over rtnetlink, as `ip route get DST from SRC` does:
//! the interface a packet to a peer leaves by. tcpsplice sends a peer's
//! rewritten packets out of the interface its route names (`lo` for an
//! address of this host).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
/// `struct nlmsghdr` and `struct rtmsg`.
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;

/// The index of the interface the route from `src` (an address of this
/// host) to `dst` leaves by.
pub fn output_interface(dst: Ipv4Addr, src: Ipv4Addr) -> io::Result<u32> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = request(dst, src);
    // SAFETY: the buffer is valid for its length; the kernel (pid 0) is
    // the default destination of an unconnected netlink socket.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..n as usize])
}

/// An `RTM_GETROUTE` request for `dst` from `src`.
fn request(dst: Ipv4Addr, src: Ipv4Addr) -> Vec<u8> {
    let len = NLMSG_HDR + RTMSG + 2 * 8;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
                                              // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    m.extend_from_slice(&[libc::AF_INET as u8, 32, 32, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    for (kind, a) in [(RTA_DST, dst), (RTA_SRC, src)] {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&a.octets());
    }
    m
}

/// `RTA_OIF` of the kernel's answer, or the error it sent.
fn parse(msg: &[u8]) -> io::Result<u32> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a malformed rtnetlink answer");
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(msg.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(msg.get(at..at + 4)?.try_into().ok()?))
    };
    let len = u32_at(0).ok_or_else(bad)? as usize;
    let end = len.min(msg.len());
    match u16_at(4).ok_or_else(bad)? {
        NLMSG_ERROR => {
            let errno = u32_at(NLMSG_HDR).ok_or_else(bad)? as i32;
            Err(io::Error::from_raw_os_error(-errno))
        }
        RTM_NEWROUTE => {
            let mut at = NLMSG_HDR + RTMSG;
            while at + 4 <= end {
                let alen = usize::from(u16_at(at).ok_or_else(bad)?);
                if alen < 4 {
                    return Err(bad());
                }
                if u16_at(at + 2) == Some(RTA_OIF) {
                    return u32_at(at + 4).ok_or_else(bad);
                }
                at += (alen + 3) & !3;
            }
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the route names no output interface",
            ))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("rtnetlink answered with message type {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_of_this_host_is_reached_over_loopback() {
        let lo = output_interface(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST).expect("route get");
        assert_eq!(lo, 1, "lo is interface 1 in every namespace");
    }

    #[test]
    fn an_unreachable_destination_is_an_error() {
        // No route from an address this host does not have.
        let e = output_interface(Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(192, 0, 2, 1));
        assert!(e.is_err(), "{e:?}");
    }

    #[test]
    fn answers_are_parsed_and_checked() {
        // An RTM_NEWROUTE with RTA_TABLE, then RTA_OIF = 7.
        let mut m = vec![0u8; NLMSG_HDR + RTMSG];
        m[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        for (kind, v) in [(15u16, 254u32), (RTA_OIF, 7)] {
            m.extend_from_slice(&8u16.to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&v.to_ne_bytes());
        }
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse(&m).unwrap(), 7);
        // An error answer carries a negative errno.
        let mut e = vec![0u8; NLMSG_HDR + 4];
        let elen = e.len() as u32;
        e[0..4].copy_from_slice(&elen.to_ne_bytes());
        e[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        e[16..20].copy_from_slice(&(-libc::ENETUNREACH).to_ne_bytes());
        assert_eq!(
            parse(&e).unwrap_err().raw_os_error(),
            Some(libc::ENETUNREACH)
        );
        // A truncated attribute is refused, not read past.
        let mut t = vec![0u8; NLMSG_HDR + RTMSG + 4];
        let tlen = t.len() as u32;
        t[0..4].copy_from_slice(&tlen.to_ne_bytes());
        t[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        assert!(parse(&t).is_err());
    }
}
