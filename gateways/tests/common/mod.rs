//! The registry and the HTTP adapter served on ephemeral ports against the real PostgreSQL
//! and the real Kafka-protocol broker; records are read back with an rdkafka consumer.
#![allow(dead_code)]

pub mod mqtt;

use ferrule_gateways::{GatewayConfig, KafkaConfig};
use ferrule_registry::db::Connector;
use ferrule_registry::{DatabaseConfig, DeviceAuthenticator, RegistryConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const ADMIN_PASSWORD: &str = "gw-test-admin";

pub fn kafka() -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: std::env::var("FERRULE_TEST_KAFKA")
            .unwrap_or_else(|_| "127.0.0.1:9092".into()),
        ..KafkaConfig::default()
    }
}

pub fn database() -> DatabaseConfig {
    DatabaseConfig {
        url: std::env::var("FERRULE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into()),
        pool_size: 4,
        ..Default::default()
    }
}

pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub struct Platform {
    pub registry: String,
    pub http: String,
    pub mqtt_port: u16,
    pub https_port: Option<u16>,
    pub mqtts_port: Option<u16>,
    pub coap_port: u16,
    pub coaps_port: u16,
    pub client: reqwest::Client,
    shutdown: watch::Sender<bool>,
}

impl Platform {
    /// Tells the gateway, the registry and the hub to shut down, as a SIGTERM does after the
    /// readiness delay.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    pub async fn start() -> Platform {
        Self::start_with(GatewayConfig::default()).await
    }

    pub async fn start_with(gateway: GatewayConfig) -> Platform {
        Self::start_full(gateway, kafka()).await
    }

    pub async fn start_full(gateway: GatewayConfig, kafka: KafkaConfig) -> Platform {
        let mut reg_cfg = RegistryConfig::default();
        reg_cfg.management.password = ADMIN_PASSWORD.into();
        reg_cfg.plain_password_cost = 4;
        let store = ferrule_registry::open_store(&database(), &reg_cfg)
            .await
            .expect("PostgreSQL must be running (scripts/test starts it)");
        let (tx, rx) = watch::channel(false);
        let reg_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let registry = format!("http://{}", reg_listener.local_addr().unwrap());
        tokio::spawn(ferrule_registry::serve(
            reg_listener,
            store.clone(),
            reg_cfg,
            rx.clone(),
        ));

        let auth = DeviceAuthenticator::new(store.pool().clone(), &Default::default());
        auth.spawn_listener(Connector::new(&database()).unwrap(), rx.clone());
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = format!("http://{}", http_listener.local_addr().unwrap());
        let mqtt_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mqtt_port = mqtt_listener.local_addr().unwrap().port();
        let tls_listener = || async {
            match gateway.tls.enabled() {
                true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
                false => None,
            }
        };
        let (https, mqtts) = (tls_listener().await, tls_listener().await);
        let port = |l: &Option<tokio::net::TcpListener>| {
            l.as_ref().map(|l| l.local_addr().unwrap().port())
        };
        let (https_port, mqtts_port) = (port(&https), port(&mqtts));
        let coap_socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let coap_port = coap_socket.local_addr().unwrap().port();
        let coaps_socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let coaps_port = coaps_socket.local_addr().unwrap().port();
        let listeners = ferrule_gateways::Listeners {
            http: Some(http_listener),
            mqtt: Some(mqtt_listener),
            https,
            mqtts,
            coap: Some(coap_socket),
            coaps: Some(coaps_socket),
        };
        tokio::spawn(
            async move { ferrule_gateways::serve(listeners, gateway, &kafka, auth, rx).await },
        );
        Platform {
            registry,
            http,
            mqtt_port,
            https_port,
            mqtts_port,
            coap_port,
            coaps_port,
            client: reqwest::Client::new(),
            shutdown: tx,
        }
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> StatusCode {
        let r = self
            .client
            .request(method, format!("{}{path}", self.registry))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(
            status.is_success(),
            "{path}: {status} {}",
            r.text().await.unwrap()
        );
        status
    }

    pub async fn tenant(&self, body: Value) -> String {
        let id = random_id("t");
        self.admin(Method::POST, &format!("/v1/tenants/{id}"), body)
            .await;
        id
    }

    /// Registers the Avro `schema` for `topic` (its subject `<topic>-value`) through the
    /// registry's schema registry API.
    pub async fn schema(&self, topic: &str, schema: Value) {
        let path = format!("/subjects/{topic}-value/versions");
        self.admin(
            Method::POST,
            &path,
            serde_json::json!({ "schema": schema.to_string() }),
        )
        .await;
    }

    pub async fn update_tenant(&self, tenant: &str, body: Value) {
        self.admin(Method::PUT, &format!("/v1/tenants/{tenant}"), body)
            .await;
    }

    pub async fn device(&self, tenant: &str, device: &str, body: Value) {
        self.admin(
            Method::POST,
            &format!("/v1/devices/{tenant}/{device}"),
            body,
        )
        .await;
    }

    pub async fn update_device(&self, tenant: &str, device: &str, body: Value) {
        self.admin(Method::PUT, &format!("/v1/devices/{tenant}/{device}"), body)
            .await;
    }

    /// A device with password credentials `<device>@<tenant>` / `pw`.
    pub async fn device_with_password(&self, tenant: &str, device: &str, body: Value) {
        self.device(tenant, device, body).await;
        self.admin(
            Method::PUT,
            &format!("/v1/credentials/{tenant}/{device}"),
            json!([{"type": "hashed-password", "auth-id": device, "secrets": [{"pwd-plain": "pw"}]}]),
        )
        .await;
    }

    /// `x509-cert` credentials for a device.
    /// Gives `device` a pre-shared key (credentials of type `psk`, auth-id = the device id).
    pub async fn credentials_psk(&self, tenant: &str, device: &str, key: &[u8]) {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        self.admin(
            Method::PUT,
            &format!("/v1/credentials/{tenant}/{device}"),
            json!([{"type": "psk", "auth-id": device, "secrets": [{"key": key}]}]),
        )
        .await;
    }

    pub async fn credentials_x509(&self, tenant: &str, device: &str, subject_dn: &str) {
        self.admin(
            Method::PUT,
            &format!("/v1/credentials/{tenant}/{device}"),
            json!([{"type": "x509-cert", "auth-id": subject_dn, "secrets": [{}]}]),
        )
        .await;
    }

    /// A request to the HTTP adapter.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.http))
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.put(format!("{}{path}", self.http))
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads `n` records of `topic` from the beginning (a fresh consumer group), or panics after
/// 20 s; then waits briefly to make sure no more than `n` arrive.
pub async fn read(topic: &str, n: usize) -> Vec<Record> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer = reader(
            &topic,
            ClientConfig::new().set("topic.metadata.refresh.interval.ms", "500"),
        );
        let mut out = Vec::new();
        let start = Instant::now();
        let mut extra_wait: Option<Instant> = None;
        loop {
            if out.len() >= n && extra_wait.is_none() {
                extra_wait = Some(Instant::now());
            }
            if extra_wait.is_some_and(|t| t.elapsed() > Duration::from_millis(300)) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "only {} of {n} records arrived on {topic}",
                out.len()
            );
            // Errors such as "unknown topic" while nothing was written yet are not records.
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push(record_of(&m));
            }
        }
        out
    })
    .await
    .unwrap()
}

