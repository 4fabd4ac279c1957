//! CoAP over DTLS in a `ferrule all` started as a user starts it: sessions held by simulated
//! devices (OpenSSL clients) end when idle, and both CoAP listeners can be switched off.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// `hono_connections_authenticated` of the CoAP adapter for `tenant`.
fn coap_connections(health: &str, tenant: &str) -> f64 {
    let (_, text) = curl(&[&format!("{health}/metrics")]);
    text.lines()
        .find(|l| {
            l.starts_with("hono_connections_authenticated{")
                && l.contains("\"hono-coap\"")
                && l.contains(tenant)
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
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
    let start = Instant::now();
    while coap_connections(&f.health, &tenant) != 3.0 {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "three sessions held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The devices keep their ends open and say nothing: after 1 s the server ends them.
    while coap_connections(&f.health, &tenant) != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
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
