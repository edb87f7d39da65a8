//! Configuration: a TOML file, the built-in default, or flags.
//!
//! ```toml
//! datapath = "auto"            # auto | tcpsplice | sockmap | uring | userspace
//! workers = 2                  # worker threads (default: one per CPU)
//!
//! [limits]
//! max_buffer_per_direction = 33554432  # bytes held in the proxy per direction
//! sockmap_max_queued = 268435456       # sockmap: hard limit (reset) if user space is too late (>= max_buffer_per_direction)
//! sockmap_max_connections = 32768      # sockmap: more connections fall back to uring
//! promote_after_ms = 200               # tcpsplice, sockmap, uring: user space first, the chosen path once this old and idle
//!
//! [timeouts]
//! handshake_ms = 10000         # client must send its request head within this
//! origin_connect_ms = 5000     # TCP connect to the origin (504 after it)
//! origin_response_ms = 10000   # origin's answer to the handshake (504 after it)
//!
//! [[listeners]]
//! listen = "127.0.0.1:8080"
//! origin = "127.0.0.1:9000"
//! reuse_port = false           # one SO_REUSEPORT socket per worker (opt-in)
//! ```
//!
//! A listener names one origin today; routes and origin pools will hang off
//! the listener (`[[listeners.routes]]`) without changing this shape.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::datapath::DataPathChoice;

/// A configuration that could not be read or does not hold.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type; the message names line and field.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message: line, column, and the offending key.
        message: String,
    },
    /// A value that parses but cannot work.
    #[error("{path}:{line}: field `{field}`: {reason}")]
    Invalid {
        /// The file (or `<flags>`).
        path: PathBuf,
        /// 1-based line of the field, or 0 when it has none (flags, defaults).
        line: usize,
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which data path carries the bytes after the 101.
    #[serde(default)]
    pub datapath: DataPathChoice,
    /// Memory limits.
    #[serde(default)]
    pub limits: Limits,
    /// Timeouts of the handshake phases.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Worker threads, each with its own runtime (default: one per CPU).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Listeners, each with its origin.
    pub listeners: Vec<Listener>,
}

/// Memory limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Upper bound of bytes the proxy holds for one direction of one
    /// connection in its socket buffers and user buffers. Every path applies
    /// backpressure to stay within it; on sockmap, a direction whose
    /// receiver falls a sixteenth of it behind (a stream) moves to user
    /// space.
    ///
    /// Default 32 MiB: what the host's TCP autotuning lets one direct
    /// connection hold (`tcp_rmem` max 32 MiB on Debian and here). The
    /// socket buffers get an eighth each, capped by `net.core.rmem_max`
    /// and `wmem_max`. Measured in full `cargo xtask bench` runs, W1 one
    /// way: 0.60× direct on sockmap and 0.65× on userspace at 8 MiB (1 MiB
    /// socket buffers); 0.74–0.85× and 0.77–0.82× at 32 MiB.
    pub max_buffer_per_direction: u64,
    /// On the sockmap path, the last resort: the kernel drops past this many
    /// bytes behind the receiver and the pair is reset (only if user space
    /// could not move the direction in time). At least
    /// `max_buffer_per_direction`, so the move to user space comes first.
    pub sockmap_max_queued: u64,
    /// How many connections the sockmap path carries at once; the next ones
    /// fall back to the next path (uring, then userspace), with a log line.
    pub sockmap_max_connections: u32,
    /// On the tcpsplice, sockmap and uring paths, a connection starts in the
    /// user-space relay and joins the chosen path once it is this old and
    /// both directions are idle at the same moment; 0 joins at the 101
    /// (tcpsplice: at the first idle moment).
    /// Joining and leaving the maps costs about 125-155 CPU-µs per session
    /// (W4 in `cargo xtask bench`), and a session on uring cost 1.26x
    /// nginx's proxy CPU against 1.10x once promoted: more than a short
    /// session spends relaying, so sessions shorter than this never pay it.
    /// Formerly `sockmap_promote_after_ms`, which is still read.
    #[serde(alias = "sockmap_promote_after_ms")]
    pub promote_after_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_buffer_per_direction: 32 << 20,
            sockmap_max_queued: 256 << 20,
            sockmap_max_connections: proxy_common::MAX_SOCKETS / 2,
            promote_after_ms: 200,
        }
    }
}

