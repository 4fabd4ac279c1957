//! Traces across processes (docs/observability.md), against a real OTLP/HTTP receiver this
//! test starts (built on the `opentelemetry-proto` definitions; it decodes every request):
//! an MQTT 5 device's trace context goes through the gateway, a Kafka header and the bridge to
//! a Qpid Proton application as one trace; tenants' sampling settings are honoured; with no
//! endpoint configured no span is made and the device's trace context reaches the
//! application unchanged.

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Debian's interpreter: python3-qpid-proton and python3-paho-mqtt are installed for it.
const PYTHON: &str = "/usr/bin/python3";

/// One span as the receiver decoded it; ids in lowercase hex.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP trace receiver on a port of its own (`POST /v1/traces`, protobuf).
struct OtlpReceiver {
    url: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    fn start() -> OtlpReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let state = spans.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route("/v1/traces", axum::routing::post(export))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        OtlpReceiver { url, spans }
    }

    /// The spans of `trace_id` received so far.
    fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits (up to 30 s: the exporters send in batches every few seconds) until the spans of
    /// `trace_id` satisfy `done`.
    fn wait_for(
        &self,
        trace_id: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let start = Instant::now();
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                return spans;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "spans of {trace_id} so far: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

async fn export(
    axum::extract::State(spans): axum::extract::State<Arc<Mutex<Vec<ReceivedSpan>>>>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(n)) => n.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = spans.lock().unwrap();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            out.push(ReceivedSpan {
                service: service.clone(),
                name: span.name.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                    .collect(),
            });
        }
    }
    axum::http::StatusCode::OK
}

/// A tenant with the application `app` (password `app-secret`) and the device `sensor`
/// (password `dev-secret`); `tenant_body` is the tenant's JSON.
fn provision(f: &Ferrule, tenant_body: &str) -> String {
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    f.admin_ok("POST", &format!("/v1/tenants/{tenant}"), tenant_body);
    f.admin_ok(
        "PUT",
        &format!("/v1/applications/{tenant}/app"),
        r#"{"secrets": [{"pwd-plain": "app-secret"}]}"#,
    );
    f.admin_ok("POST", &format!("/v1/devices/{tenant}/sensor"), "{}");
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/sensor"),
        r#"[{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"pwd-plain": "dev-secret"}]}]"#,
    );
    tenant
}

