//! One client connection, phase by phase.
//!
//! | phase | runs | result |
//! |---|---|---|
//! | **accept** | [`crate::server`] accepts TCP; buffers are sized to the per-direction bound | a socket |
//! | **handshake** | hyper reads the request head (`timeouts.handshake_ms`, 8 KiB head); [`handshake::check_request`] | a [`WsRequest`], or 400/426/431/408 and close |
//! | **waf** | hook for rules on the handshake; allows everything today | continue, or a status |
//! | **route** | the listener's origin | an address |
//! | **connect** | TCP connect (`timeouts.origin_connect_ms`) | a socket, or 502 (refused) / 504 (timeout) |
//! | **upgrade** | forwards the handshake, awaits the answer (`timeouts.origin_response_ms`), checks the 101 | the 101 relayed; a non-101 relayed unchanged; 502/504 |
//! | **hand-off** | recovers both raw sockets and their read-ahead bytes; [`DataPaths::relay`] | bytes flow on a data path |
//! | **close** | the data path reports | access log line with bytes, duration, reason |
//!
//! Errors carry their [`Source`](crate::error::Source) and whether a retry is safe.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};

use crate::accounting::Accounting;
use crate::config::Config;
use crate::datapath::{DataPaths, Pair};
use crate::error::ProxyError;
use crate::handshake::{self, WsRequest};

/// Largest request head accepted (hyper's smallest buffer); larger gets 431.
pub const MAX_HEAD: usize = 8192;

type Body = BoxBody<Bytes, hyper::Error>;

/// What every connection of one listener shares.
pub struct ListenerCtx {
    /// The whole configuration.
    pub cfg: Arc<Config>,
    /// Where this listener's sessions go.
    pub origin: SocketAddr,
    /// The running data paths.
    pub paths: Arc<DataPaths>,
}

/// Runs one client connection through every phase. Never fails: errors are
/// answered to the client and logged.
pub async fn serve_client(stream: TcpStream, peer: SocketAddr, ctx: Arc<ListenerCtx>) {
    // To answer when hyper gives up without writing a response (truncated
    // head, header timeout). Hyper keeps the socket until `conn` is dropped,
    // so the number stays valid while `conn` lives (no dup per connection).
    let raw = stream.as_raw_fd();
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, ctx).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.cfg.timeouts.handshake())
        .max_buf_size(MAX_HEAD)
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    if let Err(e) = conn.as_mut().await {
        let answer = if e.is_timeout() {
            Some((
                StatusCode::REQUEST_TIMEOUT,
                "request head not received in time",
            ))
        } else if e.is_incomplete_message() {
            Some((StatusCode::BAD_REQUEST, "truncated request head"))
        } else {
            None
        };
        tracing::debug!(%peer, "client connection ended: {e}");
        if let Some((status, reason)) = answer {
            // SAFETY: `conn` is alive and still owns the socket (see above).
            write_raw_error(unsafe { crate::sockopt::borrow(raw) }, status, reason);
        }
    }
}

/// Best-effort answer on a socket hyper has given up on.
fn write_raw_error(fd: std::os::fd::BorrowedFd<'_>, status: StatusCode, reason: &str) {
    let text = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        reason.len() + 1
    );
    // A short answer fits in the empty send buffer of a fresh connection.
    let _ = socket2::SockRef::from(&fd).send(text.as_bytes());
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, ctx: Arc<ListenerCtx>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match upgrade(req, peer, &ctx).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::info!(
                target: "access",
                %peer,
                path,
                status = e.status.as_u16(),
                source = %e.source_side,
                phase = e.phase,
                retry_safe = e.retry_safe,
                "refused: {}",
                e.reason
            );
            error_response(&e)
        }
    }
}

