//! `ferrule all` as a user runs it: the real binary against the real PostgreSQL and the real
//! Kafka-protocol broker, driven with curl the way Hono's getting-started guide does.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn registry_answers_curl_as_in_hono_getting_started() {
    let mut f = Ferrule::start(&kafka());
    let ready = f.wait_readiness(200);
    assert_eq!(ready["checks"]["kafka"]["status"], "UP", "{ready}");
    assert_eq!(ready["checks"]["postgresql"]["status"], "UP", "{ready}");
    let auth = format!("admin:{PASSWORD}");

    // Create a tenant, a device, and the device's password, as Hono's guide does (plus the
    // management credentials Ferrule requires).
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-u",
        &auth,
        &format!("{}/v1/tenants", f.registry),
    ]);
    assert_eq!(code, 201, "{body}");
    let tenant = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-u",
        &auth,
        &format!("{}/v1/devices/{tenant}", f.registry),
    ]);
    assert_eq!(code, 201, "{body}");
    let device = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let creds = format!(
        r#"[{{"type": "hashed-password", "auth-id": "{device}", "secrets": [{{"pwd-plain": "this-is-my-password"}}]}}]"#
    );
    let (code, body) = curl(&[
        "-X",
        "PUT",
        "-u",
        &auth,
        "-H",
        "content-type: application/json",
        "--data-binary",
        &creds,
        &format!("{}/v1/credentials/{tenant}/{device}", f.registry),
    ]);
    assert_eq!(code, 204, "{body}");
    let (code, body) = curl(&[
        "-u",
        &auth,
        &format!("{}/v1/credentials/{tenant}/{device}", f.registry),
    ]);
    assert_eq!(code, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed[0]["auth-id"], device.as_str());
    assert!(
        !body.contains("this-is-my-password") && !body.contains("pwd-hash"),
        "{body}"
    );

    // The device can now authenticate through the library the gateways use.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = ferrule_registry::DatabaseConfig {
            url: database_url(),
            pool_size: 1,
            ..Default::default()
        };
        let store = ferrule_registry::open_store(&db, &Default::default())
            .await
            .unwrap();
        let auth =
            ferrule_registry::DeviceAuthenticator::new(store.pool().clone(), &Default::default());
        let dev = auth
            .verify_password(&format!("{device}@{tenant}"), b"this-is-my-password")
            .await
            .unwrap();
        assert_eq!(dev.device_id, device);
    });

    // The device sends telemetry to the HTTP adapter, as in Hono's guide.
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-u",
        &format!("{device}@{tenant}:this-is-my-password"),
        "-H",
        "content-type: application/json",
        "-H",
        "qos-level: 1",
        "--data-binary",
        r#"{"temp": 5}"#,
        &format!("{}/telemetry", f.http),
    ]);
    assert_eq!(code, 202, "{body}");

    // The command router runs too: a request/response command for the device, which holds no
    // subscription, is answered with a 503 delivery failure.
    assert_eq!(command_response_status(&tenant, &device), "503");

    // Anonymous writes are refused and counted.
    let (code, _) = curl(&["-X", "POST", &format!("{}/v1/tenants", f.registry)]);
    assert_eq!(code, 401);
    let (code, metrics) = curl(&[&format!("{}/metrics", f.health)]);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("ferrule_registry_rejected_requests_total{reason=\"unauthorized\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "hono_telemetry_processing_duration_seconds_count{component_name=\"hono-http\""
        ),
        "{metrics}"
    );
    let (code, live) = curl(&[&format!("{}/liveness", f.health)]);
    assert_eq!(code, 200, "{live}");
    assert!(live.contains("last_task_ms_ago"), "{live}");
    // Hono's path for the metrics serves them too.
    let (code, hono) = curl(&[&format!("{}/prometheus", f.health)]);
    assert_eq!(code, 200);
    assert!(hono.contains("hono_telemetry_processing_duration_seconds"));
    // Hono's startup probe: the services were set up.
    let (code, started) = curl(&[&format!("{}/started", f.health)]);
    assert_eq!(code, 200, "{started}");

    assert!(f.stop().success(), "SIGTERM ends ferrule cleanly");
}

