//! What Hono devices and applications rely on beyond uploads: reachability notifications for
//! command subscriptions (Hono's `ttd=-1` / `ttd=0`), unauthenticated devices, and the MQTT
//! 3.1.1 and 5 rules for malformed input, CONNACK properties and DISCONNECT reason codes —
//! raw packets over a socket, records read back from the real broker.

mod common;

use common::mqtt::*;
use common::*;
use ferrule_gateways::GatewayConfig;
use ferrule_gateways::mqtt::{ConnectionEvents, MqttConfig};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5;
use serde_json::json;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const EMPTY_NOTIFICATION: &str = "application/vnd.eclipse-hono-empty-notification";

/// A gateway that reports connects and disconnects as events, so a test can tell when the
/// gateway finished closing a connection.
async fn platform_with_connection_events() -> Platform {
    Platform::start_with(GatewayConfig {
        mqtt: MqttConfig {
            connection_events: ConnectionEvents::Events,
            ..MqttConfig::default()
        },
        ..GatewayConfig::default()
    })
    .await
}

/// The ttd notifications among `records`, as (device id, ttd).
fn notifications(records: &[Record]) -> Vec<(String, String)> {
    records
        .iter()
        .filter(|r| r.headers.get("content-type").map(String::as_str) == Some(EMPTY_NOTIFICATION))
        .map(|r| (r.headers["device_id"].clone(), r.headers["ttd"].clone()))
        .collect()
}

async fn subscribe_v4(c: &mut RawClient, filter: &str, qos: QoS) -> v4::SubscribeReasonCode {
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(filter, qos)))
        .await;
    match c.next().await {
        Some(v4::Packet::SubAck(s)) => s.return_codes[0],
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn command_subscriptions_announce_ttd_minus_one_once_commands_reach_the_device() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    let granted = subscribe_v4(&mut c, "command///req/#", QoS::AtLeastOnce).await;
    assert_eq!(granted, v4::SubscribeReasonCode::Success(QoS::AtLeastOnce));
    let events = read(&format!("hono.event.{tenant}"), 1).await;
    assert_eq!(events.len(), 1, "one notification");
    let n = &events[0];
    assert_eq!(n.key, "dev");
    assert!(n.payload.is_empty());
    assert_eq!(n.headers["content-type"], EMPTY_NOTIFICATION);
    assert_eq!(n.headers["ttd"], "-1");
    assert_eq!(n.headers["qos"], "1");
    assert_eq!(n.headers["orig_adapter"], "hono-mqtt");
    assert_eq!(n.headers["device_id"], "dev");
    // An application that commands the device as soon as it sees the notification is served.
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "right-away")],
        "now",
    )
    .await;
    match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(cmd)) => {
            assert_eq!(cmd.topic, "command///req//right-away");
            c.send(v4::Packet::PubAck(v4::PubAck::new(cmd.pkid))).await;
        }
        other => panic!("{other:?}"),
    }
    // Unsubscribing ends it: ttd 0.
    c.send(v4::Packet::Unsubscribe(v4::Unsubscribe::new(
        "command///req/#",
    )))
    .await;
    assert!(matches!(c.next().await, Some(v4::Packet::UnsubAck(_))));
    let events = read(&format!("hono.event.{tenant}"), 2).await;
    assert_eq!(
        notifications(&events),
        vec![("dev".into(), "-1".into()), ("dev".into(), "0".into())]
    );
}

/// Sends a CONNECT built from raw bytes (protocol `level` 4 or 5, clean session, keep-alive
/// 30, no properties): `client_id` and the optional user name and password as given, so
/// tests can put bytes there that no client library would.
async fn raw_connect(
    port: u16,
    level: u8,
    client_id: &[u8],
    login: Option<(&str, &[u8])>,
) -> tokio::net::TcpStream {
    let flags = if login.is_some() {
        0b1100_0010
    } else {
        0b0000_0010
    };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 30];
    if level == 5 {
        body.push(0);
    }
    let mut field = |bytes: &[u8]| {
        body.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(bytes);
    };
    field(client_id);
    if let Some((user, password)) = login {
        field(user.as_bytes());
        field(password);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&packet).await.unwrap();
    s
}

