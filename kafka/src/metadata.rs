//! The cluster as a whole: one metadata request, for readiness and `ferrule check-kafka`.
//! librdkafka reports why it cannot reach the brokers (authentication failed, certificate not
//! trusted) through its error callback, while the request itself only times out; the client
//! keeps the last such cause and names it in the request's error. rdkafka delivers errors and
//! log lines as events on the client's queue, which a metadata request does not serve: a thread
//! of the client serves it all along.

use crate::config::KafkaConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a metadata request returned.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub brokers: Vec<String>,
    pub topics: usize,
}

/// Keeps the last error librdkafka reported for the client since the cluster last answered,
/// besides logging it.
#[derive(Default)]
pub struct LastError(Mutex<Option<String>>);

impl LastError {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(%error, reason, "kafka cluster unreachable");
        // "1/1 brokers are down" follows the error that brought them down, and says less.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *self.lock() = Some(reason.to_owned());
        }
    }
}

impl ConsumerContext for LastError {}

/// A client that asks the cluster for metadata; created once and reused.
pub struct MetadataClient {
    consumer: Arc<BaseConsumer<LastError>>,
    timeout: Duration,
    stop: Arc<AtomicBool>,
}

impl MetadataClient {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let consumer: Arc<BaseConsumer<LastError>> = Arc::new(
            cfg.consumer()
                .set("client.id", "ferrule-metadata")
                .create_with_context(LastError::default())?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (events, stopped) = (consumer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-metadata".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    // Serves log lines and errors (handed to LastError); there are no messages.
                    let _ = events.poll(Duration::from_millis(100));
                }
            })?;
        Ok(MetadataClient {
            consumer,
            timeout: Duration::from_millis(cfg.metadata_timeout_ms),
            stop,
        })
    }

    /// Sends a metadata request (blocking; call from a blocking thread).
    pub fn fetch(&self) -> anyhow::Result<ClusterInfo> {
        let md = match self.consumer.fetch_metadata(None, self.timeout) {
            Ok(md) => md,
            // librdkafka does not repeat an identical error for a while: the cause stays until
            // the cluster answers.
            Err(e) => {
                return Err(match self.consumer.context().lock().clone() {
                    Some(cause) => anyhow::anyhow!("{e}; cause: {cause}"),
                    None => e.into(),
                });
            }
        };
        *self.consumer.context().lock() = None;
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

impl Drop for MetadataClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
