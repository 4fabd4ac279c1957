//! Port of Hono's `MqttPublishTestBase` and `MqttConnectionIT` checklists (without command &
//! control): Eclipse Mosquitto's `mosquitto_pub` as the device for MQTT 3.1.1 and 5, raw MQTT
//! packets where a test needs to watch the connection, records read back from the real broker.

mod common;

use bytes::BytesMut;
use common::mqtt::*;
use common::*;
use ferrule_gateways::GatewayConfig;
use ferrule_schemas::avro::own;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Runs `mosquitto_pub`; returns whether it succeeded and what it printed on stderr.
async fn mosquitto_pub(
    port: u16,
    version: &str,
    user: &str,
    topic: &str,
    msg: &str,
    qos: u8,
    extra: &[&str],
) -> (bool, String) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-V",
        version,
        "-u",
        user,
        "-P",
        "pw",
    ])
    .args([
        "-t",
        topic,
        "-m",
        msg,
        "-q",
        &qos.to_string(),
        "-i",
        &random_id("client"),
    ])
    .args(extra);
    let out =
        tokio::task::spawn_blocking(move || cmd.output().expect("mosquitto_pub is installed"))
            .await
            .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_lowercase(),
    )
}

#[tokio::test]
async fn telemetry_and_events_with_mosquitto_311_and_5() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let u = user("dev", &tenant);
    for (version, topic, qos) in [
        ("mqttv311", "telemetry", 0),
        ("mqttv311", "t", 1),
        ("mqttv5", "telemetry", 1),
        ("mqttv5", "t/?content-type=text%2Fplain", 0),
    ] {
        let (ok, err) = mosquitto_pub(
            p.mqtt_port,
            version,
            &u,
            topic,
            &format!("{version} {topic} {qos}"),
            qos,
            &[],
        )
        .await;
        assert!(ok, "{version} {topic}: {err}");
    }
    let (ok, err) = mosquitto_pub(
        p.mqtt_port,
        "mqttv311",
        &u,
        "event/?content-type=text/plain&hono-ttl=30",
        "alarm",
        1,
        &[],
    )
    .await;
    assert!(ok, "{err}");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (ok, err) = mosquitto_pub(
        p.mqtt_port,
        "mqttv5",
        &u,
        "e",
        "v5 alarm",
        1,
        &[
            "-D",
            "publish",
            "content-type",
            "text/x-v5",
            "-D",
            "publish",
            "user-property",
            "traceparent",
            tp,
        ],
    )
    .await;
    assert!(ok, "{err}");

    let records = read(&format!("hono.telemetry.{tenant}"), 4).await;
    assert_eq!(records.len(), 4);
    let metrics = prometheus_text();
    assert!(
        metrics.contains(&format!(
            "hono_connections_attempts_total{{cipher_suite=\"UNKNOWN\",component_name=\"hono-mqtt\",component_type=\"adapter\",outcome=\"succeeded\",tenant=\"{tenant}\"}} 6"
        )),
        "{metrics}"
    );
    for r in &records {
        assert_eq!(r.key, "dev");
        assert_eq!(r.headers["device_id"], "dev");
        assert_eq!(r.headers["orig_adapter"], "hono-mqtt");
        let text = String::from_utf8_lossy(&r.payload).into_owned();
        let qos = text.rsplit(' ').next().unwrap();
        assert_eq!(r.headers["qos"], qos, "{text}");
        assert!(
            text.contains(&r.headers["orig_address"]),
            "{text} {:?}",
            r.headers
        );
    }
    let plain = records
        .iter()
        .find(|r| r.headers["orig_address"].starts_with("t/?"))
        .unwrap();
    assert_eq!(plain.headers["content-type"], "text/plain");
    let events = read(&format!("hono.event.{tenant}"), 2).await;
    let alarm = events.iter().find(|r| r.payload == b"alarm").unwrap();
    assert_eq!(alarm.headers["ttl"], "30000");
    assert_eq!(alarm.headers["content-type"], "text/plain");
    assert_eq!(alarm.headers["qos"], "1");
    let v5 = events.iter().find(|r| r.payload == b"v5 alarm").unwrap();
    assert_eq!(
        v5.headers["content-type"], "text/x-v5",
        "MQTT 5 content-type property"
    );
    assert_eq!(
        v5.headers["traceparent"], tp,
        "MQTT 5 user property traceparent"
    );
}

