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

/// A gateway, a tenant that lets CoAP devices send without credentials, its device `sensor`,
/// a UDP socket of the test's own, and the sensor's telemetry resource.
async fn anonymous_sensor() -> (Platform, String, tokio::net::UdpSocket, String) {
    let p = Platform::start().await;
    let tenant = p.tenant(open_tenant()).await;
    p.device(&tenant, "sensor", json!({})).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let path = format!("/telemetry/{tenant}/sensor");
    (p, tenant, socket, path)
}

/// Runs one of libcoap's clients (`coap-client-notls`, `-openssl`, `-gnutls`) with `args`:
/// its output, and whether it got an answer that is no error. An error response is printed as
/// its code (`4.01 Unauthorized`); a failed session as a log line at level ERR (the client
/// still exits 0).
async fn libcoap(binary: &str, args: Vec<String>) -> (String, bool) {
    let mut cmd = Command::new(binary);
    cmd.args(["-B", "5"]).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("the libcoap client runs"))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = text
        .lines()
        .any(|l| l.starts_with("4.") || l.starts_with("5.") || l.contains(" ERR "));
    let ok = out.status.success() && !refused;
    (text, ok)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// `coap-client-notls` with `args` against `uri`.
async fn coap_client(args: &[&str], uri: String) -> (String, bool) {
    let mut all = strings(args);
    all.push(uri);
    libcoap("coap-client-notls", all).await
}

/// The next datagram `socket` receives (within 10 s).
async fn next_datagram(socket: &tokio::net::UdpSocket) -> Packet {
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("a datagram within 10 s")
        .unwrap();
    Packet::from_bytes(&buf[..n]).unwrap()
}

/// Sends `packet` from a socket of its own and waits for one answer.
async fn exchange(socket: &tokio::net::UdpSocket, port: u16, packet: &Packet) -> Packet {
    socket
        .send_to(&packet.to_bytes_unlimited().unwrap(), ("127.0.0.1", port))
        .await
        .unwrap();
    next_datagram(socket).await
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

/// An empty message (an ACK or a Reset) of message id `mid`.
fn empty_message(kind: MessageType, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
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
        // A CON is answered in its ACK, with its message id; a NON with a NON of its own.
        match packet.header.get_type() {
            MessageType::Confirmable => {
                assert_eq!(
                    answer.header.get_type(),
                    MessageType::Acknowledgement,
                    "{what}"
                );
                assert_eq!(answer.header.message_id, packet.header.message_id, "{what}");
            }
            _ => assert_eq!(
                answer.header.get_type(),
                MessageType::NonConfirmable,
                "{what}"
            ),
        }
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
        "unknown-resource",
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
    let (p, tenant, socket, path) = anonymous_sensor().await;
    let first = request(
        MessageType::Confirmable,
        RequestType::Put,
        &path,
        4711,
        b"once",
    );
    // Sent twice at once: the second arrives while the first is handled (Kafka has not
    // acknowledged it yet) and is dropped; then once more after the answer, which it gets
    // again. One record.
    let bytes = first.to_bytes().unwrap();
    socket
        .send_to(&bytes, ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
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
    let (p, _, socket, path) = anonymous_sensor().await;
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

/// A device that long-polls with aiocoap: a `PUT` of an empty notification with `hono-ttd`,
/// printing what came back as JSON; with `answer`, it posts a response to the location the
/// command named.
const DEVICE: &str = r#"
import asyncio, json, sys
from aiocoap import Context, Message, PUT
async def main():
    base, path, answer = sys.argv[1], sys.argv[2], sys.argv[3] == "answer"
    ctx = await Context.create_client_context()
    resp = await asyncio.wait_for(ctx.request(Message(code=PUT, uri=base + path)).response, 30)
    cf = resp.opt.content_format
    print(json.dumps({"code": str(resp.code), "mtype": str(resp.mtype),
                      "path": list(resp.opt.location_path),
                      "query": list(resp.opt.location_query),
                      "format": None if cf is None else int(cf),
                      "payload": resp.payload.decode()}), flush=True)
    if answer:
        uri = base + "/" + "/".join(resp.opt.location_path) + "?hono-cmd-status=200"
        msg = Message(code=PUT, uri=uri, payload=b'{"volume":7}', content_format=50)
        r = await asyncio.wait_for(ctx.request(msg).response, 30)
        print(json.dumps({"code": str(r.code)}), flush=True)
asyncio.run(main())
"#;

fn spawn_device(
    port: u16,
    path: String,
    answer: bool,
) -> tokio::task::JoinHandle<Vec<serde_json::Value>> {
    let python = std::env::var("FERRULE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    tokio::task::spawn_blocking(move || {
        let base = format!("coap://127.0.0.1:{port}");
        let mode = if answer { "answer" } else { "-" };
        let out = Command::new(python)
            .args(["-c", DEVICE, &base, &path, mode])
            .output()
            .expect("python runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    })
}

fn coap_tenant(timeout_to_ack: i64) -> serde_json::Value {
    json!({"adapters": [{"type": "hono-coap", "enabled": true,
                         "device-authentication-required": false,
                         "ext": {"timeoutToAck": timeout_to_ack}}]})
}

#[tokio::test]
async fn request_response_command_in_a_separate_response_and_its_answer() {
    let p = Platform::start().await;
    // 0: the ACK goes at once, the command later in a CON of its own.
    let tenant = p.tenant(coap_tenant(0)).await;
    p.device(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let device = spawn_device(
        p.coap_port,
        format!("/telemetry/{tenant}/dev?hono-ttd=20&empty"),
        true,
    );
    let notification = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(notification[0].headers["ttd"], "20");
    assert_eq!(
        notification[0].headers["content-type"],
        "application/vnd.eclipse-hono-empty-notification"
    );
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "setVolume"),
            ("content-type", "text/plain"),
            ("response-required", "true"),
            ("correlation-id", "corr-9"),
        ],
        "7",
    )
    .await;
    let out = device.await.unwrap();
    let command = &out[0];
    assert_eq!(command["code"], "2.04 Changed");
    assert_eq!(command["mtype"], "CON", "a separate response");
    assert_eq!(command["query"], json!(["hono-command=setVolume"]));
    let path = command["path"].as_array().unwrap();
    assert_eq!(path.len(), 4, "{path:?}");
    assert_eq!(path[0], "command_response", "long names mirror the request");
    assert_eq!(path[1], tenant.as_str());
    assert_eq!(path[2], "dev");
    assert_eq!(command["format"], 0, "text/plain");
    assert_eq!(command["payload"], "7");
    assert_eq!(out[1]["code"], "2.04 Changed", "the answer was taken");
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    let r = &responses[0];
    assert_eq!(r.key, "dev");
    assert_eq!(r.headers["correlation-id"], "corr-9");
    assert_eq!(r.headers["status"], "200");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.payload, br#"{"volume":7}"#);
}

#[tokio::test]
async fn one_way_command_piggybacked_on_the_ack() {
    let p = Platform::start().await;
    // Negative: the answer always rides on the ACK, however long it takes.
    let tenant = p.tenant(coap_tenant(-1)).await;
    p.device(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let device = spawn_device(
        p.coap_port,
        format!("/t/{tenant}/dev?hono-ttd=20&empty"),
        false,
    );
    read(&format!("hono.telemetry.{tenant}"), 1).await;
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "reboot")],
        "now",
    )
    .await;
    let out = device.await.unwrap();
    assert_eq!(out[0]["mtype"], "ACK", "piggybacked");
    assert_eq!(out[0]["code"], "2.04 Changed");
    assert_eq!(out[0]["query"], json!(["hono-command=reboot"]));
    assert_eq!(
        out[0]["path"],
        json!(["c", tenant, "dev"]),
        "short names mirror the request"
    );
    assert_eq!(out[0]["payload"], "now");
}

/// A command larger than one block (1 024 bytes) goes to the device in blocks (RFC 7959
/// Block2): aiocoap asks for each further block by repeating its request, gets the whole
/// command, and answers it. The repeated requests are no uploads of their own.
#[tokio::test]
async fn a_large_command_reaches_an_aiocoap_device_in_blocks() {
    let p = Platform::start().await;
    let tenant = p.tenant(coap_tenant(-1)).await;
    p.device(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let device = spawn_device(
        p.coap_port,
        format!("/telemetry/{tenant}/dev?hono-ttd=20&empty"),
        true,
    );
    let telemetry = format!("hono.telemetry.{tenant}");
    read(&telemetry, 1).await;
    let command: String = (0..3000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "firmware"),
            ("content-type", "text/plain"),
            ("response-required", "true"),
            ("correlation-id", "big-1"),
        ],
        &command,
    )
    .await;
    let out = device.await.unwrap();
    assert_eq!(out[0]["code"], "2.04 Changed");
    assert_eq!(out[0]["query"], json!(["hono-command=firmware"]));
    assert_eq!(out[0]["payload"], command.as_str(), "the whole command");
    assert_eq!(out[1]["code"], "2.04 Changed", "the answer was taken");
    let answer = read_matching(&format!("hono.command_response.{tenant}"), |r| {
        r.headers.get("correlation-id").map(String::as_str) == Some("big-1")
    })
    .await;
    assert_eq!(answer.headers["status"], "200");
    assert_eq!(
        records_in(&telemetry).await,
        1,
        "the requests for further blocks were not uploads"
    );

    // libcoap's client does the same.
    let uri = format!(
        "coap://127.0.0.1:{}/t/{tenant}/dev?hono-ttd=15&empty",
        p.coap_port
    );
    let libcoap_device =
        tokio::spawn(async move { coap_client(&["-m", "put", "-B", "20"], uri).await });
    read(&telemetry, 2).await;
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "firmware")],
        &command,
    )
    .await;
    let (out, ok) = libcoap_device.await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains(&command), "{out}");
    assert_eq!(records_in(&telemetry).await, 2);
}

