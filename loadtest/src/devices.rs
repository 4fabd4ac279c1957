//! Simulated devices: a tenant with N password devices provisioned through the registry API,
//! driven over raw MQTT (rumqttc's codec) or HTTP; plus the raw Kafka producer baseline.

use base64::Engine;
use bytes::BytesMut;
use futures_util::stream::{self, StreamExt};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rumqttc::mqttbytes::{QoS, v4};
use sha2::Digest;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Every simulated device's password.
pub const PASSWORD: &str = "loadtest-pw";

/// How the registry stores the devices' passwords: sha-256 is cheap to check, bcrypt (cost 10,
/// Hono's default) is what a connect costs when credentials are stored the safe way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PasswordHash {
    Sha256,
    Bcrypt,
}

/// A provisioned tenant and its devices (device id = auth-id).
pub struct Fleet {
    pub tenant: String,
    pub devices: Vec<String>,
    /// Added to a device's index when it picks its loopback source address (10 000 devices
    /// per address), so simulators running side by side do not share ephemeral ports.
    pub source_offset: usize,
}

impl Fleet {
    pub async fn provision(registry: &str, auth: &str, n: usize) -> anyhow::Result<Fleet> {
        Self::provision_with(registry, auth, n, PasswordHash::Sha256).await
    }

