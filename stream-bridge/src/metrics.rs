//! The bridge's own metrics, in the process-wide registry the health port serves.

use prometheus::{IntCounterVec, Opts};
use std::sync::LazyLock;

static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let m = IntCounterVec::new(
        Opts::new(
            "ferrule_bridge_refused_total",
            "Application requests the AMQP bridge refused, by reason",
        ),
        &["reason"],
    )
    .unwrap_or_else(|e| panic!("metric definition: {e}"));
    // A second registration (several bridges in one test process) keeps the first.
    let _ = prometheus::register(Box::new(m.clone()));
    m
});

/// Counts a refused sign-in, link, command or TLS handshake.
pub fn refused(reason: &str) {
    REFUSED.with_label_values(&[reason]).inc();
}

static COMMANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let m = IntCounterVec::new(
        Opts::new(
            "ferrule_bridge_commands_total",
            "Application commands the AMQP bridge settled, by disposition",
        ),
        &["outcome"],
    )
    .unwrap_or_else(|e| panic!("metric definition: {e}"));
    let _ = prometheus::register(Box::new(m.clone()));
    // Every outcome is there from the start, at 0.
    for outcome in ["accepted", "released", "rejected"] {
        m.with_label_values(&[outcome]);
    }
    m
});

/// Makes the bridge's metrics visible before their first event.
pub fn init() {
    LazyLock::force(&REFUSED);
    LazyLock::force(&COMMANDS);
}

/// Counts a settled command: accepted, released or rejected.
pub fn command_settled(disposition: ferrule_schemas::outcome::Disposition) {
    use ferrule_schemas::outcome::Disposition as D;
    let label = match disposition {
        D::Accepted => "accepted",
        D::Released => "released",
        D::Rejected => "rejected",
    };
    COMMANDS.with_label_values(&[label]).inc();
}
