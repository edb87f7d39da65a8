//! One client connection, phase by phase: accept to upgrade in one task,
//! hand-off and close in a second, small one (see [`serve_client`]).
//!
//! | phase | runs | result |
//! |---|---|---|
//! | **accept** | [`crate::server`] accepts TCP once the client's first bytes are in (`TCP_DEFER_ACCEPT`); buffers are sized to the per-direction bound, ACKs wait for data until the 101 | a socket with the request (or part of it) to read |
//! | **handshake** | reads the request head (`timeouts.handshake_ms`, at most [`MAX_HEAD`]); [`handshake::parse_request`], [`handshake::check_request`] | the forwarded request, or 400/426/431/408 and close |
//! | **waf** | hook for rules on the handshake; allows everything today | continue, or a status |
//! | **route** | the listener's origin | an address |
//! | **connect** | TCP connect (`timeouts.origin_connect_ms`); the handshake's last ACK waits for the request | a socket, or 502 (refused) / 504 (timeout) |
//! | **upgrade** | sends the request, reads the answer (`timeouts.origin_response_ms`), [`handshake::check_response`] | the 101 relayed as sent; a non-101 relayed with its body, then close; 502/504 |
//! | **hand-off** | both sockets and the bytes read past each head; [`DataPaths::relay`] | bytes flow in the user-space relay; on tcpsplice, sockmap and uring the session joins that path once `limits.promote_after_ms` old and idle (tcpsplice: the two TCP connections are joined at the packet level and the proxy's sockets leave the byte path) |
//! | **close** | the data path reports | access log line with bytes, duration, reason |
//!
//! Errors carry their [`Source`](crate::error::Source) and whether a retry
//! is safe. The heads are read into one buffer per connection, which is
//! freed before the hand-off; an idle relayed connection holds none.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::accesslog;
use crate::accounting::Accounting;
use crate::config::Config;
use crate::datapath::{CloseReason, DataPath, DataPaths, Pair};
use crate::error::ProxyError;
use crate::handshake::{self, Reject, WsRequest, MAX_HEAD, MAX_HEADERS};
use crate::response_body::{self, Chunked, Framing};

/// First size of the head buffer; it grows once, to [`MAX_HEAD`].
const FIRST_READ: usize = 4096;

/// How long a refused client gets to take its answer, and then how long
/// Sluice reads and drops what it still sends before closing.
const LINGER: Duration = Duration::from_secs(1);

/// What every connection of one listener shares.
pub struct ListenerCtx {
    /// The whole configuration.
    pub cfg: Arc<Config>,
    /// Where this listener's sessions go.
    pub origin: SocketAddr,
    /// The running data paths.
    pub paths: Arc<DataPaths>,
}

/// A request head that passed the handshake phase.
struct Accepted {
    ws: WsRequest,
    /// The path, for the access log.
    path: String,
    /// The request to send to the origin.
    forward: Vec<u8>,
    /// Length of the client's head; bytes after it are WebSocket frames.
    head_len: usize,
}

/// A client the handshake phase refuses (or that went away first).
enum Refused {
    /// Closed or reset before sending anything: nothing to answer.
    Silent,
    /// Answer with a status; the path when the head got that far.
    Answer(ProxyError, String),
}

/// The origin's final answer to the forwarded request.
enum Answer {
    /// A valid 101: its head is the first `head_len` bytes.
    Upgrade {
        head_len: usize,
        protocol: Option<String>,
    },
    /// Any other status: relay `head` and the body, then close.
    Other {
        code: u16,
        head: Vec<u8>,
        head_len: usize,
        framing: Framing,
    },
}

/// One parsed response head.
enum Head {
    /// The final answer.
    Final(Answer),
    /// A 1xx other than 101, `len` bytes long: dropped, the answer follows.
    Interim(usize),
}