/// The device (MQTT 5, paho) sends telemetry with `traceparent` until a Proton application
/// attached to `telemetry/<tenant>` received one message: that message.
fn one_traced_message(f: &Ferrule, tenant: &str, traceparent: &str) -> Value {
    let mut app = Command::new(PYTHON)
        .args([
            &format!("{}/tests/amqp/receive.py", env!("CARGO_MANIFEST_DIR")),
            &f.amqp,
            &format!("app@{tenant}"),
            "app-secret",
            &format!("telemetry/{tenant}"),
            "1",
            "25",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3-qpid-proton is installed (scripts/test installs it)");
    let mut lines = BufReader::new(app.stdout.take().unwrap()).lines();
    let attached: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(attached["attached"], format!("telemetry/{tenant}"));
    let (host, port) = f.mqtt.split_once(':').unwrap();
    // The link's consumer group forms after the attach: the device keeps sending until the
    // application has a message.
    let mut device = Command::new(PYTHON)
        .args([
            &format!("{}/tests/apps/mqtt5_traced.py", env!("CARGO_MANIFEST_DIR")),
            host,
            port,
            &format!("sensor@{tenant}"),
            "dev-secret",
            traceparent,
            "vendor=ferrule-test",
            "25",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3-paho-mqtt is installed");
    let message: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let _ = device.kill();
    let device_out = device.wait_with_output().unwrap();
    let _ = app.wait();
    assert!(
        message.get("error").is_none(),
        "{message} (device: {})",
        String::from_utf8_lossy(&device_out.stdout)
    );
    message
}

fn random_hex(len: usize) -> String {
    let mut s = String::new();
    while s.len() < len {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(len);
    s
}

fn span_of<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name)
}

#[test]
fn one_trace_from_an_mqtt_device_through_gateway_kafka_and_bridge_to_an_application() {
    let otlp = OtlpReceiver::start();
    let mut f = Ferrule::start_with(
        &kafka(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.clone())],
    );
    f.wait_readiness(200);
    let tenant = provision(&f, "{}");
    let (trace_id, device_span) = (random_hex(32), random_hex(16));
    let traceparent = format!("00-{trace_id}-{device_span}-01");
    let message = one_traced_message(&f, &tenant, &traceparent);

    // The application's message carries the trace, continued by the bridge's span.
    let app_traceparent = message["properties"]["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = app_traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{app_traceparent}");
    assert_eq!(
        parts[1], trace_id,
        "one trace id from device to application"
    );
    assert_ne!(parts[2], device_span, "a span of the bridge's");
    assert_eq!(parts[3], "01", "sampled");
    assert_eq!(message["properties"]["tracestate"], "vendor=ferrule-test");

    let spans = otlp.wait_for(&trace_id, |spans| {
        spans.iter().any(|s| s.span_id == parts[2])
    });
    let delivery = spans.iter().find(|s| s.span_id == parts[2]).unwrap();
    assert_eq!(delivery.service, "ferrule-bridge");
    assert_eq!(delivery.name, "deliver telemetry");
    assert_eq!(delivery.attributes["tenant_id"], tenant);
    assert_eq!(delivery.attributes["device_id"], "sensor");
    // Its parent is the gateway's upload span, whose parent is the device's.
    let upload = spans
        .iter()
        .find(|s| s.span_id == delivery.parent_span_id)
        .unwrap_or_else(|| panic!("the bridge span's parent among {spans:#?}"));
    assert_eq!(upload.service, "ferrule-gateway");
    assert_eq!(upload.name, "upload telemetry");
    assert_eq!(upload.parent_span_id, device_span);
    assert_eq!(upload.attributes["tenant_id"], tenant);
    assert_eq!(upload.attributes["device_id"], "sensor");
    assert_eq!(upload.attributes["auth_id"], "sensor");
    assert_eq!(upload.attributes["component_name"], "hono-mqtt");
    assert_eq!(upload.attributes["qos"], "1");
    f.stop();
}

/// Hono's tenant `tracing` settings: `sampling-mode: none` keeps no span of the tenant's
/// messages even when the device asks for sampling, and the next hops see the trace as not
/// sampled; `sampling-mode-per-auth-id` keeps every span of one device even when the device
/// does not ask for it.
#[test]
fn tenants_sampling_modes_are_honoured() {
    let otlp = OtlpReceiver::start();
    let mut f = Ferrule::start_with(
        &kafka(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.clone())],
    );
    f.wait_readiness(200);
    let quiet = provision(&f, r#"{"tracing": {"sampling-mode": "none"}}"#);
    let chosen = provision(
        &f,
        r#"{"tracing": {"sampling-mode": "none", "sampling-mode-per-auth-id": {"sensor": "all"}}}"#,
    );

    let quiet_trace = random_hex(32);
    let message = one_traced_message(
        &f,
        &quiet,
        &format!("00-{quiet_trace}-{}-01", random_hex(16)),
    );
    let tp = message["properties"]["traceparent"].as_str().unwrap();
    assert!(tp.contains(&quiet_trace), "{tp}");
    assert!(tp.ends_with("-00"), "handed on as not sampled: {tp}");

    let chosen_trace = random_hex(32);
    let device_span = random_hex(16);
    let message = one_traced_message(&f, &chosen, &format!("00-{chosen_trace}-{device_span}-00"));
    let tp = message["properties"]["traceparent"].as_str().unwrap();
    assert!(tp.ends_with("-01"), "sampled for this auth-id: {tp}");
    let spans = otlp.wait_for(&chosen_trace, |spans| {
        span_of(spans, "ferrule-gateway", "upload telemetry").is_some()
            && span_of(spans, "ferrule-bridge", "deliver telemetry").is_some()
    });
    let upload = span_of(&spans, "ferrule-gateway", "upload telemetry").unwrap();
    assert_eq!(upload.parent_span_id, device_span);

    // By now the quiet tenant's spans, had any been kept, would have been exported too.
    assert!(
        otlp.trace(&quiet_trace).is_empty(),
        "{:#?}",
        otlp.trace(&quiet_trace)
    );
    f.stop();
}

/// No OTLP endpoint: no span is made anywhere, and the application gets the device's trace
/// context exactly as the device sent it.
#[test]
fn without_an_endpoint_the_trace_context_passes_through_unchanged() {
    let mut f = Ferrule::start_with(
        &kafka(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", String::new()),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", String::new()),
        ],
    );
    f.wait_readiness(200);
    let tenant = provision(&f, "{}");
    let traceparent = format!("00-{}-{}-01", random_hex(32), random_hex(16));
    let message = one_traced_message(&f, &tenant, &traceparent);
    assert_eq!(message["properties"]["traceparent"], traceparent.as_str());
    assert_eq!(message["properties"]["tracestate"], "vendor=ferrule-test");
    f.stop();
}
