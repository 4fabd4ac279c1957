//! W3C trace context (`traceparent`, `tracestate`) as it travels in a device's HTTP header or
//! MQTT 5 user property, a Kafka record header and an AMQP application property.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The header (and property) names of the W3C Trace Context recommendation.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A trace context as two strings, as it is written on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// From the strings a message carried; `None` without a `traceparent`.
    pub fn of(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<TraceContext> {
        Some(TraceContext {
            traceparent: traceparent?.to_owned(),
            tracestate: tracestate.filter(|s| !s.is_empty()).map(str::to_owned),
        })
    }

    /// The OpenTelemetry context whose remote parent this is; an empty context when the
    /// `traceparent` is malformed (the span then starts a trace of its own).
    pub fn parent(context: Option<&TraceContext>) -> opentelemetry::Context {
        match context {
            Some(c) => TraceContextPropagator::new().extract(c),
            None => opentelemetry::Context::new(),
        }
    }

    /// The context to hand on for `context`'s active span; `None` when it has no valid one.
    /// Written here rather than by the propagator: this runs for every message while tracing
    /// is on, and formatting machinery was a visible share of it.
    pub fn from_context(context: &opentelemetry::Context) -> Option<TraceContext> {
        let span = context.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut traceparent = String::with_capacity(55);
        let parts: [&[u8]; 4] = [
            &[0],
            &sc.trace_id().to_bytes(),
            &sc.span_id().to_bytes(),
            &[sc.trace_flags().to_u8() & 1],
        ];
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                traceparent.push('-');
            }
            for b in *part {
                traceparent.push(char::from(HEX[usize::from(b >> 4)]));
                traceparent.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
        let state = sc.trace_state().header();
        Some(TraceContext {
            traceparent,
            tracestate: (!state.is_empty()).then_some(state),
        })
    }

    /// The trace id, as 32 lowercase hex digits.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.split('-').nth(1)
    }
}

impl Extractor for TraceContext {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.traceparent),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

impl Injector for TraceContext {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = value,
            TRACESTATE => self.tracestate = Some(value).filter(|s| !s.is_empty()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_survives_the_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::of(Some(tp), Some("vendor=x")).unwrap();
        let parent = TraceContext::parent(Some(&c));
        let back = TraceContext::from_context(&parent).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn a_malformed_traceparent_gives_no_parent() {
        let c = TraceContext::of(Some("00-zz-01"), None).unwrap();
        assert!(TraceContext::from_context(&TraceContext::parent(Some(&c))).is_none());
        assert!(TraceContext::of(None, Some("a=b")).is_none());
    }
}