/// Runs one client connection through every phase. Never fails: errors are
/// answered to the client and logged.
///
/// After the 101 the hand-off and close phases go to a task of their own
/// (`spawn_local` when `local`, on a worker with a `LocalSet`), and this
/// one ends: a relayed connection, idle for hours maybe, then holds only
/// what those phases need, not this future's state for the handshake phases
/// (about 1.5 KiB; W3 measures it per idle connection).
pub async fn serve_client(
    mut client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    local: bool,
) {
    let t = &ctx.cfg.timeouts;
    if ctx.paths.bound_after_handshake() {
        // The listener left them alone, so the handshake announced the
        // window scale of an unbounded socket (see `DataPaths`).
        crate::sockopt::bound_buffers(client.as_fd(), ctx.cfg.limits.max_buffer_per_direction);
    }
    let mut buf = vec![0u8; FIRST_READ];
    // Phase: handshake.
    let read = tokio::time::timeout(t.handshake(), read_request(&mut client, &mut buf, peer)).await;
    let (req, mut len) = match read {
        Ok(Ok(r)) => r,
        Ok(Err(Refused::Silent)) => return,
        Ok(Err(Refused::Answer(e, path))) => return refuse(client, peer, &path, e).await,
        Err(_) => {
            let e = ProxyError::client(
                "handshake",
                StatusCode::REQUEST_TIMEOUT,
                "request head not received in time",
            );
            return refuse(client, peer, "", e).await;
        }
    };
    let Accepted {
        ws,
        path,
        forward,
        head_len,
    } = req;
    // Phase: waf (nothing to check yet). Phase: route.
    let origin_addr = ctx.origin;
    // Phase: connect.
    let mss = origin_mss(&client, peer, &ctx);
    let connected = tokio::time::timeout(t.origin_connect(), connect(origin_addr, mss, &ctx)).await;
    let mut origin = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let e = ProxyError::origin(
                "connect",
                StatusCode::BAD_GATEWAY,
                true,
                format!("origin {origin_addr} cannot be reached: {e}"),
            );
            return refuse(client, peer, &path, e).await;
        }
        Err(_) => {
            let e = ProxyError::origin(
                "connect",
                StatusCode::GATEWAY_TIMEOUT,
                true,
                format!("origin {origin_addr} did not accept the connection in time"),
            );
            return refuse(client, peer, &path, e).await;
        }
    };
    // Phase: upgrade.
    if let Err(e) = origin.write_all(&forward).await {
        let e = ProxyError::origin(
            "upgrade",
            StatusCode::BAD_GATEWAY,
            true,
            format!("origin: cannot send the handshake: {e}"),
        );
        return refuse(client, peer, &path, e).await;
    }
    drop(forward);
    // The client's frames sent behind its head go to the origin after the 101.
    let client_ahead = Bytes::copy_from_slice(&buf[head_len..len]);
    len = 0;
    let answer = tokio::time::timeout(
        t.origin_response(),
        read_answer(&mut origin, &mut buf, &mut len, &ws),
    )
    .await;
    let answer = match answer {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return refuse(client, peer, &path, e).await,
        Err(_) => {
            let e = ProxyError::origin(
                "upgrade",
                StatusCode::GATEWAY_TIMEOUT,
                false,
                "origin did not answer the handshake in time",
            );
            return refuse(client, peer, &path, e).await;
        }
    };
    let (head_len, protocol) = match answer {
        Answer::Upgrade { head_len, protocol } => (head_len, protocol),
        Answer::Other {
            code,
            head,
            head_len,
            framing,
        } => {
            // Not upgraded: relay the origin's answer, then close.
            accesslog::not_upgraded(peer, &path, code);
            let wait = t.origin_response();
            if let Err(why) = relay_answer(
                &mut origin,
                &mut client,
                &head,
                &mut buf,
                head_len,
                len,
                framing,
                wait,
            )
            .await
            {
                tracing::debug!(%peer, "origin's answer cut short: {why}");
                return;
            }
            drop(origin);
            return linger_close(client).await;
        }
    };
    // The 101 goes to the client as the origin sent it.
    if client.write_all(&buf[..head_len]).await.is_err() {
        tracing::debug!(%peer, "client went away before the hand-off");
        return;
    }
    // The request's ACK rode on the 101; from here on, ACKs as usual.
    crate::sockopt::quick_acks(client.as_fd());
    accesslog::upgraded(peer, &path, origin_addr, protocol.as_deref().unwrap_or(""));
    let pair = Pair {
        client,
        client_ahead,
        origin_ahead: Bytes::copy_from_slice(&buf[head_len..len]),
        origin,
    };
    // An idle relayed connection holds no head buffer.
    drop((buf, ws, protocol));
    spawn_on_worker(local, hand_off(pair, peer, path, ctx.paths.clone()));
}

/// Spawns `task` on this worker thread: into its `LocalSet` when `local`
/// (tokio-uring's runtime, where the io_uring relay runs), else onto its
/// current-thread runtime. Either way the task never leaves the thread.
pub(crate) fn spawn_on_worker(
    local: bool,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if local {
        tokio::task::spawn_local(task);
    } else {
        tokio::spawn(task);
    }
}

