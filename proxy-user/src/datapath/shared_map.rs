//! `BPF_F_MMAPABLE` arrays mapped into this process, and the slots that
//! index them.
//!
//! Both sides access an element in place: the kernel with plain loads and
//! stores, user space with atomic loads and stores of single `u64`/`u32`
//! fields. Elements never move or get recycled, unlike hash-map values,
//! which a concurrent update can hand to another key while a program still
//! reads them. Mmapable arrays need Linux 5.5+.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData};
use proxy_common::splice::{SpliceConn, SpliceRewrite};
use proxy_common::{DirCtl, DirStats};

/// An mmapable BPF array of `T`, mapped read-write.
pub struct SharedArray<T> {
    ptr: NonNull<T>,
    len: u32,
    bytes: usize,
    _map: MapData,
}

// SAFETY: the memory is shared with the kernel and only ever accessed
// through atomic operations on whole fields.
unsafe impl<T> Send for SharedArray<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedArray<T> {}

impl<T> SharedArray<T> {
    /// Maps `map`, which must be a `BPF_F_MMAPABLE` array of `len` elements
    /// of `T` (whose size is a multiple of 8, so elements are contiguous).
    pub fn new(map: Map, len: u32) -> io::Result<SharedArray<T>> {
        let Map::Array(data) = map else {
            return Err(io::Error::other("not an array map"));
        };
        assert_eq!(
            std::mem::size_of::<T>() % 8,
            0,
            "elements must be 8-byte multiples"
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (len as usize * std::mem::size_of::<T>()).next_multiple_of(page);
        // SAFETY: a shared mapping of the map's fd; the kernel checks the
        // size and the mmapable flag.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedArray {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
            bytes,
            _map: data,
        })
    }

    fn elem(&self, slot: u32) -> *mut T {
        assert!(slot < self.len, "slot {slot} out of range");
        // SAFETY: in bounds, checked above.
        unsafe { self.ptr.as_ptr().add(slot as usize) }
    }
}

impl<T> Drop for SharedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

fn u64_at<'a>(p: *mut u64) -> &'a AtomicU64 {
    // SAFETY: p points into the live mapping, 8-byte aligned, and the kernel
    // side only uses whole-field loads and stores on it.
    unsafe { AtomicU64::from_ptr(p) }
}

fn u32_at<'a>(p: *mut u32) -> &'a AtomicU32 {
    // SAFETY: as for u64_at, 4-byte aligned.
    unsafe { AtomicU32::from_ptr(p) }
}

impl SharedArray<DirCtl> {
    /// Publishes a direction's control, field by field. The verdict reads
    /// each field once; an old or new mark or limit is equally fine (limits
    /// only grow).
    pub fn store(&self, slot: u32, c: &DirCtl) {
        let e = self.elem(slot);
        // SAFETY: all are fields of an element inside the mapping.
        unsafe {
            u64_at(&raw mut (*e).peer_cookie).store(c.peer_cookie, Ordering::Release);
            u64_at(&raw mut (*e).refill_at).store(c.refill_at, Ordering::Release);
            u64_at(&raw mut (*e).limit).store(c.limit, Ordering::Release);
        }
    }
}

impl SharedArray<DirStats> {
    /// Reads a direction's counters.
    pub fn load(&self, slot: u32) -> DirStats {
        let e = self.elem(slot);
        // SAFETY: fields of an element inside the mapping.
        unsafe {
            DirStats {
                redirected: u64_at(&raw mut (*e).redirected).load(Ordering::Acquire),
                last_ns: u64_at(&raw mut (*e).last_ns).load(Ordering::Acquire),
                refill_asked: u64_at(&raw mut (*e).refill_asked).load(Ordering::Acquire),
                redirect_errors: u32_at(&raw mut (*e).redirect_errors).load(Ordering::Acquire),
                overrun: u32_at(&raw mut (*e).overrun).load(Ordering::Acquire),
            }
        }
    }

    /// Zeroes a slot's counters before a new direction uses it.
    pub fn reset(&self, slot: u32) {
        let e = self.elem(slot);
        // SAFETY: fields of an element inside the mapping.
        unsafe {
            for f in [
                &raw mut (*e).redirected,
                &raw mut (*e).last_ns,
                &raw mut (*e).refill_asked,
            ] {
                u64_at(f).store(0, Ordering::Release);
            }
            u32_at(&raw mut (*e).redirect_errors).store(0, Ordering::Release);
            u32_at(&raw mut (*e).overrun).store(0, Ordering::Release);
        }
    }
}

