//! Fuzzes the origin's side with arbitrary bytes: the response head, its
//! body framing, and the chunked-body follower. Nothing may panic, and the
//! follower never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::handshake::{self, MAX_HEADERS};
use sluice::response_body::{self, Chunked, Framing};

fuzz_target!(|data: &[u8]| {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(Some(head)) = handshake::parse_response(data, &mut storage) else {
        return;
    };
    let _ = handshake::relayed_response(&head);
    if let Ok(Framing::Chunked) = response_body::framing(&head) {
        let body = &data[head.len..];
        // Fed in two pieces, as reads would deliver it.
        let cut = body.len() / 2;
        let mut c = Chunked::default();
        if let Ok((k, done)) = c.advance(&body[..cut]) {
            assert!(k <= cut);
            if !done {
                let rest = &body[k..];
                if let Ok((k2, _)) = c.advance(rest) {
                    assert!(k2 <= rest.len());
                }
            }
        }
    }
});
