//! The splice program itself, run by the kernel on hand-made packets
//! (`BPF_PROG_TEST_RUN`): what it rewrites, what it records and counts,
//! and that the IP and TCP checksums still hold. Loopback trusts
//! `CHECKSUM_PARTIAL`, so the end-to-end tests would not notice a wrong
//! checksum; a packet built here carries a full one, which the program
//! must keep right. Loading needs root: without it each test says so and
//! returns.

use std::net::SocketAddrV4;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use proxy_common::splice::*;

use super::super::shared_map::SharedArray;
use super::{addr, key, object, ports};
use crate::accounting::monotonic_ns;

const TH_FIN: u8 = 0x01;
const TH_RST: u8 = 0x04;
const TH_PSH: u8 = 0x08;
const TH_ACK: u8 = 0x10;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;
/// `sizeof(struct __sk_buff)`, and the offsets of its `mark` and
/// `ingress_ifindex`.
const SK_BUFF_LEN: usize = 192;
const MARK: usize = 8;
const INGRESS_IFINDEX: usize = 36;
/// Where the TCP header starts in the frames built here.
const T: usize = 14 + 20;

struct Prog {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, u64>,
    flows: BpfHashMap<MapData, FlowKey, FlowRef>,
    live: Array<MapData, u64>,
    conns: SharedArray<SpliceConn>,
    events: RingBuf<MapData>,
}

