//! The data paths that carry bytes after the 101, and the choice between them.
//!
//! | path | needs | how |
//! |---|---|---|
//! | `tcpsplice` | Linux 5.17+ (TCX from 6.6), CAP_BPF + CAP_NET_ADMIN (or root), IPv4, peers on this host or behind Ethernet interfaces (not a client on this host with an origin elsewhere) | once idle, a tc program joins the two TCP connections at the packet level: the proxy's sockets leave the byte path ([`tcpsplice`]) |
//! | `sockmap` | Linux 5.19+, CAP_BPF + CAP_NET_ADMIN (or root) | eBPF sk_skb verdict redirects socket to socket |
//! | `uring` | Linux 5.11+ (5.19+ for `COOP_TASKRUN`, 5.7+ for splices), io_uring not disabled | each worker's io_uring runtime; read/write, or while a direction streams, `IORING_OP_SPLICE` through a pooled pipe in chains an io-wq worker runs |
//! | `userspace` | anything (`splice`: Linux 2.6.17+) | tokio; a read into the worker's scratch buffer, or `splice` through a pooled pipe while a direction streams |
//!
//! `auto` takes `tcpsplice` when it loads, and `userspace` otherwise (and
//! says why in the ready line). In `cargo xtask bench` a spliced session
//! cost what a direct connection costs: in full runs P and Q, W2 at
//! 1,000 × 64 B ran 0.82-0.99x direct's rate and 2.10-2.19x nginx's,
//! adding 0.5-4.3 CPU-µs per message over direct against nginx's 27-30;
//! W1 ran 1.04x / 1.06x direct in Q (one way / both ways). Sessions it cannot join (too short, busy both ways without
//! a pause, a peer on another host) stay in the user-space relay, which is
//! what `auto` ran before. Of the rest, `userspace` moved bulk fastest
//! (one way 0.67-0.73x direct, both ways 0.57-0.67x, against 0.54-0.67x
//! and 0.48-0.55x on uring and 0.63-0.72x and 0.52-0.57x on sockmap) at the
//! least CPU per MiB (410-430 µs against 420-518), and ran handshakes and
//! echoes within the noise of the others (runs E to G; the uring figures
//! predate its splices, see [`uring`]). `sockmap` bulk falls behind and
//! leaves the kernel within a few MiB (see [`sockmap`]); it costs more
//! per new session when sessions join the maps at the 101 (449-488 against 324-332 CPU-µs, an
//! earlier run), and ran 0.81-1.03x userspace at 100 and 1,000 echo
//! connections; choose it explicitly. On `tcpsplice`, `sockmap` and
//! `uring`, a connection starts in the user-space relay and joins the
//! chosen path once it is `limits.promote_after_ms` old and idle both ways
//! ([`userspace::relay_until_idle`]), so short sessions cost what they
//! cost on `userspace`: joining costs more than they spend relaying (W4,
//! quick runs side by side with nginx, 4 alternating rounds of 3
//! repetitions: uring from the 101 ran 0.81x nginx's sessions/s at 1.26x
//! its proxy CPU per session, uring after promotion 0.87x at 1.10x;
//! medians). A connection that cannot join the chosen path falls back to
//! the next (sockmap, then uring, then userspace; tcpsplice to userspace).

pub mod ebpf;
mod pipe;
mod route;
mod shared_map;
pub mod sockmap;
pub mod tcpsplice;
pub mod uring;
mod uring_splice;
pub mod userspace;

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::accounting::Accounting;
use crate::config::Limits;

/// The configured choice (`datapath = "..."`, `--datapath`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataPathChoice {
    /// Probe and take the best available: tcpsplice, else userspace.
    #[default]
    Auto,
    /// eBPF sockmap redirection in the kernel.
    Sockmap,
    /// io_uring relay.
    Uring,
    /// Plain user-space relay.
    Userspace,
    /// The two TCP connections joined at the packet level by a tc program.
    Tcpsplice,
}

/// A data path that is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// eBPF sockmap redirection in the kernel.
    Sockmap,
    /// io_uring relay.
    Uring,
    /// Plain user-space relay.
    Userspace,
    /// The two TCP connections joined at the packet level by a tc program.
    Tcpsplice,
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataPath::Sockmap => "sockmap",
            DataPath::Uring => "uring",
            DataPath::Userspace => "userspace",
            DataPath::Tcpsplice => "tcpsplice",
        })
    }
}