#[tokio::test]
async fn connack_codes_for_refused_connections() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let off = p
        .tenant(json!({"adapters": [{"type": "hono-http", "enabled": true}]}))
        .await;
    p.device_with_password(&off, "dev", json!({})).await;
    p.device_with_password(&tenant, "disabled", json!({"enabled": false}))
        .await;
    let disabled_tenant = p.tenant(json!({"enabled": false})).await;
    p.device_with_password(&disabled_tenant, "dev", json!({}))
        .await;

    let cases = [
        (format!("nobody@{tenant}"), "bad user name or password"),
        (
            format!("dev@{}", random_id("t")),
            "bad user name or password",
        ),
        (user("dev", &off), "not authori"),
        (user("disabled", &tenant), "not authori"),
        (user("dev", &disabled_tenant), "not authori"),
    ];
    for (u, want) in &cases {
        for version in ["mqttv311", "mqttv5"] {
            let (ok, err) = mosquitto_pub(p.mqtt_port, version, u, "telemetry", "x", 0, &[]).await;
            assert!(!ok, "{u} {version} connected");
            assert!(err.contains(want), "{u} {version}: {err}");
        }
    }
    // Wrong password, raw: CONNACK 0x04 in 3.1.1.
    let stream = TcpStream::connect(("127.0.0.1", p.mqtt_port))
        .await
        .unwrap();
    let mut c = RawClient {
        stream,
        buf: BytesMut::new(),
    };
    let mut connect = v4::Connect::new("raw");
    connect.set_login(user("dev", &tenant), "wrong");
    c.send(v4::Packet::Connect(connect)).await;
    match c.next().await {
        Some(v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, v4::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("{other:?}"),
    }
    assert!(c.next().await.is_none(), "closed after a refused CONNECT");
}

#[tokio::test]
async fn qos1_pubacks_only_after_kafka_and_device_order_of_10k() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let (mut c, code) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    assert_eq!(code, v4::ConnectReturnCode::Success);
    let n: u16 = 10_000;
    let writer = async {
        for i in 1..=n {
            c.publish("telemetry", i.to_string().as_bytes(), QoS::AtLeastOnce, i)
                .await;
        }
    };
    writer.await;
    let mut acked = Vec::new();
    while acked.len() < n as usize {
        match c.next().await {
            Some(v4::Packet::PubAck(a)) => acked.push(a.pkid),
            other => panic!("after {} PUBACKs: {other:?}", acked.len()),
        }
    }
    assert_eq!(acked, (1..=n).collect::<Vec<_>>(), "PUBACKs come in order");
    let records = read(&format!("hono.telemetry.{tenant}"), n as usize).await;
    let seq: Vec<u16> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).parse().unwrap())
        .collect();
    assert_eq!(seq, (1..=n).collect::<Vec<_>>());
}

#[tokio::test]
async fn error_policy_closes_or_ignores() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let u = user("dev", &tenant);

    // An event at QoS 0 is refused: default policy disconnects.
    let (mut c, _) = RawClient::connect(p.mqtt_port, &u, 60).await;
    c.publish("event", b"x", QoS::AtMostOnce, 0).await;
    c.expect_closed().await;

    // Empty payload without content type, `on-error=ignore`: PUBACK, connection stays.
    let (mut c, _) = RawClient::connect(p.mqtt_port, &u, 60).await;
    c.publish("telemetry/?on-error=ignore", b"", QoS::AtLeastOnce, 5)
        .await;
    match c.next().await {
        Some(v4::Packet::PubAck(a)) => assert_eq!(a.pkid, 5),
        other => panic!("{other:?}"),
    }
    c.send(v4::Packet::PingReq).await;
    assert_eq!(c.next().await, Some(v4::Packet::PingResp));

    // `skip-ack`: nothing comes back, the next good message is acked.
    c.publish("telemetry/?on-error=skip-ack", b"", QoS::AtLeastOnce, 6)
        .await;
    c.publish("telemetry", b"ok", QoS::AtLeastOnce, 7).await;
    match c.next().await {
        Some(v4::Packet::PubAck(a)) => assert_eq!(a.pkid, 7),
        other => panic!("{other:?}"),
    }

    // Unknown topic, and subscriptions to topics the gateway does not offer get SUBACK failure.
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "not/a/hono/topic/#",
        QoS::AtLeastOnce,
    )))
    .await;
    match c.next().await {
        Some(v4::Packet::SubAck(s)) => {
            assert_eq!(s.return_codes, vec![v4::SubscribeReasonCode::Failure])
        }
        other => panic!("{other:?}"),
    }
    c.publish("unknown/topic", b"x", QoS::AtLeastOnce, 8).await;
    c.expect_closed().await;
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records.len(), 1, "only the good message was forwarded");
}