impl Prog {
    fn load() -> Option<Prog> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: loading the tcpsplice program needs root; CI runs as root");
            return None;
        }
        let mut ebpf = object().expect("as root, the program loads");
        let flows = ebpf.take_map(MAP_FLOWS).unwrap().try_into().unwrap();
        let conns = SharedArray::new(ebpf.take_map(MAP_SPLICES).unwrap(), MAX_SPLICES).unwrap();
        let events = ebpf
            .take_map(MAP_SPLICE_EVENTS)
            .unwrap()
            .try_into()
            .unwrap();
        let stats = ebpf.take_map(MAP_SPLICE_STATS).unwrap().try_into().unwrap();
        let live = ebpf.take_map(MAP_SPLICE_LIVE).unwrap().try_into().unwrap();
        Some(Prog {
            ebpf,
            stats,
            flows,
            live,
            conns,
            events,
        })
    }

    /// Runs the ingress program on `pkt`: its verdict and the packet after
    /// it.
    fn run(&self, pkt: &[u8]) -> (i32, Vec<u8>) {
        self.run_as(PROG_SPLICE, pkt, 0)
    }

    /// Runs program `name` on `pkt`, as if it had come in on interface
    /// `iif` (0: sent by this host).
    fn run_as(&self, name: &str, pkt: &[u8], iif: u32) -> (i32, Vec<u8>) {
        let (verdict, out, _) = self.run_marked(name, pkt, iif, 0);
        (verdict, out)
    }

    /// The same with `skb->mark` set to `mark`: the verdict, the packet,
    /// and the mark after the program.
    fn run_marked(&self, name: &str, pkt: &[u8], iif: u32, mark: u32) -> (i32, Vec<u8>, u32) {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; pkt.len() + 64];
        // A `struct __sk_buff` with only `ingress_ifindex` and `mark` set.
        let mut ctx = [0u8; SK_BUFF_LEN];
        ctx[INGRESS_IFINDEX..INGRESS_IFINDEX + 4].copy_from_slice(&iif.to_ne_bytes());
        ctx[MARK..MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SK_BUFF_LEN];
        let given = iif != 0 || mark != 0;
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ctx_in: given.then_some(&ctx[..]),
                ctx_out: given.then_some(&mut ctx_out[..]),
                ..TestRunOptions::new()
            })
            .unwrap();
        out.truncate(r.data_size_out as usize);
        let mark_out = u32::from_ne_bytes(ctx_out[MARK..MARK + 4].try_into().unwrap());
        (r.return_value as i32, out, mark_out)
    }

    /// A session in `slot` with these ends, its flows in the map.
    fn session(&mut self, slot: u32, e: &Ends4, gate: u64) {
        for (k, side) in [
            (key(e.client, e.client_local), FROM_CLIENT),
            (key(e.origin, e.origin_local), FROM_ORIGIN),
            (key(e.client_local, e.client), OWN_TO_CLIENT),
            (key(e.origin_local, e.origin), OWN_TO_ORIGIN),
        ] {
            self.flows.insert(k, FlowRef { slot, side }, 0).unwrap();
        }
        self.conns.reset(slot, gate);
        self.set_live(1);
    }

    /// Sets the count of sessions with flows that the program reads first.
    fn set_live(&mut self, n: u64) {
        self.live.set(0, n, 0).unwrap();
    }

    /// A packet counter, summed over the CPUs.
    fn stat(&self, i: u32) -> u64 {
        self.stats.get(&i, 0).unwrap().iter().sum()
    }

    /// The next ring record: (slot, kind).
    fn next_event(&mut self) -> (u32, u32) {
        let item = self.events.next().expect("an event");
        // SAFETY: the program writes whole SpliceEvents.
        let ev: SpliceEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        (ev.slot, ev.kind)
    }

    fn gate(&self, slot: u32) -> u64 {
        self.conns
            .gate(slot)
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A session's four addresses.
struct Ends4 {
    client: SocketAddrV4,
    client_local: SocketAddrV4,
    origin_local: SocketAddrV4,
    origin: SocketAddrV4,
}

fn ends(port_base: u16) -> Ends4 {
    let a = |s: &str, p: u16| SocketAddrV4::new(s.parse().unwrap(), p);
    Ends4 {
        client: a("10.0.0.1", port_base),
        client_local: a("10.0.0.2", 8080),
        origin_local: a("10.0.0.2", port_base + 1),
        origin: a("10.0.0.3", 9000),
    }
}

/// Publishes both sides' rewrite, as the snapshot would, for peers on
/// this host.
fn publish(p: &Prog, slot: u32, e: &Ends4, delta: [u32; 2], ts_base: [u32; 2], next: [u32; 2]) {
    publish_via(p, slot, e, delta, ts_base, next, [0, 0]);
}

/// As [`publish`], with side s's packets leaving by interface `out_if[s]`.
fn publish_via(
    p: &Prog,
    slot: u32,
    e: &Ends4,
    delta: [u32; 2],
    ts_base: [u32; 2],
    next: [u32; 2],
    out_if: [u32; 2],
) {
    let rw = |s: usize| SpliceRewrite {
        saddr: addr(if s == 0 {
            e.origin_local
        } else {
            e.client_local
        }),
        daddr: addr(if s == 0 { e.origin } else { e.client }),
        ports: if s == 0 {
            ports(e.origin_local, e.origin)
        } else {
            ports(e.client_local, e.client)
        },
        seq_delta: delta[s],
        // The client scales its windows by 7, the origin socket's by 9.
        shift_in: [7, 9][s],
        shift_out: [9, 7][s],
        ts_base: ts_base[s],
        ts_on: 1,
        flip: 0,
        flip_ack: 0,
        ifindex: out_if[s],
        _pad: 0,
    };
    for (s, next) in next.into_iter().enumerate() {
        p.conns.publish(slot, s, &rw(s), SET | u64::from(next));
    }
    p.conns.set_snap_ns(slot, monotonic_ns());
}

/// One TCP segment, to be framed with valid checksums.
struct Seg<'a> {
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
    opts: &'a [u8],
    payload: &'a [u8],
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP checksum's sum over pseudo-header and segment (0xffff: valid).
fn tcp_sum(pkt: &[u8]) -> u16 {
    let tcp = &pkt[T..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&pkt[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    fold(sum16(tcp, sum16(&pseudo, 0)))
}

fn frame(s: &Seg<'_>) -> Vec<u8> {
    let opt_len = s.opts.len().div_ceil(4) * 4;
    let tcp_len = 20 + opt_len + s.payload.len();
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&s.from.ip().octets());
    ip[16..20].copy_from_slice(&s.to.ip().octets());
    let c = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&s.from.port().to_be_bytes());
    p.extend_from_slice(&s.to.port().to_be_bytes());
    p.extend_from_slice(&s.seq.to_be_bytes());
    p.extend_from_slice(&s.ack.to_be_bytes());
    p.push((((20 + opt_len) / 4) as u8) << 4);
    p.push(s.flags);
    p.extend_from_slice(&s.win.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(s.opts);
    p.resize(p.len() + opt_len - s.opts.len(), 0);
    p.extend_from_slice(s.payload);
    let c = !tcp_sum(&p);
    p[T + 16..T + 18].copy_from_slice(&c.to_be_bytes());
    p
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(p[at..at + 4].try_into().unwrap())
}

fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(p[at..at + 2].try_into().unwrap())
}

fn ts_opt(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o
}

/// Both checksums hold, and the addresses and ports are `from` -> `to`.
fn check_frame(out: &[u8], from: SocketAddrV4, to: SocketAddrV4) {
    assert_eq!(fold(sum16(&out[14..34], 0)), 0xffff, "IP checksum");
    assert_eq!(tcp_sum(out), 0xffff, "TCP checksum");
    assert_eq!(&out[26..30], &from.ip().octets());
    assert_eq!(&out[30..34], &to.ip().octets());
    assert_eq!(u16_at(out, T), from.port());
    assert_eq!(u16_at(out, T + 2), to.port());
}

#[test]
fn a_spliced_session_is_rewritten_both_ways_with_valid_checksums() {
    let Some(mut p) = Prog::load() else { return };
    let e = ends(40_000);
    p.session(0, &e, GATE_SPLICED);
    // Client -> origin adds 1000 (and wraps); origin -> client subtracts 3000.
    let s0 = 0xffff_ff00u32;
    let delta = [1000, 0u32.wrapping_sub(3000)];
    publish(&p, 0, &e, delta, [5000, 7000], [s0, 42]);

    // Client data with a timestamp and a SACK block.
    let mut opts = ts_opt(777, 0x1234);
    opts.extend_from_slice(&[1, 1, 5, 10]);
    opts.extend_from_slice(&600u32.to_be_bytes());
    opts.extend_from_slice(&700u32.to_be_bytes());
    let payload = [0xabu8; 100];
    let pkt = frame(&Seg {
        from: e.client,
        to: e.client_local,
        seq: s0,
        ack: 500,
        flags: TH_PSH | TH_ACK,
        win: 1000,
        opts: &opts,
        payload: &payload,
    });
    let (verdict, out) = p.run(&pkt);
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out, e.origin_local, e.origin);
    assert_eq!(u32_at(&out, T + 4), s0.wrapping_add(1000), "seq");
    assert_eq!(u32_at(&out, T + 8), 3500, "ack in the origin's space");
    // 1000 << 7 bytes, in units of 1 << 9, rounded up.
    assert_eq!(u16_at(&out, T + 14), 250, "window");
    let tsval = u32_at(&out, T + 24);
    assert!((5000..5000 + 60_000).contains(&tsval), "TSval {tsval}");
    assert_eq!(
        u32_at(&out, T + 28),
        0,
        "no echo before the origin's offset"
    );
    assert_eq!(u32_at(&out, T + 36), 3600, "SACK left edge");
    assert_eq!(u32_at(&out, T + 40), 3700, "SACK right edge");
    assert_eq!(&out[out.len() - 100..], &payload[..], "payload untouched");
    let (next, bytes, last) = p.conns.counted(0, 0);
    assert_eq!((next as u32, bytes), (s0.wrapping_add(100), 100));
    assert!(last > 0);

    // The origin's FIN, echoing the TSval it got: the client gets its own
    // value back.
    let pkt = frame(&Seg {
        from: e.origin,
        to: e.origin_local,
        seq: 42,
        ack: s0.wrapping_add(1100),
        flags: TH_FIN | TH_ACK,
        win: 250,
        opts: &ts_opt(90_000, tsval),
        payload: &[],
    });
    let (verdict, out) = p.run(&pkt);
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out, e.client_local, e.client);
    assert_eq!(u32_at(&out, T + 4), 42u32.wrapping_sub(3000), "seq");
    assert_eq!(u32_at(&out, T + 8), s0.wrapping_add(100), "ack");
    assert_eq!(u16_at(&out, T + 14), 1000, "window");
    assert_eq!(u32_at(&out, T + 28), 777, "the client's own TSval echoed");
    assert!((7000..7000 + 60_000).contains(&u32_at(&out, T + 24)));
    assert_eq!(p.conns.flags(0), FLAG_FIN[1]);

    // The client acknowledges that FIN and sends its own; the origin
    // acknowledges it: the session is done, and user space hears of it.
    let ack_fin = 43u32.wrapping_sub(3000);
    let pkt = frame(&Seg {
        from: e.client,
        to: e.client_local,
        seq: s0.wrapping_add(100),
        ack: ack_fin,
        flags: TH_FIN | TH_ACK,
        win: 1000,
        opts: &ts_opt(800, 0),
        payload: &[],
    });
    assert_eq!(p.run(&pkt).0, TC_ACT_OK);
    assert_eq!(
        p.conns.flags(0),
        FLAG_FIN[0] | FLAG_FIN[1] | FLAG_FIN_ACKED[1]
    );
    let pkt = frame(&Seg {
        from: e.origin,
        to: e.origin_local,
        seq: 43,
        ack: s0.wrapping_add(1101),
        flags: TH_ACK,
        win: 250,
        opts: &ts_opt(90_001, 0),
        payload: &[],
    });
    assert_eq!(p.run(&pkt).0, TC_ACT_OK);
    assert_eq!(p.conns.flags(0) & FLAGS_DONE, FLAGS_DONE);
    assert_eq!(p.next_event(), (0, SpliceEventKind::Done as u32));

    // The frozen sockets' own output is dropped; strangers are not ours.
    let own = frame(&Seg {
        from: e.client_local,
        to: e.client,
        seq: 1,
        ack: 1,
        flags: TH_ACK,
        win: 1,
        opts: &[],
        payload: &[],
    });
    assert_eq!(p.run(&own).0, TC_ACT_SHOT);
    let stranger = frame(&Seg {
        from: ends(50_000).client,
        to: e.client_local,
        seq: 1,
        ack: 1,
        flags: TH_ACK,
        win: 1,
        opts: &[],
        payload: &[],
    });
    let (verdict, out) = p.run(&stranger);
    assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &stranger));
    assert_eq!(p.stat(STAT_REWRITTEN), 4, "four packets rewritten");
    assert_eq!(p.stat(STAT_FAILED), 0);
}

