//! The RFC 6455 section 4 opening handshake: parsing, checks, and the request
//! forwarded to the origin.
//!
//! Pure functions over bytes, so they can be unit-tested, fuzzed
//! (`proxy-user/fuzz`) and benchmarked (`benches/handshake.rs`) without
//! sockets. httparse does the parsing; a parsed head borrows the read buffer,
//! so nothing is allocated per header. [`crate::lifecycle`] calls them in the
//! handshake and upgrade phases.

use std::io::Write;
use std::net::SocketAddr;

use base64::Engine;
use http::StatusCode;
use httparse::{Header, Status};
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the key before hashing.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest request or response head accepted; a larger request gets 431.
pub const MAX_HEAD: usize = 8192;

/// Most header fields in one head (hyper's and Go's default is 100).
pub const MAX_HEADERS: usize = 100;

/// A handshake that Sluice refuses, with the status and a short reason that
/// goes into the response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// Status to answer with.
    pub status: StatusCode,
    /// One line saying why.
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Reject {
    Reject {
        status: StatusCode::BAD_REQUEST,
        reason,
    }
}

const fn bad_gw(reason: &'static str) -> Reject {
    Reject {
        status: StatusCode::BAD_GATEWAY,
        reason,
    }
}

/// A parsed request head; borrows the read buffer.
#[derive(Debug)]
pub struct RequestHead<'h, 'b> {
    /// The method, as sent.
    pub method: &'b str,
    /// The request target, as sent (path and query).
    pub target: &'b str,
    /// The minor version: 1 for HTTP/1.1.
    pub version: u8,
    /// The header fields, in order, names as sent.
    pub headers: &'h [Header<'b>],
    /// Length of the head in bytes; what follows is the client's.
    pub len: usize,
}

/// A parsed response head; borrows the read buffer.
#[derive(Debug)]
pub struct ResponseHead<'h, 'b> {
    /// The status code.
    pub code: u16,
    /// The reason phrase, as sent.
    pub reason: &'b str,
    /// The header fields, in order, names as sent.
    pub headers: &'h [Header<'b>],
    /// Length of the head in bytes; what follows is the origin's.
    pub len: usize,
}

/// Parses a request head. `Ok(None)`: incomplete, read more. A head that
/// would not fit in [`MAX_HEAD`] is refused with 431.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [Header<'b>],
) -> Result<Option<RequestHead<'h, 'b>>, Reject> {
    let mut req = httparse::Request::new(storage);
    match req.parse(buf) {
        Ok(Status::Complete(len)) => Ok(Some(RequestHead {
            method: req.method.unwrap_or(""),
            target: req.path.unwrap_or(""),
            version: req.version.unwrap_or(0),
            headers: req.headers,
            len,
        })),
        Ok(Status::Partial) if buf.len() >= MAX_HEAD => Err(Reject {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason: "request head larger than 8 KiB",
        }),
        Ok(Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(Reject {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason: "more than 100 header fields",
        }),
        Err(httparse::Error::Version) => Err(bad("not an HTTP/1.x request")),
        Err(_) => Err(bad("malformed request head")),
    }
}

/// Parses a response head. `Ok(None)`: incomplete, read more. Errors are
/// the origin's: 502.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [Header<'b>],
) -> Result<Option<ResponseHead<'h, 'b>>, Reject> {
    let mut resp = httparse::Response::new(storage);
    match resp.parse(buf) {
        Ok(Status::Complete(len)) => Ok(Some(ResponseHead {
            code: resp.code.unwrap_or(0),
            reason: resp.reason.unwrap_or(""),
            headers: resp.headers,
            len,
        })),
        Ok(Status::Partial) if buf.len() >= MAX_HEAD => {
            Err(bad_gw("origin's response head is larger than 8 KiB"))
        }
        Ok(Status::Partial) => Ok(None),
        Err(_) => Err(bad_gw("origin sent a malformed response head")),
    }
}

