//! The CoAP adapter (`hono-coap`) over plain UDP, driven by real clients — libcoap's
//! `coap-client-notls` (Debian `libcoap3-bin`) and aiocoap (PyPI) — and, where a test needs a
//! packet no client sends on purpose (a retransmission, garbage), raw datagrams. Records are
//! read back from the real broker.

mod common;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

/// An unauthenticated tenant: the CoAP adapter entry allows devices without credentials.
fn open_tenant() -> serde_json::Value {
    json!({"adapters": [{"type": "hono-coap", "enabled": true,
                         "device-authentication-required": false}]})
}

/// Runs `coap-client-notls` with `args` against `uri`; its output and whether it exited 0.
async fn coap_client(args: &[&str], uri: String) -> (String, bool) {
    let mut cmd = Command::new("coap-client-notls");
    cmd.args(["-B", "5"]).args(args).arg(uri);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("coap-client-notls runs"))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, out.status.success())
}

/// Sends `packet` from a socket of its own and waits for one answer.
async fn exchange(socket: &tokio::net::UdpSocket, port: u16, packet: &Packet) -> Packet {
    socket
        .send_to(&packet.to_bytes_unlimited().unwrap(), ("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    Packet::from_bytes(&buf[..n]).unwrap()
}

fn request(kind: MessageType, method: RequestType, path: &str, mid: u16, payload: &[u8]) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(vec![0xfe, mid as u8]);
    for seg in path.trim_start_matches('/').split('/') {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    p
}

fn code(p: &Packet) -> MessageClass {
    p.header.code
}

#[tokio::test]
async fn anonymous_telemetry_and_events_reach_kafka_con_and_non() {
    let p = Platform::start().await;
    let tenant = p.tenant(open_tenant()).await;
    p.device(&tenant, "sensor", json!({})).await;
    let base = format!("coap://127.0.0.1:{}", p.coap_port);
    let (out, ok) = coap_client(
        &["-m", "put", "-t", "50", "-e", r#"{"temp":21}"#],
        format!("{base}/telemetry/{tenant}/sensor"),
    )
    .await;
    assert!(ok, "{out}");
    // NON: at most once; the short form of the resource.
    let (out, ok) = coap_client(
        &["-N", "-m", "put", "-t", "0", "-e", "non"],
        format!("{base}/t/{tenant}/sensor"),
    )
    .await;
    assert!(ok, "{out}");
    let (out, ok) = coap_client(
        &["-m", "put", "-e", "alarm", "-t", "0"],
        format!("{base}/event/{tenant}/sensor?hono-ttl=30"),
    )
    .await;
    assert!(ok, "{out}");

    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let con = records
        .iter()
        .find(|r| r.payload == br#"{"temp":21}"#)
        .unwrap();
    assert_eq!(con.key, "sensor");
    assert_eq!(con.headers["content-type"], "application/json");
    assert_eq!(con.headers["qos"], "1");
    assert_eq!(con.headers["orig_adapter"], "hono-coap");
    assert_eq!(
        con.headers["orig_address"],
        format!("/telemetry/{tenant}/sensor")
    );
    let non = records.iter().find(|r| r.payload == b"non").unwrap();
    assert_eq!(non.headers["qos"], "0");
    assert_eq!(non.headers["content-type"], "text/plain; charset=utf-8");
    let events = read(&format!("hono.event.{tenant}"), 1).await;
    assert_eq!(events[0].payload, b"alarm");
    assert_eq!(events[0].headers["ttl"], "30000");
}

#[tokio::test]
async fn refusals_get_hono_coap_codes() {
    let p = Platform::start().await;
    let tenant = p.tenant(open_tenant()).await;
    p.device(&tenant, "sensor", json!({})).await;
    p.device(&tenant, "off", json!({"enabled": false})).await;
    let closed = p
        .tenant(json!({"adapters": [{"type": "hono-coap", "enabled": false}]}))
        .await;
    p.device(&closed, "sensor", json!({})).await;
    let needs_auth = p.tenant(json!({})).await;
    p.device(&needs_auth, "sensor", json!({})).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = p.coap_port;
    let con = |method, path: &str, mid, payload: &[u8]| {
        request(MessageType::Confirmable, method, path, mid, payload)
    };
    let cases: Vec<(Packet, ResponseType, &str)> = vec![
        // GET on the root tells nothing (Hono's test).
        (
            con(RequestType::Get, "", 1, b""),
            ResponseType::NotFound,
            "root",
        ),
        (
            con(
                RequestType::Put,
                &format!("/telemetry/{closed}/sensor"),
                2,
                b"x",
            ),
            ResponseType::Forbidden,
            "adapter disabled",
        ),
        (
            con(
                RequestType::Put,
                &format!("/telemetry/{tenant}/off"),
                3,
                b"x",
            ),
            ResponseType::NotFound,
            "device disabled",
        ),
        (
            con(
                RequestType::Put,
                &format!("/telemetry/{tenant}/nobody"),
                4,
                b"x",
            ),
            ResponseType::NotFound,
            "unknown device",
        ),
        (
            con(
                RequestType::Put,
                &format!("/telemetry/{needs_auth}/sensor"),
                5,
                b"x",
            ),
            ResponseType::Unauthorized,
            "tenant requires authentication",
        ),
        (
            con(RequestType::Post, "/telemetry", 6, b"x"),
            ResponseType::Unauthorized,
            "no credentials on plain UDP",
        ),
        (
            con(
                RequestType::Put,
                &format!("/telemetry/{tenant}/sensor"),
                7,
                b"",
            ),
            ResponseType::BadRequest,
            "empty payload without content format",
        ),
        (
            con(
                RequestType::Put,
                &format!("/telemetry/{tenant}/sensor"),
                8,
                &[b'x'; 2049],
            ),
            ResponseType::RequestEntityTooLarge,
            "payload above max_payload_size",
        ),
        (
            request(
                MessageType::NonConfirmable,
                RequestType::Put,
                &format!("/event/{tenant}/sensor"),
                9,
                b"x",
            ),
            ResponseType::BadRequest,
            "event sent NON",
        ),
        (
            con(
                RequestType::Post,
                &format!("/telemetry/{tenant}/sensor"),
                10,
                b"x",
            ),
            ResponseType::MethodNotAllowed,
            "POST to a PUT resource",
        ),
    ];
    for (packet, want, what) in cases {
        let answer = exchange(&socket, port, &packet).await;
        assert_eq!(code(&answer), MessageClass::Response(want), "{what}");
        assert_eq!(
            answer.get_token(),
            packet.get_token(),
            "{what}: token echoed"
        );
    }
    // The empty notification: no payload, `empty` marks it.
    let mut empty = con(
        RequestType::Put,
        &format!("/telemetry/{tenant}/sensor"),
        11,
        b"",
    );
    empty.add_option(CoapOption::UriQuery, b"empty".to_vec());
    let answer = exchange(&socket, port, &empty).await;
    assert_eq!(code(&answer), MessageClass::Response(ResponseType::Changed));
    let mut full = con(
        RequestType::Put,
        &format!("/telemetry/{tenant}/sensor"),
        12,
        b"x",
    );
    full.add_option(CoapOption::UriQuery, b"empty".to_vec());
    let answer = exchange(&socket, port, &full).await;
    assert_eq!(
        code(&answer),
        MessageClass::Response(ResponseType::BadRequest),
        "an empty notification with a payload"
    );
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(
        records[0].headers["content-type"],
        "application/vnd.eclipse-hono-empty-notification"
    );
    let metrics = prometheus_text();
    for reason in [
        "adapter-disabled",
        "payload-too-large",
        "unauthorized",
        "not-found",
    ] {
        assert!(
            metrics.contains(&format!(
                "ferrule_gateway_rejected_total{{component_name=\"hono-coap\",reason=\"{reason}\"}}"
            )),
            "{reason} counted"
        );
    }
}

#[tokio::test]
async fn a_retransmitted_con_is_answered_again_and_written_once() {
    let p = Platform::start().await;
    let tenant = p.tenant(open_tenant()).await;
    p.device(&tenant, "sensor", json!({})).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let path = format!("/telemetry/{tenant}/sensor");
    let first = request(
        MessageType::Confirmable,
        RequestType::Put,
        &path,
        4711,
        b"once",
    );
    let a = exchange(&socket, p.coap_port, &first).await;
    let b = exchange(&socket, p.coap_port, &first).await;
    assert_eq!(a.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(a.header.message_id, 4711);
    assert_eq!(code(&a), MessageClass::Response(ResponseType::Changed));
    assert_eq!(
        a.to_bytes().unwrap(),
        b.to_bytes().unwrap(),
        "the same answer again"
    );
    // A new message id is a new message.
    let second = request(
        MessageType::Confirmable,
        RequestType::Put,
        &path,
        4712,
        b"twice",
    );
    exchange(&socket, p.coap_port, &second).await;
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
    assert_eq!(payloads, [b"once".as_slice(), b"twice".as_slice()]);
    assert!(prometheus_text().contains("ferrule_gateway_coap_duplicates_total"));
}

#[tokio::test]
async fn garbage_datagrams_are_dropped_counted_and_harm_no_one() {
    let p = Platform::start().await;
    let tenant = p.tenant(open_tenant()).await;
    p.device(&tenant, "sensor", json!({})).await;
    // Some of these are read as requests and answered (4.04): not on the socket used below.
    let noise = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for garbage in [
        &b""[..],
        b"\xff",
        b"\x40\x01",             // a header cut short
        b"\x4f\x01\x00\x01",     // token length 15 (reserved)
        b"\x40\x02\x00\x01\xff", // a payload marker without payload
        b"\x40\x02\x00\x01\xd0", // an option delta of 13 without its extension
        &[0x55; 1500],
    ] {
        noise
            .send_to(garbage, ("127.0.0.1", p.coap_port))
            .await
            .unwrap();
    }
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A CoAP ping is answered with a reset.
    let mut ping = Packet::new();
    ping.header.set_type(MessageType::Confirmable);
    ping.header.message_id = 99;
    ping.header.code = MessageClass::Empty;
    let pong = exchange(&socket, p.coap_port, &ping).await;
    assert_eq!(pong.header.get_type(), MessageType::Reset);
    assert_eq!(pong.header.message_id, 99);
    // The adapter still serves.
    let (out, ok) = coap_client(
        &["-m", "put", "-e", "alive", "-t", "0"],
        format!("coap://127.0.0.1:{}/telemetry/{tenant}/sensor", p.coap_port),
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(
        read(&format!("hono.telemetry.{tenant}"), 1).await[0].payload,
        b"alive"
    );
    assert!(prometheus_text().contains(
        "ferrule_gateway_rejected_total{component_name=\"hono-coap\",reason=\"malformed-datagram\"}"
    ));
}

#[tokio::test]
async fn server_time_is_returned_when_asked() {
    let p = Platform::start().await;
    let tenant = p.tenant(open_tenant()).await;
    p.device(&tenant, "sensor", json!({})).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let path = format!("/telemetry/{tenant}/sensor");
    let before = chrono::Utc::now().timestamp_millis();
    let mut by_query = request(MessageType::Confirmable, RequestType::Put, &path, 1, b"x");
    by_query.add_option(CoapOption::UriQuery, b"hono-time".to_vec());
    let mut by_option = request(MessageType::Confirmable, RequestType::Put, &path, 2, b"x");
    by_option.add_option(CoapOption::Unknown(0xFDE8), Vec::new());
    for req in [by_query, by_option] {
        let answer = exchange(&socket, p.coap_port, &req).await;
        let time = answer
            .get_first_option(CoapOption::Unknown(0xFDE8))
            .expect("the time option");
        let ms = time.iter().fold(0i64, |n, b| (n << 8) | i64::from(*b));
        assert!(
            ms >= before && ms <= chrono::Utc::now().timestamp_millis(),
            "{ms}"
        );
    }
    let plain = request(MessageType::Confirmable, RequestType::Put, &path, 3, b"x");
    let answer = exchange(&socket, p.coap_port, &plain).await;
    assert!(
        answer
            .get_first_option(CoapOption::Unknown(0xFDE8))
            .is_none()
    );
}

#[tokio::test]
async fn aiocoap_uploads_a_payload_larger_than_one_block() {
    let p = Platform::start().await;
    let tenant = p.tenant(open_tenant()).await;
    p.device(&tenant, "sensor", json!({})).await;
    let payload = "b".repeat(1800);
    let script = r#"
import asyncio, sys
from aiocoap import Context, Message, PUT
async def main():
    ctx = await Context.create_client_context()
    msg = Message(code=PUT, uri=sys.argv[1], payload=sys.argv[2].encode(), content_format=0)
    resp = await asyncio.wait_for(ctx.request(msg).response, 20)
    print(resp.code)
asyncio.run(main())
"#;
    let python = std::env::var("FERRULE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let uri = format!("coap://127.0.0.1:{}/telemetry/{tenant}/sensor", p.coap_port);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", script, &uri, &payload])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2.04 Changed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records[0].payload.len(), 1800);
}