/// A password is binary data in both versions: one that is not UTF-8 is a wrong password
/// (CONNACK 0x04 / 0x86), not a malformed packet.
#[tokio::test]
async fn a_password_that_is_not_utf8_is_refused_as_wrong_credentials() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let user = user("dev", &tenant);
    for (level, refused) in [(4u8, 0x04u8), (5, 0x86)] {
        let mut s = raw_connect(p.mqtt_port, level, b"c", Some((&user, &[0xff, 0xfe]))).await;
        let mut connack = [0u8; 4];
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut connack),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(connack[0], 0x20, "level {level}: a CONNACK");
        assert_eq!(
            connack[3], refused,
            "level {level}: bad user name or password"
        );
    }
}

/// A malformed MQTT 5 CONNECT (a client id that is not UTF-8) is answered with CONNACK 0x81
/// before the close; an MQTT 3.1.1 one is just closed.
#[tokio::test]
async fn a_malformed_mqtt5_connect_gets_a_connack_saying_so() {
    let p = Platform::start().await;
    for (level, expected) in [(5u8, Some(0x81u8)), (4, None)] {
        let mut s = raw_connect(p.mqtt_port, level, &[0xff], None).await;
        let mut got = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the connection is closed")
            .unwrap();
        match expected {
            Some(reason) => assert_eq!(got, [0x20, 3, 0, reason, 0], "level {level}"),
            None => assert!(got.is_empty(), "level {level}: {got:?}"),
        }
    }
}

/// The `ttd=-1` notification is written only once the route is in the routing state: an
/// application (or router) that looks the moment the notification is visible finds the device
/// reachable.
#[tokio::test]
async fn the_ttd_notification_is_visible_only_once_the_route_exists() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let routing = routing().await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    // The event topic exists and is being read before the subscription, so the notification
    // is seen within milliseconds of being written.
    let mut seen = watch_topic(&format!("hono.event.{tenant}"));
    c.publish("event", b"first", QoS::AtLeastOnce, 1).await;
    assert!(matches!(c.next().await, Some(v4::Packet::PubAck(_))));
    let first = tokio::time::timeout(Duration::from_secs(20), seen.recv()).await;
    assert_eq!(first.unwrap().unwrap().payload, b"first");
    assert_eq!(
        routing.resolve(&tenant, "dev", &[], &[]).await.unwrap(),
        None
    );
    // SUBACK not awaited: the check must not wait for anything the gateway does after the
    // notification.
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "command///req/#",
        QoS::AtLeastOnce,
    )))
    .await;
    let n = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .unwrap()
        .unwrap();
    let route = routing.resolve(&tenant, "dev", &[], &[]).await.unwrap();
    assert_eq!(n.headers["ttd"], "-1");
    assert!(
        route.is_some(),
        "the notification was visible before the route existed"
    );
    assert!(matches!(c.next().await, Some(v4::Packet::SubAck(_))));
}

#[tokio::test]
async fn gateway_subscriptions_announce_the_gateway_or_the_device_they_are_for() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "gw", json!({})).await;
    p.device(&tenant, "edge", json!({"via": ["gw"]})).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("gw", &tenant), 60).await;
    // For all its devices: the gateway's own id.
    let all = subscribe_v4(&mut c, "command//+/req/#", QoS::AtMostOnce).await;
    assert_eq!(all, v4::SubscribeReasonCode::Success(QoS::AtMostOnce));
    let events = read(&format!("hono.event.{tenant}"), 1).await;
    assert_eq!(notifications(&events), vec![("gw".into(), "-1".into())]);
    assert_eq!(events[0].headers["orig_adapter"], "hono-mqtt");
    // For one device, replacing the gateway-wide one (Hono uses only the last): the wide
    // subscription ends (ttd 0 for the gateway), the device's starts.
    let one = subscribe_v4(&mut c, "command//edge/req/#", QoS::AtMostOnce).await;
    assert_eq!(one, v4::SubscribeReasonCode::Success(QoS::AtMostOnce));
    // Records are keyed by device: the order holds per device.
    let events = read(&format!("hono.event.{tenant}"), 3).await;
    let mut seen = notifications(&events);
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("edge".into(), "-1".into()),
            ("gw".into(), "-1".into()),
            ("gw".into(), "0".into())
        ]
    );
    // The connection closes: the device's subscription ends.
    drop(c);
    let events = read(&format!("hono.event.{tenant}"), 4).await;
    let edge: Vec<_> = notifications(&events)
        .into_iter()
        .filter(|(d, _)| d == "edge")
        .collect();
    assert_eq!(
        edge,
        vec![("edge".into(), "-1".into()), ("edge".into(), "0".into())]
    );
}

