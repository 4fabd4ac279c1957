//! Gateway metrics under Hono's names (Prometheus form: dots become underscores, units are
//! suffixed), registered in the process-wide registry the health port serves.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use std::sync::LazyLock;
use std::time::Instant;

/// Registers a metric in the process-wide registry; the definitions below are constant, so a
/// failure is a programming error. A second registration (tests with several gateways in one
/// process) keeps the first.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    m: Result<M, prometheus::Error>,
) -> M {
    let m = m.unwrap_or_else(|e| panic!("metric definition: {e}"));
    let _ = prometheus::register(Box::new(m.clone()));
    m
}

/// Hono's `component-type` tag of every adapter series.
const COMPONENT_TYPE: &str = "adapter";

static PROCESSING: LazyLock<HistogramVec> =
    LazyLock::new(|| {
        registered(HistogramVec::new(
        HistogramOpts::new(
            "hono_telemetry_processing_duration_seconds",
            "Time from receiving a telemetry message or event until it was forwarded or refused",
        )
        .const_label("component_type", COMPONENT_TYPE)
        .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        &["component_name", "tenant", "type", "status", "qos", "ttd"],
    ))
    });

static PAYLOAD: LazyLock<HistogramVec> = LazyLock::new(|| {
    registered(HistogramVec::new(
        HistogramOpts::new(
            "hono_telemetry_payload_bytes",
            "Payload size of device messages",
        )
        .const_label("component_type", COMPONENT_TYPE)
        .buckets(prometheus::exponential_buckets(16.0, 4.0, 8).unwrap_or_default()),
        &["component_name", "tenant", "type", "status"],
    ))
});

static COMMAND_PROCESSING: LazyLock<HistogramVec> = LazyLock::new(|| {
    registered(HistogramVec::new(
        HistogramOpts::new(
            "hono_command_processing_duration_seconds",
            "Time from a command reaching this gateway until the device had it or it failed \
             (one-way, request), or from a device's response until Kafka had it (response)",
        )
        .const_label("component_type", COMPONENT_TYPE)
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ]),
        &["component_name", "tenant", "direction", "status"],
    ))
});

static COMMAND_PAYLOAD: LazyLock<HistogramVec> = LazyLock::new(|| {
    registered(HistogramVec::new(
        HistogramOpts::new(
            "hono_command_payload_bytes",
            "Payload size of commands and command responses",
        )
        .const_label("component_type", COMPONENT_TYPE)
        .buckets(prometheus::exponential_buckets(16.0, 4.0, 8).unwrap_or_default()),
        &["component_name", "tenant", "direction", "status"],
    ))
});

static CONNECTION_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    registered(HistogramVec::new(
        HistogramOpts::new(
            "hono_connections_authenticated_duration_seconds",
            "How long connections of authenticated devices stayed open",
        )
        .const_label("component_type", COMPONENT_TYPE)
        .buckets(vec![
            1.0,
            10.0,
            60.0,
            300.0,
            1800.0,
            3600.0,
            6.0 * 3600.0,
            24.0 * 3600.0,
        ]),
        &["component_name", "tenant"],
    ))
});

/// Records one command's fate at this gateway, or one response's (`direction` is `one-way`,
/// `request` or `response`; `status` `forwarded`, `unprocessable` or `undeliverable`).
pub fn command(
    adapter: &str,
    tenant: &str,
    direction: &str,
    status: &str,
    secs: f64,
    bytes: usize,
) {
    let labels = [adapter, tenant, direction, status];
    COMMAND_PROCESSING.with_label_values(&labels).observe(secs);
    COMMAND_PAYLOAD
        .with_label_values(&labels)
        .observe(bytes as f64);
}

static REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(
        Opts::new(
            "ferrule_gateway_rejected_total",
            "Device requests refused by a gateway, by adapter and reason",
        ),
        &["component_name", "reason"],
    ))
});

static CONNECTIONS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    registered(prometheus::IntGaugeVec::new(
        Opts::new(
            "hono_connections_authenticated",
            "Open connections of authenticated devices",
        )
        .const_label("component_type", COMPONENT_TYPE),
        &["component_name", "tenant"],
    ))
});

static UNAUTHENTICATED: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    registered(prometheus::IntGaugeVec::new(
        Opts::new(
            "hono_connections_unauthenticated",
            "Open connections of devices that did not authenticate",
        )
        .const_label("component_type", COMPONENT_TYPE),
        &["component_name"],
    ))
});

static ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(
        Opts::new(
            "hono_connections_attempts_total",
            "Connection attempts, by outcome",
        )
        .const_label("component_type", COMPONENT_TYPE),
        &["component_name", "tenant", "outcome", "cipher_suite"],
    ))
});

/// What Hono's `cipher-suite` tag says of a connection without TLS (or before the handshake
/// told one).
pub const NO_CIPHER_SUITE: &str = "UNKNOWN";

/// Counts a connection attempt (`outcome` as Hono names it: `succeeded`, `unauthorized`, …;
/// `cipher_suite` the TLS or DTLS suite negotiated, IANA's name, or [`NO_CIPHER_SUITE`]).
pub fn connection_attempt(adapter: &str, tenant: &str, outcome: &str, cipher_suite: &str) {
    ATTEMPTS
        .with_label_values(&[adapter, tenant, outcome, cipher_suite])
        .inc();
}

