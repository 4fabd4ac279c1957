//! Traces across processes (docs/observability.md), against a real OTLP/HTTP receiver this
//! test starts (built on the `opentelemetry-proto` definitions; it decodes every request):
//! an MQTT 5 device's trace context goes through the gateway, a Kafka header and the bridge to
//! a Qpid Proton application as one trace; tenants' sampling settings are honoured; with no
//! endpoint configured no span is made and the device's trace context reaches the
//! application unchanged.

mod common;

use common::otlp::{OtlpReceiver, ReceivedSpan};
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const PYTHON: &str = DEBIAN_PYTHON;

/// A tenant with the application `app` (password `app-secret`) and the device `sensor`
/// (password `dev-secret`); `tenant_body` is the tenant's JSON.
fn provision(f: &Ferrule, tenant_body: &str) -> String {
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    provision_as(f, &tenant, tenant_body);
    tenant
}

/// [`provision`] under the tenant id `tenant`.
fn provision_as(f: &Ferrule, tenant: &str, tenant_body: &str) {
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

/// An OTLP receiver, and a ready `ferrule all` exporting its spans there; `setting` names the
/// endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or `FERRULE_TELEMETRY__OTLP_ENDPOINT`).
fn traced(setting: &str) -> (OtlpReceiver, Ferrule) {
    let otlp = OtlpReceiver::start();
    // Its router reads no other test's commands (a new router group reads every command
    // topic from its start, and would answer them with spans of its own).
    let unused = format!("hono.command.unused-{}", uuid::Uuid::new_v4().simple());
    let env = [
        (setting, otlp.url.clone()),
        ("FERRULE_ROUTER__TOPIC_PATTERN", unused),
    ];
    let mut f = Ferrule::start_with(&kafka(), &env);
    f.wait_readiness(200);
    (otlp, f)
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
    let (otlp, f) = traced("OTEL_EXPORTER_OTLP_ENDPOINT");
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
    // The steps of the upload, as events; the device authenticated at CONNECT (below).
    assert_eq!(
        upload.events,
        ["authorised", "produced", "acknowledged"],
        "{upload:#?}"
    );
    assert_eq!(upload.error, None);
    // Telemetry goes to the application pre-settled, at most once.
    assert_eq!(delivery.attributes["disposition"], "pre-settled");
    assert_eq!(delivery.error, None);

    // The connection's authentication: Hono's CONNECT span, a trace of its own.
    let connect = otlp
        .wait_for_span(|s| s.name == "CONNECT" && s.attributes.get("tenant_id") == Some(&tenant));
    assert_eq!(connect.service, "ferrule-gateway");
    assert_eq!(connect.attributes["component_name"], "hono-mqtt");
    assert_eq!(connect.attributes["device_id"], "sensor");
    assert_eq!(connect.attributes["auth_id"], "sensor");
    assert_eq!(connect.events, ["authenticated", "authorised"]);
    assert_eq!(connect.error, None);
    // A CONNECT with a wrong password: the span says why, and names no device.
    let (host, port) = f.mqtt.split_once(':').unwrap();
    let refused = Command::new("mosquitto_pub")
        .args(["-h", host, "-p", port, "-u", &format!("sensor@{tenant}")])
        .args(["-P", "wrong", "-t", "telemetry", "-m", "x"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    let failed = otlp.wait_for_span(|s| s.name == "CONNECT" && s.error.is_some());
    assert_eq!(failed.attributes.get("tenant_id"), None, "{failed:#?}");
    assert!(failed.events.is_empty(), "{failed:#?}");
    f.stop();
}

/// Hono's tenant `tracing` settings (the endpoint set as `telemetry.otlp_endpoint` here):
/// `sampling-mode: none` keeps no span of the tenant's
/// messages even when the device asks for sampling, and the next hops see the trace as not
/// sampled; `sampling-mode-per-auth-id` keeps every span of one device even when the device
/// does not ask for it.
#[test]
fn tenants_sampling_modes_are_honoured() {
    let (otlp, f) = traced("FERRULE_TELEMETRY__OTLP_ENDPOINT");
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
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let f = Ferrule::start_for_commands_with(
        &tenant,
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", String::new()),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", String::new()),
        ],
    );
    provision_as(&f, &tenant, "{}");
    let traceparent = format!("00-{}-{}-01", random_hex(32), random_hex(16));
    let message = one_traced_message(&f, &tenant, &traceparent);
    assert_eq!(message["properties"]["traceparent"], traceparent.as_str());
    assert_eq!(message["properties"]["tracestate"], "vendor=ferrule-test");
    // A command the router cannot deliver: its failure response carries the command's trace.
    let command = format!("00-{}-{}-01", random_hex(32), random_hex(16));
    send_command(&tenant, "nobody", "c-1", &command);
    let response = topic_headers(&format!("hono.command_response.{tenant}"));
    assert_eq!(response["status"], "404");
    assert_eq!(response["traceparent"], command);
    // No exporter was built: it would have its series from the start (read once the
    // upload's own series is there, so the text is this gateway's whole).
    let start = std::time::Instant::now();
    let metrics = loop {
        let (_, metrics) = curl(&[&format!("{}/metrics", f.health)]);
        if metrics.contains("hono_telemetry_processing_duration_seconds") {
            break metrics;
        }
        assert!(start.elapsed().as_secs() < 15, "{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(!metrics.contains("ferrule_trace_spans_exported_total"));
    f.stop();
}

/// An OTLP endpoint where nothing listens: spans are lost, but counted per service, and the
/// log says so; the messages themselves go through.
#[test]
fn spans_an_endpoint_did_not_take_are_counted_and_logged() {
    let log = std::env::temp_dir().join(format!(
        "ferrule-otlp-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let unused = format!("hono.command.unused-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", nowhere),
        ("FERRULE_ROUTER__TOPIC_PATTERN", unused),
    ];
    let mut f = Ferrule::start_logging_to(&kafka(), &env, &log);
    f.wait_readiness(200);
    let tenant = provision(&f, "{}");
    let (code, body) = curl(&[
        "-u",
        &format!("sensor@{tenant}:dev-secret"),
        "-H",
        "qos-level: 1",
        "--data-binary",
        "21.5",
        &format!("{}/telemetry", f.http),
    ]);
    assert_eq!(code, 202, "{body}");
    let series = |outcome: &str| {
        let (_, text) = curl(&[&format!("{}/metrics", f.health)]);
        let labels = [("service", "ferrule-gateway"), ("outcome", outcome)];
        metric(&text, "ferrule_trace_spans_exported_total", &labels)
    };
    let start = std::time::Instant::now();
    while series("failed").unwrap_or(0.0) < 1.0 {
        assert!(start.elapsed().as_secs() < 30, "no failed export counted");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert_eq!(series("exported"), Some(0.0));
    f.stop();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("exporting spans over OTLP failed"),
        "the log: {log}"
    );
}

/// Commands honour the tenant's sampling mode too (Hono's router applies it): with
/// `sampling-mode: none` the router keeps no span of a command that asked for sampling and
/// hands the trace on as not sampled. The standard `OTEL_TRACES_SAMPLER` sets the sampler
/// when the configuration does not.
#[test]
fn commands_honour_the_tenants_sampling_mode() {
    let otlp = OtlpReceiver::start();
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let f = Ferrule::start_for_commands_with(
        &tenant,
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.clone()),
            // New traces are not kept; a caller's sampled trace is.
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off".to_owned()),
        ],
    );
    provision_as(&f, &tenant, r#"{"tracing": {"sampling-mode": "none"}}"#);
    // The tenant's `none` decides the first command already: the router asks the registry
    // for the tenant before it starts the span, cached or not.
    let quiet = random_hex(32);
    send_command(
        &tenant,
        "nobody",
        "c-1",
        &format!("00-{quiet}-{}-01", random_hex(16)),
    );
    let response = read_matching(&format!("hono.command_response.{tenant}"), "c-1");
    assert!(response["traceparent"].contains(&quiet), "{response:?}");
    assert!(
        response["traceparent"].ends_with("-00"),
        "not sampled: {response:?}"
    );
    // An upload without a trace context starts a trace the sampler does not keep.
    let (code, body) = curl(&[
        "-u",
        &format!("sensor@{tenant}:dev-secret"),
        "--data-binary",
        "1",
        &format!("{}/telemetry", f.http),
    ]);
    assert_eq!(code, 202, "{body}");
    let record = topic_headers(&format!("hono.telemetry.{tenant}"));
    let upload = record["traceparent"].clone();
    assert!(upload.ends_with("-00"), "not sampled: {record:?}");
    // Anything kept would have been exported within the batch interval.
    std::thread::sleep(std::time::Duration::from_secs(6));
    assert!(otlp.trace(&quiet).is_empty(), "{:#?}", otlp.trace(&quiet));
    let upload_trace = upload.split('-').nth(1).unwrap();
    assert!(otlp.trace(upload_trace).is_empty());
    f.stop();
}

/// The headers of the record of `topic` whose `correlation-id` is `correlation_id`.
fn read_matching(topic: &str, correlation_id: &str) -> std::collections::HashMap<String, String> {
    let start = std::time::Instant::now();
    loop {
        let found = all_topic_headers(topic)
            .into_iter()
            .find(|h| h.get("correlation-id").map(String::as_str) == Some(correlation_id));
        if let Some(h) = found {
            return h;
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "no record {correlation_id} in {topic}"
        );
    }
}

/// The spans of one command's trace, once all three arrived: the router's `route command`
/// under the application's span `app_span`, the gateway's `deliver command` under it, and the
/// `upload command response` under that; `response` (the application's view of the response)
/// carries the last one's context.
fn command_chain(
    otlp: &OtlpReceiver,
    trace_id: &str,
    app_span: &str,
    response: &Value,
) -> [ReceivedSpan; 3] {
    let spans = otlp.wait_for(trace_id, |spans| {
        span_of(spans, "ferrule-command-router", "route command").is_some()
            && span_of(spans, "ferrule-gateway", "deliver command").is_some()
            && span_of(spans, "ferrule-gateway", "upload command response").is_some()
    });
    let route = span_of(&spans, "ferrule-command-router", "route command").unwrap();
    assert_eq!(
        route.parent_span_id, app_span,
        "under the application's span"
    );
    let deliver = span_of(&spans, "ferrule-gateway", "deliver command").unwrap();
    assert_eq!(
        deliver.parent_span_id, route.span_id,
        "under the router's span"
    );
    let upload = span_of(&spans, "ferrule-gateway", "upload command response").unwrap();
    assert_eq!(
        upload.parent_span_id, deliver.span_id,
        "the response continues it"
    );
    assert_eq!(
        response["traceparent"].as_str().unwrap_or_default(),
        format!("00-{trace_id}-{}-01", upload.span_id),
        "{response}"
    );
    [route.clone(), deliver.clone(), upload.clone()]
}

/// A Kafka application (confluent-kafka) sends a request/response command with a
/// `traceparent` to an MQTT device (paho-mqtt) that answers it: the router's span is under
/// the application's, the gateway's delivery span under the router's, the response upload
/// under the delivery, and the response record carries the trace to the application.
#[test]
fn a_commands_trace_goes_through_router_and_gateway_and_back_on_the_response() {
    let otlp = OtlpReceiver::start();
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let f = Ferrule::start_for_commands_with(
        &tenant,
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.clone()),
            ("FERRULE_KAFKA__STATISTICS_INTERVAL_MS", "300".to_owned()),
        ],
    );
    f.admin_ok("POST", &format!("/v1/tenants/{tenant}"), "{}");
    f.admin_ok("POST", &format!("/v1/devices/{tenant}/lamp"), "{}");
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/lamp"),
        r#"[{"type": "hashed-password", "auth-id": "lamp", "secrets": [{"pwd-plain": "lamp-secret"}]}]"#,
    );
    let (trace_id, app_span) = (random_hex(32), random_hex(16));
    let timeout = SCRIPT_SECS.to_string();
    let mut application = Script::spawn(
        "kafka_application.py",
        &kafka_python(),
        &[
            &kafka(),
            &tenant,
            "lamp",
            &timeout,
            "",
            &format!("00-{trace_id}-{app_span}-01"),
        ],
    );
    application.expect("ready", "the application did not start");
    let (host, port) = f.mqtt.split_once(':').unwrap();
    let mut device = Script::spawn(
        "mqtt_device.py",
        DEBIAN_PYTHON,
        &[
            host,
            port,
            &format!("lamp@{tenant}"),
            "lamp-secret",
            &timeout,
        ],
    );
    device.expect("subscribed", "the MQTT device did not subscribe");
    device.expect("command", "the MQTT device got no command");
    let answer = device.expect("responded", "the MQTT device could not answer");
    let sent = application.expect("command", "the application sent no command");
    let response = application.expect("response", "the application got no response");
    assert_eq!(response["status"], 200, "{response}");
    device.finish();
    application.finish();

    let [route, deliver, upload] = command_chain(&otlp, &trace_id, &app_span, &response);
    assert_eq!(route.attributes["device_id"], "lamp");
    assert_eq!(route.attributes["outcome"], "forwarded");
    assert_eq!(route.events, ["resolved"], "{route:#?}");
    assert_eq!(route.error, None);
    assert_eq!(deliver.attributes["subject"], "setBrightness");
    // It ends when the device acknowledged the command (MQTT PUBACK).
    assert_eq!(deliver.events, ["delivered"], "{deliver:#?}");
    assert_eq!(deliver.error, None);
    assert_eq!(upload.attributes["status"], "200");

    // The same traffic in the metrics: Hono's command series of the gateway, the router's
    // own, how long the device's connection lasted, and librdkafka's statistics (reported
    // every 300 ms here) — the router's group has read every command.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let (_, metrics) = curl(&[&format!("{}/metrics", f.health)]);
    let t = tenant.as_str();
    let count = |name: &str, labels: &[(&str, &str)]| metric(&metrics, name, labels);
    let command = |direction| {
        count(
            "hono_command_processing_duration_seconds_count",
            &[
                ("component_name", "hono-mqtt"),
                ("tenant", t),
                ("direction", direction),
                ("status", "forwarded"),
            ],
        )
    };
    assert_eq!(command("request"), Some(1.0), "{metrics}");
    assert_eq!(command("response"), Some(1.0), "{metrics}");
    // The command's and the response's payload sizes, in bytes.
    let bytes = |direction: &str, payload: &Value| {
        let labels = [("tenant", t), ("direction", direction)];
        let n = count("hono_command_payload_bytes_count", &labels);
        assert_eq!(n, Some(1.0), "{direction}: {metrics}");
        let size = payload.as_str().unwrap().len() as f64;
        assert_eq!(
            count("hono_command_payload_bytes_sum", &labels),
            Some(size),
            "{payload}"
        );
    };
    bytes("request", &sent["payload"]);
    bytes("response", &answer["payload"]);
    assert_eq!(
        count("ferrule_router_commands_consumed_total", &[("tenant", t)]),
        Some(1.0)
    );
    assert_eq!(
        count("ferrule_router_commands_forwarded_total", &[("tenant", t)]),
        Some(1.0)
    );
    assert!(count("ferrule_router_routing_lookup_duration_seconds_count", &[]) >= Some(1.0));
    assert_eq!(
        count(
            "hono_connections_authenticated_duration_seconds_count",
            &[("component_name", "hono-mqtt"), ("tenant", t)]
        ),
        Some(1.0),
        "the device left: {metrics}"
    );
    let command_topic = format!("hono.command.{tenant}");
    assert_eq!(
        count("ferrule_kafka_consumer_lag", &[("topic", &command_topic)]),
        Some(0.0),
        "{metrics}"
    );
    // Per client; a producer's round trips of an idle interval are 0, a consumer's fetches
    // take a while.
    for client in ["gateway", "command-router", "gateway-commands"] {
        let rtt = count(
            "ferrule_kafka_broker_rtt_microseconds",
            &[("client", client), ("quantile", "0.99")],
        );
        assert!(rtt.is_some(), "{client}: {metrics}");
        // No request to the broker failed in this run.
        for kind in ["tx", "rx", "timeout"] {
            let errors = &[("client", client), ("kind", kind)];
            assert_eq!(count("ferrule_kafka_broker_errors", errors), Some(0.0));
        }
    }
    let fetches = count(
        "ferrule_kafka_broker_rtt_microseconds",
        &[("client", "gateway-commands"), ("quantile", "0.99")],
    );
    assert!(fetches.is_some_and(|us| us > 0.0), "{metrics}");
    // Everything was sent and read: the queues are empty.
    for client in ["gateway", "command-router", "gateway-commands"] {
        let queued = count("ferrule_kafka_client_queue_messages", &[("client", client)]);
        assert_eq!(queued, Some(0.0), "{client}: {metrics}");
    }
    f.stop();
}

