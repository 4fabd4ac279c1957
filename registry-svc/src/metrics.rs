//! Registry metrics, registered in the process-wide Prometheus registry that the health port
//! serves.

use prometheus::{IntCounterVec, Opts};
use std::sync::LazyLock;

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    // Registering twice only happens when the statics are touched from two registries; the
    // counter still works, it is just not exported twice.
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

static REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "ferrule_registry_rejected_requests_total",
        "Management API requests refused, by reason",
        &["reason"],
    )
});

static AUTH_ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "hono_authentication_attempts_total",
        "Device authentication attempts, by outcome",
        &["outcome", "client_type"],
    )
});

static AUTH_CACHE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "ferrule_auth_cache_lookups_total",
        "Credential lookups answered from the cache (hit) or the database (miss)",
        &["result"],
    )
});

/// Counts a refused management request.
pub fn rejected(reason: &str) {
    REJECTED.with_label_values(&[reason]).inc();
}

/// Counts a device authentication attempt.
pub fn auth_attempt(outcome: &str, client_type: &str) {
    AUTH_ATTEMPTS
        .with_label_values(&[outcome, client_type])
        .inc();
}

/// Counts a credential cache lookup.
pub fn auth_cache(hit: bool) {
    AUTH_CACHE
        .with_label_values(&[if hit { "hit" } else { "miss" }])
        .inc();
}

/// Touches every metric so that they are exported (with zero) before the first event.
pub fn init() {
    LazyLock::force(&REJECTED);
    LazyLock::force(&AUTH_ATTEMPTS);
    LazyLock::force(&AUTH_CACHE);
}
