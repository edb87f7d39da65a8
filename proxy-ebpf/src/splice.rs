//! Sluice's `tcpsplice` program: a tc ingress classifier that joins a
//! session's two TCP connections at the packet level (see
//! `proxy_common::splice`).
//!
//! A packet from the client to the proxy's client socket leaves as if the
//! proxy's origin socket had sent it to the origin, and the other way
//! round: addresses, ports, `seq`, `ack`, window (rescaled), TSval and
//! TSecr, SACK blocks; checksums are updated incrementally. While a session
//! is only observed, packets pass unchanged, and each one that could move a
//! proxy socket's sequence state bumps the session's gate first, so user
//! space's compare-and-swap to "spliced" fails if one slipped past its
//! snapshot.
//!
//! A packet goes on to the other peer by the interface of that peer's
//! route, which user space looked up. To a peer on this host (`lo`): up
//! the stack when the packet came in on `lo` too, else out of `lo` with
//! the local route attached (`bpf_redirect_neigh`, marked with
//! `REDIRECTED_MARK` so that `lo`'s run of this program lets it by). To a
//! peer elsewhere: out of its interface to the next hop
//! (`bpf_redirect_neigh`). A second program, on the egress of interfaces
//! other than `lo`, drops what a spliced session's frozen sockets send.
//!
//! Requires Linux 5.17+ (`bpf_loop` for the option scan; atomic fetch and
//! compare-and-swap in programs 5.12+, mmapable arrays 5.5+, ring buffers
//! 5.8+, `bpf_redirect_neigh` 5.10+); attached with TCX on 6.6+, with a
//! clsact qdisc before. IPv4 only, on `lo` and Ethernet interfaces.
#![no_std]
#![no_main]
// The bpfel target declares no compare-and-swap, so core's atomic types
// hide their read-modify-write methods; the BPF backend emits them (v3).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{self, AtomicOrdering::SeqCst};

use aya_ebpf::{
    bindings::__sk_buff,
    bindings::{BPF_F_MMAPABLE, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_loop, bpf_redirect_neigh, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use proxy_common::splice::{
    FlowKey, FlowRef, SpliceConn, SpliceEvent, SpliceEventKind, SpliceSide, FLAGS_DONE, FLAG_FIN,
    FLAG_FIN_ACKED, FLAG_RST, GATE_ARMED, GATE_OBSERVE, GATE_SPLICED, GATE_STATE, LOOPBACK_IFINDEX,
    MAX_SPLICES, REDIRECTED_MARK, SET, STATS_LEN, STAT_FAILED, STAT_REWRITTEN,
};

#[map(name = "FLOWS")]
static FLOWS: HashMap<FlowKey, FlowRef> = HashMap::with_max_entries(MAX_SPLICES * 2, 0);

#[map(name = "SPLICES")]
static SPLICES: Array<SpliceConn> = Array::with_max_entries(MAX_SPLICES, BPF_F_MMAPABLE);

#[map(name = "SPLICE_STATS")]
static SPLICE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[map(name = "SPLICE_LIVE")]
static SPLICE_LIVE: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "SPLICE_EVENTS")]
static SPLICE_EVENTS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
const BPF_F_PSEUDO_HDR: u64 = 0x10;

const TH_FIN: u8 = 0x01;
const TH_SYN: u8 = 0x02;
const TH_RST: u8 = 0x04;
const TH_ACK: u8 = 0x10;

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_SACK: u8 = 5;
const TCPOPT_TIMESTAMP: u8 = 8;

/// Not ours, or not to be touched: let the next program (or the stack) have it.
const NEXT: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn sluice_splice(ctx: TcContext) -> i32 {
    try_splice(&ctx).unwrap_or(NEXT)
}

/// Drops what a spliced session's frozen sockets send out of an interface
/// other than `lo` (there, their output loops back to the ingress program,
/// which drops it). The ingress program's rewritten packets pass this hook
/// too, with a proxy socket's 4-tuple: they came in on an interface, and a
/// socket's own output did not.
#[classifier]
pub fn sluice_splice_out(ctx: TcContext) -> i32 {
    try_splice_out(&ctx).unwrap_or(NEXT)
}

