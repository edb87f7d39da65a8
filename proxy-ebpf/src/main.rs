//! Sluice's kernel data path: one `sk_skb/stream_verdict` program.
//!
//! Sockets whose incoming bytes the kernel relays sit in `SOCKS`, which
//! carries this program; every socket of a relayed pair also sits in
//! `TARGETS`, keyed by socket cookie. For every skb that arrives on a source
//! socket the verdict redirects it to the peer's egress and counts it.
//!
//! There is no backpressure on this path (see the user-space module docs):
//! the verdict redirects every skb, up to `limit`, which user space moves on
//! at each `refill_at` mark as the peer's receiver acknowledges bytes. An
//! skb past `limit` is dropped and user space resets the pair: a stuck
//! receiver costs at most the limit, however late user space reacts.
//! Requires Linux 5.19+ (verdict-only sockmap on TCP with `tcp_read_skb`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_MMAPABLE,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{DirCtl, DirStats, Event, EventKind, MAX_SOCKETS};

#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "TARGETS")]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "SLOTS")]
static SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "CTL")]
static CTL: Array<DirCtl> = Array::with_max_entries(MAX_SOCKETS, BPF_F_MMAPABLE);

#[map(name = "STATS")]
static STATS: Array<DirStats> = Array::with_max_entries(MAX_SOCKETS, BPF_F_MMAPABLE);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[stream_verdict]
pub fn sluice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the skb's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN: TCP has already recorded it, and user space propagates
        // it once the data before it is out. Redirected, it would reach a
        // target we may have shut down and leave EPIPE on it.
        return SK_DROP;
    }
    // SAFETY: a plain u32 value, copied out at once.
    let Some(&slot) = (unsafe { SLOTS.get(&cookie) }) else {
        return SK_PASS;
    };
    let Some(ctl) = CTL.get_ptr(slot) else {
        return SK_PASS;
    };
    // SAFETY: array elements never move; user space stores each field
    // atomically, so each read sees an old or a new value of that field.
    let (peer, refill_at, limit) = unsafe {
        (
            core::ptr::read_volatile(&(*ctl).peer_cookie),
            core::ptr::read_volatile(&(*ctl).refill_at),
            core::ptr::read_volatile(&(*ctl).limit),
        )
    };
    let Some(st) = STATS.get_ptr_mut(slot) else {
        return SK_PASS;
    };
    // SAFETY: the element stays valid; verdicts for one socket run
    // serialised under its lock, so this is the only writer.
    let st = unsafe { &mut *st };
    // SAFETY: no arguments.
    st.last_ns = unsafe { bpf_ktime_get_ns() };

    if st.redirected + len > limit {
        // The connection is being reset for it: nothing of this stream is
        // delivered cleanly any more, so dropping loses nothing that counts.
        if st.overrun == 0 {
            st.overrun = 1;
            warn!(&ctx, "sluice: socket {} passed its limit {}", cookie, limit);
            notify(cookie, EventKind::Overrun);
        }
        return SK_DROP;
    }
    let mut peer = peer;
    if TARGETS.redirect_skb(&ctx, &mut peer, 0) != i64::from(SK_PASS) {
        // The peer left TARGETS (the pair is closing). Passing keeps the
        // bytes; user space reads them back at close.
        st.redirect_errors += 1;
        warn!(&ctx, "sluice: socket {} has no peer {} to redirect to", cookie, peer);
        notify(cookie, EventKind::RedirectFailed);
        return SK_PASS;
    }
    st.redirected += len;
    if st.redirected >= refill_at && st.refill_asked != refill_at {
        st.refill_asked = refill_at;
        debug!(&ctx, "sluice: socket {} reached its refill mark", cookie);
        notify(cookie, EventKind::Refill);
    }
    SK_PASS
}

#[inline(always)]
fn notify(cookie: u64, kind: EventKind) {
    let ev = Event {
        cookie,
        kind: kind as u32,
        _pad: 0,
    };
    // A full ring only delays user space: it also polls busy directions.
    let _ = EVENTS.output::<Event>(&ev, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