/// A one-byte data segment from `from` to `to` at `seq`, without options.
fn seg(from: SocketAddrV4, to: SocketAddrV4, seq: u32) -> Vec<u8> {
    frame(&Seg {
        from,
        to,
        seq,
        ack: 1,
        flags: TH_PSH | TH_ACK,
        win: 100,
        opts: &[],
        payload: b"x",
    })
}

#[test]
fn peers_elsewhere_get_each_others_packets_out_of_their_routes_interface() {
    let Some(mut p) = Prog::load() else { return };
    let e = ends(41_000);
    p.session(3, &e, GATE_SPLICED);
    // The origin's route leaves by interface 6, the client's by 5.
    publish_via(&p, 3, &e, [0, 0], [1, 1], [100, 200], [6, 5]);
    let (verdict, out) = p.run_as(PROG_SPLICE, &seg(e.client, e.client_local, 100), 5);
    assert_eq!(verdict, TC_ACT_REDIRECT, "the client's packet leaves by 6");
    check_frame(&out, e.origin_local, e.origin);
    let (verdict, out) = p.run_as(PROG_SPLICE, &seg(e.origin, e.origin_local, 200), 6);
    assert_eq!(verdict, TC_ACT_REDIRECT, "the origin's leaves by 5");
    check_frame(&out, e.client_local, e.client);
    // Peers on this host: up the stack, as before.
    publish_via(&p, 3, &e, [0, 0], [1, 1], [101, 201], [1, 1]);
    let (verdict, _) = p.run_as(PROG_SPLICE, &seg(e.client, e.client_local, 101), 1);
    assert_eq!(verdict, TC_ACT_OK);

    // Egress: the frozen socket's own output (sent by this host) is
    // dropped; the rewritten packets, which carry the same 4-tuple, came
    // in on an interface and pass.
    let own = seg(e.origin_local, e.origin, 7);
    assert_eq!(p.run_as(PROG_SPLICE_OUT, &own, 0).0, TC_ACT_SHOT);
    assert_eq!(p.run_as(PROG_SPLICE_OUT, &own, 5).0, TC_ACT_UNSPEC);
    // A peer's packets and strangers are not the egress program's.
    let peer = seg(e.client, e.client_local, 102);
    assert_eq!(p.run_as(PROG_SPLICE_OUT, &peer, 0).0, TC_ACT_UNSPEC);
    let stranger = seg(ends(50_000).client, e.client_local, 1);
    assert_eq!(p.run_as(PROG_SPLICE_OUT, &stranger, 0).0, TC_ACT_UNSPEC);
    // Before the splice the sockets' output is theirs to send.
    p.conns
        .gate(3)
        .store(GATE_OBSERVE, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(p.run_as(PROG_SPLICE_OUT, &own, 0).0, TC_ACT_UNSPEC);
}

#[test]
fn a_remote_peers_packet_for_a_local_one_leaves_by_lo_marked_and_lo_lets_it_by() {
    let Some(mut p) = Prog::load() else { return };
    let e = ends(43_000);
    p.session(4, &e, GATE_SPLICED);
    // The client is behind interface 5; the origin is on this host.
    publish_via(&p, 4, &e, [0, 0], [1, 1], [100, 200], [1, 5]);
    let (verdict, out, mark) =
        p.run_marked(PROG_SPLICE, &seg(e.client, e.client_local, 100), 5, 0x10);
    assert_eq!(verdict, TC_ACT_REDIRECT, "the client's packet leaves by lo");
    check_frame(&out, e.origin_local, e.origin);
    assert_eq!(mark, 0x10 | REDIRECTED_MARK, "marked, the mark it had kept");
    // Back in on lo, it carries the origin socket's own 4-tuple: the mark
    // lets it by, unchanged, and is taken off.
    let (verdict, again, mark) = p.run_marked(PROG_SPLICE, &out, 1, 0x10 | REDIRECTED_MARK);
    assert_eq!((verdict, &again, mark), (TC_ACT_UNSPEC, &out, 0x10));
    // The frozen socket's own output, with the same 4-tuple, is dropped.
    assert_eq!(p.run_marked(PROG_SPLICE, &out, 1, 0x10).0, TC_ACT_SHOT);
    // The origin's packet, in on lo, leaves by the client's interface.
    let (verdict, out, mark) = p.run_marked(PROG_SPLICE, &seg(e.origin, e.origin_local, 200), 1, 0);
    assert_eq!(
        (verdict, mark),
        (TC_ACT_REDIRECT, 0),
        "by interface 5, unmarked"
    );
    check_frame(&out, e.client_local, e.client);
    assert_eq!(p.stat(STAT_REWRITTEN), 2, "two packets rewritten");
}

#[test]
fn while_no_session_is_counted_live_packets_pass_without_a_lookup() {
    let Some(mut p) = Prog::load() else { return };
    let e = ends(41_000);
    p.session(3, &e, GATE_SPLICED);
    publish(&p, 3, &e, [1000, 0], [5000, 7000], [10, 42]);
    let pkt = frame(&Seg {
        from: e.client,
        to: e.client_local,
        seq: 10,
        ack: 500,
        flags: TH_PSH | TH_ACK,
        win: 1000,
        opts: &ts_opt(777, 0x1234),
        payload: b"live?",
    });
    let rewritten = p.stat(STAT_REWRITTEN);

    // The flows are there, but the count says none: the packet is not the
    // program's, even though its flow would be rewritten.
    p.set_live(0);
    let (verdict, out) = p.run(&pkt);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(out, pkt, "passed unchanged");
    assert_eq!(p.stat(STAT_REWRITTEN), rewritten);
    assert_eq!(p.conns.counted(3, 0).1, 0, "nothing recorded");

    p.set_live(1);
    let (verdict, out) = p.run(&pkt);
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out, e.origin_local, e.origin);
    assert_eq!(p.stat(STAT_REWRITTEN), rewritten + 1);
}