#[tokio::test]
async fn oversized_payload_closes_the_connection() {
    let p = Platform::start_with(GatewayConfig {
        max_payload_size: 64,
        ..Default::default()
    })
    .await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    c.publish("telemetry", &[b'x'; 65], QoS::AtLeastOnce, 1)
        .await;
    c.expect_closed().await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    c.publish("telemetry", &[b'x'; 5000], QoS::AtMostOnce, 0)
        .await;
    c.expect_closed().await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    c.publish("telemetry", &[b'y'; 64], QoS::AtLeastOnce, 2)
        .await;
    assert!(matches!(c.next().await, Some(v4::Packet::PubAck(_))));
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload, vec![b'y'; 64]);
}

#[tokio::test]
async fn gateways_publish_for_their_devices_only() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "gw", json!({})).await;
    p.device(&tenant, "behind", json!({"via": ["gw"]})).await;
    p.device(&tenant, "alone", json!({})).await;
    let u = user("gw", &tenant);
    let (ok, err) = mosquitto_pub(p.mqtt_port, "mqttv311", &u, "t//behind", "a", 1, &[]).await;
    assert!(ok, "{err}");
    let (ok, err) = mosquitto_pub(
        p.mqtt_port,
        "mqttv5",
        &u,
        &format!("telemetry/{tenant}/behind"),
        "b",
        1,
        &[],
    )
    .await;
    assert!(ok, "{err}");
    let (mut c, _) = RawClient::connect(p.mqtt_port, &u, 60).await;
    c.publish("t//alone", b"c", QoS::AtLeastOnce, 1).await;
    c.expect_closed().await;
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r.key == "behind" && r.headers["device_id"] == "behind")
    );
}

#[tokio::test]
async fn tenants_are_isolated() {
    let p = Platform::start().await;
    let a = p.tenant(json!({})).await;
    let b = p.tenant(json!({})).await;
    p.device_with_password(&a, "dev", json!({"via": ["dev"]}))
        .await;
    p.device_with_password(&b, "dev", json!({})).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &a), 60).await;
    c.publish(&format!("t/{b}/dev"), b"sneaky", QoS::AtLeastOnce, 1)
        .await;
    c.expect_closed().await;
    let (ok, err) = mosquitto_pub(
        p.mqtt_port,
        "mqttv311",
        &user("dev", &b),
        "t",
        "from-b",
        1,
        &[],
    )
    .await;
    assert!(ok, "{err}");
    let records = read(&format!("hono.telemetry.{b}"), 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload, b"from-b");
}

