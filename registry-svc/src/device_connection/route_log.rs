//! The route topic on Kafka: writes a process's subscription changes and keeps its
//! [`Table`] up to date by reading every partition from the start.
//!
//! A change costs one produce (no database round trip) and the writer waits for the broker's
//! acknowledgement only, so a long poll's registration is as cheap as its telemetry. A reader
//! that must see every change written before some moment — a router about to route a command
//! whose application reacted to a `ttd` notification — asks the broker for the partition's
//! end offset and waits until its table has applied up to it ([`RouteLog::caught_up`]); the
//! notification was written only after the registration was acknowledged, so the registration
//! lies before that end offset.

use super::RoutingError;
use super::routes::{self, Table};
use ferrule_kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Partitions of the route topic when Ferrule creates it. Every process reads every partition,
/// so more would not spread the reading; one takes the writes of a large fleet and costs the
/// broker the least per fetch (an operator may create the topic with more).
pub const PARTITIONS: i32 = 1;
/// End-offset requests are sent at most this often; a look-up waits for the next one.
const ROUND_SPACING: Duration = Duration::from_millis(5);
/// How long a produce or an end-offset request may take before the change fails.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// Handle on the route topic; cheap to clone. One per process and topic ([`RouteLog::shared`]).
#[derive(Clone)]
pub struct RouteLog {
    inner: Arc<Inner>,
}

struct Inner {
    topic: String,
    partitions: i32,
    producer: FutureProducer,
    table: RwLock<Table>,
    /// Per partition, the offset after the last record applied.
    applied: Vec<AtomicI64>,
    /// Bumped whenever `applied` moves.
    progress: watch::Sender<u64>,
    /// Requests for a partition's end offset, served by one thread.
    end_offsets: std::sync::mpsc::Sender<(i32, oneshot::Sender<Result<i64, KafkaError>>)>,
    /// Records that could not be read (counted, skipped).
    unreadable: AtomicI64,
    /// For the latest releases, whether each ended its device's newest subscription, by
    /// (partition, offset); the queue holds the keys in the order they came.
    answers: Mutex<Answers>,
}

/// Whether each release ended its device's newest subscription, by (partition, offset), and
/// the keys in the order they came.
type Answers = (
    HashMap<(i32, i64), bool>,
    std::collections::VecDeque<(i32, i64)>,
);

/// Release answers kept (a waiter reads its own within moments).
const ANSWERS: usize = 65_536;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The process's route logs by (bootstrap servers, topic); the lock is held while one starts,
/// so one process never reads the topic twice.
type Shared = tokio::sync::Mutex<HashMap<(String, String), RouteLog>>;
static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();

fn route_topic(kafka: &KafkaConfig) -> Result<String, RoutingError> {
    Ok(kafka
        .topic_names()
        .map_err(|e| RoutingError::Routes(e.to_string()))?
        .device_routes())
}

impl RouteLog {
    /// The process's log of the route topic of `kafka`'s cluster, started on first use: the
    /// gateway and the router of `ferrule all` share one table.
    pub async fn shared(kafka: &KafkaConfig) -> Result<RouteLog, RoutingError> {
        let topic = route_topic(kafka)?;
        let mut logs = SHARED.get_or_init(Default::default).lock().await;
        let key = (kafka.bootstrap_servers.clone(), topic.clone());
        if let Some(log) = logs.get(&key) {
            return Ok(log.clone());
        }
        let log = RouteLog::start(kafka, topic).await?;
        logs.insert(key, log.clone());
        Ok(log)
    }

    /// A reader of its own (not shared with the rest of the process), read to the end.
    pub async fn open(kafka: &KafkaConfig) -> Result<RouteLog, RoutingError> {
        RouteLog::start(kafka, route_topic(kafka)?).await
    }

