//! The `[kafka]` section: what a Kafka operator sets to connect Ferrule to a cluster.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// How Ferrule connects to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    #[serde(alias = "PLAINTEXT")]
    Plaintext,
    #[serde(alias = "SSL")]
    Ssl,
    #[serde(alias = "SASL_PLAINTEXT")]
    SaslPlaintext,
    #[serde(alias = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// The SASL mechanism (librdkafka's `sasl.mechanism`), used with the `sasl_*` protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A librdkafka property value; TOML and environment values may be numbers or booleans.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Text(s) => f.write_str(s),
            PropertyValue::Integer(i) => write!(f, "{i}"),
            PropertyValue::Float(x) => write!(f, "{x}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl fmt::Debug for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// librdkafka properties by name (`socket.keepalive.enable = true`), applied after Ferrule's
/// own settings so that they override them.
pub type Properties = BTreeMap<String, PropertyValue>;

/// Properties of one kind of client (`[kafka.producer]`, `[kafka.consumer]`, `[kafka.admin]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientProperties {
    /// librdkafka properties for this kind of client only; they win over `kafka.properties`.
    pub properties: Properties,
}

/// A secret that never appears in `Debug` output (logs, panics).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// The `[kafka]` section: the cluster, how to reach it securely, how topics are named and
/// created, and Ferrule's producer and consumer settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers` of the Kafka-protocol cluster.
    pub bootstrap_servers: String,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: SecurityProtocol,
    /// PEM file of the CA(s) that signed the brokers' certificates (`ssl.ca.location`); empty:
    /// the system's trust store.
    pub ssl_ca_location: String,
    /// PEM file of Ferrule's client certificate, for brokers that require one (mutual TLS).
    pub ssl_certificate_location: String,
    /// PEM file of the client certificate's private key.
    pub ssl_key_location: String,
    /// Password of that key, if it is encrypted.
    pub ssl_key_password: Secret,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with the `sasl_*` protocols).
    pub sasl_mechanism: SaslMechanism,
    pub sasl_username: String,
    pub sasl_password: Secret,
    /// Prepended to every topic name and subscription pattern (`prod.` makes
    /// `prod.hono.telemetry.<tenant>`); empty: Hono's names.
    pub topic_prefix: String,
    /// Whether Ferrule creates the topics it uses. With `false` it never creates one: topics
    /// must exist beforehand (docs/kafka.md lists them), and an upload to a tenant whose topic
    /// is missing gets 503.
    pub create_topics: bool,
    /// How long one metadata or admin request may take (milliseconds).
    pub metadata_timeout_ms: u64,
    /// Partitions of topics Ferrule creates (a tenant's `ext.kafka-topic-partitions` wins).
    pub topic_partitions: i32,
    /// Replication factor of topics Ferrule creates (a tenant's
    /// `ext.kafka-topic-replication` wins).
    pub topic_replication: i32,
    /// Most records waiting in a gateway's producer; a full queue answers devices with 503.
    pub producer_queue_messages: u32,
    /// How long a record may wait for the broker's ack before the device gets 503 (ms).
    pub delivery_timeout_ms: u64,
    /// How long the gateways' producer waits to fill a batch (ms).
    pub linger_ms: u64,
    /// Longest wait of one fetch of Ferrule's consumers (router, gateways, bridge; ms).
    /// A broker answers as soon as records arrive; one that does not wake waiting fetches
    /// adds up to this much latency per hop.
    pub consumer_fetch_wait_ms: u64,
    /// How often Ferrule's clients report librdkafka's statistics (queues, broker round
    /// trips and errors, consumer lag) to /metrics (ms); 0 turns them off.
    pub statistics_interval_ms: u64,
    /// librdkafka properties for every client; they override Ferrule's defaults.
    pub properties: Properties,
    pub producer: ClientProperties,
    pub consumer: ClientProperties,
    pub admin: ClientProperties,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            security_protocol: SecurityProtocol::Plaintext,
            ssl_ca_location: String::new(),
            ssl_certificate_location: String::new(),
            ssl_key_location: String::new(),
            ssl_key_password: Secret::default(),
            sasl_mechanism: SaslMechanism::default(),
            sasl_username: String::new(),
            sasl_password: Secret::default(),
            topic_prefix: String::new(),
            create_topics: true,
            metadata_timeout_ms: 2000,
            topic_partitions: 3,
            topic_replication: 1,
            producer_queue_messages: 100_000,
            delivery_timeout_ms: 2500,
            linger_ms: 5,
            consumer_fetch_wait_ms: 100,
            statistics_interval_ms: 10_000,
            properties: Properties::new(),
            producer: ClientProperties::default(),
            consumer: ClientProperties::default(),
            admin: ClientProperties::default(),
        }
    }
}

impl KafkaConfig {
    /// The topic names of this deployment (`topic_prefix` + Hono's names).
    pub fn topic_names(&self) -> anyhow::Result<ferrule_schemas::TopicNames> {
        ferrule_schemas::TopicNames::new(&self.topic_prefix).map_err(|_| {
            anyhow::anyhow!(
                "kafka.topic_prefix `{}` is not usable: a topic prefix may contain only \
                 [a-zA-Z0-9._-] and must leave room for Hono's topic names",
                self.topic_prefix
            )
        })
    }

    /// Settings that contradict each other, found before any client is built.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.topic_names()?;
        if self.security_protocol.uses_sasl() && self.sasl_username.is_empty() {
            anyhow::bail!(
                "kafka.security_protocol = {} needs kafka.sasl_username and kafka.sasl_password",
                self.security_protocol.as_str()
            );
        }
        if self.ssl_certificate_location.is_empty() != self.ssl_key_location.is_empty() {
            anyhow::bail!("kafka.ssl_certificate_location and kafka.ssl_key_location go together");
        }
        for file in [
            &self.ssl_ca_location,
            &self.ssl_certificate_location,
            &self.ssl_key_location,
        ] {
            if !file.is_empty() && !std::path::Path::new(file).is_file() {
                anyhow::bail!("kafka: file {file} does not exist");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafkas_upper_case_protocol_names_are_understood() {
        let parse = |v: &str| serde_json::from_value::<SecurityProtocol>(serde_json::json!(v));
        assert_eq!(parse("SASL_SSL").unwrap(), SecurityProtocol::SaslSsl);
        assert_eq!(parse("sasl_ssl").unwrap(), SecurityProtocol::SaslSsl);
        assert_eq!(parse("SSL").unwrap(), SecurityProtocol::Ssl);
        assert!(parse("tls").is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let cfg = KafkaConfig {
            sasl_password: Secret("hunter2".into()),
            ..KafkaConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn sasl_needs_a_user_and_a_prefix_must_be_a_topic_name() {
        let mut cfg = KafkaConfig {
            security_protocol: SecurityProtocol::SaslSsl,
            ..KafkaConfig::default()
        };
        assert!(cfg.validate().is_err());
        cfg.sasl_username = "alice".into();
        assert!(cfg.validate().is_ok());
        cfg.topic_prefix = "no/slash".into();
        assert!(cfg.validate().is_err());
        cfg.topic_prefix = "staging.".into();
        assert_eq!(cfg.topic_names().unwrap().hono_prefix(), "staging.hono.");
        cfg.ssl_ca_location = "/does/not/exist.pem".into();
        assert!(cfg.validate().is_err());
    }
}
