//! The router's metrics, in the process-wide registry the health port serves.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use std::sync::LazyLock;

/// Registers a metric; a second registration (several routers in one test process) keeps the
/// first.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    m: Result<M, prometheus::Error>,
) -> M {
    let m = m.unwrap_or_else(|e| panic!("metric definition: {e}"));
    let _ = prometheus::register(Box::new(m.clone()));
    m
}

static CONSUMED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(
        Opts::new(
            "ferrule_router_commands_consumed_total",
            "Command records the router read from hono.command.<tenant>",
        ),
        &["tenant"],
    ))
});

static FORWARDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(
        Opts::new(
            "ferrule_router_commands_forwarded_total",
            "Commands the router forwarded to a gateway instance (the broker acknowledged them)",
        ),
        &["tenant"],
    ))
});

static FAILED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(
        Opts::new(
            "ferrule_router_commands_failed_total",
            "Commands the router could not forward, answered with a delivery failure or an \
             outcome, by the status it gave (400 invalid, 404 unknown or disabled tenant or \
             device, 503 not connected or routing unavailable)",
        ),
        &["tenant", "status"],
    ))
});

static LOOKUP: LazyLock<Histogram> = LazyLock::new(|| {
    registered(Histogram::with_opts(
        HistogramOpts::new(
            "ferrule_router_routing_lookup_duration_seconds",
            "Time to check a command's tenant and device and find the gateway instance that \
             reaches it",
        )
        .buckets(vec![
            0.000_05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            1.0,
        ]),
    ))
});

pub fn consumed(tenant: &str) {
    CONSUMED.with_label_values(&[tenant]).inc();
}

pub fn forwarded(tenant: &str) {
    FORWARDED.with_label_values(&[tenant]).inc();
}

pub fn failed(tenant: &str, status: u16) {
    FAILED
        .with_label_values(&[tenant, &status.to_string()])
        .inc();
}

pub fn lookup(secs: f64) {
    LOOKUP.observe(secs);
}

/// Registers every series, so that /metrics shows them before the first command.
pub fn init() {
    LazyLock::force(&CONSUMED);
    LazyLock::force(&FORWARDED);
    LazyLock::force(&FAILED);
    LazyLock::force(&LOOKUP);
}