/// Timeouts of the handshake phases, in milliseconds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Time for the client to send a complete request head.
    pub handshake_ms: u64,
    /// Time to establish the TCP connection to the origin.
    pub origin_connect_ms: u64,
    /// Time for the origin to answer the forwarded handshake.
    pub origin_response_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake_ms: 10_000,
            origin_connect_ms: 5_000,
            origin_response_ms: 10_000,
        }
    }
}

impl Timeouts {
    /// `handshake_ms` as a duration.
    pub fn handshake(&self) -> Duration {
        Duration::from_millis(self.handshake_ms)
    }
    /// `origin_connect_ms` as a duration.
    pub fn origin_connect(&self) -> Duration {
        Duration::from_millis(self.origin_connect_ms)
    }
    /// `origin_response_ms` as a duration.
    pub fn origin_response(&self) -> Duration {
        Duration::from_millis(self.origin_response_ms)
    }
}

/// One listening socket and where its WebSocket sessions go.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Address and port to accept clients on.
    pub listen: SocketAddr,
    /// The origin (host:port) that receives the sessions.
    pub origin: SocketAddr,
    /// One `SO_REUSEPORT` socket per worker (like nginx's `reuseport`):
    /// the kernel spreads new connections by hash and wakes only that
    /// worker. Off by default, because then a second daemon on the same
    /// port (same user) binds without an error and takes half the traffic.
    #[serde(default)]
    pub reuse_port: bool,
}

impl Default for Config {
    /// The built-in default: 127.0.0.1:8080 in front of 127.0.0.1:9000.
    fn default() -> Self {
        Config {
            datapath: DataPathChoice::Auto,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            workers: None,
            listeners: vec![Listener {
                listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                origin: SocketAddr::from(([127, 0, 0, 1], 9000)),
                reuse_port: false,
            }],
        }
    }
}