#[tokio::test]
async fn registry_changes_close_live_connections_within_a_second() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "d1", json!({})).await;
    p.device_with_password(&tenant, "d2", json!({})).await;
    p.device_with_password(&tenant, "d3", json!({})).await;
    let (mut c1, _) = RawClient::connect(p.mqtt_port, &user("d1", &tenant), 60).await;
    let (mut c2, _) = RawClient::connect(p.mqtt_port, &user("d2", &tenant), 60).await;
    let (mut c3, _) = RawClient::connect(p.mqtt_port, &user("d3", &tenant), 60).await;

    p.update_device(&tenant, "d1", json!({"enabled": false}))
        .await;
    let t = Instant::now();
    c1.expect_closed().await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        t.elapsed()
    );
    // The others are untouched.
    c2.send(v4::Packet::PingReq).await;
    assert_eq!(c2.next().await, Some(v4::Packet::PingResp));

    p.update_tenant(&tenant, json!({"enabled": false})).await;
    let t = Instant::now();
    c2.expect_closed().await;
    c3.expect_closed().await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn keep_alive_is_enforced() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 1).await;
    let t = Instant::now();
    c.expect_closed().await;
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "closed too early: {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn without_the_broker_nothing_is_acknowledged() {
    let p = Platform::start_full(GatewayConfig::default(), unreachable_kafka()).await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let (mut c, code) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    assert_eq!(code, v4::ConnectReturnCode::Success);
    c.publish("event", b"must not be acked", QoS::AtLeastOnce, 1)
        .await;
    assert_eq!(
        c.next().await,
        None,
        "no PUBACK: the connection is closed instead"
    );
    let r = p
        .post("/event")
        .basic_auth(user("dev", &tenant), Some("pw"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn connection_events_on_connect_and_disconnect() {
    let mut cfg = GatewayConfig::default();
    cfg.mqtt.connection_events = ferrule_gateways::mqtt::ConnectionEvents::Events;
    let p = Platform::start_with(cfg).await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    // The tenant's events have a schema: the adapter's own notifications are not held to it
    // (docs/analytics.md).
    p.schema(
        &format!("hono.event.{tenant}"),
        json!({"type": "record", "name": "Alarm", "fields": [{"name": "level", "type": "int"}]}),
    )
    .await;
    let (ok, err) = mosquitto_pub(
        p.mqtt_port,
        "mqttv311",
        &user("dev", &tenant),
        "t",
        "x",
        1,
        &["-i", "client-42"],
    )
    .await;
    assert!(ok, "{err}");
    let events = read(&format!("hono.event.{tenant}"), 2).await;
    assert_eq!(events.len(), 2);
    let causes: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            assert_eq!(
                e.headers["content-type"],
                "application/vnd.eclipse-hono-dc-notification+json"
            );
            assert_eq!(e.headers["device_id"], "dev");
            // The shape `schemas/avro/connection-event.avsc` promises consumers.
            own::check(own::CONNECTION_EVENT, &e.payload).unwrap();
            serde_json::from_slice(&e.payload).unwrap()
        })
        .collect();
    assert_eq!(causes[0]["cause"], "connected");
    assert_eq!(causes[1]["cause"], "disconnected");
    assert_eq!(causes[0]["remote-id"], "client-42");
    assert_eq!(causes[0]["source"], "hono-mqtt");
}

#[tokio::test]
async fn errors_are_published_to_the_error_topic() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "error///#",
        QoS::AtMostOnce,
    )))
    .await;
    match c.next().await {
        Some(v4::Packet::SubAck(s)) => {
            assert_eq!(
                s.return_codes,
                vec![v4::SubscribeReasonCode::Success(QoS::AtMostOnce)]
            )
        }
        other => panic!("{other:?}"),
    }
    // Empty payload without a content type, default policy: error message, then PUBACK.
    c.publish("telemetry/?correlation-id=abc", b"", QoS::AtLeastOnce, 3)
        .await;
    match c.next().await {
        Some(v4::Packet::Publish(e)) => {
            assert_eq!(e.topic, "error///telemetry/abc/400");
            // The shape `schemas/avro/mqtt-error.avsc` promises devices.
            own::check(own::MQTT_ERROR, &e.payload).unwrap();
            let body: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
            assert_eq!(body["code"], 400);
            assert_eq!(body["correlation-id"], "abc");
            assert!(
                body["message"].as_str().unwrap().contains("content type"),
                "{body}"
            );
            assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.next().await, Some(v4::Packet::PubAck(v4::PubAck::new(3))));
    // Short endpoint name, packet id as correlation id, skip-ack: error message only.
    c.publish("e/?on-error=skip-ack", b"", QoS::AtLeastOnce, 4)
        .await;
    match c.next().await {
        Some(v4::Packet::Publish(e)) => assert_eq!(e.topic, "error///e/4/400"),
        other => panic!("{other:?}"),
    }
    c.send(v4::Packet::PingReq).await;
    assert_eq!(
        c.next().await,
        Some(v4::Packet::PingResp),
        "no PUBACK for skip-ack"
    );
    // A filter for another tenant is refused.
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "error/other-tenant//#",
        QoS::AtMostOnce,
    )))
    .await;
    match c.next().await {
        Some(v4::Packet::SubAck(s)) => {
            assert_eq!(s.return_codes, vec![v4::SubscribeReasonCode::Failure])
        }
        other => panic!("{other:?}"),
    }
    // on-error=disconnect: error message, then the connection closes.
    c.publish("t/?on-error=disconnect", b"", QoS::AtLeastOnce, 5)
        .await;
    match c.next().await {
        Some(v4::Packet::Publish(e)) => assert_eq!(e.topic, "error///t/5/400"),
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
}