    pub async fn provision_with(
        registry: &str,
        auth: &str,
        n: usize,
        hashing: PasswordHash,
    ) -> anyhow::Result<Fleet> {
        let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
        let http = reqwest::Client::new();
        let tenant = format!("load-{}", uuid::Uuid::new_v4().simple());
        let (hash, function) = match hashing {
            PasswordHash::Sha256 => (
                base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(PASSWORD)),
                "sha-256",
            ),
            // Hono stores and accepts the `$2a$` form only.
            PasswordHash::Bcrypt => (
                bcrypt::hash_with_result(PASSWORD, 10)?.format_for_version(bcrypt::Version::TwoA),
                "bcrypt",
            ),
        };
        let r = http
            .post(format!("{registry}/v1/tenants/{tenant}"))
            .basic_auth(user, Some(password))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "creating the tenant: {}",
            r.status()
        );
        let devices: Vec<String> = (0..n).map(|i| format!("dev-{i}")).collect();
        let results: Vec<anyhow::Result<()>> = stream::iter(devices.iter().cloned())
            .map(|d| {
                let (http, tenant, hash) = (http.clone(), tenant.clone(), hash.clone());
                async move {
                    let r = http
                        .post(format!("{registry}/v1/devices/{tenant}/{d}"))
                        .basic_auth(user, Some(password))
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "device {d}: {}", r.status());
                    let creds = serde_json::json!([{"type": "hashed-password", "auth-id": d,
                        "secrets": [{"pwd-hash": hash, "hash-function": function}]}]);
                    let r = http
                        .put(format!("{registry}/v1/credentials/{tenant}/{d}"))
                        .basic_auth(user, Some(password))
                        .json(&creds)
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "credentials {d}: {}", r.status());
                    Ok(())
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<()>>()?;
        Ok(Fleet {
            tenant,
            devices,
            source_offset: 0,
        })
    }

    /// Devices that exist nowhere, for baselines that authenticate nobody.
    pub fn unprovisioned(n: usize) -> Fleet {
        Fleet {
            tenant: "baseline".into(),
            devices: (0..n).map(|i| format!("dev-{i}")).collect(),
            source_offset: 0,
        }
    }

    /// Lets the fleet's devices use CoAP without credentials (the tenant's `hono-coap` entry
    /// with `device-authentication-required: false`; the other adapters are then off).
    pub async fn allow_anonymous_coap(&self, registry: &str, auth: &str) -> anyhow::Result<()> {
        let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
        let body = serde_json::json!({"adapters": [{"type": "hono-coap", "enabled": true,
            "device-authentication-required": false}]});
        let r = reqwest::Client::new()
            .put(format!("{registry}/v1/tenants/{}", self.tenant))
            .basic_auth(user, Some(password))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "updating the tenant: {}",
            r.status()
        );
        Ok(())
    }

    /// Replaces each device's credentials with a pre-shared key (type `psk`, auth-id = the
    /// device id), for CoAP over DTLS; returns each device's identity and key.
    pub async fn use_psk(
        &self,
        registry: &str,
        auth: &str,
        key: &[u8],
    ) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
        let http = reqwest::Client::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        let results: Vec<anyhow::Result<()>> = stream::iter(self.devices.iter().cloned())
            .map(|d| {
                let (http, encoded) = (http.clone(), encoded.clone());
                async move {
                    let creds = serde_json::json!([{"type": "psk", "auth-id": d,
                        "secrets": [{"key": encoded}]}]);
                    let r = http
                        .put(format!("{registry}/v1/credentials/{}/{d}", self.tenant))
                        .basic_auth(user, Some(password))
                        .json(&creds)
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "psk of {d}: {}", r.status());
                    Ok(())
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<()>>()?;
        Ok(self
            .devices
            .iter()
            .map(|d| (self.username(d), key.to_vec()))
            .collect())
    }

    /// The unauthenticated CoAP resource of each device: `/telemetry/{tenant}/{device}`.
    pub fn coap_paths(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| format!("/telemetry/{}/{d}", self.tenant))
            .collect()
    }

    /// Registers `schema` (Avro, JSON text) for the fleet's telemetry topic through the
    /// registry's schema registry API: from then on its gateways encode JSON payloads with it.
    pub async fn register_telemetry_schema(
        &self,
        registry: &str,
        auth: &str,
        schema: &str,
    ) -> anyhow::Result<()> {
        let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
        let r = reqwest::Client::new()
            .post(format!(
                "{registry}/subjects/{}-value/versions",
                self.telemetry_topic()
            ))
            .basic_auth(user, Some(password))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(serde_json::json!({ "schema": schema }).to_string())
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "registering the schema: {}",
            r.text().await?
        );
        Ok(())
    }

    pub fn telemetry_topic(&self) -> String {
        format!("hono.telemetry.{}", self.tenant)
    }

    pub fn username(&self, device: &str) -> String {
        format!("{device}@{}", self.tenant)
    }

    /// Every device connects and publishes `per_device` messages; QoS 1 keeps up to 100 in
    /// flight per device.
    pub async fn mqtt_publish(
        &self,
        addr: &str,
        per_device: usize,
        qos: u8,
        size: usize,
    ) -> anyhow::Result<()> {
        self.mqtt_publish_with(addr, per_device, qos, size, MqttVersion::V311)
            .await
    }

    /// Like `mqtt_publish`, speaking `version`.
    pub async fn mqtt_publish_with(
        &self,
        addr: &str,
        per_device: usize,
        qos: u8,
        size: usize,
        version: MqttVersion,
    ) -> anyhow::Result<()> {
        self.mqtt_publish_payload(addr, per_device, qos, vec![b'x'; size], version)
            .await
    }

    /// Like `mqtt_publish_with`, every message carrying `payload`.
    pub async fn mqtt_publish_payload(
        &self,
        addr: &str,
        per_device: usize,
        qos: u8,
        payload: Vec<u8>,
        version: MqttVersion,
    ) -> anyhow::Result<()> {
        let tasks = self.devices.iter().enumerate().map(|(i, d)| {
            let (addr, user, payload) = (addr.to_owned(), self.username(d), payload.clone());
            tokio::spawn(async move {
                let mut c = MqttDevice::connect_with(&addr, &user, i, version).await?;
                c.publish_all(per_device, qos, &payload).await
            })
        });
        for r in futures_util::future::join_all(tasks).await {
            r??;
        }
        Ok(())
    }

    /// Connects every device and keeps the connections open.
    pub async fn mqtt_hold(&self, addr: &str) -> anyhow::Result<Vec<TcpStream>> {
        self.mqtt_hold_at(addr, None).await
    }

    /// Connects every device and keeps the connections open: at most `rate` new connections
    /// per second when given, else as fast as 64 concurrent connects go.
    pub async fn mqtt_hold_at(
        &self,
        addr: &str,
        rate: Option<u32>,
    ) -> anyhow::Result<Vec<TcpStream>> {
        let start = tokio::time::Instant::now();
        let offset = self.source_offset;
        let progress = crate::progress::bar("connecting", self.devices.len() as u64, "devices");
        let results: Vec<anyhow::Result<TcpStream>> = stream::iter(self.devices.iter().enumerate())
            .map(|(i, d)| {
                let (addr, user, progress) = (addr.to_owned(), self.username(d), progress.clone());
                let at = rate.map(|r| {
                    start + std::time::Duration::from_secs_f64(i as f64 / f64::from(r.max(1)))
                });
                async move {
                    if let Some(at) = at {
                        tokio::time::sleep_until(at).await;
                    }
                    let stream = MqttDevice::connect(&addr, &user, offset + i).await?.stream;
                    progress.inc(1);
                    Ok(stream)
                }
            })
            .buffer_unordered(if rate.is_some() { 4096 } else { 64 })
            .collect()
            .await;
        progress.finish_and_clear();
        results.into_iter().collect()
    }

    /// `requests` POSTs spread over the devices with `concurrency` in flight.
    pub async fn http_post(
        &self,
        url: &str,
        requests: usize,
        concurrency: usize,
        qos: u8,
        size: usize,
    ) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()?;
        let next = Arc::new(AtomicUsize::new(0));
        let payload = vec![b'x'; size];
        let workers = (0..concurrency).map(|_| {
            let (http, next, payload) = (http.clone(), next.clone(), payload.clone());
            let users: Vec<String> = self.devices.iter().map(|d| self.username(d)).collect();
            let url = format!("{url}/telemetry");
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return anyhow::Ok(());
                    }
                    let r = http
                        .post(&url)
                        .basic_auth(&users[i % users.len()], Some(PASSWORD))
                        .header("content-type", "application/octet-stream")
                        .header("qos-level", qos.to_string())
                        .body(payload.clone())
                        .send()
                        .await?;
                    anyhow::ensure!(r.status() == 202, "HTTP {}", r.status());
                }
            })
        });
        for r in futures_util::future::join_all(workers).await {
            r??;
        }
        Ok(())
    }
}