/// A device subscribes on `first`, reconnects to the gateway on `second_port` (the same
/// instance or another) before the old connection is gone, subscribes again, then the old
/// connection drops. `first` reports connects and disconnects, so the test knows when it
/// closed the old connection: `events` records are on the event topic then.
async fn reconnect_and_drop_the_old_connection(first: &Platform, second_port: u16, events: usize) {
    let tenant = first.tenant(json!({})).await;
    first.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let (mut old, _) = RawClient::connect(first.mqtt_port, &user("dev", &tenant), 60).await;
    subscribe_v4(&mut old, "command///req/#", QoS::AtMostOnce).await;
    let (mut new, _) = RawClient::connect(second_port, &user("dev", &tenant), 60).await;
    subscribe_v4(&mut new, "command///req/#", QoS::AtMostOnce).await;
    drop(old);
    let records = read(&format!("hono.event.{tenant}"), events).await;
    let disconnects = records
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.payload).contains("disconnected"))
        .count();
    assert_eq!(disconnects, 1, "the old connection was closed: {records:?}");
    assert_eq!(
        notifications(&records),
        vec![("dev".into(), "-1".into()), ("dev".into(), "-1".into())],
        "no ttd 0 while the newer subscription lives"
    );
    // Commands still reach the device on its new connection.
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "still-there")],
        "x",
    )
    .await;
    match new.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(cmd)) => assert_eq!(cmd.topic, "command///req//still-there"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_reconnect_keeps_the_newer_subscription_and_announces_no_end() {
    let p = platform_with_connection_events().await;
    // connected, -1, connected, -1, disconnected.
    reconnect_and_drop_the_old_connection(&p, p.mqtt_port, 5).await;
}

#[tokio::test]
async fn a_reconnect_to_another_gateway_instance_keeps_its_subscription() {
    // Through the load balancer to the second instance: the first one's routing entry was
    // taken over, so it announces no end. Events: connected (first), -1, -1, disconnected.
    let first = platform_with_connection_events().await;
    let second = Platform::start().await;
    reconnect_and_drop_the_old_connection(&first, second.mqtt_port, 4).await;
}

/// A tenant whose MQTT adapter lets devices connect without credentials.
fn anonymous_tenant() -> serde_json::Value {
    json!({"adapters": [
        {"type": "hono-mqtt", "enabled": true, "device-authentication-required": false},
        {"type": "hono-http", "enabled": true, "device-authentication-required": false}
    ]})
}

#[tokio::test]
async fn unauthenticated_devices_publish_subscribe_and_respond_where_the_tenant_allows() {
    let p = Platform::start().await;
    let tenant = p.tenant(anonymous_tenant()).await;
    p.device(&tenant, "dev", json!({})).await;
    let strict = p.tenant(json!({})).await;
    p.device(&strict, "dev", json!({})).await;
    let _router = start_router(&tenant).await;

    // mosquitto_pub without user name and password.
    let mut pub_cmd = std::process::Command::new("mosquitto_pub");
    pub_cmd
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &p.mqtt_port.to_string(),
            "-V",
            "mqttv311",
        ])
        .args([
            "-t",
            &format!("telemetry/{tenant}/dev"),
            "-m",
            "anon",
            "-q",
            "1",
        ]);
    let out = tokio::task::spawn_blocking(move || pub_cmd.output())
        .await
        .unwrap()
        .expect("mosquitto_pub is installed");
    assert!(out.status.success(), "{out:?}");
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records[0].key, "dev");
    assert_eq!(records[0].payload, b"anon");
    assert_eq!(
        records[0].headers["orig_address"],
        format!("telemetry/{tenant}/dev")
    );

    let (mut c, code) = RawClient::connect_anonymous(p.mqtt_port).await;
    assert_eq!(code, v4::ConnectReturnCode::Success);
    // Only the `{tenant}/{device}` forms, for devices that exist.
    assert_eq!(
        subscribe_v4(&mut c, "command///req/#", QoS::AtMostOnce).await,
        v4::SubscribeReasonCode::Failure
    );
    assert_eq!(
        subscribe_v4(
            &mut c,
            &format!("command/{tenant}/nobody/req/#"),
            QoS::AtMostOnce
        )
        .await,
        v4::SubscribeReasonCode::Failure
    );
    assert_eq!(
        subscribe_v4(
            &mut c,
            &format!("command/{strict}/dev/req/#"),
            QoS::AtMostOnce
        )
        .await,
        v4::SubscribeReasonCode::Failure,
        "the other tenant requires authentication"
    );
    assert_eq!(
        subscribe_v4(
            &mut c,
            &format!("command/{tenant}/dev/req/#"),
            QoS::AtLeastOnce
        )
        .await,
        v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let events = read(&format!("hono.event.{tenant}"), 1).await;
    assert_eq!(notifications(&events), vec![("dev".into(), "-1".into())]);
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "ask"),
            ("response-required", "true"),
            ("correlation-id", "anon-1"),
        ],
        "?",
    )
    .await;
    let cmd = match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(cmd)) => cmd,
        other => panic!("{other:?}"),
    };
    c.send(v4::Packet::PubAck(v4::PubAck::new(cmd.pkid))).await;
    let parts: Vec<&str> = cmd.topic.split('/').collect();
    assert_eq!(
        (parts[0], parts[1], parts[2], parts[3], parts[5]),
        ("command", tenant.as_str(), "dev", "req", "ask"),
        "{}",
        cmd.topic
    );
    c.publish(
        &format!("command/{tenant}/dev/res/{}/200", parts[4]),
        b"answer",
        QoS::AtLeastOnce,
        7,
    )
    .await;
    assert_eq!(c.next().await, Some(v4::Packet::PubAck(v4::PubAck::new(7))));
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].headers["correlation-id"], "anon-1");
    assert_eq!(responses[0].payload, b"answer");

    // Uploads for a tenant that requires authentication close the connection, unwritten.
    c.publish(
        &format!("telemetry/{strict}/dev"),
        b"no",
        QoS::AtLeastOnce,
        8,
    )
    .await;
    c.expect_closed().await;
    let (mut c, _) = RawClient::connect_anonymous(p.mqtt_port).await;
    // An upload without tenant and device cannot be attributed: closed too.
    c.publish("telemetry", b"who", QoS::AtLeastOnce, 9).await;
    c.expect_closed().await;
    let (mut c, _) = RawClient::connect_anonymous(p.mqtt_port).await;
    c.publish(
        &format!("telemetry/{tenant}/dev"),
        b"second",
        QoS::AtLeastOnce,
        10,
    )
    .await;
    assert_eq!(
        c.next().await,
        Some(v4::Packet::PubAck(v4::PubAck::new(10)))
    );
    // The device must exist and be enabled: uploads for others close the connection.
    p.device(&tenant, "off", json!({"enabled": false})).await;
    for device in ["nobody", "off"] {
        let (mut c, _) = RawClient::connect_anonymous(p.mqtt_port).await;
        let topic = format!("telemetry/{tenant}/{device}");
        c.publish(&topic, b"no", QoS::AtLeastOnce, 11).await;
        c.expect_closed().await;
    }
    assert_eq!(
        records_in(&format!("hono.telemetry.{strict}")).await,
        0,
        "nothing reached the tenant that requires authentication"
    );
    // The same count finds the open tenant's two records.
    assert_eq!(records_in(&format!("hono.telemetry.{tenant}")).await, 2);
    let written = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let payloads: Vec<&[u8]> = written.iter().map(|r| &r.payload[..]).collect();
    assert_eq!(
        payloads,
        vec![&b"anon"[..], b"second"],
        "nothing else was written"
    );
    assert!(
        prometheus_text().lines().any(
            |l| l.starts_with(
                "hono_connections_unauthenticated{component_name=\"hono-mqtt\",component_type=\"adapter\"}",
            )
        ),
        "the unauthenticated connections are counted"
    );
}

