//! Per-connection accounting every data path keeps: bytes each way and the
//! time of the last activity. The idle timeout, access logs and metrics
//! read these.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns()` reads,
/// so user-space and kernel timestamps compare directly.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Counters of one relayed connection.
#[derive(Debug)]
pub struct Accounting {
    /// Bytes relayed from the client to the origin after the 101.
    pub client_to_origin: AtomicU64,
    /// Bytes relayed from the origin to the client after the 101.
    pub origin_to_client: AtomicU64,
    /// [`monotonic_ns`] of the last byte relayed in either direction.
    pub last_activity_ns: AtomicU64,
}

impl Default for Accounting {
    fn default() -> Self {
        Accounting {
            client_to_origin: AtomicU64::new(0),
            origin_to_client: AtomicU64::new(0),
            last_activity_ns: AtomicU64::new(monotonic_ns()),
        }
    }
}

impl Accounting {
    /// Adds `n` bytes to one direction and marks activity now.
    pub fn add(&self, to_origin: bool, n: u64) {
        let c = if to_origin {
            &self.client_to_origin
        } else {
            &self.origin_to_client
        };
        c.fetch_add(n, Relaxed);
        self.last_activity_ns.fetch_max(monotonic_ns(), Relaxed);
    }

    /// Sets both totals and the last activity from an outside source (the
    /// sockmap path reads its counters from the eBPF map).
    pub fn set(&self, c2o: u64, o2c: u64, last_ns: u64) {
        self.client_to_origin.store(c2o, Relaxed);
        self.origin_to_client.store(o2c, Relaxed);
        self.last_activity_ns.fetch_max(last_ns, Relaxed);
    }

    /// (client→origin, origin→client) bytes.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.client_to_origin.load(Relaxed),
            self.origin_to_client.load(Relaxed),
        )
    }
}