/// The Block2 exchange on the wire: the device's Block2 in its long poll sets the block size
/// (early negotiation); every block carries the same ETag, the first the whole size (Size2);
/// a retransmitted block request gets the same block; a block request for a response nobody
/// is fetching gets 4.08. A command whose device does not ask for its last block within the
/// exchange lifetime is reported undelivered (503 to a request-response command's sender).
#[tokio::test]
async fn blocks_of_a_command_and_a_command_not_fetched_in_full() {
    let mut cfg = ferrule_gateways::GatewayConfig::default();
    cfg.coap.exchange_lifetime_secs = 3;
    let p = Platform::start_with(cfg).await;
    let tenant = p.tenant(coap_tenant(-1)).await;
    p.device(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let path = format!("/telemetry/{tenant}/dev");
    let block2 = |num: u32, szx: u32| {
        ferrule_gateways::coap::resource::uint_option(u64::from((num << 4) | szx))
    };
    let poll = |mid: u16, num: u32| {
        let mut r = request(MessageType::Confirmable, RequestType::Put, &path, mid, b"");
        for q in ["hono-ttd=20", "empty"] {
            r.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        r.add_option(CoapOption::Block2, block2(num, 4)); // 256-byte blocks
        r
    };
    socket
        .send_to(&poll(1, 0).to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
    read(&format!("hono.telemetry.{tenant}"), 1).await;
    let command: String = (0..1000u32)
        .map(|i| char::from(b'0' + (i % 10) as u8))
        .collect();
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "config"),
            ("response-required", "true"),
            ("correlation-id", "unfetched"),
        ],
        &command,
    )
    .await;
    let first = next_datagram(&socket).await;
    assert_eq!(code(&first), MessageClass::Response(ResponseType::Changed));
    assert_eq!(first.header.message_id, 1);
    assert_eq!(
        first.get_first_option(CoapOption::Block2),
        Some(&block2(0, 8 | 4)),
        "block 0, more to come, 256 bytes"
    );
    assert_eq!(
        first.get_first_option(CoapOption::Size2),
        Some(&ferrule_gateways::coap::resource::uint_option(1000))
    );
    assert_eq!(first.payload, command.as_bytes()[..256]);
    let etag = first.get_first_option(CoapOption::ETag).cloned();
    assert!(etag.is_some(), "an ETag");

    let second = exchange(&socket, p.coap_port, &poll(2, 1)).await;
    assert_eq!(second.header.message_id, 2);
    assert_eq!(code(&second), MessageClass::Response(ResponseType::Changed));
    assert_eq!(
        second.get_first_option(CoapOption::Block2),
        Some(&block2(1, 8 | 4))
    );
    assert_eq!(second.get_first_option(CoapOption::ETag), etag.as_ref());
    assert_eq!(second.payload, command.as_bytes()[256..512]);
    let again = exchange(&socket, p.coap_port, &poll(2, 1)).await;
    assert_eq!(
        again.payload, second.payload,
        "a retransmission, the same block"
    );

    let mut elsewhere = request(
        MessageType::Confirmable,
        RequestType::Put,
        &format!("/t/{tenant}/dev"),
        3,
        b"",
    );
    elsewhere.add_option(CoapOption::Block2, block2(1, 4));
    let unknown = exchange(&socket, p.coap_port, &elsewhere).await;
    assert_eq!(
        code(&unknown),
        MessageClass::Response(ResponseType::RequestEntityIncomplete)
    );

    // The last block is never asked for: after the exchange lifetime, a 503 to the sender.
    let failure = read_matching(&format!("hono.command_response.{tenant}"), |r| {
        r.headers.get("correlation-id").map(String::as_str) == Some("unfetched")
    })
    .await;
    assert_eq!(failure.headers["status"], "503");
    assert_eq!(records_in(&format!("hono.telemetry.{tenant}")).await, 1);
}

#[tokio::test]
async fn ttd_without_a_command_answers_2_04_when_it_ends() {
    let p = Platform::start().await;
    let tenant = p
        .tenant(json!({"adapters": [{"type": "hono-coap", "enabled": true,
                                     "device-authentication-required": false,
                                     "ext": {"max-ttd": 1}}]}))
        .await;
    p.device(&tenant, "dev", json!({})).await;
    let out = spawn_device(
        p.coap_port,
        format!("/telemetry/{tenant}/dev?hono-ttd=30&empty"),
        false,
    )
    .await
    .unwrap();
    assert_eq!(out[0]["code"], "2.04 Changed");
    assert_eq!(out[0]["query"], json!([]));
    let n = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(n[0].headers["ttd"], "1", "capped by the tenant's max-ttd");
}

