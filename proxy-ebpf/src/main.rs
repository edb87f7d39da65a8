//! Sluice's kernel data path: an `sk_skb/stream_verdict` program that
//! relays, and a `sock_ops` program that takes a slow source out of it.
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
        _bindgen_ty_34::BPF_WRITE_HDR_TCP_CURRENT_MSS,
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_MMAPABLE, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_delete_elem,
    },
    macros::{map, sock_ops, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::{SkBuffContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{
    DirCtl, DirStats, Event, EventKind, DETACH_DONE, DETACH_FAILED, DETACH_REQUESTED, MAX_SOCKETS,
};

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

#[map(name = "DETACH")]
static DETACH: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "OWNER")]
static OWNER: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "PORTS")]
static PORTS: HashMap<u32, u8> = HashMap::with_max_entries(256, 0);

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
    let Some(&slot) = (unsafe { SLOTS.get(cookie) }) else {
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
        warn!(
            &ctx,
            "sluice: socket {} has no peer {} to redirect to", cookie, peer
        );
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

/// Arms the daemon's own sockets for the header-option callback, and in it
/// takes a source out of `SOCKS` when user space asked.
///
/// `BPF_SOCK_OPS_HDR_OPT_LEN_CB` runs with the socket locked, and with
/// `BPF_WRITE_HDR_TCP_CURRENT_MSS` it comes from `tcp_current_mss`, which TCP
/// never calls inside `tcp_read_skb`'s loop (that loop only sends ACKs, which
/// carry an skb). So no verdict run is under way on this socket, none starts
/// until the lock is released, and after it `sk_data_ready` is TCP's own:
/// every byte is either redirected or left in the receive queue. User space
/// brings the callback about with a zero-length `send` on the source.
#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // In connect(2), so `current` is the connecting process.
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            if OWNER.get(0).copied() == Some(tgid) {
                arm(&ctx);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // SAFETY: a plain u8 value, copied out at once.
            if unsafe { PORTS.get(ctx.local_port()) }.is_some() {
                arm(&ctx);
            }
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB if ctx.arg(0) == BPF_WRITE_HDR_TCP_CURRENT_MSS => {
            // SAFETY: the helper only reads the context's socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // SAFETY: a plain u32 value, copied out at once.
            if unsafe { DETACH.get(cookie) }.copied() == Some(DETACH_REQUESTED) {
                // SAFETY: SOCKS is a map definition and the key a valid u64.
                let r = unsafe {
                    bpf_map_delete_elem(
                        (&raw const SOCKS).cast_mut().cast(),
                        (&raw const cookie).cast(),
                    )
                };
                let state = if r == 0 { DETACH_DONE } else { DETACH_FAILED };
                let _ = DETACH.insert(cookie, state, 0);
            }
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn arm(ctx: &SockOpsContext) {
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
    // Without the flag the socket cannot be detached safely; user space
    // sees the request fail and keeps the kernel's hard limit.
    let _ = ctx.set_cb_flags(flags as i32);
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
