//! The `tcpsplice` path: once a session is upgraded and idle, a tc program
//! joins its two TCP connections at the packet level, and the proxy's
//! sockets and buffers drop out of the byte path. What a relay pays per
//! message (two more TCP receives and sends, a wake-up) is gone: a spliced
//! session costs the host what a direct connection costs, plus a header
//! rewrite per packet. The packet program is `proxy-ebpf/src/splice.rs`;
//! the shared layout is `proxy_common::splice`.
//!
//! Requires Linux 5.17+ (`bpf_loop`; its atomics need 5.12+;
//! `bpf_redirect_neigh` 5.10+; attached with TCX on 6.6+, through a clsact
//! qdisc before, which only 6.18 with TCX has exercised here), CAP_BPF,
//! CAP_NET_ADMIN (`TCP_REPAIR`, attaching programs),
//! `membarrier(MEMBARRIER_CMD_GLOBAL)` (not under `nohz_full`), and IPv4.
//!
//! Where the peers are: the program sits on `lo`'s ingress and on both
//! hooks of every Ethernet interface that is up at start. When a session
//! is first observed, user space looks up the route to each peer
//! ([`route`]). Peers both on this host (over `lo`): a rewritten packet
//! goes on up the stack to the other peer. A peer elsewhere (an edge
//! host's clients, and its origins if they are elsewhere too): the other
//! peer's packets leave by its interface to its next hop
//! (`bpf_redirect_neigh`), as a router would send them, and the egress
//! program drops what the frozen sockets send there. An origin on this
//! host with a client elsewhere (an app behind its edge proxy): the
//! client's packets go out of `lo` with the local route attached, as the
//! host's own would. So that the origin's segments fit the client's path,
//! the origin connection announces what the client takes per segment
//! (`lifecycle::origin_mss`). Peers behind interfaces of other kinds, or
//! whose largest segment does not fit the other's path (a client on this
//! host, whose `lo` segments are 64 KiB, with an origin elsewhere; links
//! of different MTUs) stay in the user-space relay, as do sessions that do
//! not fit otherwise.
//!
//! A session joins in three steps; user space's relay carries it until the
//! last one succeeds, and takes it back whenever a step fails:
//!
//! 1. **Observe.** At its first promotion (old enough, idle both ways) the
//!    session's flows go into `FLOWS` with its gate in OBSERVE: packets
//!    still pass to the proxy's sockets, but the program records the
//!    highest sequence number it passed on each side and bumps the gate for
//!    every packet that can move a socket's sequence state. A packet that
//!    had passed the program before the flows were there may still be on
//!    its way into the socket, so one RCU grace period must pass first
//!    ([`Grace`]; the program and the socket's receive path run in one RCU
//!    read-side section).
//! 2. **Snapshot.** At a later idle moment: read the gate; check that
//!    nothing is unread or unsent, that at most one socket still waits for
//!    its peer to acknowledge what it sent, and that each socket's
//!    `rcv_nxt` is the highest sequence number the program passed it (so
//!    nothing is in flight between the program and the socket); read both
//!    sockets' sequence numbers (in repair mode for a moment), timestamp
//!    clocks and window scales, and publish the rewrite.
//! 3. **Flip.** One compare-and-swap moves the gate from what step 2 read
//!    to SPLICED, or, when a socket waits for an acknowledgment (a request
//!    at the origin, say), to ARMED: the program then flips it itself at
//!    the packet that acknowledges everything that socket sent (the reply),
//!    and rewrites that packet. The swap fails if any packet passed since
//!    step 2 read the gate; an armed session goes back to OBSERVE if any
//!    other packet passes first. Either way the relay takes over again.
//!
//! Once spliced, the proxy's sockets are frozen where the snapshot left
//! them; whatever they might still send (a retransmission of data the
//! peer acknowledged to the other socket, a delayed ACK) is dropped by two
//! more flows, for their own output. At the end they close in repair mode,
//! which sends nothing.
//!
//! The data-path traps of a relay do not arise: no proxy buffer holds
//! bytes, TCP's own windows carry backpressure end to end, and a FIN or RST
//! reaches the other peer as that peer's own TCP would see it. The session
//! ends when the program has seen both FINs acknowledged, or a reset.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use proxy_common::splice::{
    FlowKey, FlowRef, SpliceConn, SpliceEvent, SpliceRewrite, FLAGS_DONE, FLAG_RST, FROM_CLIENT,
    FROM_ORIGIN, GATE_ARMED, GATE_OBSERVE, GATE_SPLICED, GATE_STATE, LOOPBACK_IFINDEX, MAP_FLOWS,
    MAP_SPLICES, MAP_SPLICE_EVENTS, MAP_SPLICE_LIVE, MAX_SPLICES, OWN_TO_CLIENT, OWN_TO_ORIGIN,
    PROG_SPLICE, PROG_SPLICE_OUT, SET,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{watch, Notify};