#[inline(always)]
fn try_splice_out(ctx: &TcContext) -> Result<i32, i64> {
    let Some((_, flow, conn, _)) = flow_of(ctx)? else {
        return Ok(NEXT);
    };
    // SAFETY: a field of the packet's context.
    let came_in = unsafe { (*ctx.skb.skb).ingress_ifindex } != 0;
    if flow.side <= 1 || came_in {
        return Ok(NEXT);
    }
    // SAFETY: array elements never move.
    let spliced = load(unsafe { &raw const (*conn).gate }) & GATE_STATE == GATE_SPLICED;
    Ok(if spliced { TC_ACT_SHOT } else { NEXT })
}

/// The session flow an IPv4 TCP packet belongs to: its key, where its
/// session is, and the offset of its TCP header; `None` for any other
/// packet.
#[inline(always)]
fn flow_of(ctx: &TcContext) -> Result<Option<(FlowKey, FlowRef, *mut SpliceConn, usize)>, i64> {
    // No session has flows: nothing to look up. A packet that read 0 just
    // before a session's flows went in is one that passed before them,
    // which the session's grace period already waits out.
    if SPLICE_LIVE.get(0).copied().unwrap_or(0) == 0 {
        return Ok(None);
    }
    if u16::from_be(ctx.load::<u16>(12)?) != ETH_P_IP {
        return Ok(None);
    }
    let vihl: u8 = ctx.load(ETH_HLEN)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 || ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
        return Ok(None);
    }
    // A fragment carries no TCP header we could rewrite; spliced peers send
    // with DF, so none comes.
    if u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?) & 0x3fff != 0 {
        return Ok(None);
    }
    let t = ETH_HLEN + ihl;
    let saddr: u32 = ctx.load(IP_SADDR)?;
    let daddr: u32 = ctx.load(IP_DADDR)?;
    let ports: u32 = ctx.load(t)?;
    let key = FlowKey {
        saddr,
        daddr,
        sport: ports as u16,
        dport: (ports >> 16) as u16,
    };
    // SAFETY: a plain value, copied out at once.
    let Some(flow) = (unsafe { FLOWS.get(key) }).copied() else {
        return Ok(None);
    };
    let Some(conn) = SPLICES.get_ptr_mut(flow.slot) else {
        return Ok(None);
    };
    Ok(Some((key, flow, conn, t)))
}

