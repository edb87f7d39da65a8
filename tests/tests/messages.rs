//! Real WebSocket peers exchange every kind of message through sluice, on
//! every data path: text, binary, ping/pong, fragmented, 16 MiB, close with
//! code and reason, subprotocol, and permessage-deflate (Python peers).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sluice_e2e::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tungstenite_conversation_on_every_path() {
    let (origin, _h) = echo_origin().await;
    for mode in modes() {
        let s = Sluice::start(mode, origin);
        tokio::time::timeout(Duration::from_secs(60), conversation(&s))
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: conversation timed out\n{}", s.logs()));
        // The close log line shows which data path really carried it.
        let line = s.wait_log("closed:", Duration::from_secs(5));
        assert!(line.contains("closed: closed"), "{mode:?}: {line}");
        s.assert_own_path(&line);
    }
}

async fn conversation(s: &Sluice) {
    let mode = s.mode;
    let mut req = s.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "chat, superchat".parse().unwrap());
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (mut ws, resp) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), false)
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: connect: {e}"));
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat", "{mode:?}");

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello"),
        "{mode:?}"
    );
    // The path under test carries every message below.
    quiet().await;

    let mut bin = vec![0u8; 1000];
    Prng::new(1).fill(&mut bin);
    ws.send(Message::binary(bin.clone())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(bin),
        "{mode:?}"
    );

    ws.send(Message::Ping("abc".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong("abc".into()),
        "{mode:?}"
    );

    // One text message in three frames.
    ws.send(Message::Frame(Frame::message(
        "frag",
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        "men",
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        "ted",
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("fragmented"),
        "{mode:?}"
    );

    let mut big = vec![0u8; 16 << 20];
    Prng::new(2).fill(&mut big);
    ws.send(Message::binary(big.clone())).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => assert!(b[..] == big[..], "{mode:?}: 16 MiB message differs"),
        m => panic!("{mode:?}: expected the 16 MiB echo, got {m:?}"),
    }

    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4000),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => {
            assert_eq!(f.code, CloseCode::Library(4000), "{mode:?}");
            assert_eq!(f.reason, "bye", "{mode:?}");
        }
        other => panic!("{mode:?}: expected the close echo, got {other:?}"),
    }
    assert!(
        ws.next().await.is_none(),
        "{mode:?}: stream must end after close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_peers_negotiate_deflate_on_every_path() {
    let origin = PyOrigin::start();
    for mode in modes() {
        let s = Sluice::start(mode, origin.addr);
        let out = tokio::task::spawn_blocking({
            let url = s.url();
            move || {
                std::process::Command::new("python3")
                    .arg(peer_script())
                    .args(["client", &url])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode:?}: python client failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.logs()
        );
        let json = stdout.trim();
        for needle in [
            "\"text\": \"hello\"",
            "\"binary_ok\": true",
            "\"fragmented\": \"fragmented message\"",
            "\"big_ok\": true",
            "\"pong\": true",
            "\"close_code\": 4001",
        ] {
            assert!(
                json.contains(needle),
                "{mode:?}: {needle} missing in {json}"
            );
        }
        // permessage-deflate negotiated end to end: both peers have it.
        assert!(
            json.contains("\"extensions\": [\"permessage-deflate\"]"),
            "{mode:?}: client did not negotiate deflate: {json}"
        );
        assert!(
            json.contains("PerMessageDeflate:permessage-deflate"),
            "{mode:?}: origin did not negotiate deflate: {json}"
        );
        // The subprotocol the client saw is the one the origin chose.
        assert!(
            json.contains("\"subprotocol\": \"chat\", \"extensions\": [\"PerMessageDeflate")
                || json.contains(
                    "\"subprotocol\": \"superchat\", \"extensions\": [\"PerMessageDeflate"
                ),
            "{mode:?}: {json}"
        );
        let client_proto = json
            .split("\"subprotocol\": \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        let origin_proto = json
            .split("\"subprotocol\": \"")
            .nth(2)
            .and_then(|r| r.split('"').next())
            .unwrap();
        assert_eq!(client_proto, origin_proto, "{mode:?}: {json}");
    }
}
