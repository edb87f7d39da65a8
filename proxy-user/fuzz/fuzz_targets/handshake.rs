//! Fuzzes the handshake checks and header rewriting with arbitrary request
//! heads: none may panic, and an accepted request must yield a forwarded
//! header set that keeps the key and names websocket.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use libfuzzer_sys::fuzz_target;
use sluice::handshake;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split("\r\n");
    let Some(first) = lines.next() else { return };
    let mut parts = first.split(' ');
    let method = Method::from_bytes(parts.next().unwrap_or("").as_bytes()).unwrap_or(Method::GET);
    let version = match parts.nth(1) {
        Some("HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.trim().as_bytes()), HeaderValue::from_str(v.trim())) {
            headers.append(k, v);
        }
    }
    if let Ok(req) = handshake::check_request(&method, version, &headers) {
        let fwd = handshake::forward_headers(&headers, "192.0.2.1:1".parse().unwrap(), "http");
        assert_eq!(fwd["upgrade"], "websocket");
        assert_eq!(fwd["sec-websocket-key"].to_str().unwrap().trim(), req.key);
        let mut resp = HeaderMap::new();
        resp.insert("upgrade", HeaderValue::from_static("websocket"));
        resp.insert("connection", HeaderValue::from_static("Upgrade"));
        resp.insert(
            "sec-websocket-accept",
            HeaderValue::from_str(&handshake::accept_key(&req.key)).unwrap(),
        );
        assert!(handshake::check_response(&resp, &req).is_ok());
    }
});
