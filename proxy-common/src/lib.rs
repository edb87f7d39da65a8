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

pub mod splice;

/// Name of the sockhash of sockets whose incoming bytes the verdict
/// redirects. A slow direction leaves this map for good (see
/// [`DETACH_REQUESTED`]) and continues in user space.
pub const MAP_SOCKS: &str = "SOCKS";
/// Name of the sockhash of redirect targets (no program attached). Every
/// socket of a relayed pair stays here for the whole connection, which keeps
/// its psock, and the redirect queue towards it, alive after its own
/// direction left `SOCKS`.
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
/// Name of the sock_ops program that takes a source out of `SOCKS` under
/// its socket lock (see [`DETACH_REQUESTED`]).
pub const PROG_SOCKOPS: &str = "sluice_sockops";
/// Name of the hash map from socket cookie to a detach state
/// ([`DETACH_REQUESTED`], [`DETACH_DONE`], [`DETACH_FAILED`]).
pub const MAP_DETACH: &str = "DETACH";
/// Name of the one-element array holding the daemon's process id (tgid):
/// the sock_ops program arms only the sockets this process connects.
pub const MAP_OWNER: &str = "OWNER";
/// Name of the hash map of the daemon's listening ports (host byte order):
/// the sock_ops program arms only the sockets accepted on them.
pub const MAP_PORTS: &str = "PORTS";

/// User space asks for the source to leave `SOCKS`. The sock_ops program
/// does it the next time TCP computes the socket's MSS with the socket
/// locked outside the verdict's read loop; user space forces that moment
/// with a zero-length `send`. Deleting from user space instead races with
/// `tcp_read_skb`: skbs it takes after the program is gone are dropped.
pub const DETACH_REQUESTED: u32 = 1;
/// The sock_ops program took the source out of `SOCKS`.
pub const DETACH_DONE: u32 = 2;
/// The delete failed (the socket was not in `SOCKS`).
pub const DETACH_FAILED: u32 = 3;

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