#[inline(always)]
fn try_splice(ctx: &TcContext) -> Result<i32, i64> {
    let Some((key, flow, conn, t)) = flow_of(ctx)? else {
        return Ok(NEXT);
    };
    if flow.side > 1 {
        // SAFETY: a field of the packet's context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        if mark & REDIRECTED_MARK != 0 {
            // A remote peer's packet, rewritten where it came in and sent
            // on here to a peer on this host: it carries the 4-tuple of
            // the proxy socket it stands in for. On up the stack.
            ctx.set_mark(mark & !REDIRECTED_MARK);
            return Ok(NEXT);
        }
        // The proxy's own socket sends: nothing of it may reach a peer of
        // a spliced session (the socket is frozen at the splice point).
        // SAFETY: array elements never move.
        let spliced = load(unsafe { &raw const (*conn).gate }) & GATE_STATE == GATE_SPLICED;
        return Ok(if spliced { TC_ACT_SHOT } else { NEXT });
    }
    let (saddr, daddr) = (key.saddr, key.daddr);
    let ports = u32::from(key.sport) | (u32::from(key.dport) << 16);
    let s = (flow.side & 1) as usize;
    let off_flags: u16 = u16::from_be(ctx.load(t + 12)?);
    let doff = usize::from(off_flags >> 12) * 4;
    let th = off_flags as u8;
    let hdrs = t + doff;
    let payload = (ctx.len() as usize).saturating_sub(hdrs) as u32;

    // SAFETY: in bounds (flow.side & 1); array elements never move.
    let (me, peer, gate, flags) = unsafe {
        (
            &raw mut (*conn).side[s],
            &raw const (*conn).side[s ^ 1],
            &raw mut (*conn).gate,
            &raw mut (*conn).flags,
        )
    };
    // SAFETY: as above.
    let next = unsafe { &raw mut (*me).next_seq };
    let seq = u32::from_be(ctx.load(t + 4)?);
    let data_end = seq.wrapping_add(payload);
    let ack = u32::from_be(ctx.load(t + 8)?);
    // Recorded as passing to a socket before the gate turned out spliced:
    // its bytes may already lie behind `next`, so they count in full.
    let mut recorded = false;
    let mut state = load(gate);
    if state & GATE_STATE == GATE_ARMED {
        // SAFETY: written by user space before it armed the gate.
        let (flip, flip_ack) = unsafe { ((*me).rw.flip, (*me).rw.flip_ack) };
        let expected = load(next) as u32;
        if flip != 0
            && th & TH_ACK != 0
            && th & (TH_SYN | TH_RST) == 0
            && ack == flip_ack
            && seq == expected
        {
            // The packet the armed session waits for: it acknowledges all
            // the socket sent, and starts where the socket stopped.
            match cas(gate, state, (state & !GATE_STATE) | GATE_SPLICED) {
                Ok(()) => {
                    notify(flow.slot, SpliceEventKind::Spliced, s as u32);
                    state = GATE_SPLICED;
                }
                Err(now) => state = now,
            }
        } else if payload > 0 || th & (TH_FIN | TH_SYN | TH_RST) != 0 {
            // It passes to the socket, and the snapshot no longer holds:
            // back to observing, recorded as there. Only the program leaves
            // ARMED, so if the swap fails another packet just moved the
            // gate on (to OBSERVE or SPLICED), and this one follows it.
            record(next, flags, s, payload, data_end, th);
            recorded = true;
            let observe = ((state & !GATE_STATE) + 1) | GATE_OBSERVE;
            match cas(gate, state, observe) {
                Ok(()) => {
                    notify(flow.slot, SpliceEventKind::Disarmed, s as u32);
                    return Ok(TC_ACT_OK);
                }
                Err(now) => state = now,
            }
        } else {
            // A pure ACK changes nothing the snapshot relies on.
            return Ok(TC_ACT_OK);
        }
    }
    if state & GATE_STATE == GATE_OBSERVE {
        if payload == 0 && th & (TH_FIN | TH_SYN | TH_RST) == 0 {
            // A pure ACK: user space only splices once every byte it sent
            // was acknowledged (or arms for the one that will be), so a
            // later ACK moves nothing that counts.
            return Ok(TC_ACT_OK);
        }
        // What passes to the proxy's socket is recorded first, then the
        // gate moves (a fully ordered add): whoever reads the new gate
        // also sees the record, and whoever read the old one fails its
        // compare-and-swap.
        if !recorded {
            record(next, flags, s, payload, data_end, th);
            recorded = true;
        }
        let old = fetch_add(gate, 1);
        if old & GATE_STATE == GATE_OBSERVE {
            return Ok(TC_ACT_OK);
        }
        // Spliced since the first look: this packet is rewritten after all.
        state = old;
    }
    if state & GATE_STATE != GATE_SPLICED || th & TH_SYN != 0 {
        // Being set up or taken down: not ours to touch. A SYN never
        // belongs to a spliced session.
        return Ok(NEXT);
    }

    // SAFETY: user space wrote these fields before it flipped the gate,
    // and leaves them alone while spliced; copies of plain integers.
    let (
        new_saddr,
        new_daddr,
        new_ports,
        seq_delta,
        shift_in,
        shift_out,
        ts_on,
        ack_delta,
        snap_ns,
        out_if,
    ) = unsafe {
        (
            (*me).rw.saddr,
            (*me).rw.daddr,
            (*me).rw.ports,
            (*me).rw.seq_delta,
            (*me).rw.shift_in,
            (*me).rw.shift_out,
            (*me).rw.ts_on,
            0u32.wrapping_sub((*peer).rw.seq_delta),
            (*conn).snap_ns,
            (*me).rw.ifindex,
        )
    };

    // In the other peer's own sequence space.
    let ack_mapped = ack.wrapping_add(ack_delta);
    let rw = Rewrite {
        t,
        th,
        saddr,
        daddr,
        ports,
        seq,
        ack,
        ack_mapped,
        new: (new_saddr, new_daddr, new_ports),
        seq_delta,
        shifts: (shift_in, shift_out),
    };
    if rewrite(ctx, &rw).is_err()
        || (doff > 20 && options(ctx, t, doff, me, peer, ts_on != 0, ack_delta, snap_ns).is_err())
    {
        // Half rewritten, it would reach a socket as somebody else's
        // segment; dropped, its sender sends it again.
        stat(STAT_FAILED);
        return Ok(TC_ACT_SHOT);
    }
    stat(STAT_REWRITTEN);

    // The kernel-written fields are accessed atomically: two CPUs may
    // carry packets of one flow at once.
    if payload > 0 {
        let ahead = advance(next, data_end);
        let bytes = if recorded { payload } else { ahead };
        // SAFETY: as above.
        fetch_add(unsafe { &raw mut (*me).bytes }, u64::from(bytes));
        // SAFETY: a plain store of the time of the last payload.
        unsafe { (*me).last_ns = bpf_ktime_get_ns() };
    }
    if th & TH_FIN != 0 {
        // SAFETY: written before the flag that makes readers look at it.
        unsafe { (*me).fin_end = u64::from(data_end.wrapping_add(1)) };
        fetch_or(flags, FLAG_FIN[s]);
    }
    if th & TH_RST != 0 {
        let old = fetch_or(flags, FLAG_RST[s]);
        if old & (FLAG_RST[0] | FLAG_RST[1]) == 0 {
            notify(flow.slot, SpliceEventKind::Reset, s as u32);
        }
    } else if th & TH_ACK != 0 {
        let f = load(flags);
        let o = s ^ 1;
        if f & FLAG_FIN[o] != 0 && f & FLAG_FIN_ACKED[o] == 0 {
            // SAFETY: set before FLAG_FIN[o], which was seen.
            let fin_end = unsafe { (*peer).fin_end } as u32;
            if ack_mapped.wrapping_sub(fin_end) as i32 >= 0 {
                let old = fetch_or(flags, FLAG_FIN_ACKED[o]);
                if old & FLAGS_DONE != FLAGS_DONE
                    && (old | FLAG_FIN_ACKED[o]) & FLAGS_DONE == FLAGS_DONE
                {
                    notify(flow.slot, SpliceEventKind::Done, s as u32);
                }
            }
        }
    }
    let out = u64::from(out_if);
    if out == LOOPBACK_IFINDEX || out == 0 {
        // SAFETY: a field of the packet's context.
        let came_in = u64::from(unsafe { (*ctx.skb.skb).ingress_ifindex });
        if came_in == LOOPBACK_IFINDEX || came_in == 0 {
            // The other peer is on this host, as is this one: up the stack.
            return Ok(TC_ACT_OK);
        }
        // From elsewhere to a peer on this host: out of `lo`, which loops
        // it back with the local route the lookup attached, as it does
        // the host's own packets (without one, a 127/8 address on `lo`
        // is a martian, and early demux's cached route only covers until
        // the next route cache flush). `lo`'s run of this program lets it
        // by, by the mark: it carries the 4-tuple of the proxy socket
        // whose own output the program drops there.
        // SAFETY: a field of the packet's context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(mark | REDIRECTED_MARK);
        // SAFETY: no parameters: the helper looks the route up itself.
        let r = unsafe { bpf_redirect_neigh(LOOPBACK_IFINDEX as u32, core::ptr::null_mut(), 0, 0) };
        return Ok(r as i32);
    }
    // Out of the other peer's interface, to its next hop (a FIB and
    // neighbour lookup on the rewritten header). TC_ACT_REDIRECT, or
    // TC_ACT_SHOT if the lookup failed: TCP sends the packet again.
    // SAFETY: no parameters: the helper looks the next hop up itself.
    let r = unsafe { bpf_redirect_neigh(out as u32, core::ptr::null_mut(), 0, 0) };
    Ok(r as i32)
}

