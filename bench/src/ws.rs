//! Just enough RFC 6455 for the load generator and the origin: the opening
//! handshake on both sides and frames, masked from the client. Payloads of
//! binary frames can be skipped without copying, so bulk runs measure the
//! proxy, not the harness.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Frame opcodes used here.
pub mod op {
    /// A text frame (control messages of the harness: "done", "got N").
    pub const TEXT: u8 = 0x1;
    /// A binary frame (the payload of every workload).
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// The `Sec-WebSocket-Accept` value for a key (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A client's upgrade request for `path` with a key derived from `seed`.
/// Returns the request and the key.
pub fn upgrade_request(host: &str, path: &str, seed: u64) -> (String, String) {
    let key = base64::engine::general_purpose::STANDARD
        .encode([seed.to_le_bytes(), seed.rotate_left(17).to_le_bytes()].concat());
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    (req, key)
}

/// Where a complete HTTP head ends in `buf` (just past the blank line).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Checks a server's answer head: status 101 and the right accept value.
pub fn check_101(head: &[u8], key: &str) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(format!("bad answer: {:?}", String::from_utf8_lossy(head))),
    }
    if resp.code != Some(101) {
        return Err(format!(
            "answer {:?}: {}",
            resp.code,
            String::from_utf8_lossy(head).lines().next().unwrap_or("")
        ));
    }
    let want = accept_key(key);
    let ok = resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == want.as_bytes());
    if ok {
        Ok(())
    } else {
        Err("wrong Sec-WebSocket-Accept".into())
    }
}

/// A parsed upgrade request, as the origin sees it.
pub struct Request {
    /// The request target (path and query).
    pub path: String,
    /// The 101 answer to send.
    pub answer: String,
}

/// Parses a client's upgrade request head and builds the 101.
pub fn parse_request(head: &[u8]) -> Result<Request, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("bad request head".into()),
    }
    let key = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .ok_or("no Sec-WebSocket-Key")?;
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key.trim())
    );
    Ok(Request {
        path: req.path.unwrap_or("/").to_string(),
        answer,
    })
}

/// Appends a frame header for a final frame of `len` bytes.
pub fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// Appends `payload` XOR the mask, starting at mask offset `at`.
pub fn put_masked(out: &mut Vec<u8>, payload: &[u8], key: [u8; 4], at: usize) {
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, at);
}

/// XORs `buf` with the mask, as if `buf` began at payload offset `at`.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], at: usize) {
    let k = [
        key[at % 4],
        key[(at + 1) % 4],
        key[(at + 2) % 4],
        key[(at + 3) % 4],
    ];
    let wide = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

/// A whole frame in a new buffer.
pub fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    put_header(&mut out, opcode, payload.len(), mask);
    match mask {
        Some(k) => put_masked(&mut out, payload, k, 0),
        None => out.extend_from_slice(payload),
    }
    out
}

/// A frame that the parser kept whole.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// Its opcode.
    pub opcode: u8,
    /// Its payload, unmasked.
    pub payload: Vec<u8>,
}

/// An incremental frame parser. Text and control frames are kept whole;
/// binary payloads are kept only if asked for, else just counted.
#[derive(Default)]
pub struct Parser {
    head: Vec<u8>,
    cur: Option<Current>,
    /// Binary payload bytes seen (kept or not).
    pub binary_bytes: u64,
}

struct Current {
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
    seen: u64,
    keep: bool,
    payload: Vec<u8>,
}

