//! Topic administration. With `kafka.create_topics = true` (the default) a topic is created
//! the first time it is needed, through the admin API; an existing one is fine. With `false`
//! Ferrule creates nothing: a topic is checked for with a metadata request instead, and a
//! missing one is refused with [`TopicError::Missing`], logged and counted, so the operator
//! learns which topic to create.

use crate::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Partitions and replication factor of a topic Ferrule creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    pub partitions: i32,
    pub replication: i32,
}

/// A tenant's `ext` keys that override `kafka.topic_partitions` / `kafka.topic_replication`
/// for that tenant's topics.
pub const EXT_PARTITIONS: &str = "kafka-topic-partitions";
pub const EXT_REPLICATION: &str = "kafka-topic-replication";

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The topic does not exist and Ferrule may not create it.
    #[error("topic {0} does not exist and kafka.create_topics is false")]
    Missing(String),
    #[error("the cluster did not answer in time")]
    Timeout,
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// The per-topic results of an admin request: fine when each succeeded or failed with `fine`
/// (the topic was there already, or was gone already).
fn accept(
    results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
    fine: RDKafkaErrorCode,
) -> Result<(), TopicError> {
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, code)) if code == fine => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code).into()),
        }
    }
    Ok(())
}

/// How long a topic found missing is not asked for again: a flood of uploads to it costs one
/// metadata request per topic and period.
const MISSING_RECHECK: Duration = Duration::from_secs(2);

/// Creates or checks topics, remembering the ones that exist. Cheap to clone.
#[derive(Clone)]
pub struct TopicAdmin {
    inner: Arc<Inner>,
}

struct Inner {
    admin: AdminClient<DefaultClientContext>,
    create: bool,
    timeout: Duration,
    default: TopicSpec,
    known: Mutex<HashSet<String>>,
    missing: Mutex<HashMap<String, Instant>>,
}

impl TopicAdmin {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let admin = cfg
            .admin()
            // A metadata request names the topic; it must never create it.
            .set("allow.auto.create.topics", "false")
            .create()?;
        Ok(TopicAdmin {
            inner: Arc::new(Inner {
                admin,
                create: cfg.create_topics,
                timeout: Duration::from_millis(cfg.metadata_timeout_ms),
                default: TopicSpec {
                    partitions: cfg.topic_partitions,
                    replication: cfg.topic_replication,
                },
                known: Mutex::new(HashSet::new()),
                missing: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Whether this admin creates topics (`kafka.create_topics`).
    pub fn creates_topics(&self) -> bool {
        self.inner.create
    }

    /// The spec of topics without a tenant override.
    pub fn default_spec(&self) -> TopicSpec {
        self.inner.default
    }

    /// The spec of a tenant's topics: its `ext` may override partitions and replication.
    pub fn tenant_spec(
        &self,
        ext: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> TopicSpec {
        let get = |key| {
            ext.and_then(|e| e.get(key))
                .and_then(serde_json::Value::as_i64)
                .and_then(|n| i32::try_from(n).ok())
                .filter(|n| *n > 0)
        };
        TopicSpec {
            partitions: get(EXT_PARTITIONS).unwrap_or(self.inner.default.partitions),
            replication: get(EXT_REPLICATION).unwrap_or(self.inner.default.replication),
        }
    }

    /// Whether `topic` is known to exist, so writing needs no admin request first.
    pub fn is_known(&self, topic: &str) -> bool {
        lock(&self.inner.known).contains(topic)
    }

    /// Forgets that `topic` exists: the next [`Self::ensure`] asks the cluster again (someone
    /// else deleted it).
    pub fn forget(&self, topic: &str) {
        lock(&self.inner.known).remove(topic);
    }

    /// Makes sure `topic` exists: creates it with `spec` (an existing topic is fine), or,
    /// with `create_topics = false`, checks that it is there.
    pub async fn ensure(&self, topic: &str, spec: TopicSpec) -> Result<(), TopicError> {
        self.ensure_with(topic, spec, &[]).await
    }

    /// [`Self::ensure`], creating the topic with these topic configs (`retention.ms`, …).
    pub async fn ensure_with(
        &self,
        topic: &str,
        spec: TopicSpec,
        configs: &[(&str, &str)],
    ) -> Result<(), TopicError> {
        if self.is_known(topic) {
            return Ok(());
        }
        if self.inner.create {
            self.create(topic, spec, configs).await?;
        } else {
            self.check(topic).await?;
        }
        lock(&self.inner.known).insert(topic.to_owned());
        Ok(())
    }

    /// Deletes `topic` (a missing one is fine); only with `create_topics = true`, for topics
    /// Ferrule itself created (an instance's internal command topic at shutdown).
    pub async fn delete(&self, topic: &str) -> Result<(), TopicError> {
        lock(&self.inner.known).remove(topic);
        if !self.inner.create {
            return Ok(());
        }
        let opts = self.admin_options();
        let results = self
            .admin_call(self.inner.admin.delete_topics(&[topic], &opts))
            .await?;
        accept(results, RDKafkaErrorCode::UnknownTopicOrPartition)
    }

    async fn create(
        &self,
        topic: &str,
        spec: TopicSpec,
        configs: &[(&str, &str)],
    ) -> Result<(), TopicError> {
        let mut new = NewTopic::new(
            topic,
            spec.partitions,
            TopicReplication::Fixed(spec.replication),
        );
        for (key, value) in configs {
            new = new.set(key, value);
        }
        let opts = self.admin_options();
        let results = self
            .admin_call(self.inner.admin.create_topics([&new], &opts))
            .await?;
        accept(results, RDKafkaErrorCode::TopicAlreadyExists)
    }

    /// Both of the broker's timeouts for one admin request.
    fn admin_options(&self) -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(self.inner.timeout))
            .request_timeout(Some(self.inner.timeout))
    }

    /// An admin request, given up on after twice the configured timeout.
    async fn admin_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, KafkaError>>,
    ) -> Result<T, TopicError> {
        Ok(tokio::time::timeout(self.inner.timeout * 2, call)
            .await
            .map_err(|_| TopicError::Timeout)??)
    }

    async fn check(&self, topic: &str) -> Result<(), TopicError> {
        let recently_missing = lock(&self.inner.missing)
            .get(topic)
            .is_some_and(|at| at.elapsed() < MISSING_RECHECK);
        if !recently_missing {
            let inner = self.inner.clone();
            let name = topic.to_owned();
            let exists = tokio::task::spawn_blocking(move || {
                let md = inner
                    .admin
                    .inner()
                    .fetch_metadata(Some(&name), inner.timeout)?;
                Ok::<_, KafkaError>(md.topics().iter().any(|t| {
                    t.name() == name
                        && t.error().is_none_or(|e| {
                            e != RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
                        })
                        && !t.partitions().is_empty()
                }))
            })
            .await
            .map_err(|_| TopicError::Timeout)??;
            if exists {
                lock(&self.inner.missing).remove(topic);
                return Ok(());
            }
            tracing::warn!(
                topic,
                "topic does not exist (or this client may not see it) and kafka.create_topics \
                 is false: records for it are refused until it is created"
            );
            lock(&self.inner.missing).insert(topic.to_owned(), Instant::now());
        }
        crate::metrics::topic_missing(topic);
        Err(TopicError::Missing(topic.to_owned()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
