//! Pooled pipes for `splice(2)`: a busy direction of the user-space relay
//! moves its bytes socket → pipe → socket, so they never cross into user
//! space. The pages the source socket received are handed on by reference.
//!
//! Linux 2.6.17+ (`splice`), 2.6.35+ (`F_SETPIPE_SZ`). A pipe is only taken
//! while a direction streams, and goes back to its worker's pool empty, so
//! idle connections hold none (a pipe per connection would reach
//! `fs.pipe-user-pages-soft` at about 1,000 connections). Past that limit
//! `F_SETPIPE_SZ` fails for an unprivileged user, and the direction copies
//! instead.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Capacity asked for each pipe: what one splice can carry. Equal to the
/// copy path's scratch buffer, so a direction holds no more either way.
pub const CAPACITY: usize = 1 << 20;

/// Empty pipes a worker keeps for the next busy direction (two fds each).
const KEPT: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Fds>> = const { RefCell::new(Vec::new()) };
}

/// The two ends of one pipe.
#[derive(Debug)]
struct Fds {
    read: OwnedFd,
    write: OwnedFd,
}

impl Fds {
    fn new() -> io::Result<Fds> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: a plain fcntl on an fd we own.
        let got = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                CAPACITY as libc::c_int,
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Fds { read, write })
    }
}

/// A pipe of [`CAPACITY`] bytes, and how many bytes it holds. Dropped, it
/// is closed; [`Pipe::put_back`] keeps an empty one for the next busy
/// direction on this thread.
#[derive(Debug)]
pub struct Pipe {
    fds: Fds,
    held: usize,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one; `None` if the
    /// kernel would not give one of [`CAPACITY`] bytes.
    pub fn take() -> Option<Pipe> {
        let fds = match POOL.with(|p| p.borrow_mut().pop()) {
            Some(f) => f,
            None => Fds::new().ok()?,
        };
        Some(Pipe { fds, held: 0 })
    }

    /// Bytes in the pipe, not yet passed on.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The read and write ends, for splices made elsewhere (io_uring). Such a
    /// caller keeps its own count, and puts back only an empty pipe.
    pub fn ends(&self) -> (RawFd, RawFd) {
        (self.fds.read.as_raw_fd(), self.fds.write.as_raw_fd())
    }

    /// Moves up to the pipe's free room from socket `src` into the pipe.
    /// `Ok(0)`: end of stream.
    pub fn fill_from(&mut self, src: RawFd) -> io::Result<usize> {
        let n = splice(src, self.fds.write.as_raw_fd(), CAPACITY - self.held)?;
        self.held += n;
        Ok(n)
    }

    /// Moves what the pipe holds on to socket `dst`, as much as it takes.
    pub fn drain_to(&mut self, dst: RawFd) -> io::Result<usize> {
        let n = splice(self.fds.read.as_raw_fd(), dst, self.held)?;
        self.held -= n;
        Ok(n)
    }

    /// Reads what the pipe holds into `out`, leaving it empty: for a
    /// direction that hands its bytes on to another relay.
    pub fn drain_into(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        out.reserve(self.held);
        while self.held > 0 {
            let spare = out.spare_capacity_mut();
            // SAFETY: `spare` is writable memory of at least `held` bytes
            // (reserved above); read(2) writes at most that many.
            let n = unsafe {
                libc::read(
                    self.fds.read.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    self.held.min(spare.len()),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let n = n as usize;
            // SAFETY: read(2) initialised these `n` bytes.
            unsafe { out.set_len(out.len() + n) };
            self.held -= n;
        }
        Ok(())
    }

    /// Gives an empty pipe back to this thread's pool; one still holding
    /// bytes is closed with them.
    pub fn put_back(self) {
        if self.held != 0 {
            return;
        }
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEPT {
                p.push(self.fds);
            }
        });
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the call; null offsets mean "the file
    // position", which sockets and pipes do not have.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pooled() -> usize {
        POOL.with(|p| p.borrow().len())
    }

    /// One `fill_from` that found bytes (or the end), retried while the
    /// bytes are still on their way through loopback, for at most 5 s.
    fn fill(pipe: &mut Pipe, src: &TcpStream) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match pipe.fill_from(src.as_raw_fd()) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no bytes in 5 s");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// A connected loopback pair (blocking).
    pub(crate) fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn bytes_pass_through_the_pipe_exactly() {
        let (mut a, b) = pair();
        let (c, mut d) = pair();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).unwrap();
        drop(a);
        let mut pipe = Pipe::take().expect("a pipe of CAPACITY bytes");
        let mut got = Vec::new();
        let mut moved = 0;
        loop {
            let n = fill(&mut pipe, &b);
            if n == 0 {
                break;
            }
            moved += n;
            while pipe.held() > 0 {
                pipe.drain_to(c.as_raw_fd()).unwrap();
            }
        }
        drop(c);
        d.read_to_end(&mut got).unwrap();
        assert_eq!(moved, data.len());
        assert_eq!(got, data);
        pipe.put_back();
    }

    #[test]
    fn only_empty_pipes_return_and_a_worker_keeps_a_few() {
        let before = pooled();
        let many: Vec<Pipe> = (0..KEPT + 2).filter_map(|_| Pipe::take()).collect();
        assert_eq!(many.len(), KEPT + 2);
        for p in many {
            p.put_back();
        }
        assert_eq!(pooled(), KEPT.max(before));

        // A pipe that still holds bytes is closed, not pooled.
        let (mut a, b) = pair();
        a.write_all(b"left behind").unwrap();
        let mut p = Pipe::take().unwrap();
        let in_pool = pooled();
        assert_eq!(fill(&mut p, &b), 11);
        p.put_back();
        assert_eq!(pooled(), in_pool);
    }

    #[test]
    fn a_pipe_hands_what_it_holds_to_memory_in_order() {
        let (mut a, b) = pair();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        a.write_all(&data).unwrap();
        let mut pipe = Pipe::take().unwrap();
        let mut moved = 0;
        while moved < data.len() {
            moved += fill(&mut pipe, &b);
        }
        let mut out = b"before".to_vec();
        pipe.drain_into(&mut out).unwrap();
        assert_eq!(pipe.held(), 0);
        assert_eq!(&out[..6], b"before");
        assert_eq!(&out[6..], &data[..]);
        let in_pool = pooled();
        pipe.put_back();
        assert_eq!(pooled(), (in_pool + 1).min(KEPT.max(in_pool)));
    }
}