/// What a rewrite changes in the headers.
struct Rewrite {
    /// Offset of the TCP header, and its flags.
    t: usize,
    th: u8,
    /// The header's own addresses and ports (as in the header).
    saddr: u32,
    daddr: u32,
    ports: u32,
    /// `seq` and `ack` (host order), and `ack` in the other peer's space.
    seq: u32,
    ack: u32,
    ack_mapped: u32,
    /// New addresses and ports (as in the header).
    new: (u32, u32, u32),
    seq_delta: u32,
    /// Window scales: (this peer's, the other peer's for it).
    shifts: (u32, u32),
}

/// Rewrites addresses, ports, `seq`, `ack` and window, with the IP
/// checksum and the TCP pseudo-header and checksum.
#[inline(always)]
fn rewrite(ctx: &TcContext, r: &Rewrite) -> Result<(), i64> {
    let t = r.t;
    let (new_saddr, new_daddr, new_ports) = r.new;
    for (at, old, new) in [
        (IP_SADDR, r.saddr, new_saddr),
        (IP_DADDR, r.daddr, new_daddr),
    ] {
        ctx.store(at, &new, 0)?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4)?;
        ctx.l4_csum_replace(t + 16, u64::from(old), u64::from(new), BPF_F_PSEUDO_HDR | 4)?;
    }
    put32(ctx, t, t, r.ports, new_ports)?;
    put32(
        ctx,
        t,
        t + 4,
        r.seq.to_be(),
        r.seq.wrapping_add(r.seq_delta).to_be(),
    )?;
    if r.th & TH_ACK != 0 {
        put32(ctx, t, t + 8, r.ack.to_be(), r.ack_mapped.to_be())?;
    }
    let win: u16 = ctx.load(t + 14)?;
    let new_win = rescale(u16::from_be(win), r.shifts.0, r.shifts.1).to_be();
    if new_win != win {
        ctx.store(t + 14, &new_win, 0)?;
        ctx.l4_csum_replace(t + 16, u64::from(win), u64::from(new_win), 2)?;
    }
    Ok(())
}

