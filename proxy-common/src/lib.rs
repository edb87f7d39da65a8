//! `#[repr(C)]` types shared by Sluice's eBPF verdict program and user space.
//!
//! Every map is keyed by the socket cookie (`SO_COOKIE`) of the socket whose
//! *incoming* bytes the entry describes: the source of one relay direction.
//! The kernel side writes [`DirStats`]; user space writes [`DirCtl`]. Keeping
//! the writers apart means neither side ever overwrites the other's counters.
//!
//! Types are padding-free so that a map value has no uninitialised bytes.
#![no_std]

/// Name of the sockhash that holds both sockets of every relayed pair.
pub const MAP_SOCKS: &str = "SOCKS";
/// Name of the hash map of [`DirCtl`] (user space writes, kernel reads).
pub const MAP_CTL: &str = "CTL";
/// Name of the hash map of [`DirStats`] (kernel writes, user space reads).
pub const MAP_STATS: &str = "STATS";
/// Name of the ring buffer of [`Event`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Name of the sk_skb stream_verdict program.
pub const PROG_VERDICT: &str = "sluice_verdict";

/// Upper bound on relayed pairs the maps can hold (two entries per pair).
pub const MAX_SOCKETS: u32 = 65_536;

/// Control of one direction, written by user space only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCtl {
    /// Cookie of the socket this direction writes to (the sockhash key).
    pub peer_cookie: u64,
    /// The verdict redirects only while `redirected + len <= limit`.
    /// User space raises it as the target's receiver acknowledges bytes,
    /// which is what bounds the memory one direction can hold.
    pub limit: u64,
    /// When `redirected` passes this mark the kernel asks for a new limit.
    pub refill_at: u64,
    /// Passed bytes user space has read from the source and written to the
    /// target. The kernel resumes redirecting only when this equals
    /// [`DirStats::passed`], so bytes never overtake one another.
    pub drained: u64,
}

/// Counters of one direction, written by the verdict program only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Bytes redirected to the peer's egress.
    pub redirected: u64,
    /// Bytes passed to the source's own receive queue for user space.
    pub passed: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last skb.
    pub last_ns: u64,
    /// The last `refill_at` this direction asked a refill for.
    pub refill_asked: u64,
    /// Non-zero while the direction passes to user space.
    pub passing: u32,
    /// Redirects the kernel refused (peer missing from the sockhash).
    pub redirect_errors: u32,
}

/// Why the verdict program woke user space.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes were passed to user space: drain the source.
    Passed = 1,
    /// `redirected` crossed `refill_at`: compute a new limit.
    Refill = 2,
}

/// One ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// Cookie of the source socket of the direction.
    pub cookie: u64,
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// Padding made explicit.
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), made only of integers, with no padding.
    unsafe impl aya::Pod for super::DirCtl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DirStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
}
