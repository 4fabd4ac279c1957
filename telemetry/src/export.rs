//! The OTLP exporter wrapped so that every export is accounted for: spans sent and spans lost
//! to a failed export are counted per service, and a failure is logged (the first one, then
//! at most once a minute, with how many failed since).

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prometheus::{IntCounterVec, Opts};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

static SPANS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let m = IntCounterVec::new(
        Opts::new(
            "ferrule_trace_spans_exported_total",
            "Spans handed to the OTLP exporter, by service and outcome (`exported`: the \
             receiver took them; `failed`: the export failed and they are lost)",
        ),
        &["service", "outcome"],
    )
    .unwrap_or_else(|e| panic!("metric definition: {e}"));
    // A second registration (several processes' worth in one test binary) keeps the first.
    let _ = prometheus::register(Box::new(m.clone()));
    m
});

/// How often a run of failed exports is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// An exporter that counts what `inner` did with each batch.
#[derive(Debug)]
pub(crate) struct Counted<E> {
    inner: E,
    service: &'static str,
    /// Failed exports not logged yet, and when the last log line was written.
    unlogged: AtomicU64,
    logged: Mutex<Option<Instant>>,
}

impl<E> Counted<E> {
    pub(crate) fn new(inner: E, service: &'static str) -> Self {
        // Both series exist from the start: a dashboard shows 0, not nothing.
        for outcome in ["exported", "failed"] {
            SPANS.with_label_values(&[service, outcome]);
        }
        Counted {
            inner,
            service,
            unlogged: AtomicU64::new(0),
            logged: Mutex::new(None),
        }
    }

    fn failed(&self, spans: usize, error: &dyn std::fmt::Display) {
        SPANS
            .with_label_values(&[self.service, "failed"])
            .inc_by(spans as u64);
        let failures = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return;
        }
        *logged = Some(Instant::now());
        self.unlogged.store(0, Ordering::Relaxed);
        tracing::warn!(
            service = self.service,
            %error,
            failed_exports = failures,
            "exporting spans over OTLP failed; they are lost (counted in ferrule_trace_spans_exported_total)"
        );
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => SPANS
                .with_label_values(&[self.service, "exported"])
                .inc_by(spans as u64),
            Err(e) => self.failed(spans, e),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}