#[tokio::test]
async fn an_adapter_switch_refuses_unauthenticated_devices_whatever_the_tenant_allows() {
    let mut cfg = GatewayConfig::default();
    cfg.mqtt.allow_unauthenticated = false;
    cfg.http.allow_unauthenticated = false;
    let p = Platform::start_with(cfg).await;
    let tenant = p.tenant(anonymous_tenant()).await;
    p.device(&tenant, "dev", json!({})).await;
    let (_, code) = RawClient::connect_anonymous(p.mqtt_port).await;
    assert_eq!(code, v4::ConnectReturnCode::BadUserNamePassword);
    let r = p
        .put(&format!("/telemetry/{tenant}/dev"))
        .header("content-type", "text/plain")
        .body("anon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    // With the switch on (the default), the same HTTP upload is accepted.
    let open = Platform::start().await;
    let r = open
        .put(&format!("/telemetry/{tenant}/dev"))
        .header("content-type", "text/plain")
        .body("anon")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

fn v5_login(device: &str, tenant: &str) -> (String, String) {
    (user(device, tenant), "pw".into())
}

async fn connect_v5(
    port: u16,
    device: &str,
    tenant: &str,
    properties: Option<v5::ConnectProperties>,
) -> V5Client {
    let (u, pw) = v5_login(device, tenant);
    let (c, ack) = V5Client::connect(port, &random_id("v5"), Some((&u, &pw)), properties).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    c
}

/// Device `dev` of `tenant` over MQTT 5, subscribed to its commands at `qos`.
async fn subscribed_v5(
    port: u16,
    tenant: &str,
    properties: Option<v5::ConnectProperties>,
    qos: QoS5,
) -> V5Client {
    let mut c = connect_v5(port, "dev", tenant, properties).await;
    c.send(v5::Packet::Subscribe(v5::Subscribe::new(
        v5::Filter::new("command///req/#", qos),
        None,
    )))
    .await;
    assert!(matches!(c.next().await, Some(v5::Packet::SubAck(_))));
    c
}

/// A refused subscription's SUBACK names the reason from the refusal table for an MQTT 5
/// client (an MQTT 3.1.1 client gets 0x80 for each, as from Hono): a filter the adapter does
/// not offer is invalid (0x8F), a gateway's subscription for a device not behind it is not
/// authorised (0x87); the allowed one beside them is granted.
#[tokio::test]
async fn mqtt5_suback_says_why_a_subscription_was_refused() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "gw", json!({})).await;
    p.device(&tenant, "behind", json!({"via": ["gw"]})).await;
    p.device(&tenant, "elsewhere", json!({})).await;
    let mut c = connect_v5(p.mqtt_port, "gw", &tenant, None).await;
    let filters = [
        "not/a/hono/topic/#",
        "command//elsewhere/req/#",
        "command//behind/req/#",
    ];
    c.send(v5::Packet::Subscribe(v5::Subscribe::new_many(
        filters.map(|f| v5::Filter::new(f, QoS5::AtLeastOnce)),
        None,
    )))
    .await;
    match c.next().await {
        Some(v5::Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            [
                v5::SubscribeReasonCode::TopicFilterInvalid,
                v5::SubscribeReasonCode::NotAuthorized,
                v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce),
            ]
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn mqtt5_connack_announces_limits_and_assigns_client_ids() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let (u, pw) = v5_login("dev", &tenant);
    let (_c, ack) = V5Client::connect(p.mqtt_port, "", Some((&u, &pw)), None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    let props = ack
        .properties
        .expect("an MQTT 5 CONNACK carries properties");
    let assigned = props
        .assigned_client_identifier
        .expect("Assigned Client Identifier for an empty client id");
    assert!(!assigned.is_empty());
    assert_eq!(props.max_qos, Some(1), "QoS 2 is not supported");
    assert_eq!(props.receive_max, Some(100), "gateway.mqtt.max_in_flight");
    assert_eq!(
        props.max_packet_size,
        Some(2048 + 1024),
        "max_payload_size and room for topic and properties"
    );
    assert_eq!(props.retain_available, Some(1));
    assert_eq!(props.wildcard_subscription_available, Some(1));
    assert_eq!(props.shared_subscription_available, Some(0));
    assert_eq!(props.topic_alias_max, Some(0));
    // A client id of its own gets none assigned.
    let (_c, ack) = V5Client::connect(p.mqtt_port, "mine", Some((&u, &pw)), None).await;
    assert_eq!(
        ack.properties.and_then(|p| p.assigned_client_identifier),
        None
    );
}

/// Raw bytes of an MQTT 5 PUBLISH without properties.
fn v5_publish_bytes(topic: &[u8], qos1: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0, topic.len() as u8];
    body.extend_from_slice(topic);
    if qos1 {
        body.extend_from_slice(&[0, 1]);
    }
    body.push(0);
    body.extend_from_slice(payload);
    let mut packet = vec![if qos1 { 0x32 } else { 0x30 }, body.len() as u8];
    packet.extend(body);
    packet
}

#[tokio::test]
async fn mqtt5_devices_get_a_disconnect_with_the_reason_before_the_close() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let cases: [(Vec<u8>, v5::DisconnectReasonCode); 4] = [
        // A topic that is not well-formed UTF-8: malformed packet.
        (
            v5_publish_bytes(b"telemetry/\xff", true, b"x"),
            v5::DisconnectReasonCode::MalformedPacket,
        ),
        // A wildcard in a topic name: protocol error.
        (
            v5_publish_bytes(b"telemetry/?correlation-id=a+b", true, b"x"),
            v5::DisconnectReasonCode::ProtocolError,
        ),
        // QoS 2 (the CONNACK said Maximum QoS 1).
        (
            vec![
                0x34, 14, 0, 9, b't', b'e', b'l', b'e', b'm', b'e', b't', b'r', b'y', 0, 1, 0,
            ],
            v5::DisconnectReasonCode::QoSNotSupported,
        ),
        // One byte over the announced Maximum Packet Size (3 072), with a payload within
        // the 2 048-byte limit: 3 073 bytes in all, remaining length 3 070 (0xfe 0x17).
        (
            {
                let topic_len = 3073 - 1 - 2 - 2 - 1 - 2000;
                let mut big = vec![0x30, 0xfe, 0x17, (topic_len >> 8) as u8, topic_len as u8];
                big.extend_from_slice(b"telemetry/?k=");
                big.extend(std::iter::repeat_n(b'a', topic_len - 13));
                big.push(0);
                big.extend(std::iter::repeat_n(b'x', 2000));
                assert_eq!(big.len(), 3073);
                big
            },
            v5::DisconnectReasonCode::PacketTooLarge,
        ),
    ];
    for (bytes, want) in cases {
        let mut c = connect_v5(p.mqtt_port, "dev", &tenant, None).await;
        c.send_raw(&bytes).await;
        assert_eq!(c.expect_disconnect().await, want, "{bytes:x?}");
    }
    // A second CONNECT is a protocol error.
    let mut c = connect_v5(p.mqtt_port, "dev", &tenant, None).await;
    c.send(v5::Packet::Connect(
        v5::Connect {
            keep_alive: 60,
            client_id: "again".into(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    ))
    .await;
    assert_eq!(
        c.expect_disconnect().await,
        v5::DisconnectReasonCode::ProtocolError
    );
    // Disabling the device revokes the connection: not authorised.
    let mut c = connect_v5(p.mqtt_port, "dev", &tenant, None).await;
    p.update_device(&tenant, "dev", json!({"enabled": false}))
        .await;
    assert_eq!(
        c.expect_disconnect().await,
        v5::DisconnectReasonCode::NotAuthorized
    );
    // Nothing of the refused publishes was written.
    p.update_device(&tenant, "dev", json!({"enabled": true}))
        .await;
    let mut c = connect_v5(p.mqtt_port, "dev", &tenant, None).await;
    let mut ok = v5::Publish::new("telemetry", QoS5::AtLeastOnce, "fine", None);
    ok.pkid = 3;
    c.send(v5::Packet::Publish(ok)).await;
    assert!(matches!(c.next().await, Some(v5::Packet::PubAck(a)) if a.pkid == 3));
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].payload, b"fine");
}