/// Tracks an open connection; when dropped, decrements again and, for an authenticated
/// device, records how long it was open.
pub struct ConnectionGuard(
    prometheus::IntGauge,
    Option<(prometheus::Histogram, Instant)>,
);

impl ConnectionGuard {
    pub fn new(adapter: &str, tenant: &str) -> Self {
        let g = CONNECTIONS.with_label_values(&[adapter, tenant]);
        g.inc();
        let duration = CONNECTION_DURATION.with_label_values(&[adapter, tenant]);
        ConnectionGuard(g, Some((duration, Instant::now())))
    }

    /// Tracks an open connection of a device that did not authenticate.
    pub fn unauthenticated(adapter: &str) -> Self {
        let g = UNAUTHENTICATED.with_label_values(&[adapter]);
        g.inc();
        ConnectionGuard(g, None)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
        if let Some((duration, since)) = &self.1 {
            duration.observe(since.elapsed().as_secs_f64());
        }
    }
}

/// Records one processed message (`status` is `forwarded`, `unprocessable` or `undeliverable`;
/// `ttd` Hono's tag: `none`, or for an upload that waited for a command `command` or
/// `expired`).
/// `labels`: adapter, tenant, type, status, qos, ttd (in `PROCESSING`'s order).
pub fn message(labels: [&str; 6], secs: f64, bytes: usize) {
    // Looking a series up hashes every label; consecutive messages on a thread mostly share
    // them, so the last series pair is kept per thread and reused while the labels match.
    LAST_SERIES.with_borrow_mut(|last| {
        let hit = last
            .as_ref()
            .is_some_and(|l| l.labels.iter().map(String::as_str).eq(labels));
        if !hit {
            *last = Some(Series {
                labels: labels.map(str::to_owned),
                processing: PROCESSING.with_label_values(&labels),
                payload: PAYLOAD.with_label_values(&labels[..4]),
            });
        }
        if let Some(series) = last {
            series.processing.observe(secs);
            series.payload.observe(bytes as f64);
        }
    });
}

/// The series one message's labels select.
struct Series {
    labels: [String; 6],
    processing: prometheus::Histogram,
    payload: prometheus::Histogram,
}

thread_local! {
    static LAST_SERIES: std::cell::RefCell<Option<Series>> = const { std::cell::RefCell::new(None) };
}

static COAP_DUPLICATES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(
        Opts::new(
            "ferrule_gateway_coap_duplicates_total",
            "Retransmitted CoAP requests recognised by sender and message id and not handled \
             again, by state (answered from the cache, or still in progress)",
        ),
        &["state"],
    ))
});

static DTLS_SESSIONS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    registered(prometheus::IntGaugeVec::new(
        Opts::new(
            "ferrule_gateway_coap_dtls_sessions",
            "CoAP DTLS sessions held, handshakes in progress included (bounded by \
             gateway.coap.max_dtls_sessions), by listener address",
        ),
        &["listener"],
    ))
});

/// The gauge of the DTLS sessions one listener holds.
pub fn coap_dtls_sessions(listener: &str) -> prometheus::IntGauge {
    DTLS_SESSIONS.with_label_values(&[listener])
}

/// Counts a retransmitted CoAP request that was not handled again.
pub fn coap_duplicate(state: &str) {
    COAP_DUPLICATES.with_label_values(&[state]).inc();
}

static SCHEMA_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(
        Opts::new(
            "ferrule_gateway_payload_schema_rejected_total",
            "Telemetry and events refused because the payload does not fit the Avro schema of \
             the tenant's topic, by adapter, tenant and type",
        ),
        &["component_name", "tenant", "type"],
    ))
});

/// Counts a message whose payload did not fit its topic's schema.
pub fn payload_schema_refused(adapter: &str, tenant: &str, kind: &str) {
    SCHEMA_REFUSED
        .with_label_values(&[adapter, tenant, kind])
        .inc();
}

/// Counts a refused request.
pub fn rejected(adapter: &str, reason: &str) {
    REJECTED.with_label_values(&[adapter, reason]).inc();
}

pub fn init() {
    LazyLock::force(&PROCESSING);
    LazyLock::force(&PAYLOAD);
    LazyLock::force(&REJECTED);
    LazyLock::force(&SCHEMA_REFUSED);
    LazyLock::force(&COMMAND_PROCESSING);
    LazyLock::force(&COMMAND_PAYLOAD);
    LazyLock::force(&CONNECTION_DURATION);
    LazyLock::force(&COAP_DUPLICATES);
    LazyLock::force(&DTLS_SESSIONS);
    LazyLock::force(&CONNECTIONS);
    // The MQTT adapter's gauge is there from the start, at 0 (Hono's HTTP adapter reports no
    // connection metrics; the CoAP adapter's DTLS sessions have a gauge of their own).
    UNAUTHENTICATED.with_label_values(&["hono-mqtt"]).set(0);
    LazyLock::force(&ATTEMPTS);
    ferrule_kafka::metrics::init();
}
