//! Typed telemetry (docs/analytics.md) against `ferrule all`, with the clients analytics users
//! and Hono applications run: confluent-kafka-python's SchemaRegistryClient registers a
//! tenant's schema through the registry's Confluent-compatible API and its AvroDeserializer
//! (fastavro) reads what MQTT (mosquitto_pub) and HTTP (curl) devices sent; an incompatible
//! update and non-conforming payloads are refused, and nothing of them is written; a Qpid
//! Proton application still receives JSON, or the Avro records when its link asks for them.
//! A CoAP device (libcoap's `coap-client-openssl` over DTLS) gets 4.00 for a payload that does
//! not fit.

mod common;

use common::script::*;
use common::*;
use serde_json::{Value, json};
use std::process::Command;

const DEVICE: &str = "sensor";
const DEVICE_PASSWORD: &str = "sensor-secret";
/// The device's DTLS pre-shared key for CoAP: `k1`.
const PSK_BASE64: &str = "azE=";
const APP: &str = "analytics";
const APP_PASSWORD: &str = "analytics-secret";

fn schema_v1() -> String {
    json!({"type": "record", "name": "Reading", "namespace": "org.example.sensors", "fields": [
        {"name": "temp", "type": "double"},
        {"name": "label", "type": ["null", "string"], "default": null}]})
    .to_string()
}

/// A required new field: not BACKWARD compatible (old records lack it).
fn schema_breaking() -> String {
    json!({"type": "record", "name": "Reading", "namespace": "org.example.sensors", "fields": [
        {"name": "temp", "type": "double"},
        {"name": "label", "type": ["null", "string"], "default": null},
        {"name": "site", "type": "string"}]})
    .to_string()
}

fn provision(f: &Ferrule, tenant: &str) {
    f.admin_ok("POST", &format!("/v1/tenants/{tenant}"), "{}");
    f.admin_ok(
        "PUT",
        &format!("/v1/applications/{tenant}/{APP}"),
        &json!({"secrets": [{"pwd-plain": APP_PASSWORD}]}).to_string(),
    );
    f.admin_ok("POST", &format!("/v1/devices/{tenant}/{DEVICE}"), "{}");
    let creds = json!([
        {"type": "hashed-password", "auth-id": DEVICE, "secrets": [{"pwd-plain": DEVICE_PASSWORD}]},
        {"type": "psk", "auth-id": DEVICE, "secrets": [{"key": PSK_BASE64}]}]);
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/{DEVICE}"),
        &creds.to_string(),
    );
}

fn mqtt_publish(f: &Ferrule, tenant: &str, payload: &str) -> std::process::Output {
    let (host, port) = f.mqtt.split_once(':').unwrap();
    Command::new("mosquitto_pub")
        .args(["-h", host, "-p", port, "-V", "mqttv5", "-q", "1"])
        .args(["-u", &format!("{DEVICE}@{tenant}"), "-P", DEVICE_PASSWORD])
        .args(["-t", "telemetry", "-m", payload])
        .output()
        .expect("mosquitto_pub (Debian mosquitto-clients)")
}

/// An HTTP upload at QoS 1; the status and body.
fn http_publish(f: &Ferrule, tenant: &str, content_type: &str, body_file: &str) -> (u16, String) {
    curl(&[
        "-s",
        "-u",
        &format!("{DEVICE}@{tenant}:{DEVICE_PASSWORD}"),
        "-H",
        &format!("content-type: {content_type}"),
        "-H",
        "qos-level: 1",
        "--data-binary",
        &format!("@{body_file}"),
        &format!("{}/telemetry", f.http),
    ])
}

fn file_with(bytes: &[u8]) -> tempfile_path::Path {
    tempfile_path::Path::with(bytes)
}