#[tokio::test]
async fn malformed_topics_close_mqtt311_connections_and_write_nothing() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let bad: [&[u8]; 3] = [
        b"telemetry/?correlation-id=a+b",
        b"event/#",
        b"telemetry/\xc3\x28",
    ];
    for topic in bad {
        let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
        let mut raw = vec![0x32, (topic.len() + 5) as u8, 0, topic.len() as u8];
        raw.extend_from_slice(topic);
        raw.extend_from_slice(&[0, 1, b'x']);
        c.stream.write_all(&raw).await.unwrap();
        assert_eq!(c.next().await, None, "closed, not acknowledged");
    }
    // A filter with a misplaced wildcard, and U+0000 in a filter.
    for filter in ["command/#/req", "command///req/\0"] {
        let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
        c.send(v4::Packet::Subscribe(v4::Subscribe::new(
            filter,
            QoS::AtMostOnce,
        )))
        .await;
        assert_eq!(c.next().await, None, "closed, no SUBACK");
    }
    // What is written afterwards is the first and only record of each topic.
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    c.publish("telemetry", b"fine", QoS::AtLeastOnce, 1).await;
    assert_eq!(c.next().await, Some(v4::Packet::PubAck(v4::PubAck::new(1))));
    c.publish("event", b"fine", QoS::AtLeastOnce, 2).await;
    assert_eq!(c.next().await, Some(v4::Packet::PubAck(v4::PubAck::new(2))));
    for topic in ["telemetry", "event"] {
        let records = read(&format!("hono.{topic}.{tenant}"), 1).await;
        let written: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(written, vec![&b"fine"[..]], "{topic}");
    }
}