/// Records a packet that passes to the proxy's socket while the session is
/// observed: how far its data reaches, and a FIN or RST.
#[inline(always)]
fn record(next: *mut u64, flags: *mut u64, s: usize, payload: u32, data_end: u32, th: u8) {
    if payload > 0 {
        advance(next, data_end);
    }
    if th & TH_FIN != 0 {
        fetch_or(flags, FLAG_FIN[s]);
    }
    if th & TH_RST != 0 {
        fetch_or(flags, FLAG_RST[s]);
    }
}

/// A window field from a peer that scales by `shift_in`, for one that
/// scales by `shift_out`: rounded up, so a small open window stays open.
#[inline(always)]
fn rescale(win: u16, shift_in: u32, shift_out: u32) -> u16 {
    let (si, so) = (shift_in & 15, shift_out & 15);
    if si == so {
        return win;
    }
    let bytes = u64::from(win) << si;
    let scaled = (bytes + (1u64 << so) - 1) >> so;
    if scaled > 0xffff {
        0xffff
    } else {
        scaled as u16
    }
}

/// The option parser's state, from one `bpf_loop` step to the next.
#[repr(C)]
struct OptScan {
    skb: *mut __sk_buff,
    /// Packet offset of the first option byte.
    base: u64,
    /// Option bytes.
    len: u64,
    /// The next option's offset from `base`.
    i: u64,
    /// Offsets from the TCP header of the timestamp and SACK options (0:
    /// none), and the SACK option's length.
    ts_at: u64,
    sack_at: u64,
    sack_len: u64,
}

impl Default for OptScan {
    fn default() -> Self {
        OptScan {
            skb: core::ptr::null_mut(),
            base: 0,
            len: 0,
            i: 0,
            ts_at: 0,
            sack_at: 0,
            sack_len: 0,
        }
    }
}

