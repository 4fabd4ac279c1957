//! Port of Hono's `HttpTestBase`, `TelemetryHttpIT`, `EventHttpIT` and `CorsIT` checklists
//! (without command & control): curl-like requests with reqwest against the real adapter,
//! records read back from the real broker.

mod common;

use common::*;
use ferrule_gateways::GatewayConfig;
use reqwest::StatusCode;
use serde_json::json;

fn user(device: &str, tenant: &str) -> String {
    format!("{device}@{tenant}")
}

#[tokio::test]
async fn telemetry_qos0_and_qos1_reach_kafka_with_hono_headers() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let r = p
        .post("/telemetry")
        .basic_auth(user("dev", &tenant), Some("pw"))
        .header("content-type", "application/json")
        .body(r#"{"temp": 5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = p
        .post("/telemetry")
        .basic_auth(user("dev", &tenant), Some("pw"))
        .header("QoS-Level", "1")
        .body("raw")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    assert_eq!(records.len(), 2);
    let (json_rec, raw_rec) = if records[0].payload == br#"{"temp": 5}"# {
        (&records[0], &records[1])
    } else {
        (&records[1], &records[0])
    };
    assert_eq!(json_rec.key, "dev");
    assert_eq!(json_rec.headers["device_id"], "dev");
    assert_eq!(json_rec.headers["content-type"], "application/json");
    assert_eq!(json_rec.headers["qos"], "0");
    assert_eq!(json_rec.headers["orig_adapter"], "hono-http");
    assert_eq!(json_rec.headers["orig_address"], "/telemetry");
    assert!(json_rec.headers["creation-time"].parse::<i64>().unwrap() > 1_700_000_000_000);
    assert_eq!(raw_rec.payload, b"raw");
    assert_eq!(raw_rec.headers["qos"], "1");
    assert_eq!(raw_rec.headers["content-type"], "application/octet-stream");
}

#[tokio::test]
async fn events_are_qos1_carry_ttl_and_refuse_qos0() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({"resource-limits": {"max-ttl": 30}})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let send = |ttl: Option<&'static str>, qos: Option<&'static str>| {
        let mut req = p
            .post("/event")
            .basic_auth(user("dev", &tenant), Some("pw"))
            .header("content-type", "text/plain")
            .body("alarm");
        if let Some(t) = ttl {
            req = req.header("hono-ttl", t);
        }
        if let Some(q) = qos {
            req = req.header("qos-level", q);
        }
        req.send()
    };
    assert_eq!(
        send(Some("10"), None).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(Some("100"), Some("1")).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(None, Some("0")).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(None, Some("2")).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );

    let mut ttls: Vec<String> = read(&format!("hono.event.{tenant}"), 2)
        .await
        .iter()
        .map(|r| {
            assert_eq!(r.headers["qos"], "1");
            r.headers["ttl"].clone()
        })
        .collect();
    ttls.sort();
    assert_eq!(
        ttls,
        vec!["10000", "30000"],
        "the device's ttl, capped by the tenant's max-ttl"
    );
}