#[tokio::test]
async fn mqtt5_unsuback_reasons_and_command_content_type() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let mut c = subscribed_v5(p.mqtt_port, &tenant, None, QoS5::AtMostOnce).await;
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "typed"),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await;
    match c.next_within(Duration::from_secs(30)).await {
        Some(v5::Packet::Publish(cmd)) => {
            assert_eq!(&cmd.topic[..], b"command///req//typed");
            assert_eq!(
                cmd.properties.and_then(|p| p.content_type).as_deref(),
                Some("application/json")
            );
        }
        other => panic!("{other:?}"),
    }
    let mut unsubscribe = v5::Unsubscribe::new("command///req/#", None);
    unsubscribe.filters.push("never/subscribed".into());
    unsubscribe.pkid = 4;
    c.send(v5::Packet::Unsubscribe(unsubscribe)).await;
    match c.next().await {
        Some(v5::Packet::UnsubAck(a)) => assert_eq!(
            a.reasons,
            vec![
                v5::UnsubAckReason::Success,
                v5::UnsubAckReason::NoSubscriptionExisted
            ]
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn commands_larger_than_the_device_takes_are_not_sent_and_fail_with_a_reason() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let props = v5::ConnectProperties {
        max_packet_size: Some(128),
        ..v5::ConnectProperties::new()
    };
    let mut c = subscribed_v5(p.mqtt_port, &tenant, Some(props), QoS5::AtLeastOnce).await;
    let big = "x".repeat(600);
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "big"),
            ("response-required", "true"),
            ("correlation-id", "big-1"),
        ],
        &big,
    )
    .await;
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    let r = &responses[0];
    assert_eq!(r.headers["correlation-id"], "big-1");
    assert_eq!(r.headers["status"], "413");
    assert_eq!(
        r.headers["content-type"],
        "application/vnd.eclipse-hono-delivery-failure-notification+json"
    );
    let body = String::from_utf8_lossy(&r.payload);
    assert!(body.contains("Maximum Packet Size (128 bytes)"), "{body}");
    // The connection lives on; the next packet it gets is the small command.
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "small")],
        "s",
    )
    .await;
    match c.next_within(Duration::from_secs(30)).await {
        Some(v5::Packet::Publish(cmd)) => assert_eq!(&cmd.topic[..], b"command///req//small"),
        other => panic!("{other:?}"),
    }
    // A subject no MQTT topic may hold is not sent either; its sender learns why.
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "a#b"),
            ("response-required", "true"),
            ("correlation-id", "wild-1"),
        ],
        "w",
    )
    .await;
    let r = read_matching(&format!("hono.command_response.{tenant}"), |r| {
        r.headers["correlation-id"] == "wild-1"
    })
    .await;
    assert_eq!(r.headers["status"], "400");
    let quiet = tokio::time::timeout(Duration::from_millis(300), c.next()).await;
    assert!(quiet.is_err(), "nothing sent: {quiet:?}");
}

