//! The outcomes of the commands this bridge wrote (Hono's AMQP APIs). Each command names this bridge
//! instance's outcome topic and an id; the router or gateway that learns the command's fate
//! writes one record there, and the application's transfer is settled by it. A command whose
//! outcome does not come in time is released: the application may try again.

use ferrule_kafka::{KafkaConfig, TopicAdmin, TopicSpec};
use ferrule_schemas::outcome::{Disposition, OutcomeRoute, parse_outcome};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// What the router or gateway reported: the status and why.
type Reported = (u16, String);

/// Commands of this instance waiting for their outcome; cheap to clone.
#[derive(Clone)]
pub(crate) struct Outcomes {
    inner: Arc<Inner>,
}

struct Inner {
    topic: String,
    /// Starts every id of this run, so outcomes left in a stable (`bridge.instance_id`)
    /// topic by an earlier run never settle this run's commands.
    run: String,
    timeout: Duration,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Reported>>>,
}

impl Outcomes {
    /// Creates this instance's outcome topic and reads it from the beginning (it is new, so
    /// nothing is missed) until `shutdown`; then deletes it. Kafka may be down at start: the
    /// reader keeps trying, and commands meanwhile end as released.
    pub fn start(
        kafka: KafkaConfig,
        topics: TopicAdmin,
        topic: String,
        timeout: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let outcomes = Outcomes {
            inner: Arc::new(Inner {
                topic,
                run: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
                timeout,
                next_id: AtomicU64::new(1),
                waiting: Mutex::new(HashMap::new()),
            }),
        };
        tokio::spawn(outcomes.clone().read(kafka, topics, shutdown));
        outcomes
    }

    /// Registers a command about to be written; its route goes into the command's headers.
    pub fn expect(&self) -> Expected {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(id, tx);
        Expected {
            outcomes: self.clone(),
            id,
            rx,
            route: OutcomeRoute {
                topic: self.inner.topic.clone(),
                id: format!("{}.{id}", self.inner.run),
            },
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Reported>>> {
        self.inner.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn read(
        self,
        kafka: KafkaConfig,
        topics: TopicAdmin,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let topic = self.inner.topic.clone();
        let consumer = loop {
            match outcome_consumer(&kafka, &topics, &topic).await {
                Ok(c) => break c,
                Err(e) => tracing::warn!(error = %e, topic, "outcome topic not ready; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        };
        tracing::debug!(topic, "reading command outcomes");
        loop {
            let record = tokio::select! {
                r = consumer.recv() => r,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    let class = ferrule_kafka::metrics::error("bridge", &e);
                    tracing::debug!(error = %e, topic, class = class.as_str(), "outcome consumer error");
                    continue;
                }
            };
            let headers: Vec<(&str, Option<&[u8]>)> = record
                .headers()
                .map(|hs| hs.iter().map(|h| (h.key, h.value)).collect())
                .unwrap_or_default();
            let Some((id, status)) = parse_outcome(headers.iter().copied()) else {
                continue;
            };
            let waiting = id
                .strip_prefix(self.inner.run.as_str())
                .and_then(|n| n.strip_prefix('.'))
                .and_then(|n| n.parse().ok())
                .and_then(|n| self.waiting().remove(&n));
            if let Some(tx) = waiting {
                let reason = String::from_utf8_lossy(record.payload().unwrap_or_default());
                let _ = tx.send((status, reason.into_owned()));
            }
        }
        // A topic Ferrule created for this run goes with it; one created beforehand stays
        // (`TopicAdmin::delete` deletes nothing with `kafka.create_topics = false`).
        let _ = topics.delete(&topic).await;
    }
}

/// One command's outcome to come; dropping it forgets the command.
pub(crate) struct Expected {
    outcomes: Outcomes,
    id: u64,
    rx: oneshot::Receiver<Reported>,
    pub route: OutcomeRoute,
}

impl Expected {
    /// How to settle the command, and why when it is not accepted.
    pub async fn settled(mut self) -> (Disposition, String) {
        let timeout = self.outcomes.inner.timeout;
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok((status, reason))) => (Disposition::for_status(status), reason),
            Ok(Err(_)) => (Disposition::Released, "the bridge is stopping".into()),
            Err(_) => (
                Disposition::Released,
                format!(
                    "no outcome within {} s: the command may not have reached the device",
                    timeout.as_secs_f64()
                ),
            ),
        }
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.outcomes.waiting().remove(&self.id);
    }
}

/// A consumer of the outcome topic from its current end, without a group. The topic is
/// created first (one partition, an hour's retention: outcomes matter for seconds) unless
/// `kafka.create_topics` is false; then it must exist.
async fn outcome_consumer(
    kafka: &KafkaConfig,
    topics: &TopicAdmin,
    topic: &str,
) -> anyhow::Result<StreamConsumer> {
    let spec = TopicSpec {
        partitions: 1,
        ..topics.default_spec()
    };
    topics
        .ensure_with(topic, spec, &[("retention.ms", "3600000")])
        .await?;
    let consumer: StreamConsumer = kafka
        .consumer()
        .set("group.id", topic)
        .set("enable.auto.commit", "false")
        .set(
            "fetch.wait.max.ms",
            kafka.consumer_fetch_wait_ms.to_string(),
        )
        .create()?;
    // From the end as it is now, before any command of this run names the topic.
    let end = {
        let timeout = Duration::from_millis(kafka.metadata_timeout_ms);
        let probe: rdkafka::consumer::BaseConsumer = kafka.consumer().create()?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || probe.fetch_watermarks(&topic, 0, timeout))
            .await??
            .1
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(end))?;
    consumer.assign(&tpl)?;
    Ok(consumer)
}