    /// Creates (or checks) the topic, reads it to its end, and keeps reading.
    async fn start(kafka: &KafkaConfig, topic: String) -> Result<RouteLog, RoutingError> {
        let routes = |e: &dyn std::fmt::Display| RoutingError::Routes(format!("{topic}: {e}"));
        let admin = ferrule_kafka::TopicAdmin::new(kafka).map_err(|e| routes(&e))?;
        let spec = ferrule_kafka::TopicSpec {
            partitions: PARTITIONS,
            ..admin.default_spec()
        };
        admin
            .ensure_with(&topic, spec, &[("cleanup.policy", "compact")])
            .await
            .map_err(|e| routes(&e))?;
        // In order, not idempotent (`KafkaConfig::ordered_producer`). A record retried after a
        // lost answer may be written twice, the second copy after the rest of its request among
        // this process's records: a registration written again is the same subscription (if
        // another instance registered the device in between, this instance's own next change
        // of the device ends it), and a release written again changes nothing
        // (docs/command-router.md, "The routing state", says what its answer may miss).
        let producer: FutureProducer = kafka.ordered_producer().create().map_err(|e| routes(&e))?;
        // Clients that join no group: they read by assignment and commit nothing.
        let unjoined = || {
            kafka
                .consumer()
                .set(
                    "group.id",
                    format!("ferrule-routes-{}", uuid::Uuid::new_v4().simple()),
                )
                .set("enable.auto.commit", "false")
        };
        let consumer: BaseConsumer = unjoined()
            .set(
                "fetch.wait.max.ms",
                kafka.consumer_fetch_wait_ms.to_string(),
            )
            .create()
            .map_err(|e| routes(&e))?;
        let partitions = {
            let (producer, topic) = (producer.clone(), topic.clone());
            tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), KAFKA_TIMEOUT)
                    .map(|meta| {
                        meta.topics()
                            .first()
                            .map_or(0, |t| t.partitions().len() as i32)
                    })
            })
            .await
            .map_err(|e| routes(&e))?
            .map_err(|e| routes(&e))?
        };
        if partitions == 0 {
            return Err(routes(&"the topic has no partitions"));
        }
        // A client of its own for end offsets: on the reader's connection a ListOffsets request
        // would wait behind the fetch the broker holds open (a connection answers in order).
        let offsets: BaseConsumer = unjoined().create().map_err(|e| routes(&e))?;
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(&topic, p, Offset::Beginning)
                .map_err(|e| routes(&e))?;
        }
        consumer.assign(&assignment).map_err(|e| routes(&e))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = Arc::new(Inner {
            topic: topic.clone(),
            partitions,
            producer: producer.clone(),
            table: RwLock::new(Table::default()),
            applied: (0..partitions).map(|_| AtomicI64::new(0)).collect(),
            progress: watch::channel(0).0,
            end_offsets: tx,
            unreadable: AtomicI64::new(0),
            answers: Mutex::default(),
        });
        std::thread::Builder::new()
            .name("route-offsets".into())
            .spawn({
                let topic = topic.clone();
                move || serve_end_offsets(offsets, topic, rx)
            })
            .map_err(|e| routes(&e))?;
        std::thread::Builder::new()
            .name("route-reader".into())
            .spawn({
                let inner = Arc::downgrade(&inner);
                move || read(consumer, inner)
            })
            .map_err(|e| routes(&e))?;
        let log = RouteLog { inner };
        log.caught_up_all().await?;
        Ok(log)
    }

    /// The partition of `device`'s records.
    pub fn partition_of(&self, tenant: &str, device: &str) -> i32 {
        routes::partition_of(tenant, device, self.inner.partitions)
    }

    /// Reads the table.
    pub fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.inner.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.inner.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the table could not read.
    pub fn unreadable(&self) -> i64 {
        self.inner.unreadable.load(Ordering::Relaxed)
    }

    /// Waits until the table holds every record `partition` had when this was called.
    pub async fn caught_up(&self, partition: i32) -> Result<(), RoutingError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .end_offsets
            .send((partition, tx))
            .map_err(|_| RoutingError::WriterGone)?;
        let end = rx
            .await
            .map_err(|_| RoutingError::WriterGone)?
            .map_err(|e| RoutingError::Routes(format!("end offset: {e}")))?;
        self.applied_up_to(partition, end).await
    }

    /// [`Self::caught_up`] for every partition.
    pub async fn caught_up_all(&self) -> Result<(), RoutingError> {
        for p in 0..self.inner.partitions {
            self.caught_up(p).await?;
        }
        Ok(())
    }

    /// Waits until the table applied the records of `partition` before `offset`.
    async fn applied_up_to(&self, partition: i32, offset: i64) -> Result<(), RoutingError> {
        let Some(applied) = self.inner.applied.get(partition as usize) else {
            return Err(RoutingError::Routes(format!("no partition {partition}")));
        };
        let mut progress = self.inner.progress.subscribe();
        // However long a replay takes, as long as the reader moves on.
        while applied.load(Ordering::Acquire) < offset {
            match tokio::time::timeout(KAFKA_TIMEOUT, progress.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RoutingError::WriterGone),
                Err(_) => {
                    return Err(RoutingError::Routes(
                        "the route topic reader made no progress".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Hands a record for `partition` to the producer now (`value` `None` is a tombstone) and
    /// returns its acknowledgement, the record's offset. Records handed over in turn are
    /// written in turn: a release queued before a new subscription never lands after it.
    fn enqueue(
        &self,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> impl Future<Output = Result<i64, RoutingError>> + Send + use<> {
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.inner.topic)
            .partition(partition)
            .key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        let queued = self
            .inner
            .producer
            .send_result(record)
            .map_err(|(e, _)| RoutingError::Routes(format!("writing a route: {e}")));
        async move {
            match queued?.await {
                Ok(Ok(d)) => Ok(d.offset),
                Ok(Err((e, _))) => Err(RoutingError::Routes(format!("writing a route: {e}"))),
                Err(_) => Err(RoutingError::WriterGone),
            }
        }
    }

    /// `instance` holds `device`'s subscription until `expires_ms` (or until released):
    /// queued now, acknowledged when the returned future is done.
    pub fn subscribe(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
        expires_ms: Option<i64>,
    ) -> impl Future<Output = Result<(), RoutingError>> + Send + use<> {
        let p = self.partition_of(tenant, device);
        let acked = self.enqueue(
            p,
            &routes::subscription_key(tenant, device, instance),
            Some(&routes::subscription_value(expires_ms)),
        );
        async move { acked.await.map(drop) }
    }

    /// Releases `instance`'s subscription of `device` (queued now); the returned future says
    /// whether it was the device's newest live one when the release was applied — no other
    /// instance had replaced it.
    pub fn release(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
    ) -> impl Future<Output = Result<bool, RoutingError>> + Send + use<> {
        let p = self.partition_of(tenant, device);
        let acked = self.enqueue(p, &routes::subscription_key(tenant, device, instance), None);
        let log = self.clone();
        async move {
            let offset = acked.await?;
            log.applied_up_to(p, offset + 1).await?;
            Ok(log.answer(p, offset).unwrap_or(true))
        }
    }

    /// Releases `instance`'s subscription of `device` (queued now) without asking whether it
    /// was still the newest (a long poll's end: nothing is announced either way).
    pub fn release_now(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
    ) -> impl Future<Output = Result<(), RoutingError>> + Send + use<> {
        let p = self.partition_of(tenant, device);
        let acked = self.enqueue(p, &routes::subscription_key(tenant, device, instance), None);
        async move { acked.await.map(drop) }
    }

    /// Whether the release at `offset` of `partition` ended the newest subscription, as the
    /// reader found when it applied it (kept for the latest releases only).
    fn answer(&self, partition: i32, offset: i64) -> Option<bool> {
        let answers = self.inner.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers.0.get(&(partition, offset)).copied()
    }

    /// Forgets every subscription `instance` holds (it started again under the same id);
    /// how many there were.
    pub async fn forget(&self, instance: &str) -> Result<u64, RoutingError> {
        self.caught_up_all().await?;
        let held = self.table().held_by(instance).len() as u64;
        if held == 0 {
            return Ok(0);
        }
        let key = routes::forget_key(instance);
        for p in 0..self.inner.partitions {
            let offset = self.enqueue(p, &key, Some(b"{}")).await?;
            self.applied_up_to(p, offset + 1).await?;
        }
        Ok(held)
    }

    /// Releases every subscription of an instance that is gone for good (a router forgot
    /// it), so compaction can drop its records; how many there were.
    pub async fn release_all(&self, instance: &str) -> Result<u64, RoutingError> {
        self.caught_up_all().await?;
        let held = self.table().held_by(instance);
        for (tenant, device) in &held {
            let p = self.partition_of(tenant, device);
            self.enqueue(p, &routes::subscription_key(tenant, device, instance), None)
                .await?;
        }
        // The instance's forget records stay: without them a replay would bring back what
        // they dropped.
        Ok(held.len() as u64)
    }

    /// Every live subscription of `tenant` as (device, instance), newest last per device, with
    /// every change written before this call.
    pub async fn subscriptions_of(
        &self,
        tenant: &str,
    ) -> Result<Vec<(String, String)>, RoutingError> {
        self.caught_up_all().await?;
        Ok(self.table().of_tenant(tenant, now_ms()))
    }

    /// Drops expired entries and those of instances `alive` rejects from the table.
    pub fn purge(&self, alive: &mut impl FnMut(&str) -> bool) -> usize {
        self.table_mut().purge(now_ms(), alive)
    }
}

/// Answers end-offset requests: one ListOffsets request (latest) for every partition asked
/// about since the previous one was sent, at most one every [`ROUND_SPACING`] (each costs the
/// broker more than a produce).
fn serve_end_offsets(
    client: BaseConsumer,
    topic: String,
    requests: std::sync::mpsc::Receiver<(i32, oneshot::Sender<Result<i64, KafkaError>>)>,
) {
    let mut last = std::time::Instant::now() - ROUND_SPACING;
    while let Ok(first) = requests.recv() {
        // Rounds at most every ROUND_SPACING: under load one request answers many look-ups.
        std::thread::sleep(ROUND_SPACING.saturating_sub(last.elapsed()));
        last = std::time::Instant::now();
        let mut waiting: HashMap<i32, Vec<oneshot::Sender<_>>> = HashMap::new();
        for (p, tx) in std::iter::once(first).chain(requests.try_iter()) {
            waiting.entry(p).or_default().push(tx);
        }
        let mut latest = TopicPartitionList::new();
        for p in waiting.keys() {
            let _ = latest.add_partition_offset(&topic, *p, Offset::End);
        }
        let ends = client.offsets_for_times(latest, KAFKA_TIMEOUT);
        for (p, txs) in waiting {
            let end = match &ends {
                Ok(list) => match list
                    .find_partition(&topic, p)
                    .map(|e| (e.offset(), e.error()))
                {
                    Some((Offset::Offset(o), Ok(()))) => Ok(o),
                    Some((_, Err(e))) => Err(e),
                    _ => Err(KafkaError::OffsetFetch(
                        rdkafka::types::RDKafkaErrorCode::UnknownPartition,
                    )),
                },
                Err(e) => Err(e.clone()),
            };
            for tx in txs {
                let _ = tx.send(end.clone());
            }
        }
    }
}

/// Applies every record of the topic to the table, as long as the log lives. A thread of its
/// own, so the table does not depend on the runtime that happened to start it.
fn read(consumer: BaseConsumer, log: std::sync::Weak<Inner>) {
    loop {
        let msg = consumer.poll(Duration::from_millis(200));
        let Some(inner) = log.upgrade() else { return };
        match msg {
            None => {}
            Some(Ok(m)) => {
                let p = m.partition();
                match m.key().map(|k| routes::decode(k, m.payload())) {
                    Some(Ok(record)) => {
                        let at = m.timestamp().to_millis().unwrap_or_else(now_ms);
                        let mut table = inner.table.write().unwrap_or_else(|p| p.into_inner());
                        if let routes::Record::Released {
                            tenant,
                            device,
                            instance,
                        } = &record
                        {
                            let held = table.holds(tenant, device, instance, now_ms());
                            let mut answers =
                                inner.answers.lock().unwrap_or_else(|p| p.into_inner());
                            let key = (p, m.offset());
                            if answers.0.insert(key, held).is_none() {
                                answers.1.push_back(key);
                            }
                            while answers.1.len() > ANSWERS {
                                if let Some(old) = answers.1.pop_front() {
                                    answers.0.remove(&old);
                                }
                            }
                        }
                        table.apply(p, m.offset(), at, record);
                    }
                    _ => {
                        inner.unreadable.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            partition = p,
                            offset = m.offset(),
                            "unreadable route record"
                        );
                    }
                }
                if let Some(a) = inner.applied.get(p as usize) {
                    a.fetch_max(m.offset() + 1, Ordering::AcqRel);
                }
                inner.progress.send_modify(|n| *n += 1);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading the route topic");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
