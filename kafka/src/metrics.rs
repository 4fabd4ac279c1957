//! The Kafka layer's metrics (Prometheus, `ferrule_kafka_` prefixed), registered in the
//! process-wide registry the health port serves.

use prometheus::IntCounterVec;
use std::sync::LazyLock;

fn registered(m: IntCounterVec) -> IntCounterVec {
    // A second registration (tests starting two components in one process) keeps the first.
    let _ = prometheus::register(Box::new(m.clone()));
    m
}

static PRODUCER_REPLACED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            prometheus::opts!(
                "ferrule_kafka_producer_replaced_total",
                "Producers replaced after librdkafka declared them fatally failed, by client"
            ),
            &["client"],
        )
        .expect("valid metric"),
    )
});

static TOPIC_MISSING: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            prometheus::opts!(
                "ferrule_kafka_topic_missing_total",
                "Times a topic was needed but does not exist (or is not visible to Ferrule) \
                 while kafka.create_topics is false: records refused, internal topics waited \
                 for; by topic"
            ),
            &["topic"],
        )
        .expect("valid metric"),
    )
});

static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(
        IntCounterVec::new(
            prometheus::opts!(
                "ferrule_kafka_errors_total",
                "Kafka errors seen by Ferrule's clients, by client and class (retriable, fatal)"
            ),
            &["client", "class"],
        )
        .expect("valid metric"),
    )
});

/// A producer's series start at 0 when it is created, so a dashboard shows "none" rather than
/// nothing.
pub(crate) fn producer_created(client: &str) {
    PRODUCER_REPLACED.with_label_values(&[client]);
    for class in [crate::ErrorClass::Retriable, crate::ErrorClass::Fatal] {
        ERRORS.with_label_values(&[client, class.as_str()]);
    }
}

pub(crate) fn producer_replaced(client: &str) {
    PRODUCER_REPLACED.with_label_values(&[client]).inc();
}

pub(crate) fn topic_missing(topic: &str) {
    TOPIC_MISSING.with_label_values(&[topic]).inc();
}

/// Counts an error of `client` by its class, which it returns.
pub fn error(client: &str, e: &rdkafka::error::KafkaError) -> crate::ErrorClass {
    let class = crate::classify(e);
    ERRORS.with_label_values(&[client, class.as_str()]).inc();
    class
}

/// Registers every metric, so each is exported from the start.
pub fn init() {
    LazyLock::force(&PRODUCER_REPLACED);
    LazyLock::force(&TOPIC_MISSING);
    LazyLock::force(&ERRORS);
}