impl Parser {
    /// Feeds bytes; calls `on` for each kept frame. Fails on frames this
    /// harness never sends (fragmented, reserved bits).
    pub fn feed(
        &mut self,
        mut data: &[u8],
        keep_binary: bool,
        mut on: impl FnMut(Frame),
    ) -> Result<(), String> {
        loop {
            if self.cur.is_none() {
                let need = header_len(&self.head).unwrap_or(2);
                if self.head.len() < need {
                    if data.is_empty() {
                        return Ok(());
                    }
                    let take = (need - self.head.len()).min(data.len());
                    self.head.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    // Two bytes in, the header may turn out longer.
                    continue;
                }
                let c = start(&self.head, keep_binary)?;
                self.head.clear();
                if c.len == 0 {
                    on(Frame {
                        opcode: c.opcode,
                        payload: Vec::new(),
                    });
                } else {
                    self.cur = Some(c);
                }
                continue;
            }
            if data.is_empty() {
                return Ok(());
            }
            let cur = self.cur.as_mut().expect("checked above");
            let n = ((cur.len - cur.seen) as usize).min(data.len());
            if cur.keep {
                let at = cur.payload.len();
                cur.payload.extend_from_slice(&data[..n]);
                if let Some(k) = cur.mask {
                    apply_mask(&mut cur.payload[at..], k, at);
                }
            }
            if cur.opcode == op::BINARY {
                self.binary_bytes += n as u64;
            }
            cur.seen += n as u64;
            data = &data[n..];
            if cur.seen == cur.len {
                let c = self.cur.take().expect("current frame");
                if c.keep {
                    on(Frame {
                        opcode: c.opcode,
                        payload: c.payload,
                    });
                }
            }
        }
    }
}

/// The full header length once enough of it is known.
fn header_len(h: &[u8]) -> Option<usize> {
    if h.len() < 2 {
        return None;
    }
    let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
    Some(
        2 + mask
            + match h[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            },
    )
}

fn start(h: &[u8], keep_binary: bool) -> Result<Current, String> {
    if h[0] & 0x70 != 0 || h[0] & 0x80 == 0 {
        return Err(format!("unexpected frame flags {:#x}", h[0]));
    }
    let opcode = h[0] & 0x0f;
    let (len, rest) = match h[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), &h[4..]),
        127 => (
            u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
            &h[10..],
        ),
        n => (u64::from(n), &h[2..]),
    };
    let mask = (h[1] & 0x80 != 0).then(|| [rest[0], rest[1], rest[2], rest[3]]);
    Ok(Current {
        opcode,
        len,
        mask,
        seen: 0,
        keep: opcode != op::BINARY || keep_binary,
        payload: Vec::new(),
    })
}

/// A small, fast generator for mask keys and payload bytes.
pub struct Prng(u64);

impl Prng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Prng {
        Prng(seed | 1)
    }

    /// The next 64 bits (xorshift64*).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A fresh mask key.
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }

    /// Fills a buffer.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_in_any_split() {
        let mut rng = Prng::new(7);
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, len) in [0usize, 5, 125, 126, 300, 65535, 65536, 70000]
            .into_iter()
            .enumerate()
        {
            let mut p = vec![0u8; len];
            rng.fill(&mut p);
            let mask = (i % 2 == 0).then(|| rng.mask());
            let opcode = if i % 3 == 0 { op::TEXT } else { op::BINARY };
            stream.extend(frame(opcode, &p, mask));
            want.push(Frame { opcode, payload: p });
        }
        for step in [1usize, 2, 3, 7, 13, 4096, usize::MAX] {
            let mut parser = Parser::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(step.min(stream.len())) {
                parser.feed(chunk, true, |f| got.push(f)).unwrap();
            }
            assert_eq!(got, want, "split every {step}");
        }
    }

    #[test]
    fn skipped_binary_is_counted() {
        let mut s = frame(op::BINARY, &[1u8; 1000], Some([1, 2, 3, 4]));
        s.extend(frame(op::TEXT, b"done", Some([9, 9, 9, 9])));
        let mut p = Parser::default();
        let mut got = Vec::new();
        for c in s.chunks(100) {
            p.feed(c, false, |f| got.push(f)).unwrap();
        }
        assert_eq!(p.binary_bytes, 1000);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"done");
    }

    #[test]
    fn handshake_pair_agrees() {
        let (req, key) = upgrade_request("h", "/echo", 42);
        let r = parse_request(req.as_bytes()).unwrap();
        assert_eq!(r.path, "/echo");
        check_101(r.answer.as_bytes(), &key).unwrap();
        assert!(check_101(r.answer.as_bytes(), "other").is_err());
    }
}