#[tokio::test]
async fn request_response_command_round_trip_over_mqtt() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "command///req/#",
        QoS::AtLeastOnce,
    )))
    .await;
    match c.next().await {
        Some(v4::Packet::SubAck(s)) => {
            assert_eq!(
                s.return_codes,
                vec![v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            )
        }
        other => panic!("{other:?}"),
    }
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "setVolume"),
            ("response-required", "true"),
            ("correlation-id", "c-1/with slash"),
        ],
        "5",
    )
    .await;
    let command = match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(p)) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(&command.payload[..], b"5");
    assert_eq!(
        command.qos,
        QoS::AtLeastOnce,
        "delivered with the granted QoS"
    );
    c.send(v4::Packet::PubAck(v4::PubAck::new(command.pkid)))
        .await;
    let parts: Vec<&str> = command.topic.split('/').collect();
    assert_eq!(parts.len(), 6, "{}", command.topic);
    assert_eq!(
        (parts[0], parts[1], parts[2], parts[3], parts[5]),
        ("command", "", "", "req", "setVolume")
    );
    let req_id = parts[4].to_owned();
    assert!(!req_id.is_empty());

    c.publish(
        &format!("command///res/{req_id}/200/?content-type=text%2Fplain"),
        b"volume set",
        QoS::AtLeastOnce,
        9,
    )
    .await;
    assert_eq!(c.next().await, Some(v4::Packet::PubAck(v4::PubAck::new(9))));
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    let r = &responses[0];
    assert_eq!(r.key, "dev");
    assert_eq!(r.headers["correlation-id"], "c-1/with slash");
    assert_eq!(r.headers["status"], "200");
    assert_eq!(r.headers["tenant_id"], tenant);
    assert_eq!(r.headers["content-type"], "text/plain");
    assert_eq!(r.payload, b"volume set");

    // Unsubscribing ends the subscription (ttd 0 follows below); a new one starts it again.
    c.send(v4::Packet::Unsubscribe(v4::Unsubscribe::new(
        "command///req/#",
    )))
    .await;
    assert!(matches!(c.next().await, Some(v4::Packet::UnsubAck(_))));
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "command///req/#",
        QoS::AtMostOnce,
    )))
    .await;
    assert!(matches!(c.next().await, Some(v4::Packet::SubAck(_))));

    // A status outside 200-299/400-599 is refused: error policy closes the connection.
    c.publish(
        &format!("command///res/{req_id}/302"),
        b"",
        QoS::AtLeastOnce,
        10,
    )
    .await;
    c.expect_closed().await;
}

#[tokio::test]
async fn gateway_receives_one_way_commands_for_its_devices() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "gw", json!({})).await;
    p.device(&tenant, "edge", json!({"via": ["gw"]})).await;
    p.device(&tenant, "stranger", json!({})).await;
    let _router = start_router(&tenant).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("gw", &tenant), 60).await;
    // A device outside `via` cannot be subscribed for.
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "command//stranger/req/#",
        QoS::AtMostOnce,
    )))
    .await;
    match c.next().await {
        Some(v4::Packet::SubAck(s)) => {
            assert_eq!(s.return_codes, vec![v4::SubscribeReasonCode::Failure])
        }
        other => panic!("{other:?}"),
    }
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "command//+/req/#",
        QoS::AtMostOnce,
    )))
    .await;
    assert!(matches!(c.next().await, Some(v4::Packet::SubAck(_))));
    send_command(
        &tenant,
        "edge",
        &[("device_id", "edge"), ("subject", "doIt")],
        "go",
    )
    .await;
    match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(
                p.topic, "command//edge/req//doIt",
                "one-way: empty request id"
            );
            assert_eq!(&p.payload[..], b"go");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unacknowledged_qos1_command_gets_503() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("dev", &tenant), 60).await;
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "c///q/#",
        QoS::AtLeastOnce,
    )))
    .await;
    assert!(matches!(c.next().await, Some(v4::Packet::SubAck(_))));
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "reboot"),
            ("response-required", "true"),
            ("correlation-id", "c-2"),
        ],
        "",
    )
    .await;
    match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(p)) => {
            assert!(p.topic.starts_with("c///q/"), "{}", p.topic);
            assert!(p.topic.ends_with("/reboot"), "{}", p.topic);
            assert_eq!(p.qos, QoS::AtLeastOnce);
        }
        other => panic!("{other:?}"),
    }
    // No PUBACK: after a second the application gets a 503 delivery failure.
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].headers["status"], "503");
    assert_eq!(responses[0].headers["correlation-id"], "c-2");
    assert_eq!(
        responses[0].headers["content-type"],
        "application/vnd.eclipse-hono-delivery-failure-notification+json"
    );
    // The shape `schemas/avro/delivery-failure.avsc` promises consumers.
    own::check(own::DELIVERY_FAILURE, &responses[0].payload).unwrap();
}