/// The same over AMQP: a Qpid Proton application's command carries its `traceparent` as an
/// application property; the bridge hands it on as the Kafka header, the router's and the
/// gateway's spans continue it, and the AMQP response carries the response upload's span.
#[test]
fn an_amqp_commands_trace_goes_through_router_and_gateway_and_back() {
    let otlp = OtlpReceiver::start();
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.clone())];
    let f = Ferrule::start_for_commands_with(&tenant, "", &env);
    provision_as(&f, &tenant, "{}");
    let (host, port) = f.mqtt.split_once(':').unwrap();
    let timeout = SCRIPT_SECS.to_string();
    let user = format!("sensor@{tenant}");
    let mut device = Script::spawn(
        "mqtt_device.py",
        DEBIAN_PYTHON,
        &[host, port, &user, "dev-secret", &timeout],
    );
    device.expect("subscribed", "the MQTT device did not subscribe");
    let (trace_id, app_span) = (random_hex(32), random_hex(16));
    let out = Command::new(PYTHON)
        .args([
            &format!("{}/tests/amqp/command.py", env!("CARGO_MANIFEST_DIR")),
            &f.amqp,
            &format!("app@{tenant}"),
            "app-secret",
            &tenant,
            "sensor",
            "20",
            &format!("00-{trace_id}-{app_span}-01"),
        ])
        .output()
        .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let response = lines
        .iter()
        .find(|l| l.get("status").is_some())
        .unwrap_or_else(|| panic!("no response: {lines:?} {out:?}"));
    assert_eq!(response["status"], 200, "{response}");
    device.finish();

    command_chain(&otlp, &trace_id, &app_span, response);
    f.stop();
}