/// One option: notes where timestamps and SACK blocks are. Returns 1 to
/// stop.
extern "C" fn scan_option(_step: u32, st: *mut c_void) -> i64 {
    // SAFETY: `options` passes its own OptScan.
    let st = unsafe { &mut *st.cast::<OptScan>() };
    if st.i >= st.len {
        return 1;
    }
    let Some(kind) = byte(st.skb, st.base + st.i) else {
        return 1;
    };
    if kind == TCPOPT_EOL {
        return 1;
    }
    if kind == TCPOPT_NOP {
        st.i += 1;
        return 0;
    }
    let Some(olen) = byte(st.skb, st.base + st.i + 1) else {
        return 1;
    };
    if olen < 2 || st.i + u64::from(olen) > st.len {
        return 1;
    }
    if kind == TCPOPT_TIMESTAMP && olen == 10 {
        st.ts_at = 20 + st.i;
    } else if kind == TCPOPT_SACK && olen >= 10 {
        st.sack_at = 20 + st.i;
        st.sack_len = u64::from(olen);
    }
    st.i += u64::from(olen);
    0
}

/// One packet byte at `off`.
#[inline(always)]
fn byte(skb: *mut __sk_buff, off: u64) -> Option<u8> {
    let mut b = 0u8;
    // SAFETY: one byte into `b`; the helper checks the packet bounds.
    let r = unsafe { bpf_skb_load_bytes(skb as *const c_void, off as u32, (&raw mut b).cast(), 1) };
    (r == 0).then_some(b)
}

/// Moves `next` (bit 32: set) on to `end` if `end` is past it, or sets it
/// if it was unset; returns how far it moved (0 from unset).
/// Retransmissions move nothing.
#[inline(always)]
fn advance(next: *mut u64, end: u32) -> u32 {
    let mut cur = load(next);
    for _ in 0..4 {
        let ahead = if cur & SET == 0 {
            0
        } else {
            let ahead = end.wrapping_sub(cur as u32) as i32;
            if ahead <= 0 {
                return 0;
            }
            ahead as u32
        };
        match cas(next, cur, SET | u64::from(end)) {
            Ok(()) => return ahead,
            Err(now) => cur = now,
        }
    }
    0
}

/// Rewrites the timestamp and SACK options. `ack_delta` maps this peer's
/// view of the other peer's sequence space onto the other peer's own.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into the classifier; a struct would only rename its locals"
)]
fn options(
    ctx: &TcContext,
    t: usize,
    doff: usize,
    me: *mut SpliceSide,
    peer: *const SpliceSide,
    ts_on: bool,
    ack_delta: u32,
    snap_ns: u64,
) -> Result<(), i64> {
    let mut scan = OptScan {
        skb: ctx.skb.skb,
        base: (t + 20) as u64,
        len: (doff - 20) as u64,
        ..OptScan::default()
    };
    // A loop over the option bytes would make the verifier walk every
    // layout (it did not finish); `bpf_loop` (Linux 5.17+) has it check
    // one step. At most 40 option bytes, NOPs one byte each.
    // SAFETY: the callback and its context are valid for the call.
    unsafe { bpf_loop(40, scan_option as *mut c_void, (&raw mut scan).cast(), 0) };
    let (ts_at, sack_at, sack_len) = (
        scan.ts_at as usize,
        scan.sack_at as usize,
        scan.sack_len as usize,
    );
    if ts_on && ts_at != 0 {
        let o = t + ts_at;
        let tsval = u32::from_be(ctx.load(o + 2)?);
        let tsecr = u32::from_be(ctx.load(o + 6)?);
        // SAFETY: a pointer into the array element; only accessed atomically.
        let off = unsafe { &raw mut (*me).ts_off };
        let mut cur = load(off);
        if cur & SET == 0 {
            // The proxy socket's clock now: the other peer saw no TSval
            // above it, so the first rewritten one passes its PAWS check.
            // SAFETY: a plain read of a value user space set before the flip.
            let base = unsafe { (*me).rw.ts_base };
            // SAFETY: no arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            let clock = base.wrapping_add((now.saturating_sub(snap_ns) / 1_000_000) as u32);
            let want = SET | u64::from(clock.wrapping_sub(tsval));
            cur = match cas(off, 0, want) {
                Ok(()) => want,
                Err(set) => set,
            };
        }
        put32(
            ctx,
            t,
            o + 2,
            tsval.to_be(),
            tsval.wrapping_add(cur as u32).to_be(),
        )?;
        // The echo maps back through the other peer's offset; before that
        // is known, 0 (no echo): the receiver then takes no RTT sample.
        // SAFETY: as above.
        let peer_off = load(unsafe { &raw const (*peer).ts_off });
        let new_ecr = if tsecr != 0 && peer_off & SET != 0 {
            tsecr.wrapping_sub(peer_off as u32)
        } else {
            0
        };
        put32(ctx, t, o + 6, tsecr.to_be(), new_ecr.to_be())?;
    }
    if sack_at != 0 {
        let blocks = (sack_len - 2) / 8;
        for b in 0..4 {
            if b >= blocks {
                break;
            }
            for e in 0..2 {
                let at = t + sack_at + 2 + b * 8 + e * 4;
                let edge = u32::from_be(ctx.load(at)?);
                put32(
                    ctx,
                    t,
                    at,
                    edge.to_be(),
                    edge.wrapping_add(ack_delta).to_be(),
                )?;
            }
        }
    }
    Ok(())
}