/// Connects `device` and subscribes it for its commands at QoS 0.
async fn subscribed(port: u16, device: &str, tenant: &str) -> RawClient {
    let (mut c, _) = RawClient::connect(port, &user(device, tenant), 60).await;
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "command///req/#",
        QoS::AtMostOnce,
    )))
    .await;
    match c.next().await {
        Some(v4::Packet::SubAck(s)) => assert_eq!(
            s.return_codes,
            vec![v4::SubscribeReasonCode::Success(QoS::AtMostOnce)]
        ),
        other => panic!("{other:?}"),
    }
    c
}

async fn expect_command(c: &mut RawClient, subject: &str, payload: &[u8]) {
    match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(p)) => {
            assert!(p.topic.ends_with(&format!("/{subject}")), "{}", p.topic);
            assert_eq!(&p.payload[..], payload);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn two_gateway_instances_each_get_the_commands_of_their_devices() {
    let first = Platform::start().await;
    let second = Platform::start().await;
    let tenant = first.tenant(json!({})).await;
    first
        .device_with_password(&tenant, "on-first", json!({}))
        .await;
    first
        .device_with_password(&tenant, "on-second", json!({}))
        .await;
    let _router = start_router(&tenant).await;
    let mut a = subscribed(first.mqtt_port, "on-first", &tenant).await;
    let mut b = subscribed(second.mqtt_port, "on-second", &tenant).await;
    for (device, subject) in [("on-second", "to-b"), ("on-first", "to-a")] {
        send_command(
            &tenant,
            device,
            &[("device_id", device), ("subject", subject)],
            subject,
        )
        .await;
    }
    expect_command(&mut b, "to-b", b"to-b").await;
    expect_command(&mut a, "to-a", b"to-a").await;
    // Neither got the other's command.
    for c in [&mut a, &mut b] {
        let quiet =
            tokio::time::timeout(Duration::from_millis(300), c.stream.read_buf(&mut c.buf)).await;
        assert!(quiet.is_err() && c.buf.is_empty(), "nothing more arrives");
    }
}

/// A gateway the routers counted dead while it lived on (paused, or cut off from PostgreSQL,
/// longer than the instance timeout) learns it from its next heartbeat, which finds its
/// instance forgotten: it creates its internal topic again and registers its connections'
/// subscriptions again, and commands reach its devices again.
#[tokio::test]
async fn a_gateway_counted_dead_while_alive_registers_its_subscriptions_again() {
    // Three heartbeats within the timeout: one a second.
    let p = Platform::start_with(GatewayConfig {
        instance_timeout_secs: 3,
        ..Default::default()
    })
    .await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let mut c = subscribed(p.mqtt_port, "dev", &tenant).await;
    let store = ferrule_registry::open_store(&database(), &Default::default())
        .await
        .unwrap();
    let db = store.pool().get().await.unwrap();
    let routes = common::routes().await;
    let holder = async || -> Option<String> {
        routes
            .subscriptions_of(&tenant)
            .await
            .unwrap()
            .into_iter()
            .rfind(|(d, _)| d == "dev")
            .map(|(_, i)| i)
    };
    let instance = holder().await.expect("the device's subscription");
    // What the routers do to an instance silent for too long: its topic deleted, its routing
    // entries and the instance itself forgotten.
    let topic = format!("hono.command_internal.{instance}");
    let admin = ferrule_kafka::TopicAdmin::new(&kafka()).unwrap();
    admin.delete(&topic).await.unwrap();
    routes.release_all(&instance).await.unwrap();
    assert_eq!(holder().await, None);
    db.execute(
        "DELETE FROM adapter_instances WHERE instance_id = $1",
        &[&instance],
    )
    .await
    .unwrap();
    // The next heartbeat (within a second) finds it out.
    let start = std::time::Instant::now();
    while holder().await.as_deref() != Some(instance.as_str()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the subscription was not registered again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "after-forgetting")],
        "x",
    )
    .await;
    expect_command(&mut c, "after-forgetting", b"x").await;
}

