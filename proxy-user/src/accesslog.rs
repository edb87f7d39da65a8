//! Access log lines: one when a session is upgraded or refused, one when
//! it closes.
//!
//! Formatted by hand in the layout of the daemon's other log lines
//! (`tracing_subscriber::fmt`'s default: `<RFC 3339 time>  INFO access:
//! <message> key=value ...`), in a buffer per thread, with the date and
//! time of day formatted once a second (by `humantime`), and appended to
//! the daemon's batch writer. Through `tracing`'s formatter the two lines
//! of a session cost W4 a tenth of its handshakes per second (see the
//! README). Lines are written when the log filter (`--log`, `RUST_LOG`)
//! enables target `access` at level INFO, as before.

use std::cell::{Cell, RefCell};
use std::fmt::Display;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::ProxyError;
use crate::logwriter::BatchWriter;

static OUT: OnceLock<BatchWriter> = OnceLock::new();

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
    /// The second last formatted, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// Sends access lines to `out` from now on, if the installed `tracing`
/// filter enables target `access` at INFO; returns whether it does. Call
/// once, after the subscriber is installed. Until then no line is written.
pub fn install(out: BatchWriter) -> bool {
    let on = tracing::enabled!(target: "access", tracing::Level::INFO);
    if on {
        let _ = OUT.set(out);
    }
    on
}

/// The 101 went to the client: the session is handed to a data path.
pub fn upgraded(peer: SocketAddr, path: &str, origin: SocketAddr, protocol: &str) {
    emit(|l| {
        l.message("upgraded");
        l.display("peer", peer);
        l.quoted("path", path);
        l.display("origin", origin);
        l.quoted("protocol", protocol);
        l.display("status", 101);
    });
}

/// The origin answered the upgrade with `status`, which goes to the client.
pub fn not_upgraded(peer: SocketAddr, path: &str, status: u16) {
    emit(|l| {
        l.message("origin refused the upgrade");
        l.display("peer", peer);
        l.quoted("path", path);
        l.display("status", status);
    });
}

/// Sluice refused the session with `e`'s status.
pub fn refused(peer: SocketAddr, path: &str, e: &ProxyError) {
    emit(|l| {
        l.message(format_args!("refused: {}", e.reason));
        l.display("peer", peer);
        l.quoted("path", path);
        l.display("status", e.status.as_u16());
        l.display("source", e.source_side);
        l.quoted("phase", e.phase);
        l.display("retry_safe", e.retry_safe);
    });
}

/// What the close line says about a session.
pub struct Closed<'a> {
    /// The client.
    pub peer: SocketAddr,
    /// The request path.
    pub path: &'a str,
    /// The data path that carried the bytes.
    pub datapath: &'a dyn Display,
    /// Bytes from the client to the origin.
    pub bytes_in: u64,
    /// Bytes from the origin to the client.
    pub bytes_out: u64,
    /// From the hand-off to the close.
    pub duration_ms: u64,
    /// Why it closed.
    pub reason: &'a dyn Display,
}

/// The session closed.
pub fn closed(c: &Closed<'_>) {
    emit(|l| {
        l.message(format_args!("closed: {}", c.reason));
        l.display("peer", c.peer);
        l.quoted("path", c.path);
        l.display("datapath", c.datapath);
        l.display("bytes_in", c.bytes_in);
        l.display("bytes_out", c.bytes_out);
        l.display("duration_ms", c.duration_ms);
    });
}

/// Builds one line in this thread's buffer and appends it to the output.
fn emit(fill: impl FnOnce(&mut Line<'_>)) {
    let Some(out) = OUT.get() else { return };
    LINE.with_borrow_mut(|buf| {
        buf.clear();
        timestamp(buf, SystemTime::now());
        buf.extend_from_slice(b"  INFO access: ");
        fill(&mut Line { buf });
        buf.push(b'\n');
        out.append(buf);
    });
}

/// A line being built. Writes into a `Vec` cannot fail.
struct Line<'a> {
    buf: &'a mut Vec<u8>,
}

impl Line<'_> {
    fn message(&mut self, m: impl Display) {
        let _ = write!(self.buf, "{m}");
    }

    fn display(&mut self, key: &str, v: impl Display) {
        let _ = write!(self.buf, " {key}={v}");
    }

    /// A string the way `tracing` shows one: quoted, escaped as `Debug`.
    fn quoted(&mut self, key: &str, v: &str) {
        let _ = write!(self.buf, " {key}={v:?}");
    }
}

/// Writes `t` as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (UTC).
fn timestamp(buf: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (cached, text) = SECOND.get();
    let text = if cached == secs {
        text
    } else {
        let text = civil(t);
        SECOND.set((secs, text));
        text
    };
    buf.extend_from_slice(&text);
    let _ = write!(buf, ".{:06}Z", d.subsec_micros());
}

/// `YYYY-MM-DDTHH:MM:SS` of `t` (UTC).
fn civil(t: SystemTime) -> [u8; 19] {
    // humantime writes `YYYY-MM-DDTHH:MM:SSZ`.
    let mut full = [0u8; 20];
    let _ = write!(&mut full[..], "{}", humantime::format_rfc3339_seconds(t));
    let mut out = [0u8; 19];
    out.copy_from_slice(&full[..19]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_dates_match_date_1() {
        // From `date -u -d @<secs> +%Y-%m-%dT%H:%M:%S`.
        for (secs, want) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_164_800, "2024-02-29T00:00:00"),
            (1_795_306_370, "2026-11-22T00:12:50"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(std::str::from_utf8(&civil(t)).unwrap(), want);
        }
    }

    #[test]
    fn a_timestamp_has_microseconds_and_the_cached_second_follows_the_clock() {
        let t = UNIX_EPOCH + Duration::new(1_795_306_370, 123_456_789);
        let mut buf = Vec::new();
        timestamp(&mut buf, t);
        assert_eq!(buf, b"2026-11-22T00:12:50.123456Z");
        buf.clear();
        timestamp(&mut buf, t + Duration::from_secs(1));
        assert_eq!(buf, b"2026-11-22T00:12:51.123456Z");
    }

    #[test]
    fn fields_are_written_like_tracing_writes_them() {
        let mut buf = Vec::new();
        let mut l = Line { buf: &mut buf };
        l.message(format_args!("closed: {}", "closed"));
        l.display("peer", "127.0.0.1:4000".parse::<SocketAddr>().unwrap());
        l.quoted("path", "/a \"b\"\n");
        l.display("bytes_in", 42u64);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"closed: closed peer=127.0.0.1:4000 path="/a \"b\"\n" bytes_in=42"#
        );
    }
}
