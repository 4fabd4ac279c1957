//! What becomes of one command at this gateway instance, reported once: Hono's
//! `hono_command_*` metrics and the end of the command's `deliver command` span.

use crate::metrics;
use ferrule_telemetry::Span;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Shared by every holder of the command (clones are the same record). The first of
/// [`Progress::delivered`] and [`Progress::failed`] counts; if the last holder lets go before
/// either, the command counts as undeliverable.
#[derive(Debug, Clone)]
pub struct Progress(Arc<Tracked>);

#[derive(Debug)]
struct Tracked {
    span: Span,
    /// The adapter whose device holds the subscription (`unknown` when none does).
    adapter: &'static str,
    tenant: String,
    /// `one-way` or `request`.
    direction: &'static str,
    started: Instant,
    bytes: usize,
    ended: AtomicBool,
}

impl Progress {
    pub fn new(
        span: Span,
        adapter: &'static str,
        tenant: &str,
        request: bool,
        bytes: usize,
    ) -> Self {
        Progress(Arc::new(Tracked {
            span,
            adapter,
            tenant: tenant.to_owned(),
            direction: if request { "request" } else { "one-way" },
            started: Instant::now(),
            bytes,
            ended: AtomicBool::new(false),
        }))
    }

    /// The device has the command (acknowledged it where the protocol can).
    pub fn delivered(&self) {
        if !self.0.ended.load(Ordering::Relaxed) {
            self.0.span.add_event("delivered", Vec::new());
        }
        self.0.end("forwarded", None);
    }

    /// The command did not reach the device: `status` 4xx when it never can (unprocessable),
    /// else undeliverable.
    pub fn failed(&self, status: u16, reason: &str) {
        let outcome = match status {
            400..=499 => "unprocessable",
            _ => "undeliverable",
        };
        self.0.end(outcome, Some(reason));
    }
}

impl Tracked {
    fn end(&self, status: &'static str, failure: Option<&str>) {
        if self.ended.swap(true, Ordering::Relaxed) {
            return;
        }
        metrics::command(
            self.adapter,
            &self.tenant,
            self.direction,
            status,
            self.started.elapsed().as_secs_f64(),
            self.bytes,
        );
        if let Some(reason) = failure {
            self.span.fail(reason.to_owned());
        }
        self.span.clone().end();
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.end(
            "undeliverable",
            Some("the command was dropped before it was delivered"),
        );
    }
}