#[tokio::test]
async fn mqtt5_unsupported_subscription_features_and_tiny_packet_limits() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    // A Subscription Identifier (the CONNACK said none are available): 0xA1.
    let mut c = connect_v5(p.mqtt_port, "dev", &tenant, None).await;
    let props = v5::SubscribeProperties {
        id: Some(7),
        user_properties: Vec::new(),
    };
    c.send(v5::Packet::Subscribe(v5::Subscribe::new(
        v5::Filter::new("command///req/#", QoS5::AtMostOnce),
        Some(props),
    )))
    .await;
    assert_eq!(
        c.expect_disconnect().await,
        v5::DisconnectReasonCode::SubscriptionIdentifiersNotSupported
    );
    // A shared subscription (Shared Subscription Available 0): 0x9E.
    let mut c = connect_v5(p.mqtt_port, "dev", &tenant, None).await;
    c.send(v5::Packet::Subscribe(v5::Subscribe::new(
        v5::Filter::new("$share/g/command///req/#", QoS5::AtMostOnce),
        None,
    )))
    .await;
    assert_eq!(
        c.expect_disconnect().await,
        v5::DisconnectReasonCode::SharedSubscriptionNotSupported
    );
    // A client that takes at most 20 bytes still gets its CONNACK, without properties.
    let props = v5::ConnectProperties {
        max_packet_size: Some(20),
        ..v5::ConnectProperties::new()
    };
    let (u, pw) = v5_login("dev", &tenant);
    let (mut c, ack) = V5Client::connect(p.mqtt_port, "", Some((&u, &pw)), Some(props)).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    assert_eq!(
        ack.properties, None,
        "not even the assigned id fits in 20 bytes"
    );
    c.send(v5::Packet::PingReq(v5::PingReq)).await;
    assert!(matches!(c.next().await, Some(v5::Packet::PingResp(_))));
    // With 60 bytes the client still learns its id and the Maximum QoS.
    let props = v5::ConnectProperties {
        max_packet_size: Some(60),
        ..v5::ConnectProperties::new()
    };
    let (_c, ack) = V5Client::connect(p.mqtt_port, "", Some((&u, &pw)), Some(props)).await;
    let props = ack.properties.expect("the essential properties");
    assert!(props.assigned_client_identifier.is_some());
    assert_eq!(props.max_qos, Some(1));
    assert_eq!(props.receive_max, None, "optional ones left out");
    // Maximum Packet Size 0 is a protocol error: a CONNACK 0x82 says so, then the close.
    let props = v5::ConnectProperties {
        max_packet_size: Some(0),
        ..v5::ConnectProperties::new()
    };
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", p.mqtt_port))
        .await
        .unwrap();
    let mut c = V5Client {
        stream,
        buf: bytes::BytesMut::new(),
    };
    let connect = v5::Connect {
        keep_alive: 60,
        client_id: "zero".into(),
        clean_start: true,
        properties: Some(props),
    };
    c.send(v5::Packet::Connect(connect, None, None)).await;
    match c.next().await {
        Some(v5::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v5::ConnectReturnCode::ProtocolError)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.next().await, None);
}