#[tokio::test]
async fn content_type_and_empty_payload_rules() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let post = |ct: Option<&'static str>, body: &'static str| {
        let mut req = p
            .post("/telemetry")
            .basic_auth(user("dev", &tenant), Some("pw"))
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    assert_eq!(
        post(Some("application/x-custom"), "")
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post(None, "").await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(Some("application/vnd.eclipse-hono-empty-notification"), "x")
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    let records = read(&format!("hono.telemetry.{tenant}"), 1).await;
    assert_eq!(records.len(), 1, "refused messages never reach Kafka");
    assert_eq!(records[0].headers["content-type"], "application/x-custom");
    assert!(records[0].payload.is_empty());
}

#[tokio::test]
async fn authentication_failures() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let cases = [
        (
            Some((user("dev", &tenant), "wrong")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some((user("dev", &random_id("no-tenant")), "pw")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some((user("nobody", &tenant), "pw")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(("no-at-sign".to_owned(), "pw")),
            StatusCode::UNAUTHORIZED,
        ),
        (None, StatusCode::UNAUTHORIZED),
    ];
    for (creds, want) in cases {
        let mut req = p
            .post("/telemetry")
            .header("content-type", "text/plain")
            .body("x");
        if let Some((u, pw)) = &creds {
            req = req.basic_auth(u, Some(pw));
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), want, "{creds:?}");
        let challenge = r.headers()["www-authenticate"].to_str().unwrap();
        assert_eq!(challenge, "Basic realm=\"Hono\"");
    }
}

#[tokio::test]
async fn adapter_tenant_and_device_state_is_enforced() {
    let p = Platform::start().await;
    let tenant = p
        .tenant(json!({"adapters": [{"type": "hono-mqtt", "enabled": true}]}))
        .await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let send = || {
        p.post("/telemetry")
            .basic_auth(user("dev", &tenant), Some("pw"))
            .header("content-type", "text/plain")
            .body("x")
            .send()
    };
    assert_eq!(
        send().await.unwrap().status(),
        StatusCode::FORBIDDEN,
        "adapter disabled"
    );
    p.update_tenant(
        &tenant,
        json!({"adapters": [{"type": "hono-http", "enabled": true}]}),
    )
    .await;
    eventually(StatusCode::ACCEPTED, send).await;
    p.update_device(&tenant, "dev", json!({"enabled": false}))
        .await;
    eventually(StatusCode::NOT_FOUND, send).await;
    p.update_device(&tenant, "dev", json!({})).await;
    eventually(StatusCode::ACCEPTED, send).await;
    p.update_tenant(&tenant, json!({"enabled": false})).await;
    eventually(StatusCode::FORBIDDEN, send).await;
}

#[tokio::test]
async fn gateways_act_only_for_their_devices() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "gw", json!({})).await;
    p.device_with_password(&tenant, "grouped-gw", json!({"memberOf": ["group-1"]}))
        .await;
    p.device(
        &tenant,
        "behind",
        json!({"via": ["gw"], "viaGroups": ["group-1"]}),
    )
    .await;
    p.device(&tenant, "elsewhere", json!({"via": ["other-gw"]}))
        .await;
    let put = |path: String, gw: &'static str| {
        p.put(&path)
            .basic_auth(user(gw, &tenant), Some("pw"))
            .header("content-type", "text/plain")
            .body(format!("via {gw}"))
            .send()
    };
    assert_eq!(
        put(format!("/telemetry/{tenant}/behind"), "gw")
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        put("/event//behind".into(), "gw").await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        put("/telemetry//behind".into(), "grouped-gw")
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        put("/telemetry//elsewhere".into(), "gw")
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        put("/telemetry//missing".into(), "gw")
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let other_tenant = p.tenant(json!({})).await;
    p.device(&other_tenant, "behind", json!({"via": ["gw"]}))
        .await;
    assert_eq!(
        put(format!("/telemetry/{other_tenant}/behind"), "gw")
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN,
        "a gateway never reaches another tenant"
    );
    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r.key, "behind");
        assert_eq!(
            r.headers["device_id"], "behind",
            "the record names the device, not the gateway"
        );
    }
    let events = read(&format!("hono.event.{tenant}"), 1).await;
    assert_eq!(events[0].headers["orig_address"], "/event//behind");

    // A disabled gateway may not act any more (403), a disabled device not send (404).
    p.update_device(&tenant, "gw", json!({"enabled": false}))
        .await;
    eventually(StatusCode::FORBIDDEN, || {
        put("/telemetry//behind".into(), "gw")
    })
    .await;
    let own = || {
        p.post("/telemetry")
            .basic_auth(user("gw", &tenant), Some("pw"))
            .header("content-type", "text/plain")
            .body("own")
            .send()
    };
    eventually(StatusCode::NOT_FOUND, own).await;
}

