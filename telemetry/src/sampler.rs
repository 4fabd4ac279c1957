//! Which traces are kept: the configured sampler (named as `OTEL_TRACES_SAMPLER` names them,
//! plus a rate-limiting one), overridden per tenant and per auth-id by the tenant's `tracing`
//! settings (Hono's `sampling-mode`: `all`, `none` or `default`).

use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The span attribute that carries a tenant's sampling mode into the sampler: `all` keeps the
/// trace whatever the configured sampler says, `none` drops it; absent or `default`, the
/// configured sampler decides.
pub const SAMPLING_MODE: &str = "sampling.mode";

/// Hono's sampling mode as [`SAMPLING_MODE`] carries it: `all` and `none` override the
/// sampler, anything else (`default`, absent) leaves the decision to it. `per_auth_id` (the
/// tenant's `sampling-mode-per-auth-id` entry of the sender) wins over `tenant` (its
/// `sampling-mode`).
pub fn mode(tenant: Option<&str>, per_auth_id: Option<&str>) -> Option<&'static str> {
    match per_auth_id.or(tenant)? {
        "all" => Some("all"),
        "none" => Some("none"),
        _ => None,
    }
}

/// The sampler named `name` (see `TelemetryConfig::sampler`) with its argument.
pub fn from_name(name: &str, arg: f64) -> Result<Box<dyn ShouldSample>, String> {
    let (parent_based, root) = match name.strip_prefix("parentbased_") {
        Some(root) => (true, root),
        None => (false, name),
    };
    let root: Box<dyn ShouldSample> = match root {
        "always_on" => Box::new(Sampler::AlwaysOn),
        "always_off" => Box::new(Sampler::AlwaysOff),
        "traceidratio" if (0.0..=1.0).contains(&arg) => Box::new(Sampler::TraceIdRatioBased(arg)),
        "traceidratio" => {
            return Err(format!(
                "the ratio of {name} must be within 0 and 1, not {arg}"
            ));
        }
        "rate_limiting" if arg >= 0.0 && arg.is_finite() => Box::new(RateLimiting::new(arg)),
        "rate_limiting" => {
            return Err(format!(
                "the rate of {name} must be a number >= 0, not {arg}"
            ));
        }
        other => {
            return Err(format!(
                "unknown sampler {other:?}: one of always_on, always_off, traceidratio, \
                 rate_limiting, each optionally prefixed with parentbased_"
            ));
        }
    };
    Ok(match parent_based {
        true => Box::new(Sampler::ParentBased(root)),
        false => root,
    })
}

/// At most `per_second` new traces a second (a token bucket of one second's worth).
#[derive(Debug, Clone)]
pub struct RateLimiting {
    per_second: f64,
    bucket: Arc<Mutex<(f64, Instant)>>,
}

impl RateLimiting {
    pub fn new(per_second: f64) -> Self {
        RateLimiting {
            per_second,
            bucket: Arc::new(Mutex::new((per_second.max(1.0), Instant::now()))),
        }
    }

    fn take(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * self.per_second;
        b.0 = (b.0 + refill).min(self.per_second.max(1.0));
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

impl ShouldSample for RateLimiting {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        _: TraceId,
        _: &str,
        _: &SpanKind,
        _: &[KeyValue],
        _: &[Link],
    ) -> SamplingResult {
        decided(parent, self.take())
    }
}

/// The configured sampler, unless the span names its tenant's sampling mode
/// ([`SAMPLING_MODE`]).
#[derive(Debug, Clone)]
pub struct TenantSampler(Box<dyn ShouldSample>);

impl TenantSampler {
    pub fn new(configured: Box<dyn ShouldSample>) -> Self {
        TenantSampler(configured)
    }
}

impl ShouldSample for TenantSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let mode = attributes
            .iter()
            .find(|kv| kv.key.as_str() == SAMPLING_MODE)
            .map(|kv| kv.value.as_str());
        match mode.as_deref() {
            Some("all") => decided(parent, true),
            Some("none") => decided(parent, false),
            _ => self
                .0
                .should_sample(parent, trace_id, name, kind, attributes, links),
        }
    }
}

fn decided(parent: Option<&Context>, keep: bool) -> SamplingResult {
    let trace_state = parent
        .map(|cx| cx.span().span_context().trace_state().clone())
        .unwrap_or_default();
    SamplingResult {
        decision: match keep {
            true => SamplingDecision::RecordAndSample,
            false => SamplingDecision::Drop,
        },
        attributes: Vec::new(),
        trace_state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TraceContext;

    fn decide(s: &dyn ShouldSample, parent: Option<&str>, attrs: &[KeyValue]) -> bool {
        let c = parent.and_then(|tp| TraceContext::of(Some(tp), None));
        let cx = TraceContext::parent(c.as_ref());
        let r = s.should_sample(
            Some(&cx),
            TraceId::from(7u128),
            "upload",
            &SpanKind::Server,
            attrs,
            &[],
        );
        r.decision == SamplingDecision::RecordAndSample
    }

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const NOT_SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    #[test]
    fn parent_based_follows_the_caller_and_keeps_roots() {
        let s = from_name("parentbased_always_on", 1.0).unwrap();
        assert!(decide(&*s, None, &[]));
        assert!(decide(&*s, Some(SAMPLED), &[]));
        assert!(!decide(&*s, Some(NOT_SAMPLED), &[]));
        let s = from_name("always_off", 1.0).unwrap();
        assert!(
            !decide(&*s, Some(SAMPLED), &[]),
            "the caller's decision is ignored"
        );
        assert!(from_name("sometimes", 1.0).is_err());
        assert!(from_name("traceidratio", 2.0).is_err());
    }

    #[test]
    fn a_ratio_keeps_about_that_share() {
        let s = from_name("traceidratio", 0.25).unwrap();
        let kept = (0..10_000u128)
            .filter(|i| {
                let id = TraceId::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835));
                s.should_sample(None, id, "u", &SpanKind::Server, &[], &[])
                    .decision
                    == SamplingDecision::RecordAndSample
            })
            .count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
    }

    #[test]
    fn the_rate_limit_keeps_at_most_its_rate() {
        let s = from_name("rate_limiting", 5.0).unwrap();
        let kept = (0..100).filter(|_| decide(&*s, None, &[])).count();
        // The bucket holds one second's worth; these 100 calls take far less than a second.
        assert!((5..=6).contains(&kept), "{kept}");
    }

    #[test]
    fn a_tenants_mode_overrides_the_configured_sampler() {
        let s = TenantSampler::new(from_name("always_off", 1.0).unwrap());
        assert!(decide(&s, None, &[KeyValue::new(SAMPLING_MODE, "all")]));
        assert!(!decide(
            &s,
            None,
            &[KeyValue::new(SAMPLING_MODE, "default")]
        ));
        let s = TenantSampler::new(from_name("parentbased_always_on", 1.0).unwrap());
        assert!(!decide(
            &s,
            Some(SAMPLED),
            &[KeyValue::new(SAMPLING_MODE, "none")]
        ));
        assert!(decide(&s, Some(SAMPLED), &[]));
    }
}
