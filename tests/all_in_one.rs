//! `ferrule all` as a user runs it: the real binary against the real PostgreSQL and the real
//! Kafka-protocol broker, driven with curl the way Hono's getting-started guide does.

use serde_json::Value;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "all-in-one-test-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn database_url() -> String {
    std::env::var("FERRULE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into())
}

fn kafka() -> String {
    std::env::var("FERRULE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

struct Ferrule {
    child: Child,
    registry: String,
    health: String,
    http: String,
}

impl Ferrule {
    fn start(kafka: &str) -> Ferrule {
        let (registry, health, http, mqtt) = (free_port(), free_port(), free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_ferrule"))
            .arg("all")
            .env("FERRULE_REGISTRY__BIND", format!("127.0.0.1:{registry}"))
            .env("FERRULE_HEALTH__BIND", format!("127.0.0.1:{health}"))
            .env("FERRULE_GATEWAY__HTTP__BIND", format!("127.0.0.1:{http}"))
            .env("FERRULE_GATEWAY__MQTT__BIND", format!("127.0.0.1:{mqtt}"))
            .env("FERRULE_DATABASE__URL", database_url())
            .env("FERRULE_KAFKA__BOOTSTRAP_SERVERS", kafka)
            .env("FERRULE_KAFKA__METADATA_TIMEOUT_MS", "500")
            .env("FERRULE_REGISTRY__MANAGEMENT__PASSWORD", PASSWORD)
            // A router group of its own: a killed test process must not hold partitions of another.
            .env(
                "FERRULE_ROUTER__GROUP_ID",
                format!("router-{}", uuid::Uuid::new_v4().simple()),
            )
            .env("FERRULE_REGISTRY__PLAIN_PASSWORD_COST", "4")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("ferrule binary starts");
        Ferrule {
            child,
            registry: format!("http://127.0.0.1:{registry}"),
            health: format!("http://127.0.0.1:{health}"),
            http: format!("http://127.0.0.1:{http}"),
        }
    }

    /// Polls `/readiness` until it answers `want` (or panics after 20 s).
    fn wait_readiness(&mut self, want: u16) -> Value {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ferrule exited early: {status}");
            }
            let (code, body) = curl(&["-s", &format!("{}/readiness", self.health)]);
            if code == want {
                return serde_json::from_str(&body).unwrap();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "readiness stayed {code}: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no graceful shutdown"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ferrule {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Runs curl, returning the HTTP status and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out: Output = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

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
    assert_eq!(curl(&[&format!("{}/liveness", f.health)]).0, 200);

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
        assert!(
            start.elapsed() < Duration::from_secs(30),
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