/// A file that goes with its value.
mod tempfile_path {
    pub struct Path(pub String);
    impl Path {
        pub fn with(bytes: &[u8]) -> Path {
            let p = std::env::temp_dir().join(format!("ferrule-{}", uuid::Uuid::new_v4().simple()));
            std::fs::write(&p, bytes).unwrap();
            Path(p.to_string_lossy().into_owned())
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// `{"temp": 3.5, "label": "avro"}` of [`schema_v1`] in the Confluent wire format, written by
/// hand from the Avro specification: a device that encodes itself.
fn avro_by_hand(id: u32) -> Vec<u8> {
    let mut b = vec![0];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&3.5f64.to_le_bytes());
    b.push(2); // union branch 1 (string), zig-zag
    b.push(8); // length 4, zig-zag
    b.extend_from_slice(b"avro");
    b
}

#[test]
fn device_json_becomes_avro_that_standard_clients_read_and_applications_still_get_json() {
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = format!("typed-{}", uuid::Uuid::new_v4().simple());
    provision(&f, &tenant);
    let topic = format!("hono.telemetry.{tenant}");
    let subject = format!("{topic}-value");
    let admin = format!("admin:{PASSWORD}");
    let app = format!("{APP}@{tenant}:{APP_PASSWORD}");
    let python = kafka_python();

    // The analytics team registers the schema with Confluent's client.
    let mut reg = Script::spawn(
        "analytics.py",
        &python,
        &["register", &f.registry, &admin, &subject, &schema_v1()],
    );
    let registered = reg.expect("registered", "the schema was not registered");
    reg.finish();
    let id = registered["id"].as_u64().unwrap() as u32;
    assert_eq!(registered["version"], 1);
    assert_eq!(registered["latest_id"].as_u64(), Some(u64::from(id)));
    assert_eq!(registered["compatibility"], "BACKWARD");
    let mut refused = Script::spawn(
        "analytics.py",
        &python,
        &["refused", &f.registry, &admin, &subject, &schema_breaking()],
    );
    let r = refused.expect("refused", "the incompatible schema was not refused");
    refused.finish();
    assert_eq!(
        (r["status"].as_i64(), r["code"].as_i64()),
        (Some(409), Some(409)),
        "{r}"
    );
    // An application may read its tenant's schemas but not write them.
    let mut denied = Script::spawn(
        "analytics.py",
        &python,
        &["refused", &f.registry, &app, &subject, &schema_v1()],
    );
    let r = denied.expect("refused", "an application wrote a schema");
    denied.finish();
    assert_eq!(
        (r["status"].as_i64(), r["code"].as_i64()),
        (Some(403), Some(40301)),
        "{r}"
    );

    // A Hono application attaches before the devices send.
    let url = f.amqp.clone();
    let user = format!("{APP}@{tenant}");
    let mut as_sent = Script::spawn(
        "analytics.py",
        DEBIAN_PYTHON,
        &["amqp", &url, &user, APP_PASSWORD, &tenant, "3", "60"],
    );
    as_sent.expect("ready", "the AMQP application did not attach");

    // Conforming: JSON over MQTT and HTTP, and Avro the device encoded itself.
    let out = mqtt_publish(&f, &tenant, r#"{"temp": 21.5, "label": "mqtt"}"#);
    assert!(out.status.success(), "{out:?}");
    let json_file = file_with(br#"{"temp": 19}"#);
    let (status, body) = http_publish(&f, &tenant, "application/json", &json_file.0);
    assert_eq!(status, 202, "{body}");
    let avro_file = file_with(&avro_by_hand(id));
    let (status, body) = http_publish(&f, &tenant, "application/octet-stream", &avro_file.0);
    assert_eq!(status, 202, "{body}");

    // Not conforming: refused with the protocol's error, counted, never written.
    let bad = file_with(br#"{"temp": "warm"}"#);
    let (status, body) = http_publish(&f, &tenant, "application/json", &bad.0);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("$.temp"), "the answer says where: {body}");
    let mut wrong_id = avro_by_hand(id);
    wrong_id[1..5].copy_from_slice(&(id + 100_000).to_be_bytes());
    let bad = file_with(&wrong_id);
    let (status, _) = http_publish(&f, &tenant, "application/octet-stream", &bad.0);
    assert_eq!(
        status, 400,
        "an Avro payload must name a schema of its topic"
    );
    let truncated = avro_by_hand(id);
    let bad = file_with(&truncated[..truncated.len() - 2]);
    let (status, _) = http_publish(&f, &tenant, "application/octet-stream", &bad.0);
    assert_eq!(status, 400, "an Avro payload must be one whole value");
    let out = mqtt_publish(&f, &tenant, r#"{"temperature": 21.5}"#);
    assert!(
        !out.status.success(),
        "MQTT's error policy closes the connection: {out:?}"
    );
    let out = Command::new("coap-client-openssl")
        .args(["-u", &format!("{DEVICE}@{tenant}"), "-k", "k1"])
        .args([
            "-m",
            "post",
            "-t",
            "application/json",
            "-e",
            r#"{"temp": null}"#,
        ])
        .arg(format!("coaps://{}/telemetry", f.coaps))
        .output()
        .expect("coap-client-openssl (Debian libcoap3-bin)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("4.00"),
        "CoAP answers 4.00 Bad Request: {out:?}"
    );
    let refused_of = |adapter| {
        [
            ("component_name", adapter),
            ("tenant", tenant.as_str()),
            ("type", "telemetry"),
        ]
    };
    let name = "ferrule_gateway_payload_schema_rejected_total";
    f.wait_for_metric(name, &refused_of("hono-http"), 3.0);
    f.wait_for_metric(name, &refused_of("hono-mqtt"), 1.0);
    f.wait_for_metric(name, &refused_of("hono-coap"), 1.0);

    // The analytics team reads typed records with the AvroDeserializer: the three that
    // conformed, nothing else.
    let mut consumer = Script::spawn(
        "analytics.py",
        &python,
        &["consume", &kafka(), &f.registry, &app, &topic, "3", "60"],
    );
    let mut values = Vec::new();
    for _ in 0..3 {
        let r = consumer.expect("record", "a record was not read");
        assert_eq!(r["magic"], 0);
        assert_eq!(r["schema_id"].as_u64(), Some(u64::from(id)));
        assert_eq!(r["device"], DEVICE);
        values.push((r["value"].clone(), r["content_type"].clone()));
    }
    let done = consumer.expect("done", "the consumer did not finish");
    assert_eq!(done["records"], 3, "nothing non-conforming was written");
    consumer.finish();
    assert_eq!(
        values,
        vec![
            (json!({"temp": 21.5, "label": "mqtt"}), json!("avro/binary")),
            (json!({"temp": 19.0, "label": null}), json!("avro/binary")),
            (
                json!({"temp": 3.5, "label": "avro"}),
                json!("application/octet-stream")
            ),
        ]
    );

    // Hono's application gets JSON back for what devices sent as JSON (the same values, the
    // defaults filled in), and the device's own Avro as it was sent.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(as_sent.expect("message", "the application missed a message"));
    }
    as_sent.finish();
    let body_json =
        |m: &Value| -> Value { serde_json::from_str(m["body"]["text"].as_str().unwrap()).unwrap() };
    // mosquitto_pub sends no content type: the MQTT adapter's default, as without a schema.
    assert_eq!(got[0]["content_type"], "application/octet-stream");
    assert_eq!(body_json(&got[0]), json!({"temp": 21.5, "label": "mqtt"}));
    assert_eq!(got[1]["content_type"], "application/json");
    assert_eq!(body_json(&got[1]), json!({"temp": 19.0, "label": null}));
    assert_eq!(got[2]["content_type"], "application/octet-stream");
    assert_eq!(
        got[2]["body"]["hex"].as_str(),
        Some(hex(&avro_by_hand(id)).as_str())
    );
    // An application that asks for the typed form gets the record as stored. (Links of one
    // tenant share its stream, so it attaches after the first one left.)
    let mut typed = Script::spawn(
        "analytics.py",
        DEBIAN_PYTHON,
        &[
            "amqp",
            &url,
            &user,
            APP_PASSWORD,
            &tenant,
            "1",
            "60",
            "avro",
        ],
    );
    typed.expect("ready", "the typed AMQP application did not attach");
    let out = mqtt_publish(&f, &tenant, r#"{"temp": -2.25}"#);
    assert!(out.status.success(), "{out:?}");
    let m = typed.expect("message", "the typed application missed the message");
    typed.finish();
    assert_eq!(m["content_type"], "avro/binary");
    let mut expected = vec![0];
    expected.extend_from_slice(&id.to_be_bytes());
    expected.extend_from_slice(&(-2.25f64).to_le_bytes());
    expected.push(0); // the label's default: union branch 0, null
    assert_eq!(m["body"]["hex"].as_str(), Some(hex(&expected).as_str()));
    f.stop();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