use super::ebpf::{from_object_error, lock, map, program, readable, take_map, ObjectError};
use super::shared_map::{SharedArray, Slots};
use super::{route, CloseReason, Pair, Side};
use crate::accounting::{monotonic_ns, Accounting};
use crate::sockopt;

/// The loopback interface: peers on this host are reached over it.
const LOOPBACK: &str = "lo";
/// After both FINs were acknowledged, the flows stay a little: a final ACK
/// lost on the way makes the other peer send its FIN again, and that must
/// still be rewritten. The proxy's sockets keep the 4-tuples reserved.
const LINGER: Duration = Duration::from_secs(1);
/// How often a spliced session looks at its flags without a wake-up (the
/// ring may have been full).
const RECHECK: Duration = Duration::from_secs(30);
/// About how long a grace period takes here (`membarrier` measured 8 ms).
pub const GRACE_WAIT: Duration = Duration::from_millis(10);
/// The same for an armed session, whose relay is stopped meanwhile.
const ARMED_RECHECK: Duration = Duration::from_millis(100);

/// Why the tcpsplice path could not start.
#[derive(Debug, thiserror::Error)]
pub enum TcpSpliceError {
    /// Loading the object, its program or its maps failed.
    #[error(transparent)]
    Object(ObjectError),
    /// `membarrier(MEMBARRIER_CMD_GLOBAL)` is not available.
    #[error("membarrier(MEMBARRIER_CMD_GLOBAL) is not available (a nohz_full kernel?): {0}")]
    Membarrier(io::Error),
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

from_object_error!(TcpSpliceError);

/// How a join attempt ended, when the session is not spliced.
pub enum NotJoined {
    /// The grace period after the session's flows went in is not over:
    /// relay, and try again at the next idle moment once it is (about
    /// [`GRACE_WAIT`]).
    Grace(Pair),
    /// Bytes moved: relay, and try again at a later idle moment.
    Later(Pair),
    /// Never for this session: relay it to the end. The reason is logged.
    Never(Pair, String),
}

/// The loaded program and its maps.
pub struct TcpSplice {
    flows: Mutex<Flows>,
    conns: SharedArray<SpliceConn>,
    slots: Mutex<Slots>,
    /// Wake-ups of spliced sessions, by slot.
    waiting: Mutex<StdHashMap<u32, Arc<Notify>>>,
    grace: Arc<Grace>,
    /// The interfaces the programs are attached to (name, index).
    ifaces: Vec<(String, u32)>,
    /// Keeps the program attached for the life of the process.
    _ebpf: Mutex<Ebpf>,
}

impl TcpSplice {
    /// Loads the programs, attaches them (`lo`'s ingress, and both hooks of
    /// every Ethernet interface that is up), and starts the grace-period
    /// thread and the event monitor (on the calling runtime).
    pub fn load() -> Result<Arc<TcpSplice>, TcpSpliceError> {
        membarrier_global_supported().map_err(TcpSpliceError::Membarrier)?;
        let mut ebpf = object()?;
        // Before Linux 6.6 tc programs hang off a clsact qdisc; an existing
        // one is fine. On 6.6+ aya attaches with TCX and needs none.
        let _ = tc::qdisc_add_clsact(LOOPBACK);
        program::<SchedClassifier>(&mut ebpf, PROG_SPLICE)?
            .attach(LOOPBACK, TcAttachType::Ingress)?;
        let mut ifaces = vec![(LOOPBACK.to_string(), LOOPBACK_IFINDEX as u32)];
        for name in ethernet_interfaces() {
            let index = nix::net::if_::if_nametoindex(name.as_str()).unwrap_or(0);
            match attach_both(&mut ebpf, &name) {
                Ok(()) => ifaces.push((name, index)),
                // Its peers' sessions stay in the relay (never seen there).
                Err(e) => tracing::warn!("tcpsplice cannot attach to {name}: {e}"),
            }
        }
        tracing::info!("tcpsplice attached to {}", names(&ifaces));
        let flows = Flows {
            map: take_map(&mut ebpf, MAP_FLOWS)?,
            live: take_map(&mut ebpf, MAP_SPLICE_LIVE)?,
            sessions: 0,
        };
        let conns = SharedArray::new(map(&mut ebpf, MAP_SPLICES)?, MAX_SPLICES)?;
        let events: RingBuf<MapData> = take_map(&mut ebpf, MAP_SPLICE_EVENTS)?;
        let ts = Arc::new(TcpSplice {
            flows: Mutex::new(flows),
            conns,
            slots: Mutex::new(Slots::new(MAX_SPLICES)),
            waiting: Mutex::new(StdHashMap::new()),
            grace: Grace::start()?,
            ifaces,
            _ebpf: Mutex::new(ebpf),
        });
        tokio::spawn(ring_monitor(ts.clone(), readable(events)?));
        Ok(ts)
    }