fn error_response(e: &ProxyError) -> Response<Body> {
    let mut resp = Response::new(full(format!("{}\n", e.reason)));
    *resp.status_mut() = e.status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if e.status == StatusCode::UPGRADE_REQUIRED {
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    resp
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// Phases handshake to upgrade; spawns the hand-off.
async fn upgrade(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    ctx: &ListenerCtx,
) -> Result<Response<Body>, ProxyError> {
    // Phase: handshake.
    let ws = handshake::check_request(req.method(), req.version(), req.headers())
        .map_err(|r| ProxyError::client("handshake", r.status, r.reason))?;
    // Phase: waf (nothing to check yet). Phase: route.
    let origin_addr = ctx.origin;
    // Phase: connect.
    let t = &ctx.cfg.timeouts;
    let stream = tokio::time::timeout(t.origin_connect(), connect(origin_addr, ctx))
        .await
        .map_err(|_| {
            ProxyError::origin(
                "connect",
                StatusCode::GATEWAY_TIMEOUT,
                true,
                format!("origin {origin_addr} did not accept the connection in time"),
            )
        })?
        .map_err(|e| {
            ProxyError::origin(
                "connect",
                StatusCode::BAD_GATEWAY,
                true,
                format!("origin {origin_addr} cannot be reached: {e}"),
            )
        })?;
    // Phase: upgrade.
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| origin_err("upgrade", StatusCode::BAD_GATEWAY, e))?;
    tokio::spawn(conn.with_upgrades());
    let mut oreq = Request::new(Empty::<Bytes>::new());
    *oreq.uri_mut() = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|_| {
            ProxyError::client("handshake", StatusCode::BAD_REQUEST, "bad request target")
        })?;
    *oreq.version_mut() = Version::HTTP_11;
    *oreq.headers_mut() = handshake::forward_headers(req.headers(), peer, "http");
    let mut oresp = tokio::time::timeout(t.origin_response(), sender.send_request(oreq))
        .await
        .map_err(|_| {
            ProxyError::origin(
                "upgrade",
                StatusCode::GATEWAY_TIMEOUT,
                false,
                "origin did not answer the handshake in time",
            )
        })?
        .map_err(|e| origin_err("upgrade", StatusCode::BAD_GATEWAY, e))?;
    if oresp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Not upgraded: relay the origin's answer as it is.
        tracing::info!(target: "access", %peer, path = req.uri().path(), status = oresp.status().as_u16(), "origin refused the upgrade");
        let (parts, body) = oresp.into_parts();
        return Ok(Response::from_parts(parts, body.boxed()));
    }
    handshake::check_response(oresp.headers(), &ws)
        .map_err(|r| ProxyError::origin("upgrade", r.status, false, r.reason))?;
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = oresp.headers().clone();
    let origin_up = hyper::upgrade::on(&mut oresp)
        .await
        .map_err(|e| origin_err("upgrade", StatusCode::BAD_GATEWAY, e))?;
    let origin_parts = origin_up
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| ProxyError::internal("upgrade", "origin connection is not a TCP stream"))?;
    let client_up = hyper::upgrade::on(&mut req);
    tracing::info!(
        target: "access",
        %peer,
        path = req.uri().path(),
        origin = %origin_addr,
        protocol = resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok()).unwrap_or(""),
        status = 101,
        "upgraded"
    );
    let paths = ctx.paths.clone();
    let path = req.uri().path().to_string();
    tokio::spawn(async move {
        // Phase: hand-off, once hyper has written the 101.
        let client = match client_up.await.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(p)) => p,
            _ => {
                tracing::debug!(%peer, "client went away before the hand-off");
                return;
            }
        };
        // The read-ahead is a slice of hyper's read buffer (8 KiB or more);
        // a copy lets that buffer go now, not when the connection ends.
        let pair = Pair {
            client_ahead: Bytes::copy_from_slice(&client.read_buf),
            client: client.io.into_inner(),
            origin_ahead: Bytes::copy_from_slice(&origin_parts.read_buf),
            origin: origin_parts.io.into_inner(),
        };
        // Moving `io` out leaves the other fields alive to the end of the
        // scope; the buffers are gone now.
        drop((client.read_buf, origin_parts.read_buf));
        hand_off(pair, peer, path, ws, paths).await;
    });
    Ok(resp)
}

/// Phases hand-off and close.
async fn hand_off(
    pair: Pair,
    peer: SocketAddr,
    path: String,
    _ws: WsRequest,
    paths: Arc<DataPaths>,
) {
    let started = Instant::now();
    let acct = Arc::new(Accounting::default());
    let (path_used, reason) = paths.relay(pair, acct.clone()).await;
    let (c2o, o2c) = acct.totals();
    tracing::info!(
        target: "access",
        %peer,
        path,
        datapath = %path_used,
        bytes_in = c2o,
        bytes_out = o2c,
        duration_ms = started.elapsed().as_millis() as u64,
        "closed: {reason}"
    );
}

async fn connect(addr: SocketAddr, ctx: &ListenerCtx) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    crate::sockopt::bound_buffers(sock.as_fd(), ctx.cfg.limits.max_buffer_per_direction);
    sock.set_nodelay(true)?;
    sock.connect(addr).await
}

fn origin_err(phase: &'static str, status: StatusCode, e: hyper::Error) -> ProxyError {
    ProxyError::origin(phase, status, false, format!("origin: {e}"))
}
