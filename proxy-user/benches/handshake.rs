//! What one handshake costs in user space: parse the request head, check it
//! (RFC 6455 section 4), build the forwarded request, and parse and check the
//! origin's 101. Run with `cargo bench -p proxy-user --bench handshake`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::handshake::{self, MAX_HEADERS};

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

const ANSWER: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
Sec-WebSocket-Protocol: chat\r\n\r\n";

fn bench(c: &mut Criterion) {
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("addr");
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let head = handshake::parse_request(REQUEST, &mut storage)
        .expect("valid")
        .expect("complete");
    let ws = handshake::check_request(&head).expect("valid");

    c.bench_function("parse request head", |b| {
        b.iter(|| {
            let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
            handshake::parse_request(black_box(REQUEST), &mut storage)
                .expect("valid")
                .map(|h| h.len)
        })
    });
    c.bench_function("check request", |b| {
        b.iter(|| handshake::check_request(black_box(&head)))
    });
    c.bench_function("forward request", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(512);
            handshake::forward_request(black_box(&head), peer, "http", &mut out);
            out
        })
    });
    c.bench_function("parse and check 101", |b| {
        b.iter(|| {
            let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let h = handshake::parse_response(black_box(ANSWER), &mut storage)
                .expect("valid")
                .expect("complete");
            handshake::check_response(h.headers, &ws).map(|p| p.is_some())
        })
    });
    c.bench_function("whole handshake phase", |b| {
        b.iter(|| {
            let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let head = handshake::parse_request(black_box(REQUEST), &mut storage)
                .expect("valid")
                .expect("complete");
            let ws = handshake::check_request(&head).expect("valid");
            let mut out = Vec::with_capacity(512);
            handshake::forward_request(&head, peer, "http", &mut out);
            let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let h = handshake::parse_response(black_box(ANSWER), &mut storage)
                .expect("valid")
                .expect("complete");
            handshake::check_response(h.headers, &ws).expect("valid");
            out
        })
    });
}

// criterion_group! makes a pub fn; in a private module it needs no docs.
mod group {
    use super::*;
    criterion_group!(benches, bench);
}
criterion_main!(group::benches);