    /// One join attempt for an idle session (both relay directions stopped,
    /// nothing read left unwritten). `obs` carries the session's observation
    /// from one attempt to the next; it is set up on the first. On success
    /// the session is spliced and this returns once it ended.
    pub async fn relay(
        self: &Arc<Self>,
        pair: Pair,
        obs: &mut Option<Observation>,
        acct: &Accounting,
    ) -> Result<CloseReason, NotJoined> {
        let o = match obs {
            Some(o) => o,
            None => match self.observe(&pair) {
                Ok(o) => obs.insert(o),
                Err(why) => return Err(NotJoined::Never(pair, why)),
            },
        };
        match self.grace.passed(o.ticket) {
            Ok(true) => {}
            Ok(false) => return Err(NotJoined::Grace(pair)),
            Err(why) => return Err(NotJoined::Never(pair, why)),
        }
        let slot = o.slot;
        match self.snapshot(&pair, o) {
            Ok(Flip::Spliced) => tracing::debug!(slot, "spliced"),
            Ok(Flip::Armed) => {
                if !self.armed(slot).await {
                    tracing::debug!(slot, "disarmed: a packet passed first");
                    return Err(NotJoined::Later(pair));
                }
                tracing::debug!(slot, "spliced by the packet it was armed for");
            }
            Err(Snap::Moved(what)) => {
                tracing::debug!(slot, "not spliced yet: {what}");
                return Err(NotJoined::Later(pair));
            }
            Err(Snap::Failed(why)) => return Err(NotJoined::Never(pair, why)),
        }
        let o = obs.take().expect("observed above");
        Ok(self.spliced(pair, o, acct).await)
    }

    /// Step 1: checks that the session can be spliced at all, takes a slot
    /// and puts its flows into OBSERVE.
    fn observe(self: &Arc<Self>, pair: &Pair) -> Result<Observation, String> {
        let ends = Ends::of(pair)?;
        let out_if = self.out_interfaces(&ends)?;
        let (ci, oi) = (info(pair.client.as_fd())?, info(pair.origin.as_fd())?);
        let ts = |i: &sockopt::TcpInfo| i.options() & sockopt::TCPI_OPT_TIMESTAMPS != 0;
        if ts(&ci) != ts(&oi) {
            return Err("TCP timestamps are on for one peer only".into());
        }
        if (ci.options() | oi.options()) & sockopt::TCPI_OPT_USEC_TS != 0 {
            return Err("a route uses microsecond TCP timestamps".into());
        }
        let slot = lock(&self.slots)
            .take()
            .ok_or_else(|| format!("all {MAX_SPLICES} tcpsplice slots are in use"))?;
        self.conns.reset(slot, GATE_OBSERVE);
        let flow = |side| FlowRef { slot, side };
        let keys = [
            (key(ends.client, ends.client_local), flow(FROM_CLIENT)),
            (key(ends.origin, ends.origin_local), flow(FROM_ORIGIN)),
            (key(ends.client_local, ends.client), flow(OWN_TO_CLIENT)),
            (key(ends.origin_local, ends.origin), flow(OWN_TO_ORIGIN)),
        ];
        // Made before the flows go in: should an insert fail, dropping it
        // takes out what went in and gives the slot back.
        let mut obs = Observation {
            ts: self.clone(),
            slot,
            keys: keys.map(|(k, _)| k),
            ticket: 0,
            out_if,
            ends,
        };
        lock(&self.flows).add(&keys)?;
        obs.ticket = self.grace.ask();
        Ok(obs)
    }

    /// The interfaces of the routes to the client and to the origin: `lo`
    /// (a peer on this host) or an interface the programs are on. Peers of
    /// both kinds mix: a remote peer's packets go out of `lo` to a local
    /// one, and a local peer's leave by the remote one's interface (the
    /// size check at the snapshot decides whether they fit).
    fn out_interfaces(&self, ends: &Ends) -> Result<[u32; 2], String> {
        let lookup = |peer: SocketAddrV4, local: SocketAddrV4| {
            route::output_interface(*peer.ip(), *local.ip())
                .map_err(|e| format!("no route to {peer} from {local}: {e}"))
        };
        let out = [
            lookup(ends.client, ends.client_local)?,
            lookup(ends.origin, ends.origin_local)?,
        ];
        for (who, i) in ["client", "origin"].into_iter().zip(out) {
            if !self.ifaces.iter().any(|(_, at)| *at == i) {
                return Err(format!(
                    "the {who} is reached through interface {i}, which the tcpsplice programs \
                     are not on (they are on {}; attached at start, Ethernet only)",
                    names(&self.ifaces)
                ));
            }
        }
        Ok(out)
    }