/// A plain CON upload follows the tenant's `timeoutToAck` as a long poll does — also once the
/// device's documents are cached and the upload takes the adapter's short way to the producer:
/// with 0 an empty ACK comes at once and the 2.04 in a CON of its own after the broker's
/// acknowledgement (retransmitted until the device acknowledges it), with -1 the 2.04 always
/// rides on the ACK.
#[tokio::test]
async fn plain_uploads_answer_separately_or_piggybacked_as_the_tenant_says() {
    let p = Platform::start().await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (timeout_to_ack, separate, base) in [(0, true, 600), (-1, false, 700)] {
        let tenant = p.tenant(coap_tenant(timeout_to_ack)).await;
        p.device(&tenant, "dev", json!({})).await;
        let path = format!("/event/{tenant}/dev");
        // The first upload fills the registry cache; the next ones find it there.
        // Message ids of their own: the same ones would be retransmissions.
        for mid in base..base + 3u16 {
            let mut up = request(
                MessageType::Confirmable,
                RequestType::Put,
                &path,
                mid,
                format!("m{mid}").as_bytes(),
            );
            up.add_option(CoapOption::ContentFormat, vec![0]);
            let first = exchange(&socket, p.coap_port, &up).await;
            assert_eq!(first.header.get_type(), MessageType::Acknowledgement);
            assert_eq!(first.header.message_id, mid);
            if !separate {
                assert_eq!(code(&first), MessageClass::Response(ResponseType::Changed));
                continue;
            }
            assert_eq!(code(&first), MessageClass::Empty, "an empty ACK at once");
            let response = next_datagram(&socket).await;
            assert_eq!(response.header.get_type(), MessageType::Confirmable);
            assert_eq!(response.get_token(), up.get_token());
            assert_eq!(
                code(&response),
                MessageClass::Response(ResponseType::Changed)
            );
            // Not acknowledged the first time: it comes again, and is acknowledged then.
            let again = next_datagram(&socket).await;
            assert_eq!(again.header.message_id, response.header.message_id);
            let ack = empty_message(MessageType::Acknowledgement, again.header.message_id);
            socket
                .send_to(&ack.to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
                .await
                .unwrap();
        }
        let records = read(&format!("hono.event.{tenant}"), 3).await;
        let payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
        let sent: Vec<String> = (base..base + 3).map(|m| format!("m{m}")).collect();
        assert_eq!(
            payloads,
            sent.iter().map(|m| m.as_bytes()).collect::<Vec<_>>()
        );
    }
}

/// A CON upload Kafka does not take gets 5.03 (Hono §5.4) — telemetry and events alike.
#[tokio::test]
async fn a_con_upload_kafka_does_not_take_gets_5_03() {
    let p = Platform::start_full(
        ferrule_gateways::GatewayConfig::default(),
        unreachable_kafka(),
    )
    .await;
    // -1: the answer rides on the ACK, whenever it comes.
    let tenant = p.tenant(coap_tenant(-1)).await;
    p.device(&tenant, "dev", json!({})).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (mid, endpoint) in [(1u16, "telemetry"), (2, "event")] {
        let up = request(
            MessageType::Confirmable,
            RequestType::Put,
            &format!("/{endpoint}/{tenant}/dev"),
            mid,
            b"not taken",
        );
        let answer = exchange(&socket, p.coap_port, &up).await;
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(
            code(&answer),
            MessageClass::Response(ResponseType::ServiceUnavailable),
            "{endpoint}"
        );
    }
}

/// A long poll with a positive `timeoutToAck` (Hono §5.3): a command that comes within it
/// rides on the ACK; when none has come by then, an empty ACK goes, and the command follows
/// later in a CON of its own.
#[tokio::test]
async fn a_command_within_the_ack_timeout_is_piggybacked_and_a_later_one_separate() {
    let p = Platform::start().await;
    let tenant = p.tenant(coap_tenant(5000)).await;
    p.device(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let poll = |mid: u16| {
        let mut r = request(
            MessageType::Confirmable,
            RequestType::Put,
            &format!("/telemetry/{tenant}/dev"),
            mid,
            b"",
        );
        r.add_option(CoapOption::UriQuery, b"hono-ttd=30".to_vec());
        r.add_option(CoapOption::UriQuery, b"empty".to_vec());
        r
    };
    let command_of = |p: &Packet| {
        p.get_option(CoapOption::LocationQuery)
            .into_iter()
            .flatten()
            .map(|q| String::from_utf8_lossy(q).into_owned())
            .collect::<Vec<_>>()
    };
    let telemetry = format!("hono.telemetry.{tenant}");
    // Within the timeout: the command is sent as soon as the poll is announced.
    let started = std::time::Instant::now();
    socket
        .send_to(&poll(900).to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
    read(&telemetry, 1).await;
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "within")],
        "1",
    )
    .await;
    let answer = next_datagram(&socket).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "before the timeout"
    );
    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(answer.header.message_id, 900);
    assert_eq!(code(&answer), MessageClass::Response(ResponseType::Changed));
    assert_eq!(command_of(&answer), ["hono-command=within"]);
    // Past the timeout: no command for 5 s, so the empty ACK comes first.
    let started = std::time::Instant::now();
    socket
        .send_to(&poll(901).to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
    let ack = next_datagram(&socket).await;
    assert!(
        started.elapsed() >= Duration::from_millis(4500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(ack.header.message_id, 901);
    assert_eq!(code(&ack), MessageClass::Empty);
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "after")],
        "2",
    )
    .await;
    let separate = next_datagram(&socket).await;
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(separate.get_token(), poll(901).get_token());
    assert_eq!(
        code(&separate),
        MessageClass::Response(ResponseType::Changed)
    );
    assert_eq!(command_of(&separate), ["hono-command=after"]);
    let done = empty_message(MessageType::Acknowledgement, separate.header.message_id);
    socket
        .send_to(&done.to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_command_whose_separate_response_is_reset_fails_with_503() {
    let p = Platform::start().await;
    let tenant = p.tenant(coap_tenant(0)).await;
    p.device(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut poll = request(
        MessageType::Confirmable,
        RequestType::Put,
        &format!("/telemetry/{tenant}/dev"),
        500,
        b"",
    );
    poll.add_option(CoapOption::UriQuery, b"hono-ttd=10".to_vec());
    poll.add_option(CoapOption::UriQuery, b"empty".to_vec());
    let ack = exchange(&socket, p.coap_port, &poll).await;
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(code(&ack), MessageClass::Empty, "an empty ACK at once");
    read(&format!("hono.telemetry.{tenant}"), 1).await;
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "open"),
            ("response-required", "true"),
            ("correlation-id", "c-rst"),
        ],
        "",
    )
    .await;
    let separate = next_datagram(&socket).await;
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(separate.get_token(), poll.get_token());
    assert_eq!(
        code(&separate),
        MessageClass::Response(ResponseType::Changed)
    );
    // The device does not take it.
    let rst = empty_message(MessageType::Reset, separate.header.message_id);
    socket
        .send_to(&rst.to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].headers["correlation-id"], "c-rst");
    assert_eq!(responses[0].headers["status"], "503");
}

