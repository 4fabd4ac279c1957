//! Traces across Ferrule's processes (docs/observability.md): the OpenTelemetry pipeline that
//! exports spans over OTLP/HTTP, the samplers, and the W3C trace context a span hands on in
//! Kafka headers and AMQP application-properties.
//!
//! A process installs its [`TelemetryConfig`] once ([`install`]); each component then asks
//! for its [`Tracer`] by service name ([`tracer`]). With no OTLP endpoint configured nothing
//! is built: every tracer is off, starting a span costs a branch, and a trace context that
//! arrives is handed on unchanged.
#![forbid(unsafe_code)]

pub mod context;
mod export;
pub mod sampler;
mod span;

pub use context::TraceContext;
pub use opentelemetry::KeyValue;
pub use opentelemetry::trace::SpanKind;
pub use span::{Span, Tracer};

use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The `[telemetry]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (an OpenTelemetry collector, Jaeger, Tempo), e.g.
    /// `http://127.0.0.1:4318`; spans go to `<url>/v1/traces` as protobuf. Unset: the
    /// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is) or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL); none of them: no span is exported.
    pub otlp_endpoint: String,
    /// Which traces are kept, named as `OTEL_TRACES_SAMPLER` names them:
    /// `parentbased_always_on` (the default, Hono's too), `parentbased_always_off`,
    /// `parentbased_traceidratio`, `parentbased_rate_limiting`, or any of them without
    /// `parentbased_` (the caller's decision is then ignored). A tenant's `tracing` settings
    /// override it for that tenant's messages.
    pub sampler: String,
    /// The sampler's argument: the ratio for `traceidratio` (0 to 1), new traces per second
    /// for `rate_limiting`.
    pub sampler_arg: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: String::new(),
            sampler: "parentbased_always_on".into(),
            sampler_arg: 1.0,
        }
    }
}

impl TelemetryConfig {
    /// The sampler and its argument: the configured ones, or where a key is left at its
    /// default, the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
    pub fn sampler_setting(&self) -> (String, f64) {
        let default = TelemetryConfig::default();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let name = match (self.sampler == default.sampler, env("OTEL_TRACES_SAMPLER")) {
            (true, Some(name)) => name.trim().to_owned(),
            _ => self.sampler.clone(),
        };
        let arg = match (
            self.sampler_arg == default.sampler_arg,
            env("OTEL_TRACES_SAMPLER_ARG"),
        ) {
            (true, Some(arg)) => arg.trim().parse().unwrap_or(self.sampler_arg),
            _ => self.sampler_arg,
        };
        (name, arg)
    }

    /// Where spans are sent: the configured base URL, else the standard environment
    /// variables; `None` exports nothing.
    pub fn traces_endpoint(&self) -> Option<String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let base = |url: String| format!("{}/v1/traces", url.trim_end_matches('/'));
        match self.otlp_endpoint.trim() {
            "" => env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(base)),
            url => Some(base(url.to_owned())),
        }
    }
}

/// The process's tracing: one provider per component (each its own `service.name`), built
/// on first use.
struct Telemetry {
    endpoint: String,
    sampler: sampler::TenantSampler,
    providers: Mutex<HashMap<&'static str, SdkTracerProvider>>,
}

static INSTALLED: OnceLock<Option<Telemetry>> = OnceLock::new();

/// Sets the process's tracing up from `cfg`; the first call counts. Whether spans are
/// exported. An unknown sampler name is an error.
pub fn install(cfg: &TelemetryConfig) -> Result<bool, String> {
    let (name, arg) = cfg.sampler_setting();
    let sampler = sampler::TenantSampler::new(sampler::from_name(&name, arg)?);
    let telemetry = cfg.traces_endpoint().map(|endpoint| Telemetry {
        endpoint,
        sampler,
        providers: Mutex::default(),
    });
    if let Some(t) = &telemetry {
        tracing::info!(endpoint = %t.endpoint, sampler = %name, arg, "exporting traces over OTLP/HTTP");
    }
    Ok(INSTALLED.get_or_init(|| telemetry).is_some())
}

/// The tracer of the component whose spans carry `service` as `service.name`; off when
/// nothing is exported.
pub fn tracer(service: &'static str) -> Tracer {
    let Some(Some(t)) = INSTALLED.get() else {
        return Tracer::off();
    };
    let mut providers = t.providers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = providers.get(service) {
        return Tracer::of(p);
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(t.endpoint.clone())
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, service, "no OTLP exporter: this component's spans are not exported");
            return Tracer::off();
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(export::Counted::new(exporter, service))
        .with_sampler(t.sampler.clone())
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = Tracer::of(&provider);
    providers.insert(service, provider);
    tracer
}

/// Exports the spans still queued and stops the exporters (at the end of the process).
pub fn shutdown() {
    if let Some(Some(t)) = INSTALLED.get() {
        let providers = std::mem::take(&mut *t.providers.lock().unwrap_or_else(|p| p.into_inner()));
        for (service, p) in providers {
            if let Err(e) = p.shutdown() {
                tracing::debug!(error = %e, service, "span exporter did not shut down cleanly");
            }
        }
    }
}
