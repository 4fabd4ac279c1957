//! A component's tracer and its spans: thin wrappers that do nothing when tracing is off.

use crate::context::TraceContext;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::borrow::Cow;
use std::time::SystemTime;

/// A component's tracer; [`Tracer::off`] starts no span.
#[derive(Clone, Default, Debug)]
pub struct Tracer(Option<SdkTracer>);

impl Tracer {
    pub fn off() -> Self {
        Tracer(None)
    }

    pub(crate) fn of(provider: &SdkTracerProvider) -> Self {
        Tracer(Some(provider.tracer("ferrule")))
    }

    /// Whether spans are recorded and exported at all.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Starts a span under the remote `parent` (a trace context a message carried), or as a
    /// trace of its own; at `start` if the work began earlier. `attributes` are built only
    /// when the tracer is on; the sampler sees them. Attributes the sampler does not need go
    /// in with [`Span::describe`], which builds them only for a span that is kept.
    pub fn start(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&TraceContext>,
        start: Option<SystemTime>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        let Some(tracer) = &self.0 else {
            return Span(None);
        };
        let parent = TraceContext::parent(parent);
        let mut builder = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes());
        if let Some(t) = start {
            builder = builder.with_start_time(t);
        }
        let span = tracer.build_with_context(builder, &parent);
        Span::of(parent.with_span(span))
    }
}

/// A span being recorded, or nothing when tracing is off (one pointer: it may ride along with
/// every message in flight). Dropping it ends it.
/// Clones are the same span: it ends at [`Span::end`] or when the last clone is dropped.
#[derive(Debug, Default, Clone)]
pub struct Span(Option<Box<Active>>);

/// A started span in its context, and whether it is kept (asked once: the context's span sits
/// behind a lock).
#[derive(Debug, Clone)]
struct Active {
    cx: Context,
    recording: bool,
}

impl Span {
    /// No span.
    pub fn none() -> Self {
        Span(None)
    }

    fn of(cx: Context) -> Self {
        let recording = cx.span().is_recording();
        Span(Some(Box::new(Active { cx, recording })))
    }

    /// The trace context to hand on to the next hop: this span's, or `None` when there is no
    /// span (the caller then hands on what it received).
    pub fn context(&self) -> Option<TraceContext> {
        TraceContext::from_context(&self.0.as_ref()?.cx)
    }

    /// Sets the attributes `attributes` builds, only when the span is kept: a dropped span
    /// costs no strings.
    pub fn describe(&self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(cx) = self.recording() {
            cx.span().set_attributes(attributes());
        }
    }

    pub fn set_attribute(&self, attribute: KeyValue) {
        if let Some(cx) = self.recording() {
            cx.span().set_attribute(attribute);
        }
    }

    /// The span's context while it is kept (a dropped span takes no events: each would read
    /// the clock).
    fn recording(&self) -> Option<&Context> {
        self.0.as_deref().filter(|a| a.recording).map(|a| &a.cx)
    }

    pub fn add_event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        if let Some(cx) = self.recording() {
            cx.span().add_event(name, attributes);
        }
    }

    /// An event that happened at `at`, earlier than now.
    pub fn add_event_at(&self, name: &'static str, at: SystemTime) {
        if let Some(cx) = self.recording() {
            cx.span().add_event_with_timestamp(name, at, Vec::new());
        }
    }

    /// Marks the work as failed, with why.
    pub fn fail(&self, description: impl Into<Cow<'static, str>>) {
        if let Some(cx) = self.recording() {
            cx.span().set_status(Status::error(description));
        }
    }

    /// Ends the span now (a dropped span just goes).
    pub fn end(self) {
        if let Some(cx) = self.recording() {
            cx.span().end();
        }
    }
}