/// The MQTT version a simulated device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MqttVersion {
    #[default]
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

/// One raw MQTT device connection (3.1.1, or 5 through [`crate::mqtt5`]).
pub struct MqttDevice {
    stream: TcpStream,
    buf: BytesMut,
    version: MqttVersion,
}

impl MqttDevice {
    /// Connects from 127.0.0.x (x spread by `index`), so that 100k connections fit the
    /// ephemeral port range.
    pub async fn connect(addr: &str, user: &str, index: usize) -> anyhow::Result<MqttDevice> {
        Self::connect_with(addr, user, index, MqttVersion::V311).await
    }

    pub async fn connect_with(
        addr: &str,
        user: &str,
        index: usize,
        version: MqttVersion,
    ) -> anyhow::Result<MqttDevice> {
        let target: std::net::SocketAddr = addr.parse()?;
        let socket = TcpSocket::new_v4()?;
        if target.ip().is_loopback() {
            let source = std::net::Ipv4Addr::new(127, 0, 0, 1 + (index / 10_000) as u8);
            socket.bind((source, 0).into())?;
        }
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        let mut d = MqttDevice {
            stream,
            buf: BytesMut::with_capacity(4096),
            version,
        };
        let mut connect = v4::Connect::new(user);
        connect.keep_alive = 600;
        connect.set_login(user, PASSWORD);
        d.write(&[v4::Packet::Connect(connect)]).await?;
        match d.read().await? {
            v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success => Ok(d),
            other => anyhow::bail!("{user}: {other:?}"),
        }
    }

    /// A SUBSCRIBE to `filter` with packet id 1 (a client's packet ids are never 0).
    pub fn subscribe_packet(filter: &str, qos: QoS) -> v4::Packet {
        let mut s = v4::Subscribe::new(filter, qos);
        s.pkid = 1;
        v4::Packet::Subscribe(s)
    }

    pub async fn write(&mut self, packets: &[v4::Packet]) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        for p in packets {
            match self.version {
                MqttVersion::V311 => {
                    p.write(&mut out, 1 << 20)?;
                }
                MqttVersion::V5 => {
                    if let Some(p5) = crate::mqtt5::outgoing(p) {
                        p5.write(&mut out, None)?;
                    }
                }
            }
        }
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// One PUBLISH (QoS 0 or 1; `pkid` is used for QoS 1).
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        pkid: u16,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let mut p = v4::Publish::new(topic, qos, payload);
        if qos == QoS::AtLeastOnce {
            p.pkid = pkid;
        }
        self.write(&[v4::Packet::Publish(p)]).await
    }

    pub async fn read(&mut self) -> anyhow::Result<v4::Packet> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(p);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                anyhow::bail!("connection closed by the gateway");
            }
        }
    }

    /// The next packet already received, without reading the socket.
    fn buffered(&mut self) -> anyhow::Result<Option<v4::Packet>> {
        loop {
            match self.version {
                MqttVersion::V311 => match v4::Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return Ok(Some(p)),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
                    Err(e) => anyhow::bail!(e),
                },
                MqttVersion::V5 => {
                    match rumqttc::v5::mqttbytes::v5::Packet::read(&mut self.buf, None) {
                        Ok(p) => {
                            if let Some(p) = crate::mqtt5::incoming(p) {
                                return Ok(Some(p));
                            }
                        }
                        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                            return Ok(None);
                        }
                        Err(e) => anyhow::bail!(e),
                    }
                }
            }
        }
    }

    async fn publish_all(&mut self, n: usize, qos: u8, payload: &[u8]) -> anyhow::Result<()> {
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        const WINDOW: usize = 100;
        let payload = bytes::Bytes::copy_from_slice(payload);
        let (mut sent, mut acked) = (0usize, 0usize);
        while sent < n {
            let batch = (n - sent).min(if qos == QoS::AtMostOnce {
                WINDOW
            } else {
                WINDOW - (sent - acked)
            });
            let packets: Vec<v4::Packet> = (0..batch)
                .map(|k| {
                    let mut p = v4::Publish::from_bytes("telemetry", qos, payload.clone());
                    if qos == QoS::AtLeastOnce {
                        p.pkid = ((sent + k) % 65_535 + 1) as u16;
                    }
                    v4::Packet::Publish(p)
                })
                .collect();
            self.write(&packets).await?;
            sent += batch;
            if qos == QoS::AtLeastOnce {
                // Wait for at least one ack, then count every ack already received, and
                // refill the window in one write as a client library with a send queue does.
                while sent - acked >= WINDOW || (sent == n && acked < n) {
                    if let v4::Packet::PubAck(_) = self.read().await? {
                        acked += 1;
                    }
                    while let Some(p) = self.buffered()? {
                        if let v4::Packet::PubAck(_) = p {
                            acked += 1;
                        }
                    }
                }
            }
        }
        // A ping answered means every earlier packet was handled.
        self.write(&[v4::Packet::PingReq]).await?;
        while !matches!(self.read().await?, v4::Packet::PingResp) {}
        Ok(())
    }
}