/// What the handshake phase keeps from a valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsRequest {
    /// `Sec-WebSocket-Key`, to check the origin's `Sec-WebSocket-Accept`.
    pub key: String,
    /// Subprotocols the client offered, in order.
    pub protocols: Vec<String>,
}

/// The values of every field named `name` (case-insensitive), in order.
fn values<'h, 'b: 'h>(
    headers: &'h [Header<'b>],
    name: &'h str,
) -> impl Iterator<Item = &'b [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The comma-separated tokens of every field named `name`, trimmed.
fn tokens<'h, 'b: 'h>(
    headers: &'h [Header<'b>],
    name: &'h str,
) -> impl Iterator<Item = &'b str> + 'h {
    values(headers, name)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// True if `name` lists `token` (comma-separated, case-insensitive).
fn has_token(headers: &[Header<'_>], name: &str, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// The one value of `name`, trimmed. `Err`: more than one, or not UTF-8.
fn single<'b>(headers: &[Header<'b>], name: &str) -> Result<Option<&'b str>, ()> {
    let mut all = values(headers, name);
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(());
    }
    std::str::from_utf8(first)
        .map(|s| Some(s.trim()))
        .map_err(|_| ())
}

/// Checks a client's upgrade request against RFC 6455 section 4.2.1.
pub fn check_request(head: &RequestHead<'_, '_>) -> Result<WsRequest, Reject> {
    let headers = head.headers;
    if values(headers, "upgrade").next().is_none() {
        return Err(bad("not a WebSocket upgrade: no Upgrade header"));
    }
    if head.method != "GET" {
        return Err(bad("a WebSocket handshake must use GET"));
    }
    if head.version != 1 {
        return Err(bad("a WebSocket handshake must use HTTP/1.1"));
    }
    match single(headers, "host") {
        Ok(Some(h)) if !h.is_empty() => {}
        Ok(_) => return Err(bad("missing Host header")),
        Err(()) => return Err(bad("more than one Host header")),
    }
    if !has_token(headers, "upgrade", "websocket") {
        return Err(bad("Upgrade header does not name websocket"));
    }
    if !has_token(headers, "connection", "upgrade") {
        return Err(bad("Connection header does not contain upgrade"));
    }
    // Bytes after the head are WebSocket frames; a body would be read as
    // frames by one side and as a body by the other.
    if values(headers, "transfer-encoding").next().is_some() {
        return Err(bad("a WebSocket handshake has no body (Transfer-Encoding)"));
    }
    if values(headers, "content-length").any(|v| v.trim_ascii() != b"0") {
        return Err(bad("a WebSocket handshake has no body (Content-Length)"));
    }
    let key = match single(headers, "sec-websocket-key") {
        Ok(Some(k)) => k,
        Ok(None) => return Err(bad("missing Sec-WebSocket-Key")),
        Err(()) => return Err(bad("more than one Sec-WebSocket-Key")),
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| bad("Sec-WebSocket-Key is not base64"))?;
    if decoded.len() != 16 {
        return Err(bad("Sec-WebSocket-Key is not 16 bytes"));
    }
    match single(headers, "sec-websocket-version") {
        Ok(Some("13")) => {}
        Ok(None) => return Err(bad("missing Sec-WebSocket-Version")),
        _ => {
            return Err(Reject {
                status: StatusCode::UPGRADE_REQUIRED,
                reason: "unsupported Sec-WebSocket-Version; this server speaks 13",
            })
        }
    }
    let protocols = tokens(headers, "sec-websocket-protocol")
        .map(str::to_string)
        .collect();
    Ok(WsRequest {
        key: key.to_string(),
        protocols,
    })
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True if `name` is hop-by-hop, by the list or because `Connection` names it.
fn is_hop_by_hop(headers: &[Header<'_>], name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || has_token(headers, "connection", name)
}

/// Writes the request to send to the origin into `out`: the client's request
/// line and headers (names as sent), less hop-by-hop ones, plus
/// `Connection: Upgrade`, `Upgrade: websocket` and the forwarding headers
/// (`X-Forwarded-For` and `Forwarded` extend the client's). `Sec-WebSocket-*`
/// pass unchanged.
pub fn forward_request(
    head: &RequestHead<'_, '_>,
    client: SocketAddr,
    proto: &str,
    out: &mut Vec<u8>,
) {
    let headers = head.headers;
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in headers {
        let n = h.name;
        if is_hop_by_hop(headers, n)
            || n.eq_ignore_ascii_case("x-forwarded-for")
            || n.eq_ignore_ascii_case("x-forwarded-proto")
            || n.eq_ignore_ascii_case("forwarded")
        {
            continue;
        }
        push_header(out, n, h.value);
    }
    out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n");
    let ip = client.ip();
    // Writing to a Vec cannot fail.
    let _ = write!(out, "X-Forwarded-For: ");
    join_previous(out, headers, "x-forwarded-for");
    let _ = write!(out, "{ip}\r\nX-Forwarded-Proto: {proto}\r\nForwarded: ");
    join_previous(out, headers, "forwarded");
    if ip.is_ipv6() {
        let _ = write!(out, "for=\"[{ip}]\";proto={proto}");
    } else {
        let _ = write!(out, "for={ip};proto={proto}");
    }
    // A host that cannot sit in a quoted-string is left out, not escaped.
    if let Ok(Some(host)) = single(headers, "host") {
        if host
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            let _ = write!(out, ";host=\"{host}\"");
        }
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Writes one header line.
fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the client's values of `name`, each followed by ", ".
fn join_previous(out: &mut Vec<u8>, headers: &[Header<'_>], name: &str) {
    for v in values(headers, name) {
        let v = v.trim_ascii();
        if !v.is_empty() {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
    }
}

/// Checks the origin's 101 against the client's request (RFC 6455 4.2.2).
/// A failure is the origin's fault: Sluice answers 502. Returns the
/// subprotocol the origin chose, if any.
pub fn check_response<'b>(
    headers: &[Header<'b>],
    req: &WsRequest,
) -> Result<Option<&'b str>, Reject> {
    if !has_token(headers, "upgrade", "websocket") {
        return Err(bad_gw("origin's 101 lacks Upgrade: websocket"));
    }
    if !has_token(headers, "connection", "upgrade") {
        return Err(bad_gw("origin's 101 lacks Connection: upgrade"));
    }
    match single(headers, "sec-websocket-accept") {
        Ok(Some(a)) if a == accept_key(&req.key) => {}
        _ => {
            return Err(bad_gw(
                "origin's Sec-WebSocket-Accept does not match the key",
            ))
        }
    }
    match single(headers, "sec-websocket-protocol") {
        Ok(None) => Ok(None),
        Ok(Some(p)) if req.protocols.iter().any(|o| o == p) => Ok(Some(p)),
        Ok(Some(_)) => Err(bad_gw(
            "origin chose a subprotocol the client did not offer",
        )),
        Err(()) => Err(bad_gw("origin chose more than one subprotocol")),
    }
}

/// A refusal as the client sees it: status line, a plain-text reason, and
/// `Connection: close`. A 426 also names the version Sluice speaks.
pub fn error_response(status: StatusCode, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + reason.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        reason.len() + 1
    );
    if status == StatusCode::UPGRADE_REQUIRED {
        out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n");
    }
    let _ = write!(out, "\r\n{reason}\n");
    out
}

/// The origin's non-101 answer as relayed to the client: status and headers
/// unchanged except the hop-by-hop connection headers, which become
/// `Connection: close` (the body framing headers stay, the body is relayed
/// as it comes). With `Transfer-Encoding`, a `Content-Length` is dropped, as
/// RFC 9112 section 6.3 asks of a proxy.
pub fn relayed_response(head: &ResponseHead<'_, '_>) -> Vec<u8> {
    let chunked = values(head.headers, "transfer-encoding").next().is_some();
    let mut out = Vec::with_capacity(head.len + 24);
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", head.code, head.reason);
    for h in head.headers {
        let n = h.name;
        let framing =
            n.eq_ignore_ascii_case("transfer-encoding") || n.eq_ignore_ascii_case("trailer");
        if (!framing && is_hop_by_hop(head.headers, n))
            || (chunked && n.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        push_header(&mut out, n, h.value);
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?room=1 HTTP/1.1\r\n\
        Host: example.com\r\n\
        Upgrade: WebSocket\r\n\
        Connection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\r\n";

    /// Parses `text` and runs `f` on the head.
    fn with_head<T>(text: &str, f: impl FnOnce(&RequestHead<'_, '_>) -> T) -> T {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse_request(text.as_bytes(), &mut storage)
            .expect("parses")
            .expect("complete");
        f(&head)
    }

    /// `GOOD` without the field `name`, plus `extra` lines.
    fn edited(name: &str, extra: &str) -> String {
        let mut out: String = GOOD
            .trim_end_matches("\r\n")
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .map(|l| format!("{l}\r\n"))
            .collect();
        out.push_str(extra);
        out.push_str("\r\n");
        out
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> Vec<Header<'static>> {
        pairs
            .iter()
            .map(|(name, value)| Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn rfc_example_accept() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_request_passes() {
        let r = with_head(GOOD, check_request).unwrap();
        assert_eq!(r.protocols, ["chat", "superchat"]);
        assert_eq!(r.key, "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn incomplete_oversized_and_malformed_heads() {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        assert!(parse_request(&GOOD.as_bytes()[..40], &mut storage)
            .unwrap()
            .is_none());
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}", "a".repeat(MAX_HEAD));
        let e = parse_request(long.as_bytes(), &mut storage).unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        let e = parse_request(many.as_bytes(), &mut storage).unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let e = parse_request(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", &mut storage).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let mut small = [httparse::EMPTY_HEADER; 4];
        let e = parse_response(
            b"HTTP/1.1 101 OK\r\nA: b\r\nA: b\r\nA: b\r\nA: b\r\nA: b\r\n\r\n",
            &mut small,
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn each_defect_has_its_status() {
        let cases: &[(&str, &str, StatusCode)] = &[
            ("host", "", StatusCode::BAD_REQUEST),
            ("host", "Host: a\r\nHost: b", StatusCode::BAD_REQUEST),
            ("upgrade", "Upgrade: h2c", StatusCode::BAD_REQUEST),
            ("upgrade", "", StatusCode::BAD_REQUEST),
            ("connection", "Connection: close", StatusCode::BAD_REQUEST),
            ("sec-websocket-key", "", StatusCode::BAD_REQUEST),
            (
                "sec-websocket-key",
                "Sec-WebSocket-Key: not base64!",
                StatusCode::BAD_REQUEST,
            ),
            (
                "sec-websocket-key",
                "Sec-WebSocket-Key: AAAA",
                StatusCode::BAD_REQUEST,
            ),
            (
                "sec-websocket-version",
                "Sec-WebSocket-Version: 8",
                StatusCode::UPGRADE_REQUIRED,
            ),
            ("sec-websocket-version", "", StatusCode::BAD_REQUEST),
            (
                "content-length",
                "Content-Length: 5",
                StatusCode::BAD_REQUEST,
            ),
            (
                "transfer-encoding",
                "Transfer-Encoding: chunked",
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (name, extra, status) in cases {
            let text = if extra.is_empty() {
                edited(name, "")
            } else {
                edited(name, &format!("{extra}\r\n"))
            };
            let e = with_head(&text, check_request).unwrap_err();
            assert_eq!(e.status, *status, "{name} / {extra:?}: {}", e.reason);
        }
        assert!(
            with_head(&edited("content-length", "Content-Length: 0\r\n"), |h| {
                check_request(h)
            })
            .is_ok()
        );
        let post = GOOD.replacen("GET", "POST", 1);
        assert_eq!(
            with_head(&post, check_request).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let old = GOOD.replacen("HTTP/1.1", "HTTP/1.0", 1);
        let e = with_head(&old, check_request).unwrap_err();
        assert_eq!(e.reason, "a WebSocket handshake must use HTTP/1.1");
    }

    #[test]
    fn forwarded_request() {
        let text = edited(
            "host",
            "Host: example.com\r\nx-forwarded-for: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\
             Keep-Alive: timeout=5\r\nX-Drop: 1\r\nConnection: x-drop\r\nX-Forwarded-Proto: https\r\n",
        );
        let mut out = Vec::new();
        with_head(&text, |h| {
            forward_request(h, "192.0.2.7:5555".parse().unwrap(), "http", &mut out)
        });
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("GET /chat?room=1 HTTP/1.1\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "{out}");
        let lines: Vec<&str> = out.trim_end().split("\r\n").skip(1).collect();
        let expect = [
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: chat, superchat",
            "Host: example.com",
            "Connection: Upgrade",
            "Upgrade: websocket",
            "X-Forwarded-For: 10.0.0.1, 10.0.0.2, 192.0.2.7",
            "X-Forwarded-Proto: http",
            "Forwarded: for=192.0.2.7;proto=http;host=\"example.com\"",
        ];
        assert_eq!(lines, expect);

        let mut v6 = Vec::new();
        with_head(GOOD, |h| {
            forward_request(h, "[::1]:1".parse().unwrap(), "http", &mut v6)
        });
        let v6 = String::from_utf8(v6).unwrap();
        assert!(
            v6.contains("\r\nForwarded: for=\"[::1]\";proto=http;host=\"example.com\"\r\n"),
            "{v6}"
        );
        assert!(v6.contains("\r\nX-Forwarded-For: ::1\r\n"), "{v6}");

        let quoted = edited("host", "Host: a\"b\r\nForwarded: for=10.0.0.9\r\n");
        let mut q = Vec::new();
        with_head(&quoted, |h| {
            forward_request(h, "192.0.2.7:1".parse().unwrap(), "http", &mut q)
        });
        let q = String::from_utf8(q).unwrap();
        assert!(
            q.contains("\r\nForwarded: for=10.0.0.9, for=192.0.2.7;proto=http\r\n"),
            "{q}"
        );
    }

    #[test]
    fn origin_response_checks() {
        let r = with_head(GOOD, check_request).unwrap();
        let ok = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("Sec-WebSocket-Protocol", "chat"),
        ];
        assert_eq!(check_response(&headers(&ok), &r), Ok(Some("chat")));
        assert_eq!(check_response(&headers(&ok[..3]), &r), Ok(None));
        let mut wrong = ok;
        wrong[2].1 = "AAAA";
        assert_eq!(
            check_response(&headers(&wrong), &r).unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
        let mut proto = ok;
        proto[3].1 = "other";
        assert_eq!(
            check_response(&headers(&proto), &r).unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
        let no_upgrade = headers(&ok[1..]);
        assert_eq!(
            check_response(&no_upgrade, &r).unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn answers_to_the_client() {
        let e =
            String::from_utf8(error_response(StatusCode::UPGRADE_REQUIRED, "speak 13")).unwrap();
        assert!(e.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{e}");
        assert!(e.contains("\r\nContent-Length: 9\r\n"), "{e}");
        assert!(e.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{e}");
        assert!(e.ends_with("\r\n\r\nspeak 13\n"), "{e}");

        let text = b"HTTP/1.1 403 Forbidden\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
            Keep-Alive: timeout=5\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\nX-Origin: yes\r\n\r\n";
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse_response(text, &mut storage).unwrap().unwrap();
        let out = String::from_utf8(relayed_response(&head)).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nX-Origin: yes\r\nConnection: close\r\n\r\n"
        );
    }
}
