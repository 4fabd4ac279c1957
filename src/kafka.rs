//! The Kafka-protocol cluster as seen by `ferrule`: a metadata request through rdkafka, used by
//! readiness and by `ferrule check-kafka`.

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::Duration;

/// What a metadata request returned.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub brokers: Vec<String>,
    pub topics: usize,
}

/// A client that can ask the cluster for metadata; created once and reused.
pub struct MetadataClient {
    consumer: BaseConsumer,
    timeout: Duration,
}

impl MetadataClient {
    pub fn new(bootstrap: &str, timeout: Duration) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("client.id", "ferrule-metadata")
            .set("log_level", "3")
            .create()?;
        Ok(MetadataClient { consumer, timeout })
    }

    /// Sends a metadata request (blocking; call from a blocking thread).
    pub fn fetch(&self) -> anyhow::Result<ClusterInfo> {
        let md = self.consumer.fetch_metadata(None, self.timeout)?;
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
