//! Client construction: the only place an rdkafka `ClientConfig` is started. Settings are
//! applied in three layers — connection and security, the component's own defaults, then the
//! operator's `kafka.properties` and the per-kind properties, which win.

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::config::{FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaResult;

/// Which kind of client is built; selects the per-kind properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Producer,
    Consumer,
    Admin,
}

/// A client configuration in the making: [`ClientBuilder::set`] the component's settings,
/// then [`ClientBuilder::create`].
#[must_use]
pub struct ClientBuilder<'a> {
    cfg: &'a KafkaConfig,
    kind: ClientKind,
    config: ClientConfig,
}

impl KafkaConfig {
    /// A producer (`FutureProducer`, `BaseProducer`, or a [`crate::RecoveringProducer`]).
    pub fn producer(&self) -> ClientBuilder<'_> {
        // A producer asks the broker to create a topic it writes to, where the broker allows
        // that; with `create_topics = false` it must not.
        self.builder(ClientKind::Producer)
            .set("allow.auto.create.topics", self.create_topics.to_string())
    }

    /// A producer for applications' commands (the bridge): idempotent, `acks=all`,
    /// sent at once (no linger), and a record Kafka does not take within 10 s fails rather than
    /// holding up the ones behind it for librdkafka's default of five minutes.
    pub fn command_producer(&self) -> ClientBuilder<'_> {
        self.prompt_producer().set("enable.idempotence", "true")
    }

    /// A producer for records that must keep their order but need no de-duplication by the
    /// broker (the router's forwards, the route topic's records): like
    /// [`Self::command_producer`], but one request in flight and **not** idempotent.
    ///
    /// librdkafka's idempotent producer allows five requests in flight per partition but counts
    /// *records* against that limit; once five records are in flight the partition waits for
    /// the answer, and the broker thread, whose wake-up time has already passed, polls its
    /// socket without pause until then (docs/kafka.md, "Producers"). For a producer whose
    /// records are few per request that is most of its CPU. One request at a time keeps every
    /// partition's order; what it gives up — a record retried after a lost answer may be
    /// written twice — each caller documents as harmless for its records.
    pub fn ordered_producer(&self) -> ClientBuilder<'_> {
        self.prompt_producer()
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
    }

    /// `acks=all`, no linger, and a 10 s bound on each record: what both command-path
    /// producers share.
    fn prompt_producer(&self) -> ClientBuilder<'_> {
        self.producer()
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000")
    }

    /// A consumer (`StreamConsumer`, `BaseConsumer`; also the metadata probe).
    pub fn consumer(&self) -> ClientBuilder<'_> {
        self.builder(ClientKind::Consumer)
            .set("allow.auto.create.topics", "false")
    }

    /// An admin client.
    pub fn admin(&self) -> ClientBuilder<'_> {
        self.builder(ClientKind::Admin)
    }

    fn builder(&self, kind: ClientKind) -> ClientBuilder<'_> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("security.protocol", self.security_protocol.as_str())
            // Errors only: librdkafka's errors reach the log through `tracing`.
            .set("log_level", "3");
        if self.security_protocol.uses_tls() {
            for (key, value) in [
                ("ssl.ca.location", &self.ssl_ca_location),
                ("ssl.certificate.location", &self.ssl_certificate_location),
                ("ssl.key.location", &self.ssl_key_location),
                ("ssl.key.password", &self.ssl_key_password.0),
            ] {
                if !value.is_empty() {
                    config.set(key, value);
                }
            }
        }
        if self.security_protocol.uses_sasl() {
            config
                .set("sasl.mechanism", self.sasl_mechanism.as_str())
                .set("sasl.username", &self.sasl_username)
                .set("sasl.password", &self.sasl_password.0);
        }
        ClientBuilder {
            cfg: self,
            kind,
            config,
        }
    }
}