/// Runs a libcoap client built on `tls` (`openssl` or `gnutls`) with a PSK identity and key.
async fn coaps_client(
    tls: &str,
    identity: &str,
    key: &str,
    args: &[&str],
    uri: String,
) -> (String, bool) {
    let mut all = strings(&["-u", identity, "-k", key]);
    all.extend(strings(args));
    all.push(uri);
    libcoap(&format!("coap-client-{tls}"), all).await
}

#[tokio::test]
async fn psk_devices_upload_over_dtls_with_libcoap_openssl_and_gnutls() {
    let mut cfg = ferrule_gateways::GatewayConfig::default();
    // A wrong key shows only as a Finished that does not decrypt, which DTLS drops silently:
    // the handshake then ends by its time limit.
    cfg.coap.dtls_handshake_timeout_secs = 2;
    let p = Platform::start_with(cfg).await;
    let tenant = p.tenant(json!({})).await;
    p.device(&tenant, "dev", json!({})).await;
    p.credentials_psk(&tenant, "dev", b"secret-key-1").await;
    let identity = format!("dev@{tenant}");
    let uri = format!("coaps://127.0.0.1:{}/telemetry", p.coaps_port);
    for tls in ["openssl", "gnutls"] {
        let (out, ok) = coaps_client(
            tls,
            &identity,
            "secret-key-1",
            &["-m", "post", "-t", "0", "-e", tls],
            uri.clone(),
        )
        .await;
        assert!(ok, "{tls}: {out}");
    }
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let mut payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
    payloads.sort();
    assert_eq!(payloads, [b"gnutls".as_slice(), b"openssl".as_slice()]);
    for r in &records {
        assert_eq!(r.key, "dev");
        assert_eq!(r.headers["orig_adapter"], "hono-coap");
        assert_eq!(r.headers["qos"], "1");
    }
    // A wrong key fails the handshake: nothing is written.
    let (out, ok) = coaps_client(
        "openssl",
        &identity,
        "wrong-key",
        &["-m", "post", "-e", "no"],
        uri.clone(),
    )
    .await;
    assert!(!ok, "{out}");
    let counted = |m: &str| {
        ["dtls-handshake-failed", "dtls-handshake-timeout"]
            .iter()
            .any(|r| {
                m.contains(&format!(
                    "ferrule_gateway_rejected_total{{component_name=\"hono-coap\",reason=\"{r}\"}}"
                ))
            })
    };
    let start = std::time::Instant::now();
    while !counted(&prometheus_text()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a failed handshake is counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(read(&format!("hono.telemetry.{tenant}"), 2).await.len(), 2);
}

#[tokio::test]
async fn psk_gateway_uploads_for_its_devices_only() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device(&tenant, "gw", json!({})).await;
    p.credentials_psk(&tenant, "gw", b"gateway-key").await;
    p.device(&tenant, "behind", json!({"via": ["gw"]})).await;
    p.device(&tenant, "elsewhere", json!({})).await;
    let identity = format!("gw@{tenant}");
    let base = format!("coaps://127.0.0.1:{}", p.coaps_port);
    let (out, ok) = coaps_client(
        "gnutls",
        &identity,
        "gateway-key",
        &["-m", "put", "-t", "0", "-e", "for-behind"],
        format!("{base}/t//behind"),
    )
    .await;
    assert!(ok, "{out}");
    let (out, _) = coaps_client(
        "openssl",
        &identity,
        "gateway-key",
        &["-m", "put", "-t", "0", "-e", "for-elsewhere"],
        format!("{base}/t//elsewhere"),
    )
    .await;
    assert!(out.contains("4.03"), "not in via: {out}");
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records[0].key, "behind");
    assert_eq!(records[0].payload, b"for-behind");
}

/// ClientHellos without a cookie, as a flood from spoofed addresses sends them, are answered
/// statelessly: no session is held for them, and a real device still gets one.
#[tokio::test]
async fn client_hellos_without_cookie_hold_no_session() {
    let p = Platform::start().await;
    let tenant = psk_device(&p).await;
    let flood = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut hello = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut body = vec![0xfe, 0xfd];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 0, 2, 0xc0, 0xa8, 1, 0]);
    let mut hs = vec![
        1,
        0,
        0,
        body.len() as u8,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        body.len() as u8,
    ];
    hs.extend_from_slice(&body);
    hello.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    hello.extend_from_slice(&hs);
    // From 300 addresses (ports): state per address would show as 300 sessions.
    let mut senders = Vec::new();
    for _ in 0..300 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..10 {
            s.send_to(&hello, ("127.0.0.1", p.coaps_port))
                .await
                .unwrap();
        }
        senders.push(s);
    }
    flood
        .send_to(&hello, ("127.0.0.1", p.coaps_port))
        .await
        .unwrap();
    // Each got a HelloVerifyRequest.
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), flood.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (buf[0], buf[13]),
        (22, 3),
        "a HelloVerifyRequest: {:?}",
        &buf[..n]
    );
    // This gateway's listener: the series is labelled with its address.
    let series = format!(
        "ferrule_gateway_coap_dtls_sessions{{listener=\"127.0.0.1:{}\"}} ",
        p.coaps_port
    );
    let sessions = || {
        prometheus_text()
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(
        sessions(),
        Some(0.0),
        "no session for hellos without a cookie"
    );
    let (out, ok) = coaps_client(
        "openssl",
        &format!("dev@{tenant}"),
        "k",
        &["-m", "post", "-t", "0", "-e", "through"],
        format!("coaps://127.0.0.1:{}/telemetry", p.coaps_port),
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(
        read(&format!("hono.telemetry.{tenant}"), 1).await[0].payload,
        b"through"
    );
}

/// An authenticated device polls over DTLS (short names, `piggy` with a tenant
/// `timeoutToAck` of 0: its `deviceTriggeredTimeoutToAck` of -1 applies, so the command rides
/// on the ACK) and answers at the location the command names (`cr/{reqId}`).
#[tokio::test]
async fn psk_device_gets_a_command_over_dtls_and_answers_it() {
    let p = Platform::start().await;
    let tenant = p
        .tenant(json!({"adapters": [{"type": "hono-coap", "enabled": true,
            "ext": {"timeoutToAck": 0, "deviceTriggeredTimeoutToAck": -1}}]}))
        .await;
    p.device(&tenant, "dev", json!({})).await;
    p.credentials_psk(&tenant, "dev", b"dev-key").await;
    let _router = start_router(&tenant).await;
    let identity = format!("dev@{tenant}");
    let base = format!("coaps://127.0.0.1:{}", p.coaps_port);
    let poll = {
        let (identity, base) = (identity.clone(), base.clone());
        tokio::spawn(async move {
            coaps_client(
                "openssl",
                &identity,
                "dev-key",
                &["-m", "post", "-B", "20", "-v", "7", "-t", "0", "-e", "21.5"],
                format!("{base}/t?hono-ttd=15&piggy"),
            )
            .await
        })
    };
    let n = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(n[0].headers["ttd"], "15");
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "setLevel"),
            ("response-required", "true"),
            ("correlation-id", "dtls-1"),
        ],
        "high",
    )
    .await;
    let (out, ok) = poll.await.unwrap();
    assert!(ok, "{out}");
    // libcoap prints the response it got: an ACK carrying 2.04 and the command's options.
    let line = out
        .lines()
        .find(|l| l.contains("c:2.04") && l.contains("Location-Path"))
        .unwrap_or_else(|| panic!("a 2.04 with the command: {out}"));
    assert!(line.contains("t:ACK"), "piggybacked: {line}");
    assert!(
        line.contains("Location-Query:hono-command=setLevel"),
        "{line}"
    );
    assert!(out.contains("high"), "the command's payload: {out}");
    // Location-Path:cr,Location-Path:<reqId>
    let req_id = line
        .split("Location-Path:")
        .nth(2)
        .and_then(|rest| rest.split([',', ' ', ']']).next())
        .unwrap_or_else(|| panic!("a request id: {line}"))
        .to_owned();
    let (out, ok) = coaps_client(
        "openssl",
        &identity,
        "dev-key",
        &["-m", "post", "-t", "0", "-e", "done"],
        format!("{base}/cr/{req_id}?hono-cmd-status=200"),
    )
    .await;
    assert!(ok, "{out}");
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].headers["correlation-id"], "dtls-1");
    assert_eq!(responses[0].headers["status"], "200");
    assert_eq!(responses[0].payload, b"done");
}

