//! What one handshake costs in user space: parse the request head, check it
//! (RFC 6455 section 4), build the forwarded headers, and check the origin's
//! 101. Run with `cargo bench -p proxy-user --bench handshake`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use sluice::handshake;

const REQUEST: &[u8] = b"GET /chat?room=1 HTTP/1.1\r\n\
Host: example.com\r\n\
User-Agent: bench/1.0\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Origin: https://example.com\r\n\r\n";

fn parse(head: &[u8]) -> (Method, Version, HeaderMap) {
    let mut raw = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut raw);
    req.parse(head).expect("valid head");
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        headers.append(
            HeaderName::from_bytes(h.name.as_bytes()).expect("name"),
            HeaderValue::from_bytes(h.value).expect("value"),
        );
    }
    let method = Method::from_bytes(req.method.expect("method").as_bytes()).expect("method");
    (method, Version::HTTP_11, headers)
}

fn bench(c: &mut Criterion) {
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("addr");
    let (method, version, headers) = parse(REQUEST);
    let ws = handshake::check_request(&method, version, &headers).expect("valid");
    let mut answer = HeaderMap::new();
    answer.insert("upgrade", HeaderValue::from_static("websocket"));
    answer.insert("connection", HeaderValue::from_static("Upgrade"));
    answer.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&handshake::accept_key("dGhlIHNhbXBsZSBub25jZQ==")).expect("value"),
    );
    answer.insert("sec-websocket-protocol", HeaderValue::from_static("chat"));

    c.bench_function("parse request head", |b| {
        b.iter(|| parse(black_box(REQUEST)))
    });
    c.bench_function("check request", |b| {
        b.iter(|| handshake::check_request(black_box(&method), version, black_box(&headers)))
    });
    c.bench_function("forward headers", |b| {
        b.iter(|| handshake::forward_headers(black_box(&headers), peer, "http"))
    });
    c.bench_function("check 101", |b| {
        b.iter(|| handshake::check_response(black_box(&answer), &ws))
    });
    c.bench_function("whole handshake phase", |b| {
        b.iter(|| {
            let (m, v, h) = parse(black_box(REQUEST));
            let ws = handshake::check_request(&m, v, &h).expect("valid");
            let fwd = handshake::forward_headers(&h, peer, "http");
            handshake::check_response(&answer, &ws).expect("valid");
            fwd
        })
    });
}

// criterion_group! makes a pub fn; in a private module it needs no docs.
mod group {
    use super::*;
    criterion_group!(benches, bench);
}
criterion_main!(group::benches);
