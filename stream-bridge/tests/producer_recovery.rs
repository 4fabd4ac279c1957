//! The bridge's producer against the real broker and PostgreSQL, with a Qpid Proton
//! application: after librdkafka declared the producer that writes the applications' commands
//! fatally failed (injected with librdkafka's own test hook), a new producer takes over and the
//! application's commands reach `hono.command.<tenant>` again.

use ferrule_registry::{DatabaseConfig, DeviceAuthenticator, RegistryConfig};
use rdkafka::ClientConfig;
use rdkafka::bindings::{
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER, rd_kafka_test_fatal_error,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use std::process::Command;
use std::time::{Duration, Instant};

/// Debian's interpreter: the one python3-qpid-proton is installed for.
const PYTHON: &str = "/usr/bin/python3";

fn kafka() -> String {
    std::env::var("FERRULE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn metrics_text() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&prometheus::gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// Sends `n` one-way commands to `device` through the bridge and returns how each transfer
/// was settled.
async fn send_commands(amqp: &str, tenant: &str, device: &str, n: usize) -> Vec<String> {
    let script = format!(
        "{}/../tests/amqp/dispositions.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let steps: Vec<String> = (0..n).map(|_| format!("ow:{device}")).collect();
    let (amqp, user) = (amqp.to_owned(), format!("backend@{tenant}"));
    let tenant = tenant.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(PYTHON)
            .args([&script, &amqp, &user, "app-secret", &tenant, "20"])
            .args(steps)
            .output()
            .expect("python3-qpid-proton is installed (scripts/test installs it)")
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l["outcome"].as_str().map(str::to_owned))
        .collect()
}

/// The subjects of the first `n` commands on `topic`.
async fn command_subjects(topic: &str, n: usize) -> Vec<String> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .set(
                "group.id",
                format!("reader-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "500")
            .set("log_level", "3")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        let start = Instant::now();
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "only {got:?} arrived on {topic}"
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let subject = m
                    .headers()
                    .and_then(|hs| hs.iter().find(|h| h.key == "subject"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                got.push(subject);
            }
        }
        got
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridges_producer_is_replaced_after_a_fatal_error() {
    let db = DatabaseConfig {
        url: std::env::var("FERRULE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into()),
        pool_size: 4,
        ..Default::default()
    };
    let store = ferrule_registry::open_store(&db, &RegistryConfig::default())
        .await
        .unwrap();
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    store
        .create_tenant(
            Some(tenant.clone()),
            ferrule_registry::model::tenant::Tenant::parse(b"{}").unwrap(),
        )
        .await
        .unwrap();
    store
        .set_application(
            &tenant,
            "backend",
            ferrule_registry::model::application::Application::parse(
                br#"{"secrets": [{"pwd-plain": "app-secret"}]}"#,
            )
            .unwrap(),
            None,
        )
        .await
        .unwrap();
    let registry = DeviceAuthenticator::new(store.pool().clone(), &Default::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    registry.spawn_listener(
        ferrule_registry::db::Connector::new(&db).unwrap(),
        shutdown.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let amqp = format!("amqp://{}", listener.local_addr().unwrap());
    let cfg = ferrule_stream_bridge::BridgeConfig {
        // No router runs: each command is released once this passes; what matters here is
        // whether it was written.
        command_outcome_timeout_ms: 500,
        ..Default::default()
    };
    let kafka_cfg = ferrule_kafka::KafkaConfig {
        bootstrap_servers: kafka(),
        ..Default::default()
    };
    let listeners = ferrule_stream_bridge::Listeners {
        amqp: Some(listener),
        amqps: None,
    };
    tokio::spawn(ferrule_stream_bridge::serve(
        listeners, cfg, kafka_cfg, registry, shutdown,
    ));

    let topic = format!("hono.command.{tenant}");
    assert_eq!(send_commands(&amqp, &tenant, "dev", 1).await.len(), 1);
    assert_eq!(command_subjects(&topic, 1).await.len(), 1);

    let producers = ferrule_kafka::producers();
    let (_, producer) = producers
        .iter()
        .find(|(name, _)| *name == "bridge")
        .expect("the bridge's producer is registered");
    let reason = std::ffi::CString::new("injected by the test").unwrap();
    // SAFETY: the handle belongs to the bridge's producer, which the list above keeps alive
    // during the call; the reason is a valid C string.
    let injected = unsafe {
        rd_kafka_test_fatal_error(
            producer.native_ptr(),
            RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(injected, RD_KAFKA_RESP_ERR_NO_ERROR);

    // The failed producer refuses the next command; the new one writes it and the next.
    assert_eq!(send_commands(&amqp, &tenant, "dev", 2).await.len(), 2);
    assert_eq!(command_subjects(&topic, 3).await.len(), 3);
    let metrics = metrics_text();
    assert!(
        metrics.contains("ferrule_kafka_producer_replaced_total{client=\"bridge\"} 1"),
        "{metrics}"
    );
    let _ = stop.send(true);
}
