//! `#[repr(C)]` types shared by Sluice's eBPF verdict program and user space.
//!
//! Each relayed direction is named by the socket cookie (`SO_COOKIE`) of its
//! source socket. `SLOTS` maps that cookie to a slot, written once when the
//! connection joins and removed when it leaves. Per slot, user space writes
//! [`DirCtl`] and the kernel writes [`DirStats`], in two `BPF_F_MMAPABLE`
//! arrays that both sides access in place: user space with atomic loads and
//! stores on single fields, no syscalls. (A hash map would not do: updating
//! a key recycles its element at once, and a verdict still holding the old
//! pointer would read another key's values.)
//!
//! Types are padding-free so that a map value has no uninitialised bytes.
#![no_std]

/// Name of the sockhash of sockets whose incoming bytes the verdict
/// redirects. A direction is paused by taking its source out of this map.
pub const MAP_SOCKS: &str = "SOCKS";
/// Name of the sockhash of redirect targets (no program attached). Every
/// socket of a relayed pair stays here for the whole connection, which keeps
/// its psock, and the redirect queue towards it, alive while its own
/// direction is paused.
pub const MAP_TARGETS: &str = "TARGETS";
/// Name of the hash map from socket cookie to slot.
pub const MAP_SLOTS: &str = "SLOTS";
/// Name of the mmapable array of [`DirCtl`] (user space writes, kernel reads).
pub const MAP_CTL: &str = "CTL";
/// Name of the mmapable array of [`DirStats`] (kernel writes, user space reads).
pub const MAP_STATS: &str = "STATS";
/// Name of the ring buffer of [`Event`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Name of the sk_skb stream_verdict program.
pub const PROG_VERDICT: &str = "sluice_verdict";

/// Slots, and so directions (two per relayed pair), the maps can hold.
pub const MAX_SOCKETS: u32 = 65_536;

/// Control of one direction, written by user space only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCtl {
    /// Cookie of the socket this direction writes to (the `TARGETS` key).
    pub peer_cookie: u64,
    /// When `redirected` reaches this mark the kernel asks user space to
    /// look at the target's progress and move `limit` on.
    pub refill_at: u64,
    /// Hard cap on `redirected`: the valve, enforced in the kernel. An skb
    /// that would pass it is dropped and user space resets the pair, so a
    /// stuck receiver costs at most the valve, however late user space runs.
    pub limit: u64,
}

/// Counters of one direction, written by the verdict program only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Bytes redirected to the peer's egress.
    pub redirected: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last skb.
    pub last_ns: u64,
    /// The last `refill_at` this direction raised an event for.
    pub refill_asked: u64,
    /// Redirects the kernel refused (peer missing from `TARGETS`).
    pub redirect_errors: u32,
    /// Non-zero once the direction passed its `limit`.
    pub overrun: u32,
}

/// Why the verdict program woke user space.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `redirected` reached `refill_at`: look at the target's progress.
    Refill = 2,
    /// A redirect failed (the peer left `TARGETS`): the bytes were passed.
    RedirectFailed = 3,
    /// `redirected` would pass `limit`: the skb was dropped; reset the pair.
    Overrun = 4,
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
