//! librdkafka's statistics (emitted every `kafka.statistics_interval_ms`) as Prometheus
//! gauges: each client's queue, each broker's round-trip time and error counts, and each
//! consumer group's lag per partition. A client gets them by being created with a [`Stats`]
//! context ([`crate::ClientBuilder::create_with_stats`]); its series go when it is dropped.

use prometheus::{IntGaugeVec, Opts};
use rdkafka::statistics::Statistics;
use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric definition: {e}"));
    // A second registration (several components in one test process) keeps the first.
    let _ = prometheus::register(Box::new(m.clone()));
    m
}

static QUEUE_MESSAGES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_kafka_client_queue_messages",
        "Messages in a client's queues: waiting to be sent (producers) or fetched and not yet \
         read (consumers)",
        &["client", "group", "handle"],
    )
});

static QUEUE_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_kafka_client_queue_bytes",
        "Bytes of the messages in a client's queues",
        &["client", "group", "handle"],
    )
});

static RTT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_kafka_broker_rtt_microseconds",
        "Round-trip time of a client's requests to a broker over the last statistics \
         interval, by quantile (0.5, 0.99)",
        &["client", "group", "handle", "broker", "quantile"],
    )
});

static BROKER_ERRORS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_kafka_broker_errors",
        "Errors of a client's requests to a broker since the client started, by kind \
         (tx: send errors, rx: receive errors, timeout: requests timed out)",
        &["client", "group", "handle", "broker", "kind"],
    )
});

static LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_kafka_consumer_lag",
        "Records of a partition past a consumer group's committed offset (the partition's \
         end minus that offset), for the partitions this process consumes",
        &["group", "topic", "partition"],
    )
});

/// The client context that turns a client's statistics into the gauges above.
#[derive(Debug)]
pub struct Stats {
    client: &'static str,
    /// The consumer group; empty for producers.
    group: String,
    /// The series this client set, removed with it, and librdkafka's name of the client
    /// (`rdkafka#consumer-3`): clients of one kind and group (two bridge links of a tenant)
    /// each have series of their own.
    series: Mutex<(String, HashSet<Series>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Series {
    Broker(String),
    Partition(String, String),
}

impl Stats {
    pub fn producer(client: &'static str) -> Self {
        Stats::consumer(client, "")
    }

    pub fn consumer(client: &'static str, group: impl Into<String>) -> Self {
        Stats {
            client,
            group: group.into(),
            series: Mutex::default(),
        }
    }

    /// Sets the gauges from one statistics report.
    pub fn record(&self, s: &Statistics) {
        let mut guard = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let (handle, series) = &mut *guard;
        if handle.is_empty() {
            handle.clone_from(&s.name);
        }
        let labels = [self.client, self.group.as_str(), handle.as_str()];
        // A producer's queue is its messages not yet acknowledged (librdkafka counts those
        // for producers only); a consumer's, what it fetched and was not read yet.
        let (messages, bytes) = if self.group.is_empty() {
            (i64::try_from(s.msg_cnt), i64::try_from(s.msg_size))
        } else {
            let fetched = s
                .topics
                .values()
                .flat_map(|t| t.partitions.values())
                .filter(|p| p.partition >= 0);
            let (n, b) = fetched.fold((0i64, 0u64), |(n, b), p| {
                (n + p.fetchq_cnt.max(0), b + p.fetchq_size)
            });
            (Ok(n), i64::try_from(b))
        };
        QUEUE_MESSAGES
            .with_label_values(&labels)
            .set(messages.unwrap_or(i64::MAX));
        QUEUE_BYTES
            .with_label_values(&labels)
            .set(bytes.unwrap_or(i64::MAX));
        for broker in s.brokers.values().filter(|b| b.nodeid >= 0) {
            let b = broker.nodename.as_str();
            if let Some(rtt) = &broker.rtt {
                for (q, v) in [("0.5", rtt.p50), ("0.99", rtt.p99)] {
                    RTT.with_label_values(&[self.client, &self.group, handle, b, q])
                        .set(v);
                }
            }
            for (kind, v) in [
                ("tx", broker.txerrs),
                ("rx", broker.rxerrs),
                ("timeout", broker.req_timeouts),
            ] {
                BROKER_ERRORS
                    .with_label_values(&[self.client, &self.group, handle, b, kind])
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
            series.insert(Series::Broker(b.to_owned()));
        }
        if self.group.is_empty() {
            return;
        }
        for topic in s.topics.values() {
            for p in topic.partitions.values() {
                // -1 is librdkafka's "not consumed here" (and its internal partition).
                if p.partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                let partition = p.partition.to_string();
                LAG.with_label_values(&[&self.group, &topic.topic, &partition])
                    .set(p.consumer_lag);
                series.insert(Series::Partition(topic.topic.clone(), partition));
            }
        }
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        let (handle, series) =
            std::mem::take(&mut *self.series.lock().unwrap_or_else(|p| p.into_inner()));
        let labels = [self.client, self.group.as_str(), handle.as_str()];
        let _ = QUEUE_MESSAGES.remove_label_values(&labels);
        let _ = QUEUE_BYTES.remove_label_values(&labels);
        for s in series {
            match s {
                Series::Broker(b) => {
                    for q in ["0.5", "0.99"] {
                        let _ =
                            RTT.remove_label_values(&[self.client, &self.group, &handle, &b, q]);
                    }
                    for kind in ["tx", "rx", "timeout"] {
                        let _ = BROKER_ERRORS.remove_label_values(&[
                            self.client,
                            &self.group,
                            &handle,
                            &b,
                            kind,
                        ]);
                    }
                }
                Series::Partition(topic, partition) => {
                    let _ = LAG.remove_label_values(&[&self.group, &topic, &partition]);
                }
            }
        }
    }
}

impl rdkafka::ClientContext for Stats {
    fn stats(&self, statistics: Statistics) {
        self.record(&statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for Stats {}