impl SharedArray<SpliceConn> {
    /// Starts a session's slot over: every field zero, the gate at
    /// `gate` (the splice program reads it before anything else).
    pub fn reset(&self, slot: u32, gate: u64) {
        let e = self.elem(slot);
        // SAFETY: fields of an element inside the mapping.
        unsafe {
            for s in 0..2 {
                self.publish(slot, s, &SpliceRewrite::default(), 0);
                for f in [
                    &raw mut (*e).side[s].ts_off,
                    &raw mut (*e).side[s].bytes,
                    &raw mut (*e).side[s].last_ns,
                    &raw mut (*e).side[s].fin_end,
                ] {
                    u64_at(f).store(0, Ordering::Release);
                }
            }
            u64_at(&raw mut (*e).snap_ns).store(0, Ordering::Release);
            u64_at(&raw mut (*e).flags).store(0, Ordering::Release);
            u64_at(&raw mut (*e).gate).store(gate, Ordering::Release);
        }
    }

    /// Writes the rewrite of one side's packets, and where its count
    /// starts (`next_seq`). Only while the gate is OBSERVE, when the
    /// program does not read them; the gate's compare-and-swap publishes
    /// them.
    pub fn publish(&self, slot: u32, side: usize, rw: &SpliceRewrite, next_seq: u64) {
        let e = self.elem(slot);
        // SAFETY: fields of an element inside the mapping; side is 0 or 1.
        unsafe {
            let d = &raw mut (*e).side[side & 1];
            std::ptr::write_volatile(&raw mut (*d).rw, *rw);
            u64_at(&raw mut (*d).next_seq).store(next_seq, Ordering::Release);
        }
    }

    /// Sets the time the timestamp bases were read at.
    pub fn set_snap_ns(&self, slot: u32, ns: u64) {
        // SAFETY: a field of an element inside the mapping.
        unsafe { u64_at(&raw mut (*self.elem(slot)).snap_ns).store(ns, Ordering::Release) }
    }

    /// The session's gate.
    pub fn gate(&self, slot: u32) -> &AtomicU64 {
        // SAFETY: a field of an element inside the mapping, which lives as
        // long as `self`.
        unsafe { u64_at(&raw mut (*self.elem(slot)).gate) }
    }

    /// The FIN, FIN-acknowledged and RST bits.
    pub fn flags(&self, slot: u32) -> u64 {
        // SAFETY: a field of an element inside the mapping.
        unsafe { u64_at(&raw mut (*self.elem(slot)).flags).load(Ordering::Acquire) }
    }

    /// What the kernel counted of one side: (`next_seq`, `bytes`, `last_ns`).
    pub fn counted(&self, slot: u32, side: usize) -> (u64, u64, u64) {
        let e = self.elem(slot);
        // SAFETY: fields of an element inside the mapping.
        unsafe {
            let d = &raw mut (*e).side[side & 1];
            (
                u64_at(&raw mut (*d).next_seq).load(Ordering::Acquire),
                u64_at(&raw mut (*d).bytes).load(Ordering::Acquire),
                u64_at(&raw mut (*d).last_ns).load(Ordering::Acquire),
            )
        }
    }
}

/// How long a freed slot rests before reuse, so that a verdict still running
/// for a socket that just left cannot touch the next user's counters. A
/// verdict runs for microseconds; a longer rest only parks more slots (and
/// touches more pages of the arrays) at high connection rates.
const QUARANTINE: Duration = Duration::from_millis(100);

/// Hands out slot numbers; reuses the most recently rested ones first, so
/// the pages touched stay few.
pub struct Slots {
    free: Vec<u32>,
    resting: VecDeque<(Instant, u32)>,
    next: u32,
    len: u32,
}

impl Slots {
    /// `len` slots, none in use.
    pub fn new(len: u32) -> Slots {
        Slots {
            free: Vec::new(),
            resting: VecDeque::new(),
            next: 0,
            len,
        }
    }

    /// A free slot, or `None` when all are in use or resting.
    pub fn take(&mut self) -> Option<u32> {
        let now = Instant::now();
        while let Some(&(t, s)) = self.resting.front() {
            if now.duration_since(t) < QUARANTINE {
                break;
            }
            self.resting.pop_front();
            self.free.push(s);
        }
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        (self.next < self.len).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Returns a slot; it rests before it is handed out again.
    pub fn give(&mut self, slot: u32) {
        self.resting.push_back((Instant::now(), slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_rest_before_reuse() {
        let mut s = Slots::new(2);
        let a = s.take().unwrap();
        let b = s.take().unwrap();
        assert_ne!(a, b);
        assert_eq!(s.take(), None, "all in use");
        s.give(a);
        assert_eq!(s.take(), None, "a is resting");
        s.resting[0].0 -= QUARANTINE;
        assert_eq!(s.take(), Some(a));
    }
}
