//! The RFC 6455 section 4 opening handshake: checks and header rewriting.
//!
//! Pure functions over `http` types, so they can be unit-tested and fuzzed
//! without sockets. [`crate::lifecycle`] calls them in the handshake and
//! upgrade phases.

use std::net::SocketAddr;

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the key before hashing.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

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

/// What the handshake phase keeps from a valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsRequest {
    /// `Sec-WebSocket-Key`, to check the origin's `Sec-WebSocket-Accept`.
    pub key: String,
    /// Subprotocols the client offered, in order.
    pub protocols: Vec<String>,
}

/// True if `name` lists `token` (comma-separated, case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, ()> {
    let mut all = headers.get_all(name).iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(());
    }
    first.to_str().map(|s| Some(s.trim())).map_err(|_| ())
}

/// Checks a client's upgrade request against RFC 6455 section 4.2.1.
pub fn check_request(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<WsRequest, Reject> {
    if !headers.contains_key(header::UPGRADE) {
        return Err(bad("not a WebSocket upgrade: no Upgrade header"));
    }
    if method != Method::GET {
        return Err(bad("a WebSocket handshake must use GET"));
    }
    if version != Version::HTTP_11 {
        return Err(bad("a WebSocket handshake must use HTTP/1.1"));
    }
    match single(headers, &header::HOST) {
        Ok(Some(h)) if !h.is_empty() => {}
        Ok(_) => return Err(bad("missing Host header")),
        Err(()) => return Err(bad("more than one Host header")),
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(bad("Upgrade header does not name websocket"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(bad("Connection header does not contain upgrade"));
    }
    let key = match single(headers, &header::SEC_WEBSOCKET_KEY) {
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
    match single(headers, &header::SEC_WEBSOCKET_VERSION) {
        Ok(Some("13")) => {}
        Ok(None) => return Err(bad("missing Sec-WebSocket-Version")),
        _ => {
            return Err(Reject {
                status: StatusCode::UPGRADE_REQUIRED,
                reason: "unsupported Sec-WebSocket-Version; this server speaks 13",
            })
        }
    }
    let protocols = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
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

/// The request headers to send to the origin: the client's, less hop-by-hop
/// ones, plus `Connection: Upgrade`, `Upgrade: websocket` and the forwarding
/// headers. `Sec-WebSocket-*` pass unchanged.
pub fn forward_headers(src: &HeaderMap, client: SocketAddr, proto: &str) -> HeaderMap {
    let listed: Vec<String> = src
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(src.len() + 4);
    for (name, value) in src {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));

    let ip = client.ip();
    let xff = match out.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    out.insert("x-forwarded-for", value(&xff));
    out.insert("x-forwarded-proto", value(proto));
    let for_ = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let mut fwd = format!("for={for_};proto={proto}");
    if let Some(host) = src.get(header::HOST).and_then(|v| v.to_str().ok()) {
        fwd.push_str(&format!(";host=\"{host}\""));
    }
    let fwd = match out.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {fwd}"),
        None => fwd,
    };
    out.insert(header::FORWARDED, value(&fwd));
    out
}

fn value(s: &str) -> HeaderValue {
    // Built from an IP, a fixed proto and a header that was already valid.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Checks the origin's 101 against the client's request (RFC 6455 4.2.2).
/// A failure is the origin's fault: Sluice answers 502.
pub fn check_response(headers: &HeaderMap, req: &WsRequest) -> Result<(), Reject> {
    let bad_gw = |reason| Reject {
        status: StatusCode::BAD_GATEWAY,
        reason,
    };
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(bad_gw("origin's 101 lacks Upgrade: websocket"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(bad_gw("origin's 101 lacks Connection: upgrade"));
    }
    match single(headers, &header::SEC_WEBSOCKET_ACCEPT) {
        Ok(Some(a)) if a == accept_key(&req.key) => {}
        _ => {
            return Err(bad_gw(
                "origin's Sec-WebSocket-Accept does not match the key",
            ))
        }
    }
    if let Ok(Some(p)) = single(headers, &header::SEC_WEBSOCKET_PROTOCOL) {
        if !req.protocols.iter().any(|o| o == p) {
            return Err(bad_gw(
                "origin chose a subprotocol the client did not offer",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("host", "example.com"),
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat, superchat"),
        ]
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
        let r = check_request(&Method::GET, Version::HTTP_11, &req(&good())).unwrap();
        assert_eq!(r.protocols, ["chat", "superchat"]);
    }

    #[test]
    fn each_defect_has_its_status() {
        let cases: &[(&str, Option<&str>, StatusCode)] = &[
            ("host", None, StatusCode::BAD_REQUEST),
            ("upgrade", Some("h2c"), StatusCode::BAD_REQUEST),
            ("connection", Some("close"), StatusCode::BAD_REQUEST),
            ("sec-websocket-key", None, StatusCode::BAD_REQUEST),
            (
                "sec-websocket-key",
                Some("not base64!"),
                StatusCode::BAD_REQUEST,
            ),
            ("sec-websocket-key", Some("AAAA"), StatusCode::BAD_REQUEST),
            (
                "sec-websocket-version",
                Some("8"),
                StatusCode::UPGRADE_REQUIRED,
            ),
            ("sec-websocket-version", None, StatusCode::BAD_REQUEST),
        ];
        for (name, val, status) in cases {
            let mut h: Vec<_> = good().into_iter().filter(|(k, _)| k != name).collect();
            if let Some(v) = val {
                h.push((name, v));
            }
            let e = check_request(&Method::GET, Version::HTTP_11, &req(&h)).unwrap_err();
            assert_eq!(e.status, *status, "{name}={val:?}: {}", e.reason);
        }
        let e = check_request(&Method::POST, Version::HTTP_11, &req(&good())).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = check_request(&Method::GET, Version::HTTP_10, &req(&good())).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn forwarding_headers() {
        let mut h = req(&good());
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("keep-alive", HeaderValue::from_static("timeout=5"));
        let out = forward_headers(&h, "192.0.2.7:5555".parse().unwrap(), "http");
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(
            out["forwarded"],
            "for=192.0.2.7;proto=http;host=\"example.com\""
        );
        assert_eq!(out["connection"], "Upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert!(!out.contains_key("keep-alive"));
        assert_eq!(out["sec-websocket-protocol"], "chat, superchat");
        assert_eq!(out["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        let v6 = forward_headers(&h, "[::1]:1".parse().unwrap(), "http");
        assert!(v6["forwarded"]
            .to_str()
            .unwrap()
            .starts_with("for=\"[::1]\""));
    }

    #[test]
    fn origin_response_checks() {
        let r = check_request(&Method::GET, Version::HTTP_11, &req(&good())).unwrap();
        let ok = req(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("sec-websocket-protocol", "chat"),
        ]);
        assert_eq!(check_response(&ok, &r), Ok(()));
        let mut wrong = ok.clone();
        wrong.insert("sec-websocket-accept", HeaderValue::from_static("AAAA"));
        assert_eq!(
            check_response(&wrong, &r).unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
        let mut proto = ok.clone();
        proto.insert("sec-websocket-protocol", HeaderValue::from_static("other"));
        assert_eq!(
            check_response(&proto, &r).unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
    }
}
