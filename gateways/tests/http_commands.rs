//! Commands for HTTP devices that long-poll with `hono-ttd` (Hono's `HttpTestBase` ttd
//! checks), and their responses on `/command/res`, with reqwest as the device, an rdkafka
//! producer/consumer as the application, a real command router, PostgreSQL and the broker.

mod common;

use common::*;
use ferrule_gateways::GatewayConfig;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

/// A long poll sent in the background; the answer comes back through the handle.
fn long_poll(req: reqwest::RequestBuilder) -> tokio::task::JoinHandle<reqwest::Response> {
    tokio::spawn(async move { req.send().await.unwrap() })
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Waits for the `n`-th record on the tenant's telemetry topic: the ttd notification an
/// application waits for before it sends a command.
async fn notifications(tenant: &str, n: usize) -> Vec<Record> {
    read(&format!("hono.telemetry.{tenant}"), n).await
}

#[tokio::test]
async fn ttd_without_a_command_answers_202_and_is_capped_by_the_tenant() {
    let p = Platform::start().await;
    let tenant = p
        .tenant(json!({"adapters": [
            {"type": "hono-http", "enabled": true, "ext": {"max-ttd": 2}}
        ]}))
        .await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let started = Instant::now();
    let r = p
        .post("/telemetry?hono-ttd=30")
        .basic_auth(format!("dev@{tenant}"), Some("pw"))
        .header("content-type", "text/plain")
        .body("21.5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(header(&r, "hono-command").is_none());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the request waited for the tenant's max-ttd"
    );
    let records = notifications(&tenant, 1).await;
    assert_eq!(records[0].headers["ttd"], "2", "ttd capped by max-ttd");
    assert_eq!(records[0].payload, b"21.5");
    // Counted once its poll ended without a command (Hono's ttd tag).
    assert_eq!(processed(&tenant, "expired"), Some(1.0));
    assert_eq!(processed(&tenant, "command"), None);
}

/// `hono_telemetry_processing_duration_seconds_count` of `tenant`'s forwarded HTTP uploads
/// with the `ttd` tag `ttd`.
fn processed(tenant: &str, ttd: &str) -> Option<f64> {
    let metrics = prometheus_text();
    metrics
        .lines()
        .find(|l| {
            l.starts_with("hono_telemetry_processing_duration_seconds_count{")
                && l.contains(&format!("tenant=\"{tenant}\""))
                && l.contains("status=\"forwarded\"")
                && l.contains(&format!("ttd=\"{ttd}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn request_response_command_over_http_long_poll() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let poll = long_poll(
        p.post("/telemetry")
            .basic_auth(format!("dev@{tenant}"), Some("pw"))
            .header("hono-ttd", "20")
            .header(
                "content-type",
                "application/vnd.eclipse-hono-empty-notification",
            ),
    );
    let n = notifications(&tenant, 1).await;
    assert_eq!(n[0].headers["ttd"], "20");
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "setVolume"),
            ("content-type", "text/plain"),
            ("response-required", "true"),
            ("correlation-id", "corr/1 2"),
        ],
        "7",
    )
    .await;
    let r = poll.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "hono-command").as_deref(), Some("setVolume"));
    assert_eq!(header(&r, "content-type").as_deref(), Some("text/plain"));
    assert!(
        header(&r, "hono-cmd-target-device").is_none(),
        "only gateways are told the target device"
    );
    let req_id = header(&r, "hono-cmd-req-id").expect("request id");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"7");

    // The response: the status is required.
    let no_status = p
        .post(&format!("/command/res/{req_id}"))
        .basic_auth(format!("dev@{tenant}"), Some("pw"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(no_status.status(), StatusCode::BAD_REQUEST);
    let unknown = p
        .post("/command/res/not-an-id?hono-cmd-status=200")
        .basic_auth(format!("dev@{tenant}"), Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let bad_status = p
        .post(&format!("/command/res/{req_id}?hono-cmd-status=302"))
        .basic_auth(format!("dev@{tenant}"), Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_status.status(), StatusCode::BAD_REQUEST);
    let anonymous = p
        .post(&format!("/command/res/{req_id}?hono-cmd-status=200"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let ok = p
        .post(&format!("/command/res/{req_id}"))
        .basic_auth(format!("dev@{tenant}"), Some("pw"))
        .header("hono-cmd-status", "200")
        .header("content-type", "application/json")
        .body(r#"{"volume":7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    let r = &responses[0];
    assert_eq!(r.key, "dev");
    assert_eq!(r.headers["correlation-id"], "corr/1 2");
    assert_eq!(r.headers["status"], "200");
    assert_eq!(r.headers["device_id"], "dev");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.payload, br#"{"volume":7}"#);
    // The notification counts as an upload that got a command; the command and its
    // response as Hono's command series of the HTTP adapter.
    assert_eq!(processed(&tenant, "command"), Some(1.0));
    let metrics = prometheus_text();
    for direction in ["request", "response"] {
        assert!(
            metrics.lines().any(|l| l
                .starts_with("hono_command_processing_duration_seconds_count{")
                && l.contains("component_name=\"hono-http\"")
                && l.contains(&format!("tenant=\"{tenant}\""))
                && l.contains(&format!("direction=\"{direction}\""))
                && l.contains("status=\"forwarded\"")
                && l.ends_with(" 1")),
            "{direction}: {metrics}"
        );
    }
}

#[tokio::test]
async fn one_way_command_over_http_long_poll() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let poll = long_poll(
        p.post("/event?hono-ttd=20")
            .basic_auth(format!("dev@{tenant}"), Some("pw"))
            .header("content-type", "text/plain")
            .body("door open"),
    );
    read(&format!("hono.event.{tenant}"), 1).await;
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "lock")],
        "",
    )
    .await;
    let r = poll.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "hono-command").as_deref(), Some("lock"));
    assert!(
        header(&r, "hono-cmd-req-id").is_none(),
        "one-way: nothing to answer"
    );
}