    /// Steps 2 and 3: spliced at once, or armed for the packet one socket
    /// waits for.
    fn snapshot(&self, pair: &Pair, o: &Observation) -> Result<Flip, Snap> {
        let slot = o.slot;
        let gate = self.conns.gate(slot);
        let seen = gate.load(Ordering::SeqCst);
        if seen & GATE_STATE != GATE_OBSERVE || self.conns.flags(slot) != 0 {
            return Err(Snap::Failed(
                "a peer closed while the session was observed".into(),
            ));
        }
        let (c, og) = (pair.client.as_fd(), pair.origin.as_fd());
        let e = |e: io::Error| Snap::Failed(format!("reading the sockets' TCP state: {e}"));
        // Nothing unread, nothing unsent (repair mode below would take
        // unsent data as sent). Sent data not yet acknowledged may wait on
        // one socket: the session is then armed for the peer's ACK. The
        // relay is stopped, so nothing is queued after this look.
        let mut unacked = [0u64; 2];
        for (i, fd) in [c, og].into_iter().enumerate() {
            if sockopt::inq(fd).map_err(e)? != 0 {
                return Err(Snap::Moved("bytes wait to be read"));
            }
            if sockopt::notsent(fd).map_err(e)? != 0 {
                return Err(Snap::Moved("bytes wait to be sent"));
            }
            unacked[i] = sockopt::outq(fd).map_err(e)?;
        }
        if unacked[0] != 0 && unacked[1] != 0 {
            return Err(Snap::Moved("both sockets wait for acknowledgments"));
        }
        // A delayed ACK still pending would be the frozen socket's own
        // output after the flip, and dropped; its peer, whose bytes the
        // other peer acknowledged to the proxy before the join, would then
        // retransmit on its timer. Sent now, while the session is observed.
        for fd in [c, og] {
            socket2::SockRef::from(&fd)
                .set_quickack(true)
                .map_err(|e| Snap::Failed(format!("TCP_QUICKACK: {e}")))?;
        }
        let (ci, oi) = (
            info(c).map_err(Snap::Failed)?,
            info(og).map_err(Snap::Failed)?,
        );
        const ESTABLISHED: u8 = 1;
        if ci.state() != ESTABLISHED || oi.state() != ESTABLISHED {
            return Err(Snap::Failed(
                "a peer closed while the session was observed".into(),
            ));
        }
        let (c_rcv, c_snd, c_mss) = queue_seqs(c)?;
        let (o_rcv, o_snd, o_mss) = queue_seqs(og)?;
        // Each peer's segments go on to the other as they are: the largest
        // packet the proxy let one peer send (`advmss`, the payload it
        // announced, with the options and the IP and TCP headers) must fit
        // the other peer's path and the MSS that peer announced.
        for (from, to, to_mss) in [(&ci, &oi, o_mss), (&oi, &ci, c_mss)] {
            let packet = from.advmss() + from.option_bytes() + 40;
            let takes = to.pmtu().min(to_mss + 40);
            if packet > takes {
                return Err(Snap::Failed(format!(
                    "a peer may send {packet}-byte packets, and the other takes {takes}: a \
                     smaller MTU or MSS on one side"
                )));
            }
        }
        // Each socket has taken in everything the program passed it.
        for (side, rcv) in [(0, c_rcv), (1, o_rcv)] {
            let (seen_next, _, _) = self.conns.counted(slot, side);
            if seen_next & SET != 0 && seen_next as u32 != rcv {
                return Err(Snap::Moved("a packet is on its way into a socket"));
            }
        }
        let snap_ns = monotonic_ns();
        let (c_ts, o_ts) = (
            sockopt::tcp_timestamp(c).map_err(e)?,
            sockopt::tcp_timestamp(og).map_err(e)?,
        );
        let shift = |i: &sockopt::TcpInfo, theirs: bool| -> u32 {
            if i.options() & sockopt::TCPI_OPT_WSCALE == 0 {
                0
            } else if theirs {
                u32::from(i.snd_wscale())
            } else {
                u32::from(i.rcv_wscale())
            }
        };
        let ts_on = u32::from(ci.options() & sockopt::TCPI_OPT_TIMESTAMPS != 0);
        let (ends, o_if) = (&o.ends, o.out_if);
        // Per socket, by side (0 client, 1 origin): its TCP_INFO, rcv_nxt,
        // write_seq, timestamp clock, and the two ends of its connection.
        let sock = [(&ci, c_rcv, c_snd, c_ts), (&oi, o_rcv, o_snd, o_ts)];
        let (local, remote) = (
            [ends.client_local, ends.origin_local],
            [ends.client, ends.origin],
        );
        for s in 0..2 {
            // Side s's packets leave as if the other socket had sent them.
            let o = s ^ 1;
            let rw = SpliceRewrite {
                saddr: addr(local[o]),
                daddr: addr(remote[o]),
                ports: ports(local[o], remote[o]),
                seq_delta: sock[o].2.wrapping_sub(sock[s].1),
                shift_in: shift(sock[s].0, true),
                shift_out: shift(sock[o].0, false),
                ts_base: sock[o].3,
                ts_on,
                flip: u32::from(unacked[s] != 0),
                flip_ack: sock[s].2,
                ifindex: o_if[o],
                _pad: 0,
            };
            self.conns.publish(slot, s, &rw, SET | u64::from(sock[s].1));
        }
        self.conns.set_snap_ns(slot, snap_ns);
        tracing::debug!(
            slot,
            "snapshot: unacked {unacked:?}, client rcv {c_rcv} snd {c_snd}, origin rcv {o_rcv} snd {o_snd}"
        );
        let (state, flip) = if unacked == [0, 0] {
            (GATE_SPLICED, Flip::Spliced)
        } else {
            (GATE_ARMED, Flip::Armed)
        };
        gate.compare_exchange(
            seen,
            (seen & !GATE_STATE) | state,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .map(|_| flip)
        .map_err(|_| Snap::Moved("a packet passed during the snapshot"))
    }

    /// Waits until the armed session in `slot` is spliced by the packet it
    /// waits for (true), or a packet disarmed it (false). The relay is
    /// stopped meanwhile, as it would wait for that packet too.
    async fn armed(&self, slot: u32) -> bool {
        let wake = self.wake_on(slot);
        let gate = self.conns.gate(slot);
        loop {
            match gate.load(Ordering::SeqCst) & GATE_STATE {
                GATE_ARMED => {}
                s => return s == GATE_SPLICED,
            }
            // The ring may have been full: look again now and then.
            let _ = tokio::time::timeout(ARMED_RECHECK, wake.notify.notified()).await;
        }
    }

    /// Registers for the program's events about `slot` until dropped.
    fn wake_on(&self, slot: u32) -> Wake<'_> {
        let notify = Arc::new(Notify::new());
        lock(&self.waiting).insert(slot, notify.clone());
        Wake {
            ts: self,
            slot,
            notify,
        }
    }

