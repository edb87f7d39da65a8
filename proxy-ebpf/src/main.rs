//! Sluice's kernel data path: one `sk_skb/stream_verdict` program.
//!
//! Both sockets of a relayed pair sit in the `SOCKS` sockhash, keyed by
//! socket cookie. For every skb that arrives on a source socket the verdict
//! either redirects it to the peer's egress, or passes it to the source's own
//! receive queue, where user space reads it. It passes when the direction has
//! used its credit (`redirected` would pass `limit`). That is the
//! backpressure: passed bytes stay charged to the source's receive buffer, so
//! TCP closes the source's window.
//!
//! Once passing, it resumes redirecting only when user space has written every
//! passed byte to the peer (`drained == passed`), so bytes keep their order.
//! Requires Linux 5.19+ (verdict-only sockmap on TCP with `tcp_read_skb`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{DirCtl, DirStats, Event, EventKind, MAX_SOCKETS};

#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "CTL")]
static CTL: HashMap<u64, DirCtl> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "STATS")]
static STATS: HashMap<u64, DirStats> = HashMap::with_max_entries(MAX_SOCKETS, 0);

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
    // SAFETY: map values are plain integers; a concurrent user-space update
    // can only make us read an older or newer value of a field.
    let Some(ctl) = (unsafe { CTL.get(&cookie) }) else {
        return SK_PASS;
    };
    let Some(st) = STATS.get_ptr_mut(&cookie) else {
        return SK_PASS;
    };
    // SAFETY: the pointer comes from the map lookup and stays valid for this
    // run; verdicts for one socket run serialised under its lock.
    let st = unsafe { &mut *st };
    // SAFETY: no arguments.
    st.last_ns = unsafe { bpf_ktime_get_ns() };

    let fits = st.redirected + len <= ctl.limit;
    if st.passing != 0 {
        if ctl.drained != st.passed || !fits {
            return pass(&ctx, st, cookie, len);
        }
        st.passing = 0;
        debug!(&ctx, "sluice: socket {} redirects again", cookie);
    } else if !fits {
        st.passing = 1;
        debug!(&ctx, "sluice: socket {} passes to user space", cookie);
        return pass(&ctx, st, cookie, len);
    }

    let mut peer = ctl.peer_cookie;
    let verdict = SOCKS.redirect_skb(&ctx, &mut peer, 0);
    if verdict != i64::from(SK_PASS) {
        // The peer left the sockhash (it is closing): let user space decide.
        st.redirect_errors += 1;
        st.passing = 1;
        warn!(&ctx, "sluice: socket {} has no peer {} to redirect to", cookie, peer);
        return pass(&ctx, st, cookie, len);
    }
    st.redirected += len;
    if st.redirected >= ctl.refill_at && st.refill_asked != ctl.refill_at {
        st.refill_asked = ctl.refill_at;
        notify(cookie, EventKind::Refill);
    }
    SK_PASS
}

#[inline(always)]
fn pass(_ctx: &SkBuffContext, st: &mut DirStats, cookie: u64, len: u64) -> u32 {
    st.passed += len;
    notify(cookie, EventKind::Passed);
    SK_PASS
}

#[inline(always)]
fn notify(cookie: u64, kind: EventKind) {
    let ev = Event {
        cookie,
        kind: kind as u32,
        _pad: 0,
    };
    // A full ring only delays user space: it also polls passing directions.
    let _ = EVENTS.output::<Event>(&ev, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