/// Reads the client's head until it is complete and checks it.
async fn read_request(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
) -> Result<(Accepted, usize), Refused> {
    let mut len = 0;
    loop {
        if len == buf.len() {
            // Only from FIRST_READ: a head that fills MAX_HEAD is refused.
            buf.resize(MAX_HEAD, 0);
        }
        let n = client
            .read(&mut buf[len..])
            .await
            .map_err(|_| Refused::Silent)?;
        if n == 0 {
            if len == 0 {
                return Err(Refused::Silent);
            }
            let e = ProxyError::client(
                "handshake",
                StatusCode::BAD_REQUEST,
                "truncated request head",
            );
            return Err(Refused::Answer(e, String::new()));
        }
        len += n;
        match accept_request(&buf[..len], peer) {
            Ok(Some(a)) => return Ok((a, len)),
            Ok(None) => {}
            Err((r, path)) => {
                return Err(Refused::Answer(
                    ProxyError::client("handshake", r.status, r.reason),
                    path,
                ))
            }
        }
    }
}

/// Parses and checks a head, and builds the forwarded request. `Ok(None)`:
/// incomplete.
fn accept_request(buf: &[u8], peer: SocketAddr) -> Result<Option<Accepted>, (Reject, String)> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let head = match handshake::parse_request(buf, &mut storage) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(r) => return Err((r, String::new())),
    };
    let path = head.target.split('?').next().unwrap_or("").to_string();
    let ws = match handshake::check_request(&head) {
        Ok(ws) => ws,
        Err(r) => return Err((r, path)),
    };
    let mut forward = Vec::with_capacity(head.len + 160);
    handshake::forward_request(&head, peer, "http", &mut forward);
    Ok(Some(Accepted {
        ws,
        path,
        forward,
        head_len: head.len,
    }))
}

/// Reads the origin's answer into `buf[..len]`, skipping interim 1xx
/// answers. Any failure is the origin's: 502.
async fn read_answer(
    origin: &mut TcpStream,
    buf: &mut Vec<u8>,
    len: &mut usize,
    ws: &WsRequest,
) -> Result<Answer, ProxyError> {
    let fail =
        |reason: String| ProxyError::origin("upgrade", StatusCode::BAD_GATEWAY, false, reason);
    loop {
        if *len > 0 {
            match classify(&buf[..*len], ws) {
                Ok(Some(Head::Interim(head_len))) => {
                    buf.copy_within(head_len..*len, 0);
                    *len -= head_len;
                    continue;
                }
                Ok(Some(Head::Final(a))) => return Ok(a),
                Ok(None) => {}
                Err(r) => return Err(fail(r.reason.to_string())),
            }
        }
        if *len == buf.len() {
            buf.resize(MAX_HEAD, 0);
        }
        match origin.read(&mut buf[*len..]).await {
            Ok(0) => return Err(fail("origin closed the connection before answering".into())),
            Ok(n) => *len += n,
            Err(e) => return Err(fail(format!("origin: {e}"))),
        }
    }
}

/// Parses and checks the origin's answer. `Ok(None)`: incomplete.
fn classify(buf: &[u8], ws: &WsRequest) -> Result<Option<Head>, Reject> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(head) = handshake::parse_response(buf, &mut storage)? else {
        return Ok(None);
    };
    Ok(Some(match head.code {
        101 => Head::Final(Answer::Upgrade {
            head_len: head.len,
            protocol: handshake::check_response(head.headers, ws)?.map(str::to_string),
        }),
        100..=199 => Head::Interim(head.len),
        code => Head::Final(Answer::Other {
            code,
            head: handshake::relayed_response(&head),
            head_len: head.len,
            framing: response_body::framing(&head)?,
        }),
    }))
}

/// Relays a non-101 answer: `head`, then exactly its body, the start of which
/// is `buf[start..len]`. `Err` says why it stopped early.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
async fn relay_answer(
    origin: &mut TcpStream,
    client: &mut TcpStream,
    head: &[u8],
    buf: &mut [u8],
    mut start: usize,
    mut len: usize,
    framing: Framing,
    wait: Duration,
) -> Result<(), String> {
    client
        .write_all(head)
        .await
        .map_err(|e| format!("client: {e}"))?;
    let mut chunked = Chunked::default();
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    loop {
        let avail = &buf[start..len];
        let (take, done) = match framing {
            Framing::Empty => (0, true),
            Framing::Length(_) => {
                let k = left.min(avail.len() as u64);
                left -= k;
                (k as usize, left == 0)
            }
            Framing::UntilClose => (avail.len(), false),
            Framing::Chunked => chunked.advance(avail).map_err(|r| r.reason.to_string())?,
        };
        client
            .write_all(&buf[start..start + take])
            .await
            .map_err(|e| format!("client: {e}"))?;
        start += take;
        if done {
            return Ok(());
        }
        // Keep what is not relayed yet at the front, and read more.
        buf.copy_within(start..len, 0);
        len -= start;
        start = 0;
        let n = match tokio::time::timeout(wait, origin.read(&mut buf[len..])).await {
            Err(_) => return Err("origin stopped sending its answer".into()),
            Ok(Err(e)) => return Err(format!("origin: {e}")),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return match framing {
                Framing::UntilClose => Ok(()),
                _ => Err("origin closed before the end of its answer".into()),
            };
        }
        len += n;
    }
}