    /// The session is spliced: waits for its end, then tears it down.
    async fn spliced(&self, pair: Pair, o: Observation, acct: &Accounting) -> CloseReason {
        let slot = o.slot;
        let frozen = Frozen { pair, obs: o };
        let before = acct.totals();
        let wake = self.wake_on(slot);
        let update = || {
            let (_, c2o, c_last) = self.conns.counted(slot, 0);
            let (_, o2c, o_last) = self.conns.counted(slot, 1);
            acct.set(before.0 + c2o, before.1 + o2c, c_last.max(o_last));
        };
        let reason = loop {
            if let Some(reason) = end_of(self.conns.flags(slot)) {
                break reason;
            }
            update();
            let _ = tokio::time::timeout(RECHECK, wake.notify.notified()).await;
        };
        update();
        drop(wake);
        let linger = if reason == CloseReason::Done {
            LINGER
        } else {
            Duration::ZERO
        };
        // The sockets and the flows go after the linger, in a task of
        // their own.
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            drop(frozen);
        });
        reason
    }
}

/// How a spliced session with these flags ended, if it did.
fn end_of(flags: u64) -> Option<CloseReason> {
    // Both FINs acknowledged: every byte was, too. A reset after that is a
    // peer's answer to a stray segment (a FIN that its tail loss probe sent
    // again, crossing the other peer's last ACK, say), as a direct
    // connection can end too: the session ended cleanly.
    if flags & FLAGS_DONE == FLAGS_DONE {
        Some(CloseReason::Done)
    } else if flags & FLAG_RST[0] != 0 {
        Some(CloseReason::Reset(Side::Client))
    } else if flags & FLAG_RST[1] != 0 {
        Some(CloseReason::Reset(Side::Origin))
    } else {
        None
    }
}

