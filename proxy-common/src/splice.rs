//! Types of the `tcpsplice` path: a tc program that joins the client's and
//! the origin's TCP connections at the packet level once a session is
//! upgraded and idle.
//!
//! Every packet that arrives for one of the proxy's two sockets of a spliced
//! session is rewritten to look as if the proxy's *other* socket had sent it
//! to the other peer: addresses, ports, sequence and acknowledgment numbers,
//! window, timestamps and SACK blocks. The peers then talk to each other
//! through the kernel's IP layer, and the proxy's sockets see nothing more.
//!
//! `FLOWS` maps a packet's 4-tuple to a [`FlowRef`]; the session's state
//! lives in slot `slot` of the mmapable array `SPLICES` ([`SpliceConn`]),
//! which user space reads and writes in place with atomics.

/// Name of the hash map from [`FlowKey`] to [`FlowRef`].
pub const MAP_FLOWS: &str = "FLOWS";
/// Name of the mmapable array of [`SpliceConn`].
pub const MAP_SPLICES: &str = "SPLICES";
/// Name of the per-CPU array of packet counters ([`STAT_REWRITTEN`], ...).
pub const MAP_SPLICE_STATS: &str = "SPLICE_STATS";
/// `SPLICE_STATS` index: packets rewritten.
pub const STAT_REWRITTEN: u32 = 0;
/// `SPLICE_STATS` index: packets dropped because their rewrite failed
/// half-way (a helper error); TCP sends them again.
pub const STAT_FAILED: u32 = 1;
/// Entries of `SPLICE_STATS`.
pub const STATS_LEN: u32 = 2;
/// Name of a one-entry array: how many sessions have flows in `FLOWS`.
/// While it is 0 the program lets every packet pass at once, without the
/// hash lookup, so sessions that never splice (short ones) cost no more
/// than one array read per packet. User space raises it before a session's
/// flows go in, and lowers it after they are out.
pub const MAP_SPLICE_LIVE: &str = "SPLICE_LIVE";
/// Name of the ring buffer of [`SpliceEvent`]s.
pub const MAP_SPLICE_EVENTS: &str = "SPLICE_EVENTS";
/// Name of the tc classifier on ingress (of `lo` and of every other
/// interface a peer may be reached through).
pub const PROG_SPLICE: &str = "sluice_splice";
/// Name of the tc classifier on the egress of interfaces other than `lo`:
/// it drops what a spliced session's frozen sockets send to a peer there
/// (on `lo` the ingress program does, as their output loops back).
pub const PROG_SPLICE_OUT: &str = "sluice_splice_out";

/// Sessions the splice maps can hold at once (two flows each).
pub const MAX_SPLICES: u32 = 32_768;

/// [`SpliceConn::gate`] state: packets pass to the proxy's sockets; every
/// one that could change a socket's sequence state (data, FIN, RST, SYN)
/// first adds one to the gate's low half.
pub const GATE_OBSERVE: u64 = 1 << 32;
/// [`SpliceConn::gate`] state: packets are rewritten and go to the other
/// peer. User space moves `OBSERVE | n` to `SPLICED | n` with one
/// compare-and-swap, which fails if any packet passed since it read `n`.
pub const GATE_SPLICED: u64 = 2 << 32;
/// [`SpliceConn::gate`] state: the rewrite is published, and one socket
/// still waits for its peer to acknowledge what it sent (a request at the
/// origin, say). The packet from that peer that acknowledges all of it
/// (its reply) flips the gate to SPLICED itself and is rewritten; any other
/// packet that passes to a socket moves the gate back to OBSERVE.
pub const GATE_ARMED: u64 = 3 << 32;
/// Mask of the state half of [`SpliceConn::gate`].
pub const GATE_STATE: u64 = 0xffff_ffff << 32;

/// Bit 32 of [`SpliceSide::ts_off`] and [`SpliceSide::next_seq`]: the
/// value in the low half is set (0 is a valid sequence number and offset).
pub const SET: u64 = 1 << 32;

/// [`SpliceConn::flags`]: the client sent FIN (bit 0) / the origin (bit 1).
pub const FLAG_FIN: [u64; 2] = [1, 2];
/// [`SpliceConn::flags`]: the client's FIN was acknowledged by the origin
/// (bit 2) / the origin's by the client (bit 3).
pub const FLAG_FIN_ACKED: [u64; 2] = [4, 8];
/// [`SpliceConn::flags`]: the client reset (bit 4) / the origin (bit 5).
pub const FLAG_RST: [u64; 2] = [16, 32];
/// [`SpliceConn::flags`]: both FINs were acknowledged.
pub const FLAGS_DONE: u64 = 4 | 8;

/// A TCP/IPv4 flow as it arrives at the proxy: the peer's address and port,
/// then the proxy socket's, all in network byte order, as in the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The peer's address.
    pub saddr: u32,
    /// The proxy socket's address.
    pub daddr: u32,
    /// The peer's port.
    pub sport: u16,
    /// The proxy socket's port.
    pub dport: u16,
}

/// Where a flow's session state is: `SPLICES[slot]`, and whose packets
/// the flow carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRef {
    /// Index into `SPLICES`.
    pub slot: u32,
    /// [`FROM_CLIENT`], [`FROM_ORIGIN`], or the proxy's own output to
    /// either ([`OWN_TO_CLIENT`], [`OWN_TO_ORIGIN`]), which is dropped once
    /// spliced: a frozen socket's retransmission or delayed ACK would
    /// otherwise reach a peer that now talks to the other one.
    pub side: u32,
}

