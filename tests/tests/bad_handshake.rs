//! Bad handshakes get their status code, a reason, and a closed connection;
//! the daemon keeps serving others. Origin failures map to 502/504, and a
//! non-101 origin answer is relayed unchanged. Run on every data path (the
//! handshake is the same, but the daemon around it differs).

use std::time::Duration;

use futures_util::StreamExt;
use sluice_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends `req` (then FIN if `half_close`), reads the whole answer until the
/// proxy closes, returns it.
async fn ask(addr: std::net::SocketAddr, req: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy must close the connection after an error")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn without(header: &str) -> String {
    upgrade_request("x")
        .lines()
        .filter(|l| {
            !l.to_ascii_lowercase()
                .starts_with(&header.to_ascii_lowercase())
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn replace(header: &str, value: &str) -> String {
    upgrade_request("x")
        .lines()
        .map(|l| {
            if l.to_ascii_lowercase()
                .starts_with(&format!("{}:", header.to_ascii_lowercase()))
            {
                format!("{header}: {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_get_status_and_close_on_every_path() {
    let (origin, _h) = echo_origin().await;
    let long = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\nUpgrade: websocket\r\n\r\n",
        "a".repeat(8192)
    );
    let cases: Vec<(&str, String, bool, &str, &str)> = vec![
        (
            "wrong version",
            replace("Sec-WebSocket-Version", "8"),
            false,
            "426",
            "Sec-WebSocket-Version: 13",
        ),
        (
            "no Upgrade",
            without("Upgrade"),
            false,
            "400",
            "no Upgrade header",
        ),
        (
            "Upgrade not websocket",
            replace("Upgrade", "h2c"),
            false,
            "400",
            "websocket",
        ),
        (
            "Connection without upgrade",
            replace("Connection", "keep-alive"),
            false,
            "400",
            "Connection",
        ),
        (
            "no key",
            without("Sec-WebSocket-Key"),
            false,
            "400",
            "Sec-WebSocket-Key",
        ),
        (
            "key not base64",
            replace("Sec-WebSocket-Key", "%%%%"),
            false,
            "400",
            "base64",
        ),
        (
            "key not 16 bytes",
            replace("Sec-WebSocket-Key", "AAAA"),
            false,
            "400",
            "16 bytes",
        ),
        (
            "no version",
            without("Sec-WebSocket-Version"),
            false,
            "400",
            "Sec-WebSocket-Version",
        ),
        ("no Host", without("Host"), false, "400", ""),
        (
            "POST",
            upgrade_request("x").replacen("GET", "POST", 1),
            false,
            "400",
            "GET",
        ),
        (
            "HTTP/1.0",
            upgrade_request("x").replacen("HTTP/1.1", "HTTP/1.0", 1),
            false,
            "400",
            "HTTP/1.1",
        ),
        (
            "garbage",
            "\x16\x03\x01\x02\x00garbage\r\n\r\n".to_string(),
            false,
            "400",
            "",
        ),
        (
            "truncated",
            "GET /chat HTTP/1.1\r\nHost: x\r\nUpgr".to_string(),
            true,
            "400",
            "truncated",
        ),
        ("8 KiB header line", long, false, "431", ""),
    ];
    for mode in modes() {
        let s = Sluice::start(mode, origin);
        for (what, req, half, status, needle) in &cases {
            let req = if req.ends_with("\r\n\r\n") || *half || *what == "garbage" {
                req.clone()
            } else {
                format!("{req}\r\n\r\n")
            };
            let answer = ask(s.addr, req.as_bytes(), *half).await;
            // An HTTP/1.0 request is answered in HTTP/1.0.
            assert!(
                answer.starts_with("HTTP/1.") && answer.get(8..13) == Some(&format!(" {status} ")),
                "{mode:?} {what}: expected {status}, got {answer:?}"
            );
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains(&needle.to_ascii_lowercase()),
                "{mode:?} {what}: {needle:?} missing in {answer:?}"
            );
        }
        // Still serving: a good session works after all that.
        let (mut ws, _) = tokio_tungstenite::connect_async(s.url()).await.unwrap();
        use futures_util::SinkExt;
        ws.send("still here".into()).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap().into_text().unwrap(),
            "still here"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_failures_map_to_502_and_504() {
    for mode in modes() {
        // Nothing listens on a freshly released port: 502.
        let dead = free_addr();
        let s = Sluice::start(mode, dead);
        let a = ask(s.addr, upgrade_request("x").as_bytes(), false).await;
        assert!(a.starts_with("HTTP/1.1 502 "), "{mode:?} unreachable: {a}");
        assert!(a.contains("cannot be reached"), "{mode:?}: {a}");
        drop(s);

        // An origin that accepts and never answers: 504 after the timeout.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let oa = l.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Ok((st, _)) = l.accept().await {
                keep.push(st);
            }
        });
        let s = Sluice::start_config(mode, |addr| {
            format!(
                "[timeouts]\norigin_response_ms = 300\n[[listeners]]\nlisten = \"{addr}\"\norigin = \"{oa}\"\n"
            )
        });
        let a = ask(s.addr, upgrade_request("x").as_bytes(), false).await;
        assert!(
            a.starts_with("HTTP/1.1 504 "),
            "{mode:?} silent origin: {a}"
        );
        hold.abort();
        drop(s);

        // A 101 with the wrong Sec-WebSocket-Accept: 502, and no upgrade.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let o = tokio::spawn(async move {
            let (mut o, _) = l.accept().await.unwrap();
            let _ = read_head(&mut o).await;
            o.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
            )
            .await
            .unwrap();
            o
        });
        let a = ask(s.addr, upgrade_request("x").as_bytes(), false).await;
        assert!(a.starts_with("HTTP/1.1 502 "), "{mode:?} bad accept: {a}");
        assert!(a.contains("Sec-WebSocket-Accept"), "{mode:?}: {a}");
        drop(o.await);
        drop(s);

        // A non-101 answer is relayed unchanged, body included.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let o = tokio::spawn(async move {
            let (mut o, _) = l.accept().await.unwrap();
            let (head, _) = read_head(&mut o).await;
            o.write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Origin: yes\r\n\
                  Content-Length: 13\r\nConnection: close\r\n\r\nnot for you.\n",
            )
            .await
            .unwrap();
            head
        });
        let a = ask(s.addr, upgrade_request("x").as_bytes(), false).await;
        let head = o.await.unwrap();
        assert!(a.starts_with("HTTP/1.1 403 Forbidden"), "{mode:?}: {a}");
        assert!(
            a.to_ascii_lowercase().contains("x-origin: yes"),
            "{mode:?}: {a}"
        );
        assert!(a.ends_with("not for you.\n"), "{mode:?}: {a}");
        // And what the origin saw: forwarding headers, key kept.
        let h = head.to_ascii_lowercase();
        assert!(h.contains("x-forwarded-for: 127.0.0.1"), "{head}");
        assert!(h.contains("x-forwarded-proto: http"), "{head}");
        assert!(h.contains("forwarded: for=127.0.0.1;proto=http"), "{head}");
        assert!(
            h.contains(&format!("sec-websocket-key: {}", KEY.to_ascii_lowercase())),
            "{head}"
        );
    }
}