/// A session's registration for the program's events (see
/// [`ring_monitor`]); it ends on drop, however the wait ends.
struct Wake<'a> {
    ts: &'a TcpSplice,
    slot: u32,
    notify: Arc<Notify>,
}

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        lock(&self.ts.waiting).remove(&self.slot);
    }
}

/// A spliced session's frozen sockets and its flows. Dropped, however the
/// session ends (the daemon stopping too), it closes the sockets in repair
/// mode, which sends nothing (a FIN of theirs would carry stale sequence
/// numbers), and only then takes the flows out: until they go, whatever
/// the sockets send is dropped.
struct Frozen {
    /// Dropped first (fields drop in order).
    pair: Pair,
    obs: Observation,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for fd in [self.pair.client.as_fd(), self.pair.origin.as_fd()] {
            if let Err(e) = sockopt::set_repair(fd, true) {
                tracing::warn!(
                    slot = self.obs.slot,
                    "a spliced socket closes outside repair mode: {e}"
                );
            }
        }
    }
}

/// The object with its programs loaded (verified), not attached.
fn object() -> Result<Ebpf, ObjectError> {
    let mut ebpf =
        EbpfLoader::new().load(aya::include_bytes_aligned!(env!("SLUICE_TCPSPLICE_OBJ")))?;
    program::<SchedClassifier>(&mut ebpf, PROG_SPLICE)?.load()?;
    program::<SchedClassifier>(&mut ebpf, PROG_SPLICE_OUT)?.load()?;
    Ok(ebpf)
}

/// The interfaces' names, for a log line.
fn names(ifaces: &[(String, u32)]) -> String {
    let v: Vec<&str> = ifaces.iter().map(|(n, _)| n.as_str()).collect();
    v.join(", ")
}

/// Attaches the ingress program and the egress one to `iface`.
fn attach_both(ebpf: &mut Ebpf, iface: &str) -> Result<(), String> {
    let _ = tc::qdisc_add_clsact(iface);
    for (name, hook) in [
        (PROG_SPLICE, TcAttachType::Ingress),
        (PROG_SPLICE_OUT, TcAttachType::Egress),
    ] {
        program::<SchedClassifier>(ebpf, name)
            .map_err(|e| e.to_string())?
            .attach(iface, hook)
            .map_err(|e| format!("{name} on {hook:?}: {e}"))?;
    }
    Ok(())
}

