//! What the router tests share: a tenant with devices in the registry, a router for it, and
//! Kafka clients of their own to send commands and read what the router wrote.
#![allow(dead_code)]

use ferrule_command_router::{RoutingState, forward};
use ferrule_registry::db::Connector;
use ferrule_registry::{DatabaseConfig, DeviceAuthenticator, RegistryConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub fn kafka() -> String {
    std::env::var("FERRULE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub struct Setup {
    pub tenant: String,
    pub routing: RoutingState,
    pub auth: DeviceAuthenticator,
    _stop_listener: watch::Sender<bool>,
}

pub async fn setup() -> Setup {
    let db = DatabaseConfig {
        url: std::env::var("FERRULE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into()),
        pool_size: 4,
        ..Default::default()
    };
    let store = ferrule_registry::open_store(&db, &RegistryConfig::default())
        .await
        .unwrap();
    let tenant = id("t");
    let parse_t = |b: &[u8]| ferrule_registry::model::tenant::Tenant::parse(b).unwrap();
    let parse_d = |b: &[u8]| ferrule_registry::model::device::Device::parse(b).unwrap();
    store
        .create_tenant(Some(tenant.clone()), parse_t(b"{}"))
        .await
        .unwrap();
    store
        .create_device(&tenant, Some("dev".into()), parse_d(b"{}"))
        .await
        .unwrap();
    store
        .create_device(&tenant, Some("gw".into()), parse_d(b"{}"))
        .await
        .unwrap();
    store
        .create_device(&tenant, Some("edge".into()), parse_d(br#"{"via": ["gw"]}"#))
        .await
        .unwrap();
    let auth = DeviceAuthenticator::new(store.pool().clone(), &Default::default());
    let (tx, rx) = watch::channel(false);
    auth.spawn_listener(Connector::new(&db).unwrap(), rx);
    Setup {
        tenant,
        routing: RoutingState::new(
            store.pool().clone(),
            Duration::from_secs(30),
            &kafka_config(),
        ),
        auth,
        _stop_listener: tx,
    }
}

/// This process's reader of the route topic on the test broker.
pub async fn routes() -> ferrule_registry::device_connection::RouteLog {
    ferrule_registry::device_connection::RouteLog::shared(&kafka_config())
        .await
        .unwrap()
}

/// The test broker, with short fetch waits.
pub fn kafka_config() -> ferrule_kafka::KafkaConfig {
    ferrule_kafka::KafkaConfig {
        bootstrap_servers: kafka(),
        consumer_fetch_wait_ms: 20,
        ..Default::default()
    }
}

pub fn start_router(s: &Setup, group: &str) -> watch::Sender<bool> {
    let (tx, rx) = watch::channel(false);
    let (auth, routing, group) = (s.auth.clone(), s.routing.clone(), group.to_owned());
    // Only this test's tenant: routers of tests running alongside never answer its commands.
    let topic = format!("hono.command.{}", s.tenant);
    tokio::spawn(async move {
        let kafka = ferrule_kafka::KafkaConfig {
            bootstrap_servers: kafka(),
            consumer_fetch_wait_ms: 20,
            ..Default::default()
        };
        let topics = ferrule_kafka::TopicAdmin::new(&kafka).unwrap();
        if let Err(e) = forward::run(&kafka, &group, &topic, auth, routing, topics, rx).await {
            eprintln!("ROUTER FAILED: {e:#}");
        }
    });
    tx
}

pub async fn send_command(tenant: &str, device: &str, headers: &[(&str, &str)], payload: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("log_level", "3")
        .create()
        .unwrap();
    let mut hs = OwnedHeaders::new();
    for (k, v) in headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    producer
        .send(
            FutureRecord::to(&format!("hono.command.{tenant}"))
                .key(device)
                .headers(hs)
                .payload(payload),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
}

/// A record as key, headers and payload.
pub type Record = (String, HashMap<String, String>, String);

/// The first record of `topic` (read from the beginning).
pub async fn first_record(topic: &str) -> Record {
    records(topic, 1).await.remove(0)
}

/// The first `n` records of `topic` (read from the beginning).
pub async fn records(topic: &str, n: usize) -> Vec<Record> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .set("group.id", id("reader"))
            .set("topic.metadata.refresh.interval.ms", "500")
            .set("auto.offset.reset", "earliest")
            .set("log_level", "3")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        let mut got = Vec::new();
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} of {n} records arrived on {topic}",
                got.len()
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let mut headers = HashMap::new();
                for hd in m
                    .headers()
                    .map(|h| h.iter().collect::<Vec<_>>())
                    .unwrap_or_default()
                {
                    headers.entry(hd.key.to_owned()).or_insert_with(|| {
                        String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned()
                    });
                }
                let text =
                    |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                got.push((text(m.key()), headers, text(m.payload())));
                if got.len() == n {
                    return got;
                }
            }
        }
    })
    .await
    .unwrap()
}