impl Config {
    /// Reads and checks a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and checks TOML text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.check(path, text)
    }

    /// Checks what the types cannot, for a configuration built from flags.
    pub fn validate(self, origin: &Path) -> Result<Config, ConfigError> {
        self.check(origin, "")
    }

    fn check(self, path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |field: &str, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(text, field),
            field: field.to_string(),
            reason: reason.to_string(),
        };
        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is needed"));
        }
        if self.workers.is_some_and(|w| !(1..=1024).contains(&w)) {
            return Err(invalid("workers", "must be between 1 and 1024"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if self.listeners[..i].iter().any(|o| o.listen == l.listen) {
                return Err(invalid(
                    &format!("listeners[{i}].listen"),
                    &format!("{} is already used by another listener", l.listen),
                ));
            }
        }
        if self.limits.sockmap_max_queued < (1 << 20) {
            return Err(invalid(
                "limits.sockmap_max_queued",
                "must be at least 1048576 bytes",
            ));
        }
        if self.limits.sockmap_max_queued < self.limits.max_buffer_per_direction {
            // A direction moves to user space well within max_buffer; below
            // it the hard limit could trip first and reset a bulk transfer
            // whose receiver falls behind before user space looks.
            return Err(invalid(
                "limits.sockmap_max_queued",
                &format!(
                    "must be at least limits.max_buffer_per_direction ({})",
                    self.limits.max_buffer_per_direction
                ),
            ));
        }
        let most = proxy_common::MAX_SOCKETS / 2;
        if !(1..=most).contains(&self.limits.sockmap_max_connections) {
            return Err(invalid(
                "limits.sockmap_max_connections",
                &format!("must be between 1 and {most} (two sockets each)"),
            ));
        }
        if self.limits.promote_after_ms > 86_400_000 {
            // Named as the file spells it (the old name is still read).
            let field = if line_of(text, "sockmap_promote_after_ms") > 0 {
                "limits.sockmap_promote_after_ms"
            } else {
                "limits.promote_after_ms"
            };
            return Err(invalid(field, "must be at most 86400000 (one day)"));
        }
        if self.limits.max_buffer_per_direction < (256 << 10) {
            return Err(invalid(
                "limits.max_buffer_per_direction",
                "must be at least 262144 bytes",
            ));
        }
        for (field, v) in [
            ("timeouts.handshake_ms", self.timeouts.handshake_ms),
            (
                "timeouts.origin_connect_ms",
                self.timeouts.origin_connect_ms,
            ),
            (
                "timeouts.origin_response_ms",
                self.timeouts.origin_response_ms,
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        Ok(self)
    }
}

/// Best-effort line of a dotted field (`a.b`, `listeners[2].listen`): the
/// line of the matching occurrence of its last key, 0 when not found.
fn line_of(text: &str, field: &str) -> usize {
    let last = field.rsplit('.').next().unwrap_or(field);
    let (key, nth) = match last.split_once('[') {
        Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().unwrap_or(0)),
        None => (last, 0),
    };
    // For `listeners[i].listen` count occurrences of `listen`, the i-th one.
    let nth = if field.contains("].") {
        field
            .split_once('[')
            .and_then(|(_, r)| r.split_once(']'))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(nth)
    } else {
        nth
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
                || l.trim_start_matches('[').trim_end_matches(']') == key
        })
        .nth(nth)
        .map_or(0, |(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let cfg = Config::from_toml(
            r#"
datapath = "uring"
[limits]
max_buffer_per_direction = 1048576
[timeouts]
origin_connect_ms = 100
[[listeners]]
listen = "127.0.0.1:1"
origin = "127.0.0.1:2"
reuse_port = true
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(cfg.datapath, DataPathChoice::Uring);
        assert_eq!(cfg.limits.max_buffer_per_direction, 1 << 20);
        assert_eq!(cfg.timeouts.origin_connect_ms, 100);
        assert_eq!(cfg.timeouts.origin_response_ms, 10_000);
        assert_eq!(cfg.listeners[0].origin.port(), 2);
        assert!(cfg.listeners[0].reuse_port);
        assert!(!Config::default().listeners[0].reuse_port);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let err = Config::from_toml(
            "[[listeners]]\nlisten = \"127.0.0.1:1\"\norigin = \"nowhere\"\n",
            Path::new("sluice.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("sluice.toml: "), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("origin"), "{err}");

        let err = Config::from_toml("datapath = \"fast\"\nlisteners = []\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("datapath"), "{err}");

        let err = Config::from_toml("bogus = 1\nlisteners = []\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        const ONE: &str = "[[listeners]]\nlisten = \"127.0.0.1:1\"\norigin = \"127.0.0.1:2\"\n";
        let cases = [
            (
                "[limits]\nmax_buffer_per_direction = 10\n",
                "b.toml:2: field `limits.max_buffer_per_direction`",
            ),
            (
                "[limits]\nsockmap_max_queued = 16777216\n",
                "b.toml:2: field `limits.sockmap_max_queued`: must be at least limits.max_buffer_per_direction (33554432)",
            ),
            (
                "[limits]\nsockmap_max_connections = 0\n",
                "b.toml:2: field `limits.sockmap_max_connections`: must be between 1 and 32768",
            ),
            (
                "datapath = \"uring\"\n[limits]\npromote_after_ms = 100000000\n",
                "b.toml:3: field `limits.promote_after_ms`: must be at most",
            ),
            (
                "datapath = \"sockmap\"\n[limits]\nsockmap_promote_after_ms = 100000000\n",
                "b.toml:3: field `limits.sockmap_promote_after_ms`: must be at most",
            ),
            (
                "[[listeners]]\nlisten = \"127.0.0.1:1\"\norigin = \"127.0.0.1:3\"\n",
                "b.toml:5: field `listeners[1].listen`",
            ),
        ];
        for (head, want) in cases {
            // The duplicate-listener case puts its listener first.
            let text = if head.starts_with("[[listeners]]") {
                format!("{ONE}{head}")
            } else {
                format!("{head}{ONE}")
            };
            let err = Config::from_toml(&text, Path::new("b.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{text}\n=> {err}");
        }
        let err = Config::from_toml("listeners = []\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `listeners`"), "{err}");
    }
}