/// The Ethernet interfaces that are up: where remote peers' packets come
/// in. Read with `getifaddrs` (netlink), which sees this process's network
/// namespace whatever `/sys` shows. Interfaces of other kinds (tunnels,
/// with no Ethernet header) and ones that come up later are left alone;
/// sessions through them stay in the relay.
fn ethernet_interfaces() -> Vec<String> {
    const ARPHRD_ETHER: u16 = 1;
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut names: Vec<String> = all
        .filter(|i| {
            i.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
                && i.address
                    .as_ref()
                    .and_then(|a| a.as_link_addr())
                    .is_some_and(|l| l.hatype() == ARPHRD_ETHER)
        })
        .map(|i| i.interface_name)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// How a snapshot ended.
enum Flip {
    /// Spliced at once (both sockets had everything acknowledged).
    Spliced,
    /// Armed: the packet one socket waits for will splice it.
    Armed,
}

/// In repair mode (needed to read them): (`rcv_nxt`, `write_seq`, the MSS
/// the peer announced). Repair
/// mode is left at once, without its window probe; the caller checked that
/// nothing is unsent, which repair mode would take as sent. Leaving repair
/// mode also clears `SO_REUSEADDR`, which an accepted socket inherits from
/// the listener: its TIME_WAIT would then keep a restarted daemon from
/// binding the port. It is set back.
fn queue_seqs(fd: BorrowedFd<'_>) -> Result<(u32, u32, u32), Snap> {
    let sock = socket2::SockRef::from(&fd);
    let reuse = sock
        .reuse_address()
        .map_err(|e| Snap::Failed(format!("SO_REUSEADDR: {e}")))?;
    sockopt::set_repair(fd, true)
        .map_err(|e| Snap::Failed(format!("TCP_REPAIR: {e} (needs CAP_NET_ADMIN)")))?;
    let seqs = sockopt::queue_seqs(fd);
    let mss = sockopt::peer_mss(fd);
    let off = sockopt::set_repair(fd, false);
    let (rcv, snd) = seqs.map_err(|e| Snap::Failed(format!("TCP_QUEUE_SEQ: {e}")))?;
    let mss = mss.map_err(|e| Snap::Failed(format!("TCP_MAXSEG: {e}")))?;
    off.map_err(|e| Snap::Failed(format!("leaving TCP_REPAIR: {e}")))?;
    if reuse {
        sock.set_reuse_address(true)
            .map_err(|e| Snap::Failed(format!("SO_REUSEADDR: {e}")))?;
    }
    Ok((rcv, snd, mss))
}

/// Why a snapshot did not lead to a flip.
enum Snap {
    /// Bytes moved or are in flight (which ones): try again later.
    Moved(&'static str),
    /// This session cannot be spliced.
    Failed(String),
}

/// A session's flows in the splice map and its slot; removed on drop.
pub struct Observation {
    ts: Arc<TcpSplice>,
    slot: u32,
    keys: [FlowKey; 4],
    /// The grace period that must pass before the first snapshot.
    ticket: u64,
    /// The interface of the route to the client, and to the origin.
    out_if: [u32; 2],
    ends: Ends,
}

impl Drop for Observation {
    fn drop(&mut self) {
        lock(&self.ts.flows).remove(&self.keys);
        // The slot rests before reuse, so a program run that still holds
        // it finishes first.
        lock(&self.ts.slots).give(self.slot);
    }
}

/// The splice map, and the count of sessions with flows in it that the
/// program reads first (`SPLICE_LIVE`).
struct Flows {
    map: BpfHashMap<MapData, FlowKey, FlowRef>,
    live: Array<MapData, u64>,
    /// Sessions counted in: those between [`Flows::add`] and
    /// [`Flows::remove`], failed adds included.
    sessions: u64,
}

impl Flows {
    /// Counts a session in, then puts its flows in. Each call, even a failed
    /// one, is undone by one [`Flows::remove`].
    fn add(&mut self, flows: &[(FlowKey, FlowRef)]) -> Result<(), String> {
        self.sessions += 1;
        self.live
            .set(0, self.sessions, 0)
            .map_err(|e| format!("cannot count a session in the splice map: {e}"))?;
        for (k, v) in flows {
            self.map
                .insert(k, v, 0)
                .map_err(|e| format!("cannot add a flow to the splice map: {e}"))?;
        }
        Ok(())
    }

    /// Takes a session's flows out, then counts it out.
    fn remove(&mut self, keys: &[FlowKey]) {
        for k in keys {
            let _ = self.map.remove(k);
        }
        self.sessions = self.sessions.saturating_sub(1);
        let _ = self.live.set(0, self.sessions, 0);
    }
}

/// The four addresses of a session (IPv4 only).
struct Ends {
    client: SocketAddrV4,
    client_local: SocketAddrV4,
    origin_local: SocketAddrV4,
    origin: SocketAddrV4,
}

impl Ends {
    fn of(pair: &Pair) -> Result<Ends, String> {
        let v4 = |a: io::Result<SocketAddr>| match a {
            Ok(SocketAddr::V4(a)) => Ok(a),
            // A dual-stack listener sees IPv4 clients this way; their
            // packets are IPv4.
            Ok(SocketAddr::V6(a)) => match a.ip().to_ipv4_mapped() {
                Some(ip) => Ok(SocketAddrV4::new(ip, a.port())),
                None => Err(format!("{a} is IPv6 (tcpsplice is IPv4 only)")),
            },
            Err(e) => Err(format!("socket address: {e}")),
        };
        Ok(Ends {
            client: v4(pair.client.peer_addr())?,
            client_local: v4(pair.client.local_addr())?,
            origin_local: v4(pair.origin.local_addr())?,
            origin: v4(pair.origin.peer_addr())?,
        })
    }
}

/// An address as the program reads it from the header.
fn addr(a: SocketAddrV4) -> u32 {
    u32::from_ne_bytes(a.ip().octets())
}

/// A port as the program reads it from the header.
fn port(a: SocketAddrV4) -> u16 {
    u16::from_ne_bytes(a.port().to_be_bytes())
}

/// Source and destination port as one header word.
fn ports(src: SocketAddrV4, dst: SocketAddrV4) -> u32 {
    let (s, d) = (src.port().to_be_bytes(), dst.port().to_be_bytes());
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// The key of packets from `from` to the proxy's socket at `to`.
fn key(from: SocketAddrV4, to: SocketAddrV4) -> FlowKey {
    FlowKey {
        saddr: addr(from),
        daddr: addr(to),
        sport: port(from),
        dport: port(to),
    }
}

fn info(fd: BorrowedFd<'_>) -> Result<sockopt::TcpInfo, String> {
    sockopt::tcp_info(fd).map_err(|e| format!("TCP_INFO: {e}"))
}

/// RCU grace periods on demand: one `membarrier(MEMBARRIER_CMD_GLOBAL)`
/// (`synchronize_rcu`, 7-8 ms here) serves every session that asked
/// before it started.
struct Grace {
    asked: Mutex<u64>,
    wake: Condvar,
    done: watch::Sender<u64>,
    /// Set if `membarrier` failed: no grace period can be vouched for, so
    /// no session joins any more.
    failed: OnceLock<String>,
}

impl Grace {
    fn start() -> io::Result<Arc<Grace>> {
        let g = Arc::new(Grace {
            asked: Mutex::new(0),
            wake: Condvar::new(),
            done: watch::Sender::new(0),
            failed: OnceLock::new(),
        });
        let me = g.clone();
        std::thread::Builder::new()
            .name("sluice-grace".into())
            .spawn(move || me.run())?;
        Ok(g)
    }

    /// A ticket for a grace period that starts from now.
    fn ask(&self) -> u64 {
        let mut a = lock(&self.asked);
        *a += 1;
        self.wake.notify_one();
        *a
    }

    /// Whether the grace period of `ticket` is over; `Err` if none can be.
    fn passed(&self, ticket: u64) -> Result<bool, String> {
        if let Some(why) = self.failed.get() {
            return Err(why.clone());
        }
        Ok(*self.done.borrow() >= ticket)
    }

    fn run(&self) {
        let mut done = 0;
        loop {
            let target = {
                let mut a = lock(&self.asked);
                while *a <= done {
                    a = self.wake.wait(a).unwrap_or_else(|e| e.into_inner());
                }
                *a
            };
            if let Err(e) = membarrier_global() {
                // Checked at start. A guess at how long packets take would
                // not be a grace period; sessions stay in user space.
                let why = format!("membarrier(MEMBARRIER_CMD_GLOBAL) failed: {e}");
                tracing::error!("{why}; no more sessions join tcpsplice");
                let _ = self.failed.set(why);
                return;
            }
            done = target;
            self.done.send_replace(done);
        }
    }
}

const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;

fn membarrier(cmd: libc::c_long) -> io::Result<libc::c_long> {
    // SAFETY: membarrier takes two integer arguments and touches no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn membarrier_global_supported() -> io::Result<()> {
    if membarrier(MEMBARRIER_CMD_QUERY)? & MEMBARRIER_CMD_GLOBAL == 0 {
        return Err(io::Error::other("not in the supported commands"));
    }
    Ok(())
}

/// Waits until every CPU passed a quiescent state: every packet that was
/// inside the receive path (an RCU read-side section) when it was called
/// has reached its socket.
fn membarrier_global() -> io::Result<()> {
    membarrier(MEMBARRIER_CMD_GLOBAL).map(|_| ())
}

async fn ring_monitor(ts: Arc<TcpSplice>, mut ring: AsyncFd<RingBuf<MapData>>) {
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            tracing::error!("tcpsplice event ring failed; sessions look every {RECHECK:?}");
            return;
        };
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<SpliceEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole SpliceEvent; read_unaligned
            // copes with the ring's 8-byte alignment either way.
            let ev: SpliceEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let hit = lock(&ts.waiting).get(&ev.slot).cloned();
            if let Some(n) = hit {
                n.notify_one();
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
#[path = "tcpsplice_tests.rs"]
mod program_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::splice::{FLAG_FIN, FLAG_FIN_ACKED};

    #[test]
    fn a_reset_after_both_fins_were_acknowledged_is_a_clean_end() {
        let done = FLAG_FIN[0] | FLAG_FIN[1] | FLAG_FIN_ACKED[0] | FLAG_FIN_ACKED[1];
        assert_eq!(end_of(done | FLAG_RST[0]), Some(CloseReason::Done));
        assert_eq!(end_of(done), Some(CloseReason::Done));
        // Before that, a reset is one.
        let half = FLAG_FIN[1] | FLAG_FIN_ACKED[1];
        assert_eq!(
            end_of(half | FLAG_RST[0]),
            Some(CloseReason::Reset(Side::Client))
        );
        assert_eq!(end_of(FLAG_RST[1]), Some(CloseReason::Reset(Side::Origin)));
        assert_eq!(end_of(half), None);
    }

    #[test]
    fn keys_and_rewrites_are_in_header_byte_order() {
        let a: SocketAddrV4 = "10.1.2.3:8080".parse().unwrap();
        let b: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        // As the bytes lie in the header, read as native integers.
        assert_eq!(addr(a).to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(port(a).to_ne_bytes(), 8080u16.to_be_bytes());
        let p = ports(a, b).to_ne_bytes();
        assert_eq!(&p[..2], &8080u16.to_be_bytes());
        assert_eq!(&p[2..], &40000u16.to_be_bytes());
        let k = key(b, a);
        assert_eq!((k.saddr, k.dport), (addr(b), port(a)));
    }
}