/// Writes a 32-bit field (network order values) and updates the TCP
/// checksum. A field at an odd offset from the TCP header straddles the
/// checksum's 16-bit words, so its three covering words are replaced.
#[inline(always)]
fn put32(ctx: &TcContext, t: usize, at: usize, old: u32, new: u32) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    if (at - t) & 1 == 0 {
        ctx.store(at, &new, 0)?;
        ctx.l4_csum_replace(t + 16, u64::from(old), u64::from(new), 4)?;
        return Ok(());
    }
    let before: [u16; 3] = ctx.load(at - 1)?;
    ctx.store(at, &new, 0)?;
    let after: [u16; 3] = ctx.load(at - 1)?;
    for w in 0..3 {
        if before[w] != after[w] {
            ctx.l4_csum_replace(t + 16, u64::from(before[w]), u64::from(after[w]), 2)?;
        }
    }
    Ok(())
}

/// Load of a field of a map element, whole. BPF has no atomic loads
/// before v4 (LLVM cannot select them); the fetch and compare-and-swap instructions below
/// are fully ordered, and they are what the gate relies on.
#[inline(always)]
fn load(p: *const u64) -> u64 {
    // SAFETY: callers pass pointers into array elements, which stay valid
    // and aligned; a u64 load is single-copy atomic.
    unsafe { core::ptr::read_volatile(p) }
}

/// Counts one packet in `SPLICE_STATS` (per CPU: no atomics needed).
#[inline(always)]
fn stat(i: u32) {
    if let Some(c) = SPLICE_STATS.get_ptr_mut(i) {
        // SAFETY: this CPU's own element, valid for the program's run.
        unsafe { *c += 1 };
    }
}

/// Atomic add, returning the old value (BPF_FETCH, v3).
#[inline(always)]
fn fetch_add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: as for `load`.
    unsafe { intrinsics::atomic_xadd::<u64, u64, { SeqCst }>(p, v) }
}

/// Atomic or, returning the old value.
#[inline(always)]
fn fetch_or(p: *mut u64, v: u64) -> u64 {
    // SAFETY: as for `load`.
    unsafe { intrinsics::atomic_or::<u64, u64, { SeqCst }>(p, v) }
}

/// Compare-and-swap: `Err` carries the value found.
#[inline(always)]
fn cas(p: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: as for `load`.
    let (found, ok) =
        unsafe { intrinsics::atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new) };
    if ok {
        Ok(())
    } else {
        Err(found)
    }
}

#[inline(always)]
fn notify(slot: u32, kind: SpliceEventKind, side: u32) {
    let ev = SpliceEvent {
        slot,
        kind: kind as u32,
        side,
        _pad: 0,
    };
    // A full ring loses a wake-up only: user space also looks at `flags`
    // when it polls the session.
    let _ = SPLICE_EVENTS.output::<SpliceEvent>(&ev, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