/// What a client gets through Sluice from an origin that reads the request,
/// writes `answer`, and then holds its connection open (as a keep-alive
/// server would), so only the answer's own framing can end it.
async fn answer_from_holding_origin(mode: Mode, answer: &'static [u8]) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = Sluice::start(mode, l.local_addr().unwrap());
    let o = tokio::spawn(async move {
        let (mut o, _) = l.accept().await.unwrap();
        let _ = read_head(&mut o).await;
        o.write_all(answer).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let a = ask(s.addr, upgrade_request("x").as_bytes(), false).await;
    o.abort();
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_answers_end_where_their_framing_says() {
    for mode in modes() {
        // Chunked: the client gets the whole body, then a close, long
        // before any timeout.
        let a = answer_from_holding_origin(
            mode,
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\
              Keep-Alive: timeout=60\r\n\r\n6\r\nlog in\r\n3;x=y\r\n...\r\n0\r\n\r\n",
        )
        .await;
        assert!(
            a.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
            "{mode:?}: {a}"
        );
        assert!(a.contains("\r\nConnection: close\r\n"), "{mode:?}: {a}");
        assert!(
            !a.to_ascii_lowercase().contains("keep-alive"),
            "{mode:?}: {a}"
        );
        assert!(
            a.ends_with("\r\n\r\n6\r\nlog in\r\n3;x=y\r\n...\r\n0\r\n\r\n"),
            "{mode:?}: {a}"
        );

        // Content-Length.
        let a = answer_from_holding_origin(
            mode,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nno room.\r\n",
        )
        .await;
        assert!(a.starts_with("HTTP/1.1 404 Not Found\r\n"), "{mode:?}: {a}");
        assert!(a.ends_with("\r\n\r\nno room.\r\n"), "{mode:?}: {a}");

        // An interim 103 before the 101 is dropped; the session works.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sluice::start(mode, l.local_addr().unwrap());
        let o = tokio::spawn(async move {
            let (mut o, _) = l.accept().await.unwrap();
            let (head, _) = read_head(&mut o).await;
            let answer = format!(
                "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n{}hello",
                switching_protocols(&head)
            );
            o.write_all(answer.as_bytes()).await.unwrap();
            let mut got = [0u8; 5];
            o.read_exact(&mut got).await.unwrap();
            got
        });
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(upgrade_request("x").as_bytes()).await.unwrap();
        let (head, after) = read_head(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{mode:?}: {head}");
        assert!(!head.contains("103"), "{mode:?}: {head}");
        let mut rest = after;
        while rest.len() < 5 {
            let mut b = [0u8; 16];
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "{mode:?}: closed after the 101");
            rest.extend_from_slice(&b[..n]);
        }
        assert_eq!(&rest[..], b"hello", "{mode:?}");
        c.write_all(b"world").await.unwrap();
        assert_eq!(&o.await.unwrap(), b"world", "{mode:?}");
        drop(s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_a_body_is_refused() {
    let (origin, _h) = echo_origin().await;
    let s = Sluice::start(modes()[0], origin);
    let req = upgrade_request("x").replacen("\r\n\r\n", "\r\nContent-Length: 4\r\n\r\nbody", 1);
    let a = ask(s.addr, req.as_bytes(), false).await;
    assert!(a.starts_with("HTTP/1.1 400 "), "{a}");
    assert!(a.contains("no body"), "{a}");
    let line = s.wait_log("refused:", Duration::from_secs(5));
    assert!(line.contains("status=400"), "{line}");
    assert!(line.contains("source=client"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_meet_the_handshake_timeout_on_every_path() {
    let (origin, _h) = echo_origin().await;
    for mode in modes() {
        let s = Sluice::start_config(mode, |addr| {
            format!(
                "[timeouts]\nhandshake_ms = 500\n[[listeners]]\nlisten = \"{addr}\"\norigin = \"{origin}\"\n"
            )
        });
        // Half a head, then nothing: 408 once handshake_ms is up.
        let t0 = std::time::Instant::now();
        let head = upgrade_request("x");
        let slow = ask(s.addr, &head.as_bytes()[..40], false).await;
        assert!(slow.starts_with("HTTP/1.1 408 "), "{mode:?} slow: {slow}");
        assert!(
            t0.elapsed() >= Duration::from_millis(500),
            "{mode:?}: 408 after {:?}",
            t0.elapsed()
        );
        // Connected and silent: the listener defers the accept until bytes
        // come (TCP_DEFER_ACCEPT), and after about a second of SYN-ACK
        // retransmissions takes the connection anyway; then the timeout
        // closes it as it does the slow one.
        let t0 = std::time::Instant::now();
        let silent = ask(s.addr, b"", false).await;
        assert!(
            silent.is_empty() || silent.starts_with("HTTP/1.1 408 "),
            "{mode:?} silent: {silent}"
        );
        eprintln!(
            "{mode:?}: a silent client was closed after {:?}",
            t0.elapsed()
        );
        // The daemon still serves.
        let (mut ws, _) = tokio_tungstenite::connect_async(s.url()).await.unwrap();
        ws.close(None).await.unwrap();
        drop(s);
    }
}