/// Logs a refusal, answers it, and closes.
async fn refuse(mut client: TcpStream, peer: SocketAddr, path: &str, e: ProxyError) {
    accesslog::refused(peer, path, &e);
    let answer = handshake::error_response(e.status, &e.reason);
    if tokio::time::timeout(LINGER, client.write_all(&answer))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        linger_close(client).await;
    }
}

/// Closes after an answer the way nginx's lingering close does: FIN first,
/// then read and drop what the client still sends (for at most [`LINGER`]
/// and 64 KiB), so that unread bytes do not turn the close into a reset
/// that could destroy the answer before the client reads it.
async fn linger_close(mut client: TcpStream) {
    let _ = client.shutdown().await;
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        for _ in 0..16 {
            if !matches!(client.read(&mut sink).await, Ok(n) if n > 0) {
                break;
            }
        }
    })
    .await;
}

/// Phases hand-off and close. The close phase (the access log line) runs
/// in whichever task ends the session: this one, or on the io_uring path
/// the relay's own task, which this one leaves to it.
async fn hand_off(pair: Pair, peer: SocketAddr, path: String, paths: Arc<DataPaths>) {
    let started = Instant::now();
    let acct = Arc::new(Accounting::default());
    let totals = acct.clone();
    let closed = Box::new(move |path_used: DataPath, reason: CloseReason| {
        let (c2o, o2c) = totals.totals();
        accesslog::closed(&accesslog::Closed {
            peer,
            path: &path,
            datapath: &path_used,
            bytes_in: c2o,
            bytes_out: o2c,
            duration_ms: started.elapsed().as_millis() as u64,
            reason: &reason,
        });
    });
    paths.relay(pair, acct, closed).await;
}

/// The MSS the origin connection announces, on the tcpsplice path when
/// the client is elsewhere: what the client takes per segment (the smaller
/// of its announced MSS and its path's, as the client socket sends). A
/// spliced session's origin segments go to the client as they are, and a
/// local origin's would otherwise be `lo`'s (64 KiB), a remote one's its
/// own link's. The relay is not slowed by it: `lo` and TSO carry the
/// origin's segments in 64 KiB batches all the same. `None`: leave the
/// kernel's.
fn origin_mss(client: &TcpStream, peer: SocketAddr, ctx: &ListenerCtx) -> Option<u32> {
    if !ctx.paths.splices() || !peer.is_ipv4() || peer.ip().is_loopback() {
        return None;
    }
    let info = crate::sockopt::tcp_info(client.as_fd()).ok()?;
    // The MSS option counts the payload and the options; the origin takes
    // its own (the same kinds: the splice checks) off again. Before any
    // data the window bound (half the client's SYN window) is far above.
    let mss = info.snd_mss() + info.option_bytes();
    // Past 64 KiB the client is on this host (an address of its own, by
    // `lo`): the kernel's MSS is the same.
    (mss < 65_000).then_some(mss)
}

async fn connect(
    addr: SocketAddr,
    mss: Option<u32>,
    ctx: &ListenerCtx,
) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let bound = ctx.cfg.limits.max_buffer_per_direction;
    let after = ctx.paths.bound_after_handshake();
    if !after {
        crate::sockopt::bound_buffers(sock.as_fd(), bound);
    }
    sock.set_nodelay(true)?;
    if let Some(mss) = mss {
        // Announced in the SYN: the most the origin sends per segment.
        crate::sockopt::set_mss(sock.as_fd(), mss);
    }
    // The handshake's last ACK rides on the request.
    crate::sockopt::delay_handshake_ack(sock.as_fd());
    let s = sock.connect(addr).await?;
    if after {
        // See `DataPaths::bound_after_handshake`.
        crate::sockopt::bound_buffers(s.as_fd(), bound);
    }
    Ok(s)
}