/// DTLS with X.509 (as Hono's CoAP adapter offers it): a device certificate from the tenant's trust anchor is
/// the credential; one from a forged CA of the same name gets no session.
#[tokio::test]
async fn devices_authenticate_with_client_certificates_over_dtls() {
    let (dir, tls) = certificates();
    let p = Platform::start_with(ferrule_gateways::GatewayConfig {
        tls,
        ..Default::default()
    })
    .await;
    let ca_cn = random_id("coap-ca");
    let spki = device_credentials(&dir, "dev", &ca_cn, "coap-device-1");
    device_credentials(&dir, "forged", &ca_cn, "coap-device-1");
    let tenant = p
        .tenant(json!({"trusted-ca": [{"subject-dn": format!("CN={ca_cn}"), "public-key": spki}]}))
        .await;
    p.device(&tenant, "dev", json!({})).await;
    p.credentials_x509(&tenant, "dev", "CN=coap-device-1").await;
    let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let uri = format!("coaps://127.0.0.1:{}/telemetry", p.coaps_port);
    for (tls, cert) in [("openssl", "dev"), ("gnutls", "dev"), ("openssl", "forged")] {
        let args = vec![
            "-c".to_owned(),
            path(&format!("{cert}.pem")),
            "-j".into(),
            path(&format!("{cert}-key.pem")),
            "-C".into(),
            path("ca.pem"),
            "-m".into(),
            "post".into(),
            "-t".into(),
            "0".into(),
            "-e".into(),
            format!("{cert} over {tls}"),
            uri.clone(),
        ];
        let (text, ok) = libcoap(&format!("coap-client-{tls}"), args).await;
        assert_eq!(ok, cert != "forged", "{tls} {cert}: {text}");
    }
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let mut payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
    payloads.sort();
    assert_eq!(
        payloads,
        [
            b"dev over gnutls".as_slice(),
            b"dev over openssl".as_slice()
        ]
    );
    assert!(records.iter().all(|r| r.key == "dev"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A device that dies without closing its session and comes back from the same address and
/// port gets a new session at once (RFC 6347 §4.2.8), not the dead one's.
#[tokio::test]
async fn a_device_restarting_from_the_same_port_gets_a_new_session() {
    let p = Platform::start().await;
    let tenant = psk_device(&p).await;
    let local_port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port().to_string()
    };
    let identity = format!("dev@{tenant}");
    let uri = format!("coaps://127.0.0.1:{}/telemetry", p.coaps_port);
    // The first one long-polls, and is killed while it waits.
    let mut first = Command::new("coap-client-openssl")
        .args(["-B", "30", "-p", &local_port, "-u", &identity, "-k", "k"])
        .args(["-m", "post", "-t", "0", "-e", "first"])
        .arg(format!("{uri}?hono-ttd=20"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    read(&format!("hono.telemetry.{tenant}"), 1).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let (out, ok) = coaps_client(
        "openssl",
        &identity,
        "k",
        &["-p", &local_port, "-m", "post", "-t", "0", "-e", "second"],
        uri,
    )
    .await;
    assert!(ok, "{out}");
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    assert!(records.iter().any(|r| r.payload == b"second"));
}

/// A DTLS-PSK session of the test's own — OpenSSL over a socket bound to `local` — where a
/// test must choose the message ids, which libcoap's clients draw at random.
struct PskSession {
    socket: tokio::net::UdpSocket,
    stream: openssl::ssl::SslStream<ferrule_gateways::coap::dtls::Datagrams>,
}

impl PskSession {
    async fn open(local: std::net::SocketAddr, port: u16, identity: &str, key: &[u8]) -> Self {
        Self::try_open(local, port, identity, key, Duration::from_secs(10))
            .await
            .expect("a DTLS session")
    }

    /// A session, or `None` when the server refused it (an alert) or the handshake has not
    /// finished `within` (the server set up no session for it).
    async fn try_open(
        local: std::net::SocketAddr,
        port: u16,
        identity: &str,
        key: &[u8],
        within: Duration,
    ) -> Option<Self> {
        use openssl::ssl::{ErrorCode, Ssl, SslContextBuilder, SslMethod};
        let (identity, key) = (identity.to_owned(), key.to_vec());
        let mut ctx = SslContextBuilder::new(SslMethod::dtls()).unwrap();
        ctx.set_cipher_list("PSK-AES128-CCM8").unwrap();
        ctx.set_psk_client_callback(move |_, _, id, psk| {
            id[..identity.len()].copy_from_slice(identity.as_bytes());
            id[identity.len()] = 0;
            psk[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        let socket = tokio::net::UdpSocket::bind(local).await.unwrap();
        socket.connect(("127.0.0.1", port)).await.unwrap();
        let mut ssl = Ssl::new(&ctx.build()).unwrap();
        ssl.set_connect_state();
        let mut session = PskSession {
            socket,
            stream: openssl::ssl::SslStream::new(ssl, Default::default()).unwrap(),
        };
        let deadline = std::time::Instant::now() + within;
        loop {
            match session.stream.do_handshake() {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                // The server ended the handshake (an alert).
                Err(_) => return None,
            }
            session.flush().await;
            if std::time::Instant::now() >= deadline {
                return None;
            }
            session.receive(Duration::from_millis(500)).await;
        }
        session.flush().await;
        Some(session)
    }

    async fn flush(&mut self) {
        for d in self.stream.get_mut().outbox.drain(..) {
            self.socket.send(&d).await.unwrap();
        }
    }

    /// Takes one datagram, if one comes within `wait`, into the session.
    async fn receive(&mut self, wait: Duration) {
        let mut buf = [0u8; 2048];
        if let Ok(n) = tokio::time::timeout(wait, self.socket.recv(&mut buf)).await {
            self.stream
                .get_mut()
                .inbox
                .push_back(buf[..n.unwrap()].to_vec());
        }
    }

    /// Sends `request` and returns the first CoAP message that comes back.
    async fn exchange(&mut self, request: &Packet) -> Packet {
        self.stream.ssl_write(&request.to_bytes().unwrap()).unwrap();
        self.flush().await;
        let mut plain = [0u8; 2048];
        for _ in 0..20 {
            self.receive(Duration::from_millis(500)).await;
            if let Ok(n) = self.stream.ssl_read(&mut plain) {
                return Packet::from_bytes(&plain[..n]).unwrap();
            }
        }
        panic!("no answer over DTLS");
    }
}

/// RFC 7252 ties a message id to its endpoint, and over DTLS the endpoint is the session: a
/// device that opens a new session from the address and port of an earlier one (a restarted
/// device, a reused NAT mapping) and starts its message ids where the earlier one did has its
/// requests handled — not answered from the earlier session's exchanges, which would drop its
/// data and could hand it an answer meant for another device.
#[tokio::test]
async fn a_new_dtls_session_from_the_same_port_starts_its_own_exchanges() {
    let p = Platform::start().await;
    let tenant = psk_device(&p).await;
    let local = any_local_port();
    let identity = format!("dev@{tenant}");
    for payload in [b"first".as_slice(), b"second"] {
        let mut session = PskSession::open(local, p.coaps_port, &identity, b"k").await;
        let upload = request(
            MessageType::Confirmable,
            RequestType::Post,
            "/telemetry",
            7,
            payload,
        );
        // Within the session a retransmission is answered again and not written twice.
        for _ in 0..2 {
            let answer = session.exchange(&upload).await;
            assert_eq!(code(&answer), MessageClass::Response(ResponseType::Changed));
        }
    }
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let mut payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
    payloads.sort();
    // (`read` waits a moment for more: none came.)
    assert_eq!(payloads, [b"first".as_slice(), b"second".as_slice()]);
}

/// A tenant (returned) with the device `dev`, whose pre-shared key is `k`.
async fn psk_device(p: &Platform) -> String {
    let tenant = p.tenant(json!({})).await;
    p.device(&tenant, "dev", json!({})).await;
    p.credentials_psk(&tenant, "dev", b"k").await;
    tenant
}

/// Asserts that `identity` (key `k`) gets no session from a new port within `within`, and that
/// the refusal is counted as `reason`.
async fn assert_no_session(port: u16, identity: &str, within: Duration, reason: &str) {
    let before = coap_rejections(reason);
    let session = PskSession::try_open(any_local_port(), port, identity, b"k", within).await;
    assert!(session.is_none(), "a session was set up");
    assert!(coap_rejections(reason) > before, "counted as {reason}");
}

fn any_local_port() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// How often the CoAP adapter refused something for `reason` so far (0 before the first).
fn coap_rejections(reason: &str) -> f64 {
    let series = format!(
        "ferrule_gateway_rejected_total{{component_name=\"hono-coap\",reason=\"{reason}\"}} "
    );
    prometheus_text()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The DTLS listener holds at most `max_dtls_sessions` sessions: a device beyond them gets no
/// session (counted as `dtls-sessions-exceeded`) while the others keep theirs.
#[tokio::test]
async fn dtls_sessions_beyond_the_limit_are_refused() {
    let mut cfg = ferrule_gateways::GatewayConfig::default();
    cfg.coap.max_dtls_sessions = 2;
    let p = Platform::start_with(cfg).await;
    let tenant = psk_device(&p).await;
    let identity = format!("dev@{tenant}");
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(PskSession::open(any_local_port(), p.coaps_port, &identity, b"k").await);
    }
    assert_no_session(
        p.coaps_port,
        &identity,
        Duration::from_secs(3),
        "dtls-sessions-exceeded",
    )
    .await;
    // The two held ones still work.
    for (i, session) in held.iter_mut().enumerate() {
        let payload = format!("held-{i}");
        let answer = session
            .exchange(&request(
                MessageType::Confirmable,
                RequestType::Post,
                "/telemetry",
                20 + i as u16,
                payload.as_bytes(),
            ))
            .await;
        assert_eq!(code(&answer), MessageClass::Response(ResponseType::Changed));
    }
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let mut payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
    payloads.sort();
    assert_eq!(payloads, [b"held-0".as_slice(), b"held-1".as_slice()]);
}

/// At most `max_dtls_handshakes` handshakes run at once: while one hangs half-way (a client
/// that proved its address and went silent), another is refused (counted as
/// `dtls-handshakes-exceeded`); once the hanging one times out, handshakes start again.
#[tokio::test]
async fn dtls_handshakes_beyond_the_limit_wait_for_a_free_slot() {
    let mut cfg = ferrule_gateways::GatewayConfig::default();
    cfg.coap.max_dtls_handshakes = 1;
    cfg.coap.dtls_handshake_timeout_secs = 3;
    let p = Platform::start_with(cfg).await;
    let tenant = psk_device(&p).await;
    let identity = format!("dev@{tenant}");
    assert!(dtls_session_starts(p.coaps_port).await, "the hanging one");
    // A second handshake does not run beside the first.
    assert_no_session(
        p.coaps_port,
        &identity,
        Duration::from_millis(1500),
        "dtls-handshakes-exceeded",
    )
    .await;
    // The hanging handshake ends by its time limit; then a device gets through.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut session = PskSession::try_open(
        any_local_port(),
        p.coaps_port,
        &identity,
        b"k",
        Duration::from_secs(10),
    )
    .await
    .expect("a session once the slot is free");
    let answer = session
        .exchange(&request(
            MessageType::Confirmable,
            RequestType::Post,
            "/telemetry",
            1,
            b"after",
        ))
        .await;
    assert_eq!(code(&answer), MessageClass::Response(ResponseType::Changed));
}

/// A CoAP request of `method` on `path` with `queries` as Uri-Query options.
fn request_with(
    kind: MessageType,
    method: RequestType,
    path: &str,
    queries: &[&str],
    mid: u16,
    payload: &[u8],
) -> Packet {
    let mut r = request(kind, method, path, mid, payload);
    for q in queries {
        r.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
    }
    r
}

fn location(p: &Packet, option: CoapOption) -> Vec<String> {
    p.get_option(option)
        .into_iter()
        .flatten()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A gateway over DTLS (Hono §5.1, §5.3): it uploads in the tenant form for a device behind
/// it (not for one of another tenant), polls for that device with `hono-ttd` — here on the
/// event resource, whose upload then carries the ttd — gets a request/response command at
/// `cr//{device}/{reqId}` and a one-way command at `c//{device}`, and answers the first there;
/// an answer without `hono-cmd-status` is 4.00 and nothing is written for it.
#[tokio::test]
async fn psk_gateway_polls_for_a_device_and_answers_its_commands() {
    let p = Platform::start().await;
    // -1: the command always rides on the ACK.
    let tenant = p
        .tenant(json!({"adapters": [{"type": "hono-coap", "enabled": true,
                                     "ext": {"timeoutToAck": -1}}]}))
        .await;
    let other = p.tenant(json!({})).await;
    p.device(&tenant, "gw", json!({})).await;
    p.credentials_psk(&tenant, "gw", b"gateway-key").await;
    p.device(&tenant, "behind", json!({"via": ["gw"]})).await;
    p.device(&other, "behind", json!({})).await;
    let _router = start_router(&tenant).await;
    let mut gw = PskSession::open(
        any_local_port(),
        p.coaps_port,
        &format!("gw@{tenant}"),
        b"gateway-key",
    )
    .await;
    let changed = MessageClass::Response(ResponseType::Changed);
    // The tenant form, for the gateway's own tenant and for another one.
    let up = request(
        MessageType::Confirmable,
        RequestType::Put,
        &format!("/t/{tenant}/behind"),
        1,
        b"tenant-form",
    );
    assert_eq!(code(&gw.exchange(&up).await), changed);
    let up = request(
        MessageType::Confirmable,
        RequestType::Put,
        &format!("/t/{other}/behind"),
        2,
        b"other",
    );
    assert_eq!(
        code(&gw.exchange(&up).await),
        MessageClass::Response(ResponseType::Forbidden),
        "another tenant's device"
    );
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(
        (records[0].key.as_str(), records[0].payload.as_slice()),
        ("behind", b"tenant-form".as_slice())
    );
    // A poll on the event resource; the command is sent once the event announced it.
    let poll = request_with(
        MessageType::Confirmable,
        RequestType::Put,
        "/e//behind",
        &["hono-ttd=20"],
        3,
        b"ev",
    );
    let waiting = tokio::spawn(async move {
        let answer = gw.exchange(&poll).await;
        (gw, answer)
    });
    let events = read(&format!("hono.event.{tenant}"), 1).await;
    assert_eq!(events[0].key, "behind");
    assert_eq!(events[0].headers["ttd"], "20");
    send_command(
        &tenant,
        "behind",
        &[
            ("device_id", "behind"),
            ("subject", "setLevel"),
            ("response-required", "true"),
            ("correlation-id", "gw-1"),
        ],
        "5",
    )
    .await;
    let (mut gw, answer) = waiting.await.unwrap();
    assert_eq!(code(&answer), changed);
    assert_eq!(
        location(&answer, CoapOption::LocationQuery),
        ["hono-command=setLevel"]
    );
    let path = location(&answer, CoapOption::LocationPath);
    assert_eq!(path.len(), 4, "{path:?}");
    assert_eq!(
        &path[..3],
        ["cr", "", "behind"],
        "the gateway form: cr//{{device}}/{{reqId}}"
    );
    assert_eq!(answer.payload, b"5");
    // The answer (a gateway's is a PUT) without a status is refused; with one it is taken.
    let uri = format!("/{}", path.join("/"));
    let bare = request(
        MessageType::Confirmable,
        RequestType::Put,
        &uri,
        4,
        b"no status",
    );
    assert_eq!(
        code(&gw.exchange(&bare).await),
        MessageClass::Response(ResponseType::BadRequest)
    );
    let answered = request_with(
        MessageType::Confirmable,
        RequestType::Put,
        &uri,
        &["hono-cmd-status=200"],
        5,
        b"done",
    );
    assert_eq!(code(&gw.exchange(&answered).await), changed);
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].key, "behind");
    assert_eq!(responses[0].headers["correlation-id"], "gw-1");
    assert_eq!(responses[0].headers["status"], "200");
    assert_eq!(responses[0].payload, b"done");
    // A one-way command: `c//{device}`.
    let poll = request_with(
        MessageType::Confirmable,
        RequestType::Put,
        "/t//behind",
        &["hono-ttd=20", "empty"],
        6,
        b"",
    );
    let waiting = tokio::spawn(async move { gw.exchange(&poll).await });
    read(&format!("hono.telemetry.{tenant}"), 2).await;
    send_command(
        &tenant,
        "behind",
        &[("device_id", "behind"), ("subject", "reboot")],
        "now",
    )
    .await;
    let answer = waiting.await.unwrap();
    assert_eq!(code(&answer), changed);
    assert_eq!(
        location(&answer, CoapOption::LocationQuery),
        ["hono-command=reboot"]
    );
    assert_eq!(
        location(&answer, CoapOption::LocationPath),
        ["c", "", "behind"]
    );
}

/// Hono's content-format rules that let an upload through (§5.2, and Hono's `CoapTestBase`):
/// an empty body with a content format is forwarded as it is, a body without one as
/// `application/octet-stream`.
#[tokio::test]
async fn content_format_rules_that_forward() {
    let (p, tenant, socket, path) = anonymous_sensor().await;
    let mut empty = request(MessageType::Confirmable, RequestType::Put, &path, 30, b"");
    empty.add_option(CoapOption::ContentFormat, vec![0]); // text/plain
    let untyped = request(
        MessageType::Confirmable,
        RequestType::Put,
        &path,
        31,
        b"raw",
    );
    for up in [&empty, &untyped] {
        let a = exchange(&socket, p.coap_port, up).await;
        assert_eq!(code(&a), MessageClass::Response(ResponseType::Changed));
    }
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let seen: Vec<(&str, &[u8])> = records
        .iter()
        .map(|r| (r.headers["content-type"].as_str(), r.payload.as_slice()))
        .collect();
    assert_eq!(
        seen,
        [
            ("text/plain; charset=utf-8", b"".as_slice()),
            ("application/octet-stream", b"raw".as_slice())
        ]
    );
}

/// A disabled gateway uploads nothing for the devices behind it: its PSK identity is refused
/// in the handshake (an "unknown PSK identity" alert, as for a disabled device), so it never
/// gets as far as a request.
#[tokio::test]
async fn a_disabled_gateway_uploads_nothing() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device(&tenant, "gw", json!({"enabled": false})).await;
    p.credentials_psk(&tenant, "gw", b"gateway-key").await;
    p.device(&tenant, "behind", json!({"via": ["gw"]})).await;
    let session = PskSession::try_open(
        any_local_port(),
        p.coaps_port,
        &format!("gw@{tenant}"),
        b"gateway-key",
        Duration::from_secs(5),
    )
    .await;
    assert!(session.is_none(), "a disabled gateway got a session");
    // Nothing was written: the probe below is the only record.
    p.device(&tenant, "probe", json!({})).await;
    p.credentials_psk(&tenant, "probe", b"k").await;
    let mut probe = PskSession::open(
        any_local_port(),
        p.coaps_port,
        &format!("probe@{tenant}"),
        b"k",
    )
    .await;
    let up = request(
        MessageType::Confirmable,
        RequestType::Post,
        "/telemetry",
        2,
        b"probe",
    );
    assert_eq!(
        code(&probe.exchange(&up).await),
        MessageClass::Response(ResponseType::Changed)
    );
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records[0].key, "probe");
}

/// RFC 7252's rules for what the server cannot process: another protocol version is ignored
/// (§3), a CON carrying a response code gets a Reset (§4.2), a critical option the server
/// does not know gets 4.02 (§5.4.1).
#[tokio::test]
async fn messages_the_server_cannot_process_get_the_rfc_answers() {
    let (p, tenant, socket, path) = anonymous_sensor().await;
    let mut v2 = request(MessageType::Confirmable, RequestType::Put, &path, 1, b"x");
    v2.header.set_version(2);
    socket
        .send_to(&v2.to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
    let mut response_as_con = Packet::new();
    response_as_con.header.set_type(MessageType::Confirmable);
    response_as_con.header.code = MessageClass::Response(ResponseType::Content);
    response_as_con.header.message_id = 2;
    let rst = exchange(&socket, p.coap_port, &response_as_con).await;
    assert_eq!(rst.header.get_type(), MessageType::Reset, "a Reset");
    assert_eq!(
        rst.header.message_id, 2,
        "the version-2 message got no answer first"
    );
    let mut critical = request(MessageType::Confirmable, RequestType::Put, &path, 3, b"x");
    critical.add_option(CoapOption::Unknown(2049), b"?".to_vec());
    let answer = exchange(&socket, p.coap_port, &critical).await;
    assert_eq!(
        code(&answer),
        MessageClass::Response(ResponseType::BadOption)
    );
    // An unknown elective option is ignored.
    let mut elective = request(MessageType::Confirmable, RequestType::Put, &path, 4, b"ok");
    elective.add_option(CoapOption::Unknown(2050), b"?".to_vec());
    let answer = exchange(&socket, p.coap_port, &elective).await;
    assert_eq!(code(&answer), MessageClass::Response(ResponseType::Changed));
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records[0].payload, b"ok", "nothing else was written");
}

/// Block-wise bodies (RFC 7959): 2.31 per block, a gap 4.08, a body past `max_payload_size`
/// 4.13 with Size1 — and nothing written for either.
#[tokio::test]
async fn block_wise_bodies_with_gaps_or_too_large_are_refused() {
    let (p, tenant, socket, path) = anonymous_sensor().await;
    // Block1 value: NUM << 4 | M << 3 | SZX; SZX 6 = 1024-byte blocks, 4 = 256.
    let sized = |szx: u32, mid: u16, num: u32, more: bool, payload: &[u8]| {
        let mut p = request(
            MessageType::Confirmable,
            RequestType::Put,
            &path,
            mid,
            payload,
        );
        let v = (num << 4) | (u32::from(more) << 3) | szx;
        let bytes: Vec<u8> = v
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        p.add_option(CoapOption::Block1, bytes);
        p
    };
    let block = |mid, num, more, payload: &[u8]| sized(6, mid, num, more, payload);
    let first = exchange(&socket, p.coap_port, &sized(4, 1, 0, true, &[b'a'; 256])).await;
    assert_eq!(code(&first), MessageClass::Response(ResponseType::Continue));
    // Block 2 without block 1: a gap.
    let gap = exchange(&socket, p.coap_port, &sized(4, 2, 2, false, b"end")).await;
    assert_eq!(
        code(&gap),
        MessageClass::Response(ResponseType::RequestEntityIncomplete)
    );
    // 1024 + 1024 + 1 bytes: past the 2048 the gateway takes.
    exchange(&socket, p.coap_port, &block(3, 0, true, &[b'a'; 1024])).await;
    exchange(&socket, p.coap_port, &block(4, 1, true, &[b'b'; 1024])).await;
    let large = exchange(&socket, p.coap_port, &block(5, 2, false, b"c")).await;
    assert_eq!(
        code(&large),
        MessageClass::Response(ResponseType::RequestEntityTooLarge)
    );
    let size1 = large.get_first_option(CoapOption::Size1).expect("Size1");
    assert_eq!(
        size1.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)),
        2048
    );
    // A whole body afterwards still goes through.
    exchange(&socket, p.coap_port, &block(6, 0, true, &[b'x'; 1024])).await;
    let done = exchange(&socket, p.coap_port, &block(7, 1, false, b"y")).await;
    assert_eq!(code(&done), MessageClass::Response(ResponseType::Changed));
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records[0].payload.len(), 1025);
}

