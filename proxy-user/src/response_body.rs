//! Where the origin's non-101 answer ends (RFC 9112 section 6.3), so that
//! Sluice relays exactly its body and then closes the client connection.
//!
//! Pure functions over bytes, fuzzed with the handshake
//! (`proxy-user/fuzz`); [`crate::lifecycle`] does the reading and writing.

use http::StatusCode;

use crate::handshake::{Reject, ResponseHead, MAX_HEAD};

/// Longest chunk-size line accepted (size and extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// How the body of an answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the origin closes.
    UntilClose,
}

fn bad_gw(reason: &'static str) -> Reject {
    Reject {
        status: StatusCode::BAD_GATEWAY,
        reason,
    }
}

/// The framing of an answer to a GET (RFC 9112 6.3): `Transfer-Encoding`
/// wins over `Content-Length`; several `Content-Length` values must agree.
pub fn framing(head: &ResponseHead<'_, '_>) -> Result<Framing, Reject> {
    if head.code < 200 || head.code == 204 || head.code == 304 {
        return Ok(Framing::Empty);
    }
    let named = |n: &'static str| {
        head.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(n))
    };
    if let Some(last) = named("transfer-encoding")
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|t| !t.is_empty())
    {
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for h in named("content-length") {
        let v = std::str::from_utf8(h.value)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(bad_gw("origin sent an invalid Content-Length"))?;
        if length.is_some_and(|l| l != v) {
            return Err(bad_gw("origin sent conflicting Content-Length values"));
        }
        length = Some(v);
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: bytes left, its closing CRLF included.
    Data(u64),
    /// After the last chunk: trailer lines up to an empty one.
    Trailer,
    /// The body has ended.
    Done,
}

/// Follows a chunked body as it passes, to find its end.
#[derive(Debug)]
pub struct Chunked {
    state: State,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked { state: State::Size }
    }
}

impl Chunked {
    /// Consumes the body bytes at the front of `buf`. Returns how many
    /// belong to the body (relay them; keep the rest for the next call,
    /// with more bytes appended) and whether the body ended there.
    pub fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), Reject> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                State::Done => return Ok((pos, true)),
                State::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        pos += used;
                        self.state = if size == 0 {
                            State::Trailer
                        } else {
                            State::Data(size.saturating_add(2))
                        };
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_LINE => {
                        return Err(bad_gw("origin sent a chunk-size line too long"))
                    }
                    Ok(httparse::Status::Partial) => return Ok((pos, false)),
                    Err(_) => return Err(bad_gw("origin sent a malformed chunked body")),
                },
                State::Data(left) => {
                    let k = left.min(rest.len() as u64);
                    pos += k as usize;
                    if k == left {
                        self.state = State::Size;
                    } else {
                        self.state = State::Data(left - k);
                        return Ok((pos, false));
                    }
                }
                State::Trailer => match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        pos += i + 1;
                        if rest[..i].iter().all(|&b| b == b'\r') {
                            self.state = State::Done;
                        }
                    }
                    None if rest.len() > MAX_HEAD / 2 => {
                        return Err(bad_gw("origin sent a trailer line too long"))
                    }
                    None => return Ok((pos, false)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing_of(text: &str) -> Result<Framing, Reject> {
        let mut storage = [httparse::EMPTY_HEADER; 16];
        let head = crate::handshake::parse_response(text.as_bytes(), &mut storage)
            .unwrap()
            .unwrap();
        framing(&head)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing_of("HTTP/1.1 304 Not Modified\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing_of("HTTP/1.1 403 F\r\nContent-Length: 13\r\n\r\n"),
            Ok(Framing::Length(13))
        );
        assert_eq!(
            framing_of("HTTP/1.1 403 F\r\nContent-Length: 13\r\ncontent-length: 13\r\n\r\n"),
            Ok(Framing::Length(13))
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 403 F\r\nContent-Length: 13\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            ),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing_of("HTTP/1.1 403 F\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Ok(Framing::UntilClose)
        );
        assert_eq!(
            framing_of("HTTP/1.1 500 E\r\n\r\n"),
            Ok(Framing::UntilClose)
        );
        assert!(
            framing_of("HTTP/1.1 403 F\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err()
        );
        assert!(framing_of("HTTP/1.1 403 F\r\nContent-Length: -1\r\n\r\n").is_err());
    }

    const BODY: &[u8] =
        b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n";

    #[test]
    fn chunked_end_is_found_whatever_the_split() {
        let after = b"NEXT";
        let mut all = BODY.to_vec();
        all.extend_from_slice(after);
        for split in 0..=all.len() {
            let mut c = Chunked::default();
            let mut pending = all[..split].to_vec();
            let mut relayed = Vec::new();
            let (k, done) = c.advance(&pending).unwrap();
            relayed.extend_from_slice(&pending[..k]);
            pending.drain(..k);
            let mut ended = done;
            if !ended {
                pending.extend_from_slice(&all[split..]);
                let (k, done) = c.advance(&pending).unwrap();
                relayed.extend_from_slice(&pending[..k]);
                ended = done;
            }
            assert!(ended, "split at {split}");
            assert_eq!(relayed, BODY, "split at {split}");
        }
    }

    #[test]
    fn chunked_errors() {
        assert!(Chunked::default().advance(b"zz\r\n").is_err());
        let long = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert!(Chunked::default().advance(&long).is_err());
        let mut c = Chunked::default();
        assert_eq!(c.advance(b"0\r\n").unwrap(), (3, false));
        assert!(c.advance(&vec![b'x'; MAX_HEAD]).is_err());
    }
}