/// A consumer of `topic` from its start in a group of its own, with `config` added.
fn reader(topic: &str, config: &mut ClientConfig) -> BaseConsumer {
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", &kafka().bootstrap_servers)
        .set("group.id", random_id("test-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

fn record_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let mut headers = HashMap::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            headers.entry(h.key.to_owned()).or_insert_with(|| {
                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()
            });
        }
    }
    Record {
        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
        payload: m.payload().unwrap_or_default().to_vec(),
        headers,
    }
}

/// The records of `topic` from its start, each handed over the moment the consumer sees it
/// (10 ms fetch wait): for tests that act as soon as a record is visible, as an application
/// does. The reader stops when the receiver is dropped, and waits while 64 records are unread.
pub fn watch_topic(topic: &str) -> tokio::sync::mpsc::Receiver<Record> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let consumer = reader(
            &topic,
            ClientConfig::new()
                .set("topic.metadata.refresh.interval.ms", "200")
                .set("fetch.wait.max.ms", "10"),
        );
        while !tx.is_closed() {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50))
                && tx.blocking_send(record_of(&m)).is_err()
            {
                break;
            }
        }
    });
    rx
}

/// How many records `topic` holds (the sum of its partitions' high watermarks; 0 for a topic
/// that does not exist).
pub async fn records_in(topic: &str) -> i64 {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka().bootstrap_servers)
            .set("log_level", "3")
            .create()
            .unwrap();
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout).unwrap();
        metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions())
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p.id(), timeout)
                    .unwrap()
                    .1
            })
            .sum()
    })
    .await
    .unwrap()
}

/// The routing state as the command router reads it.
pub async fn routing() -> ferrule_registry::device_connection::RoutingState {
    let store = ferrule_registry::open_store(&database(), &Default::default())
        .await
        .unwrap();
    ferrule_registry::device_connection::RoutingState::new(
        store.pool().clone(),
        Duration::from_secs(30),
        &route_kafka(),
    )
}

