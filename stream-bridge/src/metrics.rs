//! The bridge's own metrics, in the process-wide registry the health port serves.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
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

static UNDECODABLE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let m = IntCounterVec::new(
        Opts::new(
            "ferrule_bridge_payload_undecodable_total",
            "Records the gateway encoded with an Avro schema that the bridge could not decode \
             back to JSON (delivered as stored), by tenant and type",
        ),
        &["tenant", "type"],
    )
    .unwrap_or_else(|e| panic!("metric definition: {e}"));
    let _ = prometheus::register(Box::new(m.clone()));
    m
});

/// Counts a converted record delivered as stored because it could not be decoded.
pub fn undecodable(tenant: &str, kind: &str) {
    UNDECODABLE.with_label_values(&[tenant, kind]).inc();
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

fn gauge(name: &str, help: &str) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), &["tenant", "type"])
        .unwrap_or_else(|e| panic!("metric definition: {e}"));
    let _ = prometheus::register(Box::new(m.clone()));
    m
}

static LINKS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_bridge_links",
        "Application receiver links the bridge feeds, by tenant and type (telemetry, event)",
    )
});

static WAITING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_bridge_links_waiting",
        "Links whose next message waits for the application: no link credit left, or the \
         session's window is full",
    )
});

static UNSETTLED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "ferrule_bridge_unsettled_deliveries",
        "Events sent to applications and not yet settled by them (at most 256 per link)",
    )
});

/// One link's share of the link gauges; gives it back when dropped.
pub struct LinkGauges {
    links: IntGauge,
    waiting: IntGauge,
    unsettled: IntGauge,
    /// What this link added to `unsettled`.
    held: i64,
}

impl LinkGauges {
    pub fn new(tenant: &str, kind: &str) -> Self {
        let labels = [tenant, kind];
        let links = LINKS.with_label_values(&labels);
        links.inc();
        LinkGauges {
            links,
            waiting: WAITING.with_label_values(&labels),
            unsettled: UNSETTLED.with_label_values(&labels),
            held: 0,
        }
    }

    /// The link waits for the application until the guard is dropped.
    pub fn waiting(&self) -> impl Drop + use<> {
        struct Waiting(IntGauge);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.waiting.inc();
        Waiting(self.waiting.clone())
    }

    /// The link's unsettled deliveries now.
    pub fn unsettled(&mut self, now: usize) {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.unsettled.add(now - self.held);
        self.held = now;
    }
}

impl Drop for LinkGauges {
    fn drop(&mut self) {
        self.links.dec();
        self.unsettled.sub(self.held);
    }
}

/// Makes the bridge's metrics visible before their first event.
pub fn init() {
    LazyLock::force(&REFUSED);
    LazyLock::force(&UNDECODABLE);
    LazyLock::force(&COMMANDS);
    LazyLock::force(&LINKS);
    LazyLock::force(&WAITING);
    LazyLock::force(&UNSETTLED);
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
