//! Fuzzes the request side of the handshake with arbitrary bytes: parsing,
//! the checks and the forwarded request. Nothing may panic; an accepted
//! request must forward as a complete head that keeps the key, names
//! websocket, and passes the checks again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::handshake::{self, MAX_HEADERS};

fuzz_target!(|data: &[u8]| {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(Some(head)) = handshake::parse_request(data, &mut storage) else {
        return;
    };
    assert!(head.len <= data.len());
    let Ok(req) = handshake::check_request(&head) else {
        return;
    };
    let mut out = Vec::new();
    handshake::forward_request(&head, "192.0.2.1:1".parse().unwrap(), "http", &mut out);
    let mut again = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
    let mut fwd = httparse::Request::new(&mut again);
    let done = fwd.parse(&out).expect("the forwarded request parses");
    assert_eq!(done, httparse::Status::Complete(out.len()));
    let keys: Vec<_> = fwd
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(std::str::from_utf8(keys[0].value).unwrap().trim(), req.key);
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        handshake::accept_key(&req.key)
    );
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let resp = handshake::parse_response(answer.as_bytes(), &mut storage)
        .unwrap()
        .unwrap();
    assert_eq!(handshake::check_response(resp.headers, &req), Ok(None));
});