#[test]
fn a_timestamp_at_an_odd_offset_keeps_the_checksum_valid() {
    let Some(mut p) = Prog::load() else { return };
    let e = ends(41_000);
    p.session(2, &e, GATE_SPLICED);
    publish(&p, 2, &e, [5, 6], [100, 200], [1000, 2000]);
    // NOP, timestamp (at TCP offset 21), NOP NOP.
    let mut opts = vec![1, 8, 10];
    opts.extend_from_slice(&12_345u32.to_be_bytes());
    opts.extend_from_slice(&0u32.to_be_bytes());
    opts.extend_from_slice(&[1, 1]);
    let pkt = frame(&Seg {
        from: e.client,
        to: e.client_local,
        seq: 1000,
        ack: 77,
        flags: TH_ACK,
        win: 64,
        opts: &opts,
        payload: b"x",
    });
    let (verdict, out) = p.run(&pkt);
    assert_eq!(verdict, TC_ACT_OK);
    check_frame(&out, e.origin_local, e.origin);
    let tsval = u32_at(&out, T + 23);
    assert!((100..100 + 60_000).contains(&tsval), "TSval {tsval}");
}

#[test]
fn observed_packets_pass_unchanged_and_move_the_gate_first() {
    let Some(mut p) = Prog::load() else { return };
    let e = ends(42_000);
    p.session(3, &e, GATE_OBSERVE);
    let data = frame(&Seg {
        from: e.client,
        to: e.client_local,
        seq: 1000,
        ack: 1,
        flags: TH_PSH | TH_ACK,
        win: 100,
        opts: &[],
        payload: &[1; 10],
    });
    let (verdict, out) = p.run(&data);
    assert_eq!((verdict, &out), (TC_ACT_OK, &data));
    assert_eq!(p.gate(3), GATE_OBSERVE | 1, "data moves the gate");
    assert_eq!(p.conns.counted(3, 0).0, SET | 1010, "and is recorded");
    let ack = frame(&Seg {
        from: e.origin,
        to: e.origin_local,
        seq: 5,
        ack: 9,
        flags: TH_ACK,
        win: 100,
        opts: &[],
        payload: &[],
    });
    assert_eq!(p.run(&ack), (TC_ACT_OK, ack.clone()));
    assert_eq!(p.gate(3), GATE_OBSERVE | 1, "a pure ACK does not");
    let rst = frame(&Seg {
        from: e.origin,
        to: e.origin_local,
        seq: 5,
        ack: 9,
        flags: TH_RST,
        win: 0,
        opts: &[],
        payload: &[],
    });
    assert_eq!(p.run(&rst).0, TC_ACT_OK);
    assert_eq!(p.gate(3), GATE_OBSERVE | 2);
    assert_eq!(p.conns.flags(3), FLAG_RST[1], "a reset is recorded");
}

