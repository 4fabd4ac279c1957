//! The cluster as a whole: one metadata request, for readiness and `ferrule check-kafka`.
//! librdkafka reports why it cannot reach the brokers (authentication failed, certificate not
//! trusted) through its error callback, while the request itself only times out; the client
//! keeps the last such cause and names it in the request's error.

use crate::config::KafkaConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use std::sync::Mutex;
use std::time::Duration;

/// What a metadata request returned.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub brokers: Vec<String>,
    pub topics: usize,
}

/// Keeps the last error librdkafka reported for the client, besides logging it.
#[derive(Default)]
pub struct LastError(Mutex<Option<String>>);

impl LastError {
    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(%error, reason, "kafka cluster unreachable");
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
    }
}

impl ConsumerContext for LastError {}

/// A client that asks the cluster for metadata; created once and reused.
pub struct MetadataClient {
    consumer: BaseConsumer<LastError>,
    timeout: Duration,
}

impl MetadataClient {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let consumer = cfg
            .consumer()
            .set("client.id", "ferrule-metadata")
            .create_with_context(LastError::default())?;
        Ok(MetadataClient {
            consumer,
            timeout: Duration::from_millis(cfg.metadata_timeout_ms),
        })
    }

    /// Sends a metadata request (blocking; call from a blocking thread).
    pub fn fetch(&self) -> anyhow::Result<ClusterInfo> {
        // A cause from before this request is stale.
        self.consumer.context().take();
        let md = match self.consumer.fetch_metadata(None, self.timeout) {
            Ok(md) => md,
            Err(e) => {
                return Err(match self.consumer.context().take() {
                    Some(cause) => anyhow::anyhow!("{e}; cause: {cause}"),
                    None => e.into(),
                });
            }
        };
        Ok(ClusterInfo {
            brokers: md
                .brokers()
                .iter()
                .map(|b| format!("{}:{} (id {})", b.host(), b.port(), b.id()))
                .collect(),
            topics: md.topics().len(),
        })
    }
}