#[tokio::test]
async fn gateway_long_polls_for_one_device_and_for_all_its_devices() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "gw", json!({})).await;
    p.device(&tenant, "edge", json!({"via": ["gw"]})).await;
    p.device(&tenant, "stranger", json!({})).await;
    let _router = start_router(&tenant).await;
    let gw = format!("gw@{tenant}");

    // A gateway may not poll for a device outside its `via`.
    let r = p
        .put(&format!("/telemetry/{tenant}/stranger?hono-ttd=5"))
        .basic_auth(&gw, Some("pw"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // For one device: PUT /telemetry/{tenant}/{device}.
    let poll = long_poll(
        p.put(&format!("/telemetry/{tenant}/edge"))
            .basic_auth(&gw, Some("pw"))
            .header("hono-ttd", "20")
            .header("content-type", "text/plain")
            .body("1"),
    );
    notifications(&tenant, 1).await;
    send_command(
        &tenant,
        "edge",
        &[
            ("device_id", "edge"),
            ("subject", "reset"),
            ("response-required", "true"),
            ("correlation-id", "c-edge"),
        ],
        "now",
    )
    .await;
    let r = poll.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "hono-cmd-target-device").as_deref(),
        Some("edge")
    );
    let req_id = header(&r, "hono-cmd-req-id").unwrap();
    let ok = p
        .put(&format!("/command/res//edge/{req_id}?hono-cmd-status=204"))
        .basic_auth(&gw, Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED, "{:?}", ok.text().await);
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].headers["device_id"], "edge");
    assert_eq!(responses[0].headers["correlation-id"], "c-edge");
    assert_eq!(responses[0].headers["status"], "204");

    // For all its devices: the gateway posts its own telemetry with a ttd.
    let poll = long_poll(
        p.post("/telemetry?hono-ttd=20")
            .basic_auth(&gw, Some("pw"))
            .header("content-type", "text/plain")
            .body("2"),
    );
    // Records of different devices may sit in different partitions: look for the gateway's.
    let n = notifications(&tenant, 2).await;
    let own = n.iter().find(|r| r.headers["device_id"] == "gw");
    assert_eq!(
        own.map(|r| r.headers["ttd"].as_str()),
        Some("20"),
        "the gateway's own notification"
    );
    send_command(
        &tenant,
        "edge",
        &[("device_id", "edge"), ("subject", "blink")],
        "",
    )
    .await;
    let r = poll.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "hono-command").as_deref(), Some("blink"));
    assert_eq!(
        header(&r, "hono-cmd-target-device").as_deref(),
        Some("edge")
    );
}

#[tokio::test]
async fn the_newest_long_poll_of_a_device_gets_the_command() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;
    let poll = |body: &'static str| {
        long_poll(
            p.post("/telemetry?hono-ttd=20")
                .basic_auth(format!("dev@{tenant}"), Some("pw"))
                .header("content-type", "text/plain")
                .body(body),
        )
    };
    let first = poll("first");
    notifications(&tenant, 1).await;
    let started = Instant::now();
    let second = poll("second");
    // The older request is answered as soon as the newer one took over.
    let r = first.await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(started.elapsed() < Duration::from_secs(15));
    notifications(&tenant, 2).await;
    send_command(
        &tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "ping")],
        "",
    )
    .await;
    let r = second.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "hono-command").as_deref(), Some("ping"));
}

#[tokio::test]
async fn unanswered_and_undeliverable_commands_get_503_responses() {
    let p = Platform::start_with(GatewayConfig {
        command_response_timeout_secs: 1,
        ..GatewayConfig::default()
    })
    .await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let _router = start_router(&tenant).await;

    // Nobody polls: the router answers 503 right away.
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "noone"),
            ("response-required", "true"),
            ("correlation-id", "c-offline"),
        ],
        "",
    )
    .await;
    let responses = read(&format!("hono.command_response.{tenant}"), 1).await;
    assert_eq!(responses[0].headers["correlation-id"], "c-offline");
    assert_eq!(responses[0].headers["status"], "503");

    // Delivered, but the device never answers: 503 after the response timeout.
    let poll = long_poll(
        p.post("/telemetry?hono-ttd=20")
            .basic_auth(format!("dev@{tenant}"), Some("pw"))
            .header("content-type", "text/plain")
            .body("x"),
    );
    notifications(&tenant, 1).await;
    send_command(
        &tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "ignored"),
            ("response-required", "true"),
            ("correlation-id", "c-timeout"),
        ],
        "",
    )
    .await;
    let r = poll.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let req_id = header(&r, "hono-cmd-req-id").unwrap();
    // The router answers at least once: the first 503 may have come twice.
    let timeout = read_matching(&format!("hono.command_response.{tenant}"), |r| {
        r.headers["correlation-id"] == "c-timeout"
    })
    .await;
    assert_eq!(timeout.headers["status"], "503");
    assert_eq!(
        timeout.headers["content-type"],
        "application/vnd.eclipse-hono-delivery-failure-notification+json"
    );
    // A late answer is refused: the application no longer waits.
    let late = p
        .post(&format!("/command/res/{req_id}?hono-cmd-status=200"))
        .basic_auth(format!("dev@{tenant}"), Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), StatusCode::SERVICE_UNAVAILABLE);
    let all = read(&format!("hono.command_response.{tenant}"), 2).await;
    assert!(
        all.iter().all(|r| r.headers["status"] == "503"),
        "the late answer was not written: {all:?}"
    );
}
