//! Ferrule's one Kafka layer. Every component (gateways, command router, AMQP bridge, the
//! `ferrule` binary) reaches the cluster only through it:
//!
//! - [`KafkaConfig`], the `[kafka]` section: bootstrap servers, TLS and SASL, topic naming and
//!   creation, and tables of librdkafka properties that override Ferrule's defaults;
//! - [`KafkaConfig::producer`], [`KafkaConfig::consumer`], [`KafkaConfig::admin`]: the only
//!   place an rdkafka client configuration is started;
//! - [`TopicAdmin`]: creates topics (or, with `create_topics = false`, checks that they exist);
//! - [`RecoveringProducer`]: a producer that is replaced when librdkafka declares it fatally
//!   failed, re-sending the record the failed one refused;
//! - [`classify`]: which Kafka errors are worth retrying and which are not.
#![forbid(unsafe_code)]

mod client;
mod config;
mod error;
mod metadata;
pub mod metrics;
mod producer;
pub mod stats;
mod topics;

pub use client::{ClientBuilder, ClientKind};
pub use config::{ClientProperties, KafkaConfig, SaslMechanism, SecurityProtocol};
pub use error::{ErrorClass, classify};
pub use metadata::{ClusterInfo, MetadataClient};
pub use producer::{RecoveringProducer, producers};
pub use stats::Stats;
pub use topics::{EXT_PARTITIONS, EXT_REPLICATION, TopicAdmin, TopicError, TopicSpec};