impl ClientBuilder<'_> {
    /// A setting of the component; the operator's properties still override it.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// The finished configuration, with the operator's properties applied last. Environment
    /// variables cannot hold a `.`: in a key without one, `_` stands for `.`, so
    /// `FERRULE_KAFKA__PROPERTIES__SOCKET_KEEPALIVE_ENABLE` sets `socket.keepalive.enable`
    /// (librdkafka's one string property with `_` and no `.`, `log_level`, stays as it is).
    pub fn into_config(self) -> ClientConfig {
        let kind = match self.kind {
            ClientKind::Producer => &self.cfg.producer,
            ClientKind::Consumer => &self.cfg.consumer,
            ClientKind::Admin => &self.cfg.admin,
        };
        let mut config = self.config;
        for (key, value) in self.cfg.properties.iter().chain(&kind.properties) {
            config.set(property_name(key), value.to_string());
        }
        config
    }

    pub fn create<T: FromClientConfig>(self) -> KafkaResult<T> {
        self.into_config().create()
    }

    /// A client whose statistics become metrics (`crate::stats`), every
    /// `kafka.statistics_interval_ms`.
    pub fn create_with_stats<T>(self, stats: crate::Stats) -> KafkaResult<T>
    where
        T: FromClientConfigAndContext<crate::Stats>,
    {
        self.with_statistics().create_with_context(stats)
    }

    /// Asks librdkafka for statistics every `kafka.statistics_interval_ms` (none with 0); the
    /// client's context must handle them (librdkafka's default context logs them).
    pub fn with_statistics(self) -> Self {
        match self.cfg.statistics_interval_ms {
            0 => self,
            ms => self.set("statistics.interval.ms", ms.to_string()),
        }
    }

    pub fn create_with_context<C, T>(self, context: C) -> KafkaResult<T>
    where
        C: rdkafka::ClientContext,
        T: FromClientConfigAndContext<C>,
    {
        self.into_config().create_with_context(context)
    }
}

/// The librdkafka property a configured key names (see [`ClientBuilder::into_config`]).
fn property_name(key: &str) -> String {
    if key.contains('.') || key == "log_level" {
        key.to_owned()
    } else {
        key.replace('_', ".")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PropertyValue, SaslMechanism, Secret, SecurityProtocol};

    #[test]
    fn operator_properties_override_defaults_and_kinds_override_common() {
        let mut cfg = KafkaConfig {
            bootstrap_servers: "b:9093".into(),
            security_protocol: SecurityProtocol::SaslSsl,
            ssl_ca_location: "ca.pem".into(),
            sasl_mechanism: SaslMechanism::ScramSha256,
            sasl_username: "alice".into(),
            sasl_password: Secret("pw".into()),
            ..KafkaConfig::default()
        };
        cfg.properties
            .insert("linger.ms".into(), PropertyValue::Integer(50));
        cfg.properties
            .insert("client.id".into(), PropertyValue::Text("common".into()));
        cfg.producer
            .properties
            .insert("client.id".into(), PropertyValue::Text("producer".into()));
        cfg.consumer
            .properties
            .insert("enable.auto.commit".into(), PropertyValue::Bool(false));

        let p = cfg.producer().set("linger.ms", "5").into_config();
        assert_eq!(p.get("bootstrap.servers"), Some("b:9093"));
        assert_eq!(p.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(p.get("ssl.ca.location"), Some("ca.pem"));
        assert_eq!(p.get("ssl.certificate.location"), None);
        assert_eq!(p.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert_eq!(p.get("sasl.username"), Some("alice"));
        assert_eq!(p.get("sasl.password"), Some("pw"));
        assert_eq!(p.get("linger.ms"), Some("50"));
        assert_eq!(p.get("client.id"), Some("producer"));
        assert_eq!(p.get("enable.auto.commit"), None);

        let c = cfg.consumer().into_config();
        assert_eq!(c.get("client.id"), Some("common"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));

        assert_eq!(
            property_name("socket_keepalive_enable"),
            "socket.keepalive.enable"
        );
        assert_eq!(
            property_name("ssl.endpoint.identification.algorithm"),
            "ssl.endpoint.identification.algorithm"
        );
        assert_eq!(property_name("log_level"), "log_level");

        let plain = KafkaConfig::default().admin().into_config();
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.username"), None);
        assert_eq!(plain.get("ssl.ca.location"), None);
    }
}
