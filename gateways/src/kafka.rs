//! The Kafka leg of the gateways: one idempotent producer per process for every QoS, topics
//! created through the admin API when first used, and a full producer queue reported as
//! back-pressure instead of growing memory.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

/// The `[kafka]` section: the cluster and how Ferrule produces to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers` of the Kafka-protocol cluster.
    pub bootstrap_servers: String,
    /// How long one metadata request may take (milliseconds).
    pub metadata_timeout_ms: u64,
    /// Partitions of topics Ferrule creates.
    pub topic_partitions: i32,
    /// Replication factor of topics Ferrule creates.
    pub topic_replication: i32,
    /// Most records waiting in the producer; a full queue answers devices with 503.
    pub producer_queue_messages: u32,
    /// How long a record may wait for the broker's ack before the device gets 503 (ms).
    pub delivery_timeout_ms: u64,
    /// How long the producer waits to fill a batch (ms).
    pub linger_ms: u64,
    /// Longest wait of one fetch of Ferrule's command consumers (router and gateways, ms).
    /// A broker answers as soon as records arrive; one that does not wake waiting fetches
    /// adds up to this much latency per command hop.
    pub consumer_fetch_wait_ms: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            metadata_timeout_ms: 2000,
            topic_partitions: 3,
            topic_replication: 1,
            producer_queue_messages: 100_000,
            delivery_timeout_ms: 2500,
            linger_ms: 5,
            consumer_fetch_wait_ms: 100,
        }
    }
}

/// Why a record did not reach the broker; the device is told, the record is never re-sent.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The producer queue is full: the broker is slower than the devices.
    #[error("the producer queue is full")]
    QueueFull,
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("delivery was cancelled")]
    Cancelled,
    #[error("the cluster did not answer in time")]
    Timeout,
}

/// A record on its way to Kafka.
pub struct OutboundRecord<'a> {
    pub topic: &'a str,
    pub key: &'a str,
    pub headers: OwnedHeaders,
    pub payload: &'a [u8],
}

/// The process's one producer, plus the set of topics known to exist.
pub struct DownstreamSender {
    /// Replaced when librdkafka declares it fatally failed (an idempotent producer whose
    /// sequence the broker lost, say): from then on it refuses every record.
    producer: RwLock<Arc<FutureProducer>>,
    admin: AdminClient<DefaultClientContext>,
    known_topics: Mutex<HashSet<String>>,
    cfg: KafkaConfig,
}

impl DownstreamSender {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("log_level", "3")
            .create()?;
        Ok(DownstreamSender {
            producer: RwLock::new(Arc::new(producer(cfg)?)),
            admin,
            known_topics: Mutex::new(HashSet::new()),
            cfg: cfg.clone(),
        })
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current producer's librdkafka handle: lets a test put it into a state no broker
    /// produces on demand (a fatal error). Dereferencing it is the caller's risk.
    #[doc(hidden)]
    pub fn native_producer(&self) -> *mut rdkafka::types::RDKafka {
        self.producer().client().native_ptr()
    }

    /// Builds a new producer if the current one failed fatally; `true` when it did. Records
    /// the failed one still held are failed to their senders, never re-sent.
    fn replace_if_fatal(&self) -> bool {
        let failed = {
            let mut current = self.producer.write().unwrap_or_else(|p| p.into_inner());
            let Some((code, reason)) = current.client().fatal_error() else {
                return false;
            };
            let fresh = match producer(&self.cfg) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot build a new Kafka producer");
                    return false;
                }
            };
            tracing::warn!(?code, %reason, "the Kafka producer failed fatally; a new one takes over");
            crate::metrics::producer_replaced();
            std::mem::replace(&mut *current, fresh)
        };
        // Dropped outside the lock: it waits for its threads.
        drop(failed);
        true
    }

    /// Creates `topic` unless it is known to exist; an existing topic is fine.
    pub async fn ensure_topic(&self, topic: &str) -> Result<(), ProduceError> {
        if self.is_known(topic) {
            return Ok(());
        }
        // Boxed: creating is rare, and its future would otherwise sit inside every message's.
        Box::pin(self.create_topic(topic)).await
    }

    async fn create_topic(&self, topic: &str) -> Result<(), ProduceError> {
        let new = NewTopic::new(
            topic,
            self.cfg.topic_partitions,
            TopicReplication::Fixed(self.cfg.topic_replication),
        );
        let timeout = Duration::from_millis(self.cfg.metadata_timeout_ms);
        let opts = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let results = tokio::time::timeout(timeout * 2, self.admin.create_topics([&new], &opts))
            .await
            .map_err(|_| ProduceError::Timeout)??;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code).into()),
            }
        }
        self.known().insert(topic.to_owned());
        Ok(())
    }

    /// Whether `topic` is known to exist, so producing needs no admin request first.
    pub fn is_known(&self, topic: &str) -> bool {
        self.known().contains(topic)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.known_topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the record to the producer without waiting; the returned future resolves when
    /// the broker acked. A full queue is returned at once as back-pressure.
    pub fn enqueue(&self, record: OutboundRecord<'_>) -> Result<Delivery, ProduceError> {
        let mut fr = FutureRecord::to(record.topic)
            .key(record.key)
            .payload(record.payload)
            .headers(record.headers);
        let mut retried = false;
        loop {
            // The read guard lives for this statement only.
            let sent = self
                .producer
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .send_result(fr);
            fr = match sent {
                Ok(f) => return Ok(Delivery(f)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(ProduceError::QueueFull);
                }
                // The failed producer refused the record, so it never left: a new one takes
                // it, once.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::Fatal), fr))
                    if !retried && self.replace_if_fatal() =>
                {
                    fr
                }
                Err((e, _)) => return Err(e.into()),
            };
            retried = true;
        }
    }

    /// Waits until queued records were delivered or `timeout` passed (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer().flush(timeout) {
            tracing::warn!(error = %e, "records still unsent at shutdown");
        }
    }
}

/// The idempotent, acks=all producer every record of a gateway goes through.
fn producer(cfg: &KafkaConfig) -> KafkaResult<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            cfg.producer_queue_messages.to_string(),
        )
        .set("message.timeout.ms", cfg.delivery_timeout_ms.to_string())
        .set("log_level", "3")
        .create()
}

/// The broker's answer to one record.
pub struct Delivery(DeliveryFuture);

impl Delivery {
    pub async fn acked(mut self) -> Result<(), ProduceError> {
        std::future::poll_fn(|cx| self.poll_acked(cx)).await
    }

    /// The broker's answer once it is there; lets a connection keep many deliveries in a
    /// plain queue and poll only the oldest.
    pub fn poll_acked(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProduceError>> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e.into()),
            Err(_) => Err(ProduceError::Cancelled),
        })
    }
}