#[tokio::test]
async fn unauthenticated_uploads_only_where_the_tenant_allows() {
    let p = Platform::start().await;
    let open = p
        .tenant(json!({"adapters": [{"type": "hono-http", "enabled": true,
                                      "device-authentication-required": false}]}))
        .await;
    p.device(&open, "dev", json!({})).await;
    let closed = p.tenant(json!({})).await;
    p.device(&closed, "dev", json!({})).await;
    let put = |t: &str| {
        p.put(&format!("/telemetry/{t}/dev"))
            .header("content-type", "text/plain")
            .body("anon")
            .send()
    };
    assert_eq!(put(&open).await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(
        put(&closed).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(read(&format!("hono.telemetry.{open}"), 1).await.len(), 1);
}

#[tokio::test]
async fn oversized_payload_is_413() {
    let p = Platform::start_with(GatewayConfig {
        max_payload_size: 100,
        ..Default::default()
    })
    .await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let r = p
        .post("/telemetry")
        .basic_auth(user("dev", &tenant), Some("pw"))
        .body(vec![b'x'; 101])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = p
        .post("/telemetry")
        .basic_auth(user("dev", &tenant), Some("pw"))
        .body(vec![b'x'; 100])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn cors_preflight() {
    let p = Platform::start().await;
    for (method, path) in [
        ("POST", "/telemetry"),
        ("POST", "/event"),
        ("PUT", "/telemetry/t/d"),
        ("PUT", "/event/t/d"),
    ] {
        let r = p
            .client
            .request(reqwest::Method::OPTIONS, format!("{}{path}", p.http))
            .header("origin", "http://hono.eclipse.org")
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type, qos-level",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "*");
        assert!(
            h["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains(method)
        );
        let allowed = h["access-control-allow-headers"].to_str().unwrap();
        for name in [
            "authorization",
            "content-type",
            "qos-level",
            "hono-ttd",
            "hono-cmd-status",
        ] {
            assert!(allowed.contains(name), "{allowed}");
        }
    }
}

#[tokio::test]
async fn ttd_defaults_and_retain_free_headers() {
    // The configured cap applies to tenants without a max-ttd of their own; small, because
    // the request waits that long for a command.
    let p = Platform::start_with(GatewayConfig {
        http: ferrule_gateways::http::HttpConfig {
            max_ttd_secs: 3,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let tenant = p
        .tenant(json!({"defaults": {"content-type": "text/tenant", "site": "north"}}))
        .await;
    p.device_with_password(
        &tenant,
        "dev",
        json!({"defaults": {"site": "south", "ttl-telemetry-qos0": 5}}),
    )
    .await;
    let r = p
        .post("/telemetry?hono-ttd=100")
        .basic_auth(user("dev", &tenant), Some("pw"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let rec = &read(&format!("hono.telemetry.{tenant}"), 1).await[0];
    assert_eq!(
        rec.headers["ttd"], "3",
        "ttd is capped at the configured max-ttd"
    );
    assert_eq!(rec.headers["content-type"], "text/tenant");
    assert_eq!(
        rec.headers["site"], "south",
        "device defaults beat tenant defaults"
    );
    assert_eq!(rec.headers["ttl"], "5000");
    assert!(!rec.headers.contains_key("ttl-telemetry-qos0"));
    assert!(!rec.headers.contains_key("x-opt-retain"));
    assert_eq!(
        rec.headers["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "the trace context travels in a Kafka header"
    );
    // Hono's metric names, with the tenant as a label; the upload waited for a command that
    // never came (Hono's ttd tag).
    let metrics = prometheus_text();
    assert!(
        metrics.contains(&format!("hono_telemetry_processing_duration_seconds_count{{component_name=\"hono-http\",component_type=\"adapter\",qos=\"0\",status=\"forwarded\",tenant=\"{tenant}\",ttd=\"expired\",type=\"telemetry\"}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("hono_telemetry_payload_bytes_count{{component_name=\"hono-http\",component_type=\"adapter\",status=\"forwarded\",tenant=\"{tenant}\",type=\"telemetry\"}} 1")));
}

#[tokio::test]
async fn per_device_order_of_10k_messages() {
    let p = Platform::start().await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let n = 10_000;
    for i in 0..n {
        let r = p
            .post("/telemetry")
            .basic_auth(user("dev", &tenant), Some("pw"))
            .header("content-type", "text/plain")
            .body(i.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let records = read(&format!("hono.telemetry.{tenant}"), n).await;
    let seq: Vec<usize> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).parse().unwrap())
        .collect();
    assert_eq!(seq, (0..n).collect::<Vec<_>>());
}

#[tokio::test]
async fn two_tenants_never_see_each_others_data() {
    let p = Platform::start().await;
    let a = p.tenant(json!({})).await;
    let b = p.tenant(json!({})).await;
    p.device_with_password(&a, "dev", json!({})).await;
    p.device_with_password(&b, "dev", json!({})).await;
    // Same device id, same auth-id, different tenants.
    for (t, body) in [(&a, "from-a"), (&b, "from-b")] {
        let r = p
            .post("/telemetry")
            .basic_auth(user("dev", t), Some("pw"))
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    // A's device addressing B's namespace is refused.
    let r = p
        .put(&format!("/telemetry/{b}/dev"))
        .basic_auth(user("dev", &a), Some("pw"))
        .header("content-type", "text/plain")
        .body("sneaky")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let ra = read(&format!("hono.telemetry.{a}"), 1).await;
    let rb = read(&format!("hono.telemetry.{b}"), 1).await;
    assert_eq!(ra.len(), 1);
    assert_eq!(rb.len(), 1);
    assert_eq!(ra[0].payload, b"from-a");
    assert_eq!(rb[0].payload, b"from-b");
}