#[test]
fn an_armed_session_is_spliced_by_the_awaited_packet_and_disarmed_by_others() {
    let Some(mut p) = Prog::load() else { return };
    let e = ends(43_000);
    p.session(4, &e, GATE_OBSERVE);
    publish(&p, 4, &e, [100, 200], [1, 2], [3000, 5000]);
    // The origin socket waits for the origin to acknowledge 777.
    let armed = p.conns.counted(4, 1).0;
    assert_eq!(armed, SET | 5000);
    let rw = SpliceRewrite {
        saddr: addr(e.client_local),
        daddr: addr(e.client),
        ports: ports(e.client_local, e.client),
        seq_delta: 200,
        shift_in: 9,
        shift_out: 7,
        ts_base: 2,
        ts_on: 1,
        flip: 1,
        flip_ack: 777,
        ifindex: 0,
        _pad: 0,
    };
    p.conns.publish(4, 1, &rw, armed);
    p.conns
        .gate(4)
        .store(GATE_ARMED | 7, std::sync::atomic::Ordering::SeqCst);

    // Client data first: it passes to the socket, and the gate goes back.
    let data = frame(&Seg {
        from: e.client,
        to: e.client_local,
        seq: 3000,
        ack: 1,
        flags: TH_PSH | TH_ACK,
        win: 100,
        opts: &[],
        payload: &[2; 4],
    });
    let (verdict, out) = p.run(&data);
    assert_eq!((verdict, &out), (TC_ACT_OK, &data));
    assert_eq!(p.gate(4), GATE_OBSERVE | 8);
    assert_eq!(p.conns.counted(4, 0).0, SET | 3004);
    assert_eq!(p.next_event(), (4, SpliceEventKind::Disarmed as u32));

    // Armed again: the reply that acknowledges 777 splices the session
    // and is itself rewritten; a reply that acknowledges less would not.
    p.conns
        .gate(4)
        .store(GATE_ARMED | 8, std::sync::atomic::Ordering::SeqCst);
    let short = frame(&Seg {
        from: e.origin,
        to: e.origin_local,
        seq: 5000,
        ack: 700,
        flags: TH_ACK,
        win: 100,
        opts: &[],
        payload: &[],
    });
    assert_eq!(
        p.run(&short),
        (TC_ACT_OK, short.clone()),
        "a partial ACK passes"
    );
    assert_eq!(p.gate(4), GATE_ARMED | 8, "and leaves the gate armed");
    let reply = frame(&Seg {
        from: e.origin,
        to: e.origin_local,
        seq: 5000,
        ack: 777,
        flags: TH_PSH | TH_ACK,
        win: 100,
        opts: &[],
        payload: &[3; 6],
    });
    let (verdict, out) = p.run(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(p.gate(4) & GATE_STATE, GATE_SPLICED);
    check_frame(&out, e.client_local, e.client);
    assert_eq!(u32_at(&out, T + 4), 5200);
    assert_eq!(p.conns.counted(4, 1).1, 6, "the reply's bytes are counted");
    assert_eq!(p.next_event(), (4, SpliceEventKind::Spliced as u32));
}