/// [`FlowRef::side`]: packets from the client to the proxy.
pub const FROM_CLIENT: u32 = 0;
/// [`FlowRef::side`]: packets from the origin to the proxy.
pub const FROM_ORIGIN: u32 = 1;
/// [`FlowRef::side`]: the proxy's client socket's own packets.
pub const OWN_TO_CLIENT: u32 = 2;
/// [`FlowRef::side`]: the proxy's origin socket's own packets.
pub const OWN_TO_ORIGIN: u32 = 3;

/// The rewrite of the packets one peer sends: user space writes it whole
/// before the gate leaves OBSERVE, and leaves it alone afterwards.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceRewrite {
    /// Source address the rewritten packets carry: the proxy socket that
    /// faces the other peer (network order).
    pub saddr: u32,
    /// Destination: the other peer (network order).
    pub daddr: u32,
    /// Source and destination port as they lie in the header (network
    /// order, source first).
    pub ports: u32,
    /// Added to `seq`: this peer's sequence space onto the one the other
    /// peer expects (the proxy's other socket's). The other side's
    /// `seq_delta`, negated, maps this peer's `ack` and SACK blocks.
    pub seq_delta: u32,
    /// Window scale this peer announced: its window field is shifted by it.
    pub shift_in: u32,
    /// Window scale the other peer applies to the rewritten packets (the
    /// one the proxy's other socket announced to it).
    pub shift_out: u32,
    /// TCP timestamp clock (`TCP_TIMESTAMP`) of the proxy socket whose
    /// place the rewritten packets take, read at [`SpliceConn::snap_ns`].
    pub ts_base: u32,
    /// Non-zero: the session uses TCP timestamps.
    pub ts_on: u32,
    /// Non-zero: while ARMED, a packet from this peer that acknowledges
    /// `flip_ack` and starts at `next_seq` splices the session.
    pub flip: u32,
    /// What the proxy's socket facing this peer has sent (`write_seq`).
    pub flip_ack: u32,
    /// The interface the rewritten packets leave by: the route to the
    /// other peer. [`LOOPBACK_IFINDEX`] (or 0): to a peer on this host, up
    /// the stack (from `lo`) or out of `lo` (from another interface); any
    /// other: out of it, to the next hop.
    pub ifindex: u32,
    /// Padding made explicit.
    pub _pad: u32,
}

/// One peer's side of a session: the rewrite of its packets, and what the
/// kernel counts of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceSide {
    /// User space's part.
    pub rw: SpliceRewrite,
    /// Kernel: offset added to this peer's TSval, fixed by the first
    /// rewritten packet so that the other peer's clock check (PAWS) holds;
    /// bit 32 says it is set.
    pub ts_off: u64,
    /// Sequence number past the last payload byte passed or counted (low
    /// 32 bits; bit 32: set). While observed, the kernel records how far
    /// what it passed to the socket reaches; user space sets it to the
    /// socket's `rcv_nxt` with the rewrite, and the kernel counts on.
    pub next_seq: u64,
    /// Kernel: payload bytes this peer sent since the splice.
    pub bytes: u64,
    /// Kernel: `bpf_ktime_get_ns()` of the last packet with payload.
    pub last_ns: u64,
    /// Kernel: sequence number just past this peer's FIN (`seq + len + 1`).
    pub fin_end: u64,
}

/// The loopback interface's index, in every network namespace.
pub const LOOPBACK_IFINDEX: u64 = 1;

/// The `skb->mark` bit the ingress program sets on a packet it rewrote on
/// another interface and sends out of `lo` (to a peer on this host);
/// `lo`'s run of the program clears it and lets the packet by. It carries
/// the 4-tuple of the proxy's own socket, whose output the program would
/// otherwise drop. Policy routing rules on marks see it in the lookup.
pub const REDIRECTED_MARK: u32 = 1 << 29;

/// One spliced session.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceConn {
    /// State (high half: [`GATE_OBSERVE`], [`GATE_SPLICED`]) and the count
    /// of packets passed to the proxy's sockets while observing (low half).
    pub gate: u64,
    /// `CLOCK_MONOTONIC` of the snapshot the `ts_base` values were read at.
    pub snap_ns: u64,
    /// FIN, acknowledged FIN and RST bits ([`FLAG_FIN`] and friends).
    pub flags: u64,
    /// Indexed by the side the packets come from: 0 client, 1 origin.
    pub side: [SpliceSide; 2],
}

/// Why the splice program woke user space.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceEventKind {
    /// A peer reset: `side` says which.
    Reset = 1,
    /// Both FINs were acknowledged: the session is over.
    Done = 2,
    /// An armed session was spliced by the packet it waited for.
    Spliced = 3,
    /// A packet passed to a socket of an armed session: back to OBSERVE.
    Disarmed = 4,
}

/// One ring-buffer record of the splice program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceEvent {
    /// The session's slot.
    pub slot: u32,
    /// A [`SpliceEventKind`] as `u32`.
    pub kind: u32,
    /// The side the packet came from (0 client, 1 origin).
    pub side: u32,
    /// Padding made explicit.
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), made only of integers, with no padding.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceConn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceEvent {}
}