/// This process's reader of the route topic on the test broker.
pub async fn routes() -> ferrule_registry::device_connection::RouteLog {
    ferrule_registry::device_connection::RouteLog::shared(&route_kafka())
        .await
        .unwrap()
}

/// The test broker as the route topic's readers use it (short fetch waits).
pub fn route_kafka() -> KafkaConfig {
    KafkaConfig {
        consumer_fetch_wait_ms: 20,
        ..kafka()
    }
}

/// The first record of `topic` that `wanted` picks, waiting for it as [`read`] does.
pub async fn read_matching(topic: &str, wanted: impl Fn(&Record) -> bool) -> Record {
    let mut n = 1;
    loop {
        let records = read(topic, n).await;
        if let Some(r) = records.iter().find(|r| wanted(r)) {
            return r.clone();
        }
        n = records.len() + 1;
    }
}

/// Registry changes reach the gateway through PostgreSQL notifications, within a second:
/// repeats the request until it gets `want`, for at most two seconds.
pub async fn eventually<F, Fut>(want: StatusCode, mut request: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let start = Instant::now();
    loop {
        let got = request().await.unwrap().status();
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "still {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a command the way a Kafka application does.
pub async fn send_command(tenant: &str, device: &str, headers: &[(&str, &str)], payload: &str) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka().bootstrap_servers)
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
    let topic = format!("hono.command.{tenant}");
    producer
        .send(
            FutureRecord::to(&topic)
                .key(device)
                .headers(hs)
                .payload(payload),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
}

/// A command router of its own for this test's tenant (own consumer group). Routers of
/// other tests running at the same time never see this tenant's commands.
pub async fn start_router(tenant: &str) -> tokio::sync::watch::Sender<bool> {
    start_router_in(tenant, &random_id("router")).await
}

/// A command router for `tenant` in consumer group `group`; sending `true` stops it.
pub async fn start_router_in(tenant: &str, group: &str) -> tokio::sync::watch::Sender<bool> {
    let topic = format!("hono.command.{tenant}");
    let store = ferrule_registry::open_store(&database(), &Default::default())
        .await
        .unwrap();
    let auth =
        ferrule_registry::DeviceAuthenticator::new(store.pool().clone(), &Default::default());
    let (tx, rx) = tokio::sync::watch::channel(false);
    auth.spawn_listener(Connector::new(&database()).unwrap(), rx.clone());
    let routing = ferrule_registry::device_connection::RoutingState::new(
        store.pool().clone(),
        Duration::from_secs(30),
        &route_kafka(),
    );
    let group = group.to_owned();
    tokio::spawn(async move {
        let kafka = KafkaConfig {
            consumer_fetch_wait_ms: 20,
            ..kafka()
        };
        let topics = ferrule_kafka::TopicAdmin::new(&kafka)?;
        ferrule_command_router::forward::run(&kafka, &group, &topic, auth, routing, topics, rx)
            .await
    });
    tx
}

/// The process's Prometheus metrics, as the health port serves them.
/// A Kafka configuration whose broker address has nothing listening, with short time limits:
/// nothing a gateway sends is ever acknowledged.
pub fn unreachable_kafka() -> KafkaConfig {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    KafkaConfig {
        bootstrap_servers: dead.to_string(),
        metadata_timeout_ms: 500,
        delivery_timeout_ms: 500,
        ..Default::default()
    }
}

pub fn prometheus_text() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&prometheus::gather(), &mut buf)
        .unwrap();
    String::from_utf8(buf).unwrap()
}

/// A CA and a server certificate for 127.0.0.1/localhost, as PEM files in a fresh folder.
pub fn certificates() -> (std::path::PathBuf, ferrule_gateways::tls::TlsConfig) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(random_id("ferrule-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Ferrule Test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let server =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let cert = server.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    let tls = ferrule_gateways::tls::TlsConfig {
        cert_file: dir.join("server.pem"),
        key_file: dir.join("server-key.pem"),
    };
    (dir, tls)
}

/// A CA named `CN=<cn>` and a device certificate `CN=<device>` it signed,
/// written as PEM files; returns the CA's public key (DER SPKI, base64) for the trust anchor.
pub fn device_credentials(
    dir: &std::path::Path,
    name: &str,
    ca_cn: &str,
    device_cn: &str,
) -> String {
    use base64::Engine;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let spki = base64::engine::general_purpose::STANDARD
        .encode(rcgen::PublicKeyData::subject_public_key_info(&ca_key));
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_cn);
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, device_cn);
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    spki
}