/// One end of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client socket.
    Client,
    /// The origin socket.
    Origin,
}

impl Side {
    /// The other side.
    pub fn flip(self) -> Side {
        match self {
            Side::Client => Side::Origin,
            Side::Origin => Side::Client,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Origin => "origin",
        })
    }
}

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions closed with FIN after all bytes were delivered.
    Done,
    /// One side reset or failed; the other side was reset too.
    Reset(Side),
    /// Sluice could not go on (a kernel facility failed mid-connection).
    Internal(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Done => f.write_str("closed"),
            CloseReason::Reset(s) => write!(f, "reset by {s}"),
            CloseReason::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

/// The two sockets after the 101, with the bytes that were read ahead of the
/// upgrade on each (they must be delivered first, in order).
#[derive(Debug)]
pub struct Pair {
    /// The client connection.
    pub client: TcpStream,
    /// Bytes the client sent after its request head (for the origin).
    pub client_ahead: Bytes,
    /// The origin connection.
    pub origin: TcpStream,
    /// Bytes the origin sent after its 101 (for the client).
    pub origin_ahead: Bytes,
}

/// The close phase of one connection: called once, with the path that
/// carried it and how it ended, by whichever task ends it.
pub type OnClose = Box<dyn FnOnce(DataPath, CloseReason) + Send>;

/// A connection that could not join a data path, handed back untouched
/// (its read-ahead bytes still pending) so the next path can take it.
#[derive(Debug)]
pub struct Fallback {
    /// The connection.
    pub pair: Pair,
    /// Why it could not join, or why it left.
    pub why: String,
    /// The path let it go by design (say, sockmap's pair whose directions
    /// both stream in user space), not because something failed.
    pub planned: bool,
}

impl Fallback {
    /// Boxes a fallback (it travels in an `Err`, which should stay small).
    pub fn new(pair: Pair, why: impl Into<String>) -> Box<Fallback> {
        Box::new(Fallback {
            pair,
            why: why.into(),
            planned: false,
        })
    }

    /// A connection a path hands on by design, mid-way through its life.
    pub fn planned(pair: Pair, why: impl Into<String>) -> Box<Fallback> {
        Box::new(Fallback {
            pair,
            why: why.into(),
            planned: true,
        })
    }
}

/// The data paths available in this process, and the one in use.
pub struct DataPaths {
    /// The chosen path.
    pub primary: DataPath,
    /// Why it was chosen (logged at start).
    pub why: String,
    sockmap: Option<Arc<sockmap::Sockmap>>,
    uring: Option<uring::UringRelay>,
    tcpsplice: Option<Arc<tcpsplice::TcpSplice>>,
    /// `limits.promote_after_ms`.
    promote_after: std::time::Duration,
}

impl DataPaths {
    /// Probes and starts the configured path. An explicit choice that is not
    /// available is an error; `auto` falls back and says why.
    /// Must run inside the tokio runtime (the sockmap path starts tasks).
    pub fn start(choice: DataPathChoice, limits: &Limits) -> Result<DataPaths, String> {
        let sockmap = if choice == DataPathChoice::Sockmap {
            Some(
                sockmap::Sockmap::load(
                    limits.max_buffer_per_direction,
                    limits.sockmap_max_queued,
                    limits.sockmap_max_connections,
                )
                .map_err(|e| format!("datapath sockmap is not available: {e}"))?,
            )
        } else {
            None
        };
        // Chosen, or `auto`'s first choice when it can load.
        let tcpsplice = match choice {
            DataPathChoice::Tcpsplice => Ok(tcpsplice::TcpSplice::load()
                .map_err(|e| format!("datapath tcpsplice is not available: {e}"))?),
            DataPathChoice::Auto => tcpsplice::TcpSplice::load().map_err(|e| first_line(&e)),
            _ => Err("not wanted".to_string()),
        };
        // The uring relay runs when it is chosen, or as sockmap's fallback.
        let uring = match choice {
            DataPathChoice::Uring | DataPathChoice::Sockmap => {
                uring::UringRelay::start(limits.max_buffer_per_direction)
            }
            DataPathChoice::Auto | DataPathChoice::Userspace | DataPathChoice::Tcpsplice => {
                Err("not wanted".to_string())
            }
        };
        if choice == DataPathChoice::Uring {
            if let Err(e) = &uring {
                return Err(format!("datapath uring is not available: {e}"));
            }
        }
        let (primary, why) = match choice {
            DataPathChoice::Sockmap => (DataPath::Sockmap, "configured sockmap".to_string()),
            DataPathChoice::Auto => match &tcpsplice {
                Ok(_) => (
                    DataPath::Tcpsplice,
                    format!("auto: tcpsplice measured fastest (cargo xtask bench); {SPLICE_SCOPE}"),
                ),
                Err(e) => {
                    let uring_state = match uring::probe() {
                        Ok(_) => "available".to_string(),
                        Err(e) => format!("unavailable: {e}"),
                    };
                    (
                        DataPath::Userspace,
                        format!(
                            "auto: tcpsplice is not available ({e}); userspace measured \
                             fastest of the rest (cargo xtask bench); io_uring {uring_state}, \
                             opt-in; sockmap opt-in (more CPU per MiB and per session)"
                        ),
                    )
                }
            },
            DataPathChoice::Uring => (DataPath::Uring, "configured uring".to_string()),
            DataPathChoice::Userspace => (DataPath::Userspace, "configured userspace".to_string()),
            DataPathChoice::Tcpsplice => (
                DataPath::Tcpsplice,
                format!("configured tcpsplice; {SPLICE_SCOPE}"),
            ),
        };
        Ok(DataPaths {
            primary,
            why,
            sockmap,
            uring: uring.ok(),
            tcpsplice: tcpsplice.ok(),
            promote_after: std::time::Duration::from_millis(limits.promote_after_ms),
        })
    }

    /// Whether sockets get their buffer bound only after the TCP handshake
    /// (tcpsplice), not before it. A receive buffer set before the handshake
    /// caps the window scale the socket announces (7 for the default bound,
    /// against 10 for a socket left to autotuning here), and a spliced
    /// session passes the peers' windows through that scale: the origin's
    /// window, clamped to 8 MiB for the client, held one-way bulk to a third
    /// of a direct connection's rate (the sender was receive-window-limited
    /// 66% of its busy time, `ss -ti` in the bench's namespace).
    pub fn bound_after_handshake(&self) -> bool {
        self.primary == DataPath::Tcpsplice
    }

    /// Whether the tcpsplice path is loaded: sessions may be spliced.
    pub fn splices(&self) -> bool {
        self.tcpsplice.is_some()
    }

    /// Whether worker threads should run tokio-uring runtimes: io_uring is
    /// this daemon's primary path or sockmap's fallback, and it probed fine.
    pub fn uring_on_workers(&self) -> bool {
        self.uring.is_some()
    }

    /// Tells the paths that this daemon accepts on `port` (after binding,
    /// before accepting): the sockmap path arms those sockets so that a slow
    /// direction can leave the kernel safely.
    pub fn serve_port(&self, port: u16) -> Result<(), String> {
        match &self.sockmap {
            Some(sm) => sm
                .serve_port(port)
                .map_err(|e| format!("sockmap cannot watch port {port}: {e}")),
            None => Ok(()),
        }
    }

    /// Relays one connection on the primary path, falling back to the next
    /// path if the connection cannot join it, and calls `closed` with the
    /// path that carried it and how it ended. Each path's future is boxed:
    /// inline, every connection's task would be as large as the largest
    /// path's state (sockmap's), whichever path carries it.
    ///
    /// On the io_uring path this returns once the connection joins it: the
    /// relay's futures are not `Send`, so they run in a task of their own,
    /// which calls `closed`, and the caller's task can end instead of
    /// waiting beside it (W3 counts both per idle connection).
    pub async fn relay(&self, pair: Pair, acct: Arc<Accounting>, closed: OnClose) {
        let mut pair = pair;
        if let Some(ts) = &self.tcpsplice {
            match Box::pin(self.splice(ts, pair, &acct)).await {
                Ok((path, reason)) => return closed(path, reason),
                Err(p) => pair = p,
            }
        }
        // Joining sockmap or uring costs more per session than a short
        // session spends relaying: such sessions stay in user space.
        let joins = match self.primary {
            DataPath::Sockmap => self.sockmap.is_some(),
            DataPath::Uring => self.uring.is_some(),
            // A session tcpsplice could not take stays in user space.
            DataPath::Userspace | DataPath::Tcpsplice => false,
        };
        if joins && !self.promote_after.is_zero() {
            let first = userspace::relay_until_idle(pair, acct.clone(), self.promote_after);
            match Box::pin(first).await {
                Ok(reason) => return closed(DataPath::Userspace, reason),
                Err(p) => pair = p,
            }
        }
        if self.primary == DataPath::Sockmap {
            if let Some(sm) = &self.sockmap {
                match Box::pin(sm.relay(pair, acct.clone())).await {
                    Ok(reason) => return closed(DataPath::Sockmap, reason),
                    Err(f) if f.planned => {
                        tracing::info!(
                            "connection leaves sockmap for the {} relay: {}",
                            if self.uring_here().is_some() {
                                "io_uring"
                            } else {
                                "user-space"
                            },
                            f.why
                        );
                        // The close line names the path the session joined;
                        // sockmap's own lines said when its directions moved.
                        let closed: OnClose = Box::new(move |_, r| closed(DataPath::Sockmap, r));
                        return self.relay_rest(f.pair, acct, closed).await;
                    }
                    Err(f) => {
                        tracing::warn!("connection falls back from sockmap: {}", f.why);
                        pair = f.pair;
                    }
                }
            }
        }
        self.relay_rest(pair, acct, closed).await
    }

    /// The rest of a connection that the chosen path did not take, or let
    /// go: on io_uring where the chosen path falls back to it, else in the
    /// user-space relay.
    async fn relay_rest(&self, pair: Pair, acct: Arc<Accounting>, closed: OnClose) {
        if let Some(u) = self.uring_here() {
            return u.spawn(pair, acct, closed);
        }
        if matches!(self.primary, DataPath::Sockmap | DataPath::Uring) && self.uring.is_some() {
            tracing::warn!("connection falls back from uring: this worker has no io_uring runtime");
        }
        let reason = Box::pin(userspace::relay(pair, acct)).await;
        closed(DataPath::Userspace, reason)
    }

    /// The io_uring relay that [`Self::relay_rest`] hands a connection to
    /// on this worker: when the chosen path is uring or falls back to it,
    /// and this worker runs a ring.
    fn uring_here(&self) -> Option<&uring::UringRelay> {
        let u = self.uring.as_ref()?;
        (matches!(self.primary, DataPath::Sockmap | DataPath::Uring) && u.here()).then_some(u)
    }

    /// The tcpsplice path: the user-space relay carries the session, and
    /// at each idle moment past the promotion time it tries to join (see
    /// [`tcpsplice`]). `Err`: this session cannot be spliced; the pair goes
    /// to the user-space relay.
    async fn splice(
        &self,
        ts: &Arc<tcpsplice::TcpSplice>,
        mut pair: Pair,
        acct: &Arc<Accounting>,
    ) -> Result<(DataPath, CloseReason), Pair> {
        let mut obs = None;
        let mut wait = self.promote_after;
        let mut backoff = std::time::Duration::ZERO;
        loop {
            match userspace::relay_until_idle(pair, acct.clone(), wait).await {
                Ok(reason) => return Ok((DataPath::Userspace, reason)),
                Err(p) => pair = p,
            }
            match ts.relay(pair, &mut obs, acct).await {
                Ok(reason) => return Ok((DataPath::Tcpsplice, reason)),
                Err(tcpsplice::NotJoined::Grace(p)) => {
                    pair = p;
                    wait = tcpsplice::GRACE_WAIT;
                }
                Err(tcpsplice::NotJoined::Later(p)) => {
                    pair = p;
                    // Bytes moved at the last moment: a busy session tries
                    // less and less often, down to ten times a second (most
                    // such tries end at the first look: six ioctls).
                    backoff = (backoff * 2).clamp(SPLICE_RETRY_MIN, SPLICE_RETRY_MAX);
                    wait = backoff;
                }
                Err(tcpsplice::NotJoined::Never(p, why)) => {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(|| {
                        tracing::info!("a session stays in user space: {why} (logged once)")
                    });
                    tracing::debug!("session stays in user space: {why}");
                    return Err(p);
                }
            }
        }
    }
}

/// The first line of an error, for a log line (a verifier's output can run
/// to thousands).
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Which sessions tcpsplice joins, for the ready line.
const SPLICE_SCOPE: &str = "IPv4 sessions whose peers are on this host or behind its Ethernet \
     interfaces join once idle (not a client on this host with an origin elsewhere); others stay \
     in user space";

/// The first wait before a session whose bytes moved tries to splice again.
const SPLICE_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(10);
/// The longest wait between two tries: a session that paused for longer
/// (a quarter of a second, say, after a burst) is tried within it.
const SPLICE_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(100);