/// Every protocol's upload has its span, made by the one pipeline: HTTP continues the
/// device's `traceparent` header and hands its own on in the Kafka record; CoAP (Hono defines
/// no option for a trace context) starts a trace per upload.
#[test]
fn http_and_coap_uploads_have_their_spans() {
    let (otlp, f) = traced("OTEL_EXPORTER_OTLP_ENDPOINT");
    let tenant = provision(
        &f,
        r#"{"adapters": [{"type": "hono-http", "enabled": true},
                         {"type": "hono-coap", "enabled": true,
                          "device-authentication-required": false}]}"#,
    );
    let (trace_id, device_span) = (random_hex(32), random_hex(16));
    let (code, body) = curl(&[
        "-u",
        &format!("sensor@{tenant}:dev-secret"),
        "-H",
        &format!("traceparent: 00-{trace_id}-{device_span}-01"),
        "-H",
        "content-type: text/plain",
        "--data-binary",
        "21.5",
        &format!("{}/event", f.http),
    ]);
    assert_eq!(code, 202, "{body}");
    let spans = otlp.wait_for(&trace_id, |s| !s.is_empty());
    let upload = &spans[0];
    assert_eq!(upload.service, "ferrule-gateway");
    assert_eq!(upload.name, "upload event");
    assert_eq!(upload.parent_span_id, device_span);
    assert_eq!(upload.attributes["component_name"], "hono-http");
    assert_eq!(upload.attributes["tenant_id"], tenant);
    assert_eq!(
        upload.attributes["messaging.destination.name"],
        format!("hono.event.{tenant}")
    );
    // The record carries the upload span's context.
    let record = topic_headers(&format!("hono.event.{tenant}"));
    assert_eq!(
        record.get("traceparent").map(String::as_str),
        Some(format!("00-{trace_id}-{}-01", upload.span_id).as_str())
    );
    // HTTP authenticates each request: the span starts before, and says when it was done.
    assert_eq!(
        upload.events,
        ["authenticated", "authorised", "produced", "acknowledged"],
        "{upload:#?}"
    );
    // A Proton application takes the event: the bridge's span has its disposition.
    let received = Command::new(PYTHON)
        .args([
            &format!("{}/tests/amqp/receive.py", env!("CARGO_MANIFEST_DIR")),
            &f.amqp,
            &format!("app@{tenant}"),
            "app-secret",
            &format!("event/{tenant}"),
            "1",
            "25",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&received.stdout).contains("21.5"),
        "{received:?}"
    );
    let spans = otlp.wait_for(&trace_id, |s| s.len() == 2);
    let delivery = span_of(&spans, "ferrule-bridge", "deliver event").unwrap();
    assert_eq!(delivery.parent_span_id, upload.span_id);
    assert_eq!(delivery.attributes["disposition"], "accepted");
    assert_eq!(delivery.error, None);

    // A wrong password is refused before the pipeline: a span of its own, all the same.
    let (refused, device_span) = (random_hex(32), random_hex(16));
    let (code, _) = curl(&[
        "-u",
        &format!("sensor@{tenant}:wrong"),
        "-H",
        &format!("traceparent: 00-{refused}-{device_span}-01"),
        "--data-binary",
        "x",
        &format!("{}/telemetry", f.http),
    ]);
    assert_eq!(code, 401);
    let spans = otlp.wait_for(&refused, |s| !s.is_empty());
    assert_eq!(spans[0].name, "upload telemetry");
    assert_eq!(spans[0].parent_span_id, device_span);
    assert_eq!(spans[0].attributes["component_name"], "hono-http");
    assert!(spans[0].error.is_some(), "{spans:#?}");

    let out = Command::new("coap-client-notls")
        .args([
            "-m",
            "put",
            "-e",
            "22.5",
            &format!("coap://{}/telemetry/{tenant}/sensor", f.coap),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let coap = otlp.wait_for_span(|s| {
        s.attributes.get("component_name").map(String::as_str) == Some("hono-coap")
            && s.attributes.get("tenant_id") == Some(&tenant)
    });
    assert_eq!(coap.name, "upload telemetry");
    assert_eq!(coap.parent_span_id, "", "a trace of its own");
    assert_eq!(coap.attributes["device_id"], "sensor");
    // Unauthenticated: no authentication step; confirmable, so acknowledged by the broker.
    assert_eq!(coap.events, ["authorised", "produced", "acknowledged"]);

    // Over DTLS the device authenticates in the handshake, with its pre-shared key.
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/sensor"),
        r#"[{"type": "psk", "auth-id": "sensor-psk", "secrets": [{"key": "azE="}]}]"#,
    );
    let out = Command::new("coap-client-openssl")
        .args(["-u", &format!("sensor-psk@{tenant}"), "-k", "k1"])
        .args(["-m", "post", "-e", "23.5"])
        .arg(format!("coaps://{}/telemetry", f.coaps))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let handshake = otlp.wait_for_span(|s| {
        s.name == "DTLS handshake" && s.attributes.get("tenant_id") == Some(&tenant)
    });
    assert_eq!(handshake.attributes["component_name"], "hono-coap");
    assert_eq!(handshake.attributes["auth_id"], "sensor-psk");
    assert_eq!(handshake.events, ["authenticated", "authorised"]);
    let upload = otlp.wait_for_span(|s| {
        s.attributes.get("auth_id").map(String::as_str) == Some("sensor-psk")
            && s.name == "upload telemetry"
    });
    assert_eq!(upload.events, ["authorised", "produced", "acknowledged"]);
    f.stop();
}

/// The headers of the first record of `topic`, read from its start.
fn topic_headers(topic: &str) -> std::collections::HashMap<String, String> {
    let start = std::time::Instant::now();
    loop {
        if let Some(h) = all_topic_headers(topic).into_iter().next() {
            return h;
        }
        assert!(start.elapsed().as_secs() < 20, "no record in {topic}");
    }
}

/// The headers of every record of `topic` that arrives within a second of reading it from its
/// start (or of the last one).
fn all_topic_headers(topic: &str) -> Vec<std::collections::HashMap<String, String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut all = Vec::new();
    let mut last = std::time::Instant::now();
    while last.elapsed() < std::time::Duration::from_secs(1) {
        if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                            (h.key.to_owned(), v.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            all.push(headers);
            last = std::time::Instant::now();
        }
    }
    all
}