#[tokio::test]
async fn mqtt311_nameless_client_without_clean_session_is_rejected() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let mut c = RawClient {
        stream: tokio::net::TcpStream::connect(("127.0.0.1", p.mqtt_port))
            .await
            .unwrap(),
        buf: bytes::BytesMut::new(),
    };
    let mut connect = v4::Connect::new("");
    connect.clean_session = false;
    connect.set_login(user("dev", &tenant), "pw");
    c.send(v4::Packet::Connect(connect)).await;
    match c.next().await {
        Some(v4::Packet::ConnAck(a)) => assert_eq!(a.code, v4::ConnectReturnCode::BadClientId),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.next().await, None);
}

#[tokio::test]
async fn commands_wait_for_the_clients_receive_maximum() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let props = v5::ConnectProperties {
        receive_maximum: Some(1),
        ..v5::ConnectProperties::new()
    };
    let mut c = subscribed_v5(p.mqtt_port, &tenant, Some(props), QoS5::AtLeastOnce).await;
    for subject in ["first", "second"] {
        send_command(
            &tenant,
            "dev",
            &[("device_id", "dev"), ("subject", subject)],
            subject,
        )
        .await;
    }
    let first = match c.next_within(Duration::from_secs(30)).await {
        Some(v5::Packet::Publish(cmd)) => cmd,
        other => panic!("{other:?}"),
    };
    assert_eq!(&first.topic[..], b"command///req//first");
    // The second waits while the first is not acknowledged, also past the 1 s after which
    // the first one's sender is told it was not acknowledged.
    let early = tokio::time::timeout(Duration::from_millis(1800), c.next()).await;
    assert!(early.is_err(), "a second command in flight: {early:?}");
    c.send(v5::Packet::PubAck(v5::PubAck::new(first.pkid, None)))
        .await;
    match c.next_within(Duration::from_secs(30)).await {
        Some(v5::Packet::Publish(cmd)) => assert_eq!(&cmd.topic[..], b"command///req//second"),
        other => panic!("{other:?}"),
    }
}

/// At shutdown an MQTT 5 connection is told why (DISCONNECT 0x8B, server shutting down) before
/// it closes, and a client that connected but never sent its CONNECT is closed too.
#[tokio::test]
async fn shutdown_disconnects_mqtt5_clients_with_0x8b_and_closes_silent_sockets() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let mut c = connect_v5(p.mqtt_port, "dev", &tenant, None).await;
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", p.mqtt_port))
        .await
        .unwrap();
    // The gateway has taken the silent socket before it stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.stop();
    assert_eq!(
        c.expect_disconnect().await,
        v5::DisconnectReasonCode::ServerShuttingDown
    );
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("the silent socket is closed, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