#[tokio::test]
async fn a_router_restart_between_subscribe_and_command_loses_nothing() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let group = random_id("router");
    let router = start_router_in(&tenant, &group).await;
    let mut c = subscribed(p.mqtt_port, "dev", &tenant).await;
    router.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sent while no router runs; the restarted one (same group, fresh process state) finds
    // the subscription in PostgreSQL.
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "after-restart")],
        "x",
    )
    .await;
    let _restarted = start_router_in(&tenant, &group).await;
    expect_command(&mut c, "after-restart", b"x").await;
}

#[tokio::test]
async fn gateway_answers_commands_for_its_devices_and_reaches_group_members() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "gw", json!({"memberOf": ["north"]}))
        .await;
    p.device(&tenant, "edge", json!({"via": ["gw"]})).await;
    p.device(&tenant, "grouped", json!({"viaGroups": ["north"]}))
        .await;
    let _router = start_router(&tenant).await;
    let (mut c, _) = RawClient::connect(p.mqtt_port, &user("gw", &tenant), 60).await;
    c.send(v4::Packet::Subscribe(v4::Subscribe::new(
        "command//+/req/#",
        QoS::AtMostOnce,
    )))
    .await;
    assert!(matches!(c.next().await, Some(v4::Packet::SubAck(_))));
    send_command(
        &tenant,
        "edge",
        &[
            ("device_id", "edge"),
            ("subject", "ask"),
            ("response-required", "true"),
            ("correlation-id", "c-gw"),
        ],
        "?",
    )
    .await;
    let topic = match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(p)) => p.topic,
        other => panic!("{other:?}"),
    };
    let parts: Vec<&str> = topic.split('/').collect();
    assert_eq!(
        (parts[0], parts[1], parts[2], parts[3], parts[5]),
        ("command", "", "edge", "req", "ask"),
        "{topic}"
    );
    // The gateway answers for the device (QoS 0).
    c.publish(
        &format!("command//edge/res/{}/200", parts[4]),
        b"42",
        QoS::AtMostOnce,
        0,
    )
    .await;
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].headers["device_id"], "edge");
    assert_eq!(responses[0].headers["correlation-id"], "c-gw");
    assert_eq!(responses[0].headers["status"], "200");
    assert_eq!(responses[0].payload, b"42");

    // A device that reaches the gateway through `viaGroups`.
    send_command(
        &tenant,
        "grouped",
        &[("device_id", "grouped"), ("subject", "hello")],
        "hi",
    )
    .await;
    match c.next_within(Duration::from_secs(30)).await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "command//grouped/req//hello");
            assert_eq!(&p.payload[..], b"hi");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_command_forwarded_twice_reaches_the_device_once() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let mut c = subscribed(p.mqtt_port, "dev", &tenant).await;
    // The instance holding the subscription, from the routing state.
    let instance: String = common::routes()
        .await
        .subscriptions_of(&tenant)
        .await
        .unwrap()
        .into_iter()
        .rfind(|(d, _)| d == "dev")
        .expect("the device's subscription")
        .1;
    // What a rebalance or a second router can do: the same source record forwarded twice.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka().bootstrap_servers)
        .set("log_level", "3")
        .create()
        .unwrap();
    for (offset, subject) in [("7", "once"), ("7", "once"), ("8", "next")] {
        let headers = [
            ("device_id", "dev"),
            ("subject", subject),
            ("tenant_id", tenant.as_str()),
            ("orig-partition", "0"),
            ("orig-offset", offset),
        ]
        .iter()
        .fold(OwnedHeaders::new(), |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: Some(*v),
            })
        });
        producer
            .send(
                FutureRecord::to(&format!("hono.command_internal.{instance}"))
                    .key("dev")
                    .headers(headers)
                    .payload(subject),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    expect_command(&mut c, "once", b"once").await;
    expect_command(&mut c, "next", b"next").await;
}