/// Produces `n` records like the gateway's for an MQTT QoS 1 upload (device id as key, the six
/// headers the gateway writes, the same payload) and waits for every ack: the ceiling of the
/// Kafka leg for exactly the records Ferrule has to write.
pub async fn raw_producer(
    bootstrap: &str,
    topic: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<()> {
    raw_produce(
        &raw_producer_ready(bootstrap, topic, None).await?,
        topic,
        n,
        size,
    )
    .await
}

/// A producer configured like the gateway's, connected and holding `topic`'s metadata. With
/// `partitions` it is ready the way a running gateway's producer is, so a timed run starts with
/// its first record: the topic is created with as many partitions as the gateway gives a
/// tenant's topics, and one record is sent and acknowledged first (its producer id acquired),
/// so the topic holds one record more than the run sends.
pub async fn raw_producer_ready(
    bootstrap: &str,
    topic: &str,
    partitions: Option<i32>,
) -> anyhow::Result<FutureProducer> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    if let Some(partitions) = partitions {
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("log_level", "3")
            .create()?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        for result in admin.create_topics([&new], &AdminOptions::new()).await? {
            result.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("log_level", "3")
        .create()?;
    let client = producer.clone();
    let topic_name = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(Some(&topic_name), std::time::Duration::from_secs(10))
            .map(|_| ())
    })
    .await??;
    if partitions.is_some() {
        raw_produce(&producer, topic, 1, 1).await?;
    }
    Ok(producer)
}

/// Sends `n` records like the gateway's on `producer` and waits for every ack: 10 000 in flight,
/// sent from one task per core as the gateway's connections are served on every core, so the
/// application side is never what limits the ceiling.
pub async fn raw_produce(
    producer: &FutureProducer,
    topic: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<()> {
    let tasks = std::thread::available_parallelism().map_or(1, |p| p.get());
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (producer, topic) = (producer.clone(), topic.to_owned());
            let share = n / tasks + usize::from(t < n % tasks);
            tokio::spawn(async move {
                produce_share(&producer, &topic, share, size, 10_000 / tasks).await
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(())
}

async fn produce_share(
    producer: &FutureProducer,
    topic: &str,
    n: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<()> {
    let payload = vec![b'x'; size];
    let results: Vec<anyhow::Result<()>> = stream::iter(0..n)
        .map(|i| {
            let producer = &producer;
            let payload = &payload;
            async move {
                let key = format!("dev-{}", i % 100);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis()
                    .to_string();
                let headers = [
                    ("content-type", "application/octet-stream"),
                    ("creation-time", now.as_str()),
                    ("device_id", key.as_str()),
                    ("qos", "1"),
                    ("orig_adapter", "hono-mqtt"),
                    ("orig_address", "telemetry"),
                ]
                .into_iter()
                .fold(OwnedHeaders::new_with_capacity(6), |hs, (k, v)| {
                    hs.insert(Header {
                        key: k,
                        value: Some(v),
                    })
                });
                let record = FutureRecord::to(topic)
                    .key(&key)
                    .payload(payload)
                    .headers(headers);
                producer
                    .send(record, std::time::Duration::from_secs(30))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| anyhow::anyhow!(e))
            }
        })
        .buffer_unordered(window.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}
