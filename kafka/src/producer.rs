//! A producer that outlives librdkafka's fatal errors. An idempotent producer whose sequence
//! the broker lost (a broker restarted without its state, say) is declared fatally failed and
//! from then on refuses every record; until the process restarts, nothing more would be
//! written. [`RecoveringProducer`] builds a new one from the same configuration and hands the
//! refused record to it, once. Records the failed producer still held are failed to their
//! senders, never re-sent behind their back.

use crate::Stats;
use crate::client::ClientBuilder;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{OwnedMessage, ToBytes};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

struct Inner {
    /// The component the producer belongs to (`gateway`, `command-router`, `bridge`): the
    /// `client` label of its metrics.
    name: &'static str,
    config: ClientConfig,
    current: RwLock<Arc<FutureProducer<Stats>>>,
}

/// A `FutureProducer` that is replaced when it failed fatally. Cheap to clone.
#[derive(Clone)]
pub struct RecoveringProducer {
    inner: Arc<Inner>,
}

/// Every producer alive in this process, by component: lets a test put one into a state no
/// broker produces on demand, and diagnostics list them.
static LIVE: Mutex<Vec<(&'static str, Weak<Inner>)>> = Mutex::new(Vec::new());

/// The recovering producers alive in this process, with their component names.
pub fn producers() -> Vec<(&'static str, RecoveringProducer)> {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|(_, w)| w.strong_count() > 0);
    live.iter()
        .filter_map(|(name, w)| {
            Some((
                *name,
                RecoveringProducer {
                    inner: w.upgrade()?,
                },
            ))
        })
        .collect()
}

impl RecoveringProducer {
    /// Builds the first producer from `builder`; later ones come from the same settings.
    pub fn new(name: &'static str, builder: ClientBuilder<'_>) -> KafkaResult<Self> {
        let config = builder.with_statistics().into_config();
        let first: FutureProducer<Stats> = config.create_with_context(Stats::producer(name))?;
        crate::metrics::producer_created(name);
        let inner = Arc::new(Inner {
            name,
            config,
            current: RwLock::new(Arc::new(first)),
        });
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, Arc::downgrade(&inner)));
        Ok(RecoveringProducer { inner })
    }

    /// The producer in use now.
    pub fn current(&self) -> Arc<FutureProducer<Stats>> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current producer's librdkafka handle: lets a test inject a fatal error.
    /// Dereferencing it is the caller's risk.
    #[doc(hidden)]
    pub fn native_ptr(&self) -> *mut rdkafka::types::RDKafka {
        self.current().client().native_ptr()
    }

    /// Builds a new producer if the current one failed fatally; `true` when it did (or when
    /// another caller already did since `failed` was taken).
    fn replace_if_fatal(&self, failed: &Arc<FutureProducer<Stats>>) -> bool {
        let old = {
            let mut current = self
                .inner
                .current
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if !Arc::ptr_eq(&current, failed) {
                return true;
            }
            let Some((code, reason)) = current.client().fatal_error() else {
                return false;
            };
            let fresh: FutureProducer<Stats> = match self
                .inner
                .config
                .create_with_context(Stats::producer(self.inner.name))
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(client = self.inner.name, error = %e, "cannot build a new Kafka producer");
                    return false;
                }
            };
            tracing::warn!(client = self.inner.name, ?code, %reason, "the Kafka producer failed fatally; a new one takes over");
            crate::metrics::producer_replaced(self.inner.name);
            std::mem::replace(&mut *current, Arc::new(fresh))
        };
        // Dropped outside the lock and off the caller's (perhaps async) thread: it flushes
        // and waits for its threads.
        std::thread::spawn(move || drop(old));
        true
    }

    /// Hands `record` to the producer without waiting. A full queue is returned at once as
    /// back-pressure; a record refused because the producer failed fatally goes to a new one.
    #[allow(clippy::result_large_err)]
    pub fn send_result<'a, K, P>(
        &self,
        mut record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let mut retried = false;
        loop {
            let producer = self.current();
            record = match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::Fatal), r))
                    if !retried && self.replace_if_fatal(&producer) =>
                {
                    r
                }
                Err((e, r)) => {
                    crate::metrics::error(self.inner.name, &e);
                    return Err((e, r));
                }
            };
            retried = true;
        }
    }

    /// Sends `record` and waits for the broker's answer; a full queue is waited on for up to
    /// `queue_timeout`. A record the failed producer refused, or failed while it held it
    /// because it failed fatally, is sent once more on a new producer.
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> Result<(i32, i64), (KafkaError, OwnedMessage)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let producer = self.current();
        match producer.send(record, Timeout::After(queue_timeout)).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::Fatal), msg))
                if self.replace_if_fatal(&producer) =>
            {
                self.resend(msg, queue_timeout).await
            }
            Err((e, msg)) => {
                crate::metrics::error(self.inner.name, &e);
                Err((e, msg))
            }
        }
    }

    async fn resend(
        &self,
        msg: OwnedMessage,
        queue_timeout: Duration,
    ) -> Result<(i32, i64), (KafkaError, OwnedMessage)> {
        use rdkafka::message::Message;
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(msg.topic());
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        if let Some(h) = msg.headers() {
            record = record.headers(h.clone());
        }
        match self
            .current()
            .send(record, Timeout::After(queue_timeout))
            .await
        {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => {
                crate::metrics::error(self.inner.name, &e);
                Err((e, msg))
            }
        }
    }

    /// Waits until queued records were delivered or `timeout` passed (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.current().flush(timeout) {
            tracing::warn!(client = self.inner.name, error = %e, "records still unsent at shutdown");
        }
    }
}