#[test]
fn check_kafka_gets_metadata_from_the_broker() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .arg("check-kafka")
        .env("FERRULE_KAFKA__BOOTSTRAP_SERVERS", kafka())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("brokers [127.0.0.1:"), "{stdout}");
}

#[test]
fn readiness_reports_an_unreachable_broker() {
    let dead = format!("127.0.0.1:{}", free_port());
    let mut f = Ferrule::start(&dead);
    let ready = f.wait_readiness(503);
    // PostgreSQL is fine; only Kafka is missing.
    let start = Instant::now();
    let mut ready = ready;
    while ready["checks"]["postgresql"]["status"] != "UP" {
        assert!(start.elapsed() < Duration::from_secs(10), "{ready}");
        std::thread::sleep(Duration::from_millis(100));
        ready = f.wait_readiness(503);
    }
    assert_eq!(ready["checks"]["kafka"]["status"], "DOWN", "{ready}");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .arg("check-kafka")
        .env("FERRULE_KAFKA__BOOTSTRAP_SERVERS", &dead)
        .env("FERRULE_KAFKA__METADATA_TIMEOUT_MS", "300")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn help_documents_every_config_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for key in [
        "registry.bind",
        "database.url",
        "kafka.bootstrap_servers",
        "health.bind",
        "registry.management.password",
        "FERRULE_REGISTRY__MAX_PAYLOAD_SIZE",
        "kafka.security_protocol",
        "kafka.ssl_ca_location",
        "kafka.sasl_mechanism",
        "kafka.sasl_username",
        "kafka.sasl_password",
        "kafka.topic_prefix",
        "kafka.create_topics",
        "kafka.properties = {}",
        "kafka.producer.properties = {}",
        "kafka.consumer.properties = {}",
        "kafka.admin.properties = {}",
        "FERRULE_KAFKA__PRODUCER__PROPERTIES__<KEY>",
        "gateway.instance_id",
        "bridge.instance_id",
        "database.tls",
    ] {
        assert!(help.contains(key), "--help lacks {key}:\n{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .arg("print-config")
        .output()
        .unwrap();
    let toml = String::from_utf8_lossy(&out.stdout);
    assert!(toml.contains("[registry.management]"), "{toml}");
}

/// Sends a request/response command with rdkafka and returns the `status` of its response.
fn command_response_status(tenant: &str, device: &str) -> String {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("log_level", "3")
        .create()
        .unwrap();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "device_id",
            value: Some(device),
        })
        .insert(Header {
            key: "subject",
            value: Some("ping"),
        })
        .insert(Header {
            key: "response-required",
            value: Some("true"),
        })
        .insert(Header {
            key: "correlation-id",
            value: Some("all-in-one-1"),
        });
    producer
        .send(
            BaseRecord::to(&format!("hono.command.{tenant}"))
                .key(device)
                .payload("")
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(5)).unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set(
            "group.id",
            format!("all-in-one-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "500")
        .set("log_level", "3")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&format!("hono.command_response.{tenant}")])
        .unwrap();
    let start = Instant::now();
    loop {
        // The router of a default configuration reads every tenant's command topic from
        // its start, those of the tests before this one too: on a loaded CI box that takes
        // a while.
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no command response"
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m.headers().unwrap();
            let correlation = headers
                .iter()
                .find(|h| h.key == "correlation-id")
                .and_then(|h| h.value);
            assert_eq!(correlation, Some(&b"all-in-one-1"[..]));
            let status = headers
                .iter()
                .find(|h| h.key == "status")
                .and_then(|h| h.value)
                .unwrap();
            return String::from_utf8_lossy(status).into_owned();
        }
    }
}