#[tokio::test]
async fn an_unknown_psk_identity_gets_no_session() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    let (out, ok) = coaps_client(
        "gnutls",
        &format!("nobody@{tenant}"),
        "k",
        &["-m", "post", "-t", "0", "-e", "x"],
        format!("coaps://127.0.0.1:{}/telemetry", p.coaps_port),
    )
    .await;
    assert!(!ok, "{out}");
}

/// A DTLS 1.2 ClientHello (one PSK suite) with `cookie`, its record and message sequence
/// numbers `seq`; the same random each time, as a client's second hello repeats its first.
fn client_hello(seq: u8, cookie: &[u8]) -> Vec<u8> {
    let mut body = vec![0xfe, 0xfd];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // no session id
    body.push(cookie.len() as u8);
    body.extend_from_slice(cookie);
    body.extend_from_slice(&[0, 2, 0xc0, 0xa8, 1, 0]);
    let len = body.len() as u8;
    let mut hs = vec![1, 0, 0, len, 0, seq, 0, 0, 0, 0, 0, len];
    hs.extend_from_slice(&body);
    let mut record = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, seq];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// Sends a hello, takes the HelloVerifyRequest's cookie and sends the hello again with it:
/// whether anything (the server's flight, or an alert) answers that within a second, that is
/// whether a session was set up for it. `false` as well when nothing answers the first hello.
async fn dtls_session_starts(port: u16) -> bool {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&client_hello(0, &[]), ("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    let Ok(n) = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await else {
        return false;
    };
    let n = n.unwrap();
    // Record header 13, handshake header 12, then version 2, cookie length 1, cookie.
    assert_eq!((buf[0], buf[13]), (22, 3), "{:?}", &buf[..n]);
    let cookie = buf[28..28 + usize::from(buf[27])].to_vec();
    socket
        .send_to(&client_hello(1, &cookie), ("127.0.0.1", port))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf))
        .await
        .is_ok()
}

