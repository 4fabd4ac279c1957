//! The Kafka leg of the gateways, on the shared Kafka layer (`ferrule-kafka`): one idempotent
//! producer per process for every QoS that recovers from fatal errors, topics created (or, with
//! `kafka.create_topics = false`, checked for) when first used, and a full producer queue
//! reported as back-pressure instead of growing memory.

pub use ferrule_kafka::KafkaConfig;
use ferrule_kafka::{RecoveringProducer, TopicAdmin, TopicError};
use ferrule_schemas::TopicNames;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// The topic does not exist and Ferrule may not create it (`kafka.create_topics`).
    #[error("topic {0} does not exist")]
    MissingTopic(String),
}

impl From<TopicError> for ProduceError {
    fn from(e: TopicError) -> Self {
        match e {
            TopicError::Missing(t) => ProduceError::MissingTopic(t),
            TopicError::Timeout => ProduceError::Timeout,
            TopicError::Kafka(k) => ProduceError::Kafka(k),
        }
    }
}

/// A record on its way to Kafka.
pub struct OutboundRecord<'a> {
    pub topic: &'a str,
    pub key: &'a str,
    pub headers: OwnedHeaders,
    pub payload: &'a [u8],
}

/// The process's one producer, the topics known to exist, and how they are named.
pub struct DownstreamSender {
    producer: RecoveringProducer,
    topics: TopicAdmin,
    names: TopicNames,
}

impl DownstreamSender {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let producer = cfg
            .producer()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                cfg.producer_queue_messages.to_string(),
            )
            .set("message.timeout.ms", cfg.delivery_timeout_ms.to_string());
        Ok(DownstreamSender {
            producer: RecoveringProducer::new("gateway", producer)?,
            topics: TopicAdmin::new(cfg)?,
            names: cfg.topic_names()?,
        })
    }

    /// How this deployment names its topics.
    pub fn names(&self) -> &TopicNames {
        &self.names
    }

    /// The current producer's librdkafka handle: lets a test put it into a state no broker
    /// produces on demand (a fatal error). Dereferencing it is the caller's risk.
    #[doc(hidden)]
    pub fn native_producer(&self) -> *mut rdkafka::types::RDKafka {
        self.producer.native_ptr()
    }

    /// Makes sure `topic` exists (creating it with the tenant's partitions and replication,
    /// from its `ext` or the defaults), unless it is known to.
    pub async fn ensure_topic(
        &self,
        topic: &str,
        tenant_ext: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<(), ProduceError> {
        if self.topics.is_known(topic) {
            return Ok(());
        }
        // Boxed: creating is rare, and its future would otherwise sit inside every message's.
        let spec = self.topics.tenant_spec(tenant_ext);
        Box::pin(self.topics.ensure(topic, spec)).await?;
        Ok(())
    }

    /// Forgets that `topic` exists (see [`TopicAdmin::forget`]).
    pub fn forget_topic(&self, topic: &str) {
        self.topics.forget(topic);
    }

    /// Deletes a topic this process created (see [`TopicAdmin::delete`]).
    pub async fn delete_topic(&self, topic: &str) -> Result<(), ProduceError> {
        Ok(self.topics.delete(topic).await?)
    }

    /// Whether `topic` is known to exist, so producing needs no admin request first.
    pub fn is_known(&self, topic: &str) -> bool {
        self.topics.is_known(topic)
    }

    /// Hands the record to the producer without waiting; the returned future resolves when
    /// the broker acked. A full queue is returned at once as back-pressure.
    pub fn enqueue(&self, record: OutboundRecord<'_>) -> Result<Delivery, ProduceError> {
        let fr = FutureRecord::to(record.topic)
            .key(record.key)
            .payload(record.payload)
            .headers(record.headers);
        match self.producer.send_result(fr) {
            Ok(f) => Ok(Delivery(f)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(ProduceError::QueueFull)
            }
            Err((e, _)) => Err(e.into()),
        }
    }

    /// Waits until queued records were delivered or `timeout` passed (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        self.producer.flush(timeout);
    }
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
