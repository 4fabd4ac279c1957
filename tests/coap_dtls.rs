//! CoAP over DTLS in a `ferrule all` started as a user starts it: sessions held by simulated
//! devices (OpenSSL clients) end when idle, and both CoAP listeners can be switched off.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// The value of the CoAP adapter's series of `metric` for `tenant` (and `outcome`, if given).
fn coap_metric(health: &str, metric: &str, tenant: &str, outcome: Option<&str>) -> Option<f64> {
    let (_, text) = curl(&[&format!("{health}/metrics")]);
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{metric}{{"))
                && l.contains("\"hono-coap\"")
                && l.contains(tenant)
                && outcome.is_none_or(|o| l.contains(&format!("outcome=\"{o}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn idle_dtls_sessions_end_and_the_coap_listeners_switch_off() {
    let mut f = Ferrule::start_with(
        &kafka(),
        &[("FERRULE_GATEWAY__COAP__DTLS_IDLE_TIMEOUT_SECS", "1".into())],
    );
    f.wait_readiness(200);
    let tenant = format!("coap-{}", uuid::Uuid::new_v4().simple());
    f.admin_ok("POST", &format!("/v1/tenants/{tenant}"), "{}");
    f.admin_ok("POST", &format!("/v1/devices/{tenant}/dev"), "{}");
    // base64("k1")
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/dev"),
        r#"[{"type": "psk", "auth-id": "dev", "secrets": [{"key": "azE="}]}]"#,
    );
    let opened = ferrule_loadtest::coap_dtls::open_sessions(
        f.coaps.parse().unwrap(),
        vec![(format!("dev@{tenant}"), b"k1".to_vec())],
        3,
        3,
    )
    .await
    .unwrap();
    assert_eq!(opened.sessions.len(), 3);
    let attempts = coap_metric(
        &f.health,
        "hono_connections_attempts_total",
        &tenant,
        Some("succeeded"),
    );
    assert_eq!(attempts, Some(3.0), "three sessions were established");
    // With the DTLS suite of the sessions (PSK with AES-CCM or AES-GCM, by IANA's name).
    let (_, text) = curl(&[&format!("{}/metrics", f.health)]);
    let suite = metric(
        &text,
        "hono_connections_attempts_total",
        &[("tenant", &tenant), ("outcome", "succeeded")],
    );
    assert_eq!(suite, Some(3.0));
    assert!(
        text.lines()
            .any(|l| l.starts_with("hono_connections_attempts_total{")
                && l.contains(&tenant)
                && l.contains("cipher_suite=\"TLS_PSK_WITH_")),
        "{text}"
    );
    // The devices keep their ends open and say nothing: a second after its last datagram the
    // server ends each session.
    let start = Instant::now();
    // The series exists from the first session on; it must come down to 0.
    while coap_metric(&f.health, "hono_connections_authenticated", &tenant, None) != Some(0.0) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "idle sessions ended after their timeout"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(opened);

    let mut off = Ferrule::start_with(
        &kafka(),
        &[
            ("FERRULE_GATEWAY__COAP__ENABLED", "false".into()),
            ("FERRULE_GATEWAY__COAP__DTLS_ENABLED", "false".into()),
        ],
    );
    off.wait_readiness(200);
    for addr in [&off.coap, &off.coaps] {
        assert!(
            std::net::UdpSocket::bind(addr.as_str()).is_ok(),
            "nothing listens on {addr}"
        );
    }
}