/// At shutdown the CoAP listeners stop taking new work while an exchange is still in flight (a
/// separate response the device has not acknowledged): a new DTLS session is not set up,
/// though one was before the stop, and a new plain request gets 5.03.
#[tokio::test]
async fn no_dtls_session_starts_while_the_listener_drains() {
    let p = Platform::start().await;
    let tenant = p.tenant(coap_tenant(0)).await;
    p.device(&tenant, "dev", json!({})).await;
    assert!(dtls_session_starts(p.coaps_port).await, "before the stop");
    // A long poll whose answer comes separately, at the stop.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut poll = request(
        MessageType::Confirmable,
        RequestType::Put,
        &format!("/telemetry/{tenant}/dev"),
        900,
        b"",
    );
    poll.add_option(CoapOption::UriQuery, b"hono-ttd=30".to_vec());
    poll.add_option(CoapOption::UriQuery, b"empty".to_vec());
    let ack = exchange(&socket, p.coap_port, &poll).await;
    assert_eq!(code(&ack), MessageClass::Empty, "an empty ACK at once");
    read(&format!("hono.telemetry.{tenant}"), 1).await;
    p.stop();
    let separate = next_datagram(&socket).await;
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(
        code(&separate),
        MessageClass::Response(ResponseType::Changed)
    );
    // Not acknowledged yet: the listeners drain.
    assert!(
        !dtls_session_starts(p.coaps_port).await,
        "a DTLS session was set up while draining"
    );
    let late = request(
        MessageType::Confirmable,
        RequestType::Put,
        &format!("/telemetry/{tenant}/dev"),
        901,
        b"late",
    );
    let refused = exchange(
        &tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        p.coap_port,
        &late,
    )
    .await;
    assert_eq!(
        code(&refused),
        MessageClass::Response(ResponseType::ServiceUnavailable)
    );
    let ack = empty_message(MessageType::Acknowledgement, separate.header.message_id);
    socket
        .send_to(&ack.to_bytes().unwrap(), ("127.0.0.1", p.coap_port))
        .await
        .unwrap();
}
