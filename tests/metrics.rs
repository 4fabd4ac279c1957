//! Hono's connection metrics of a running `ferrule all`, read from `/metrics` while known
//! MQTT clients (mosquitto) are connected and after they left: each platform is this test's
//! own, so the values are exact.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A mosquitto client that stays connected, subscribed to `topic`.
fn subscriber(f: &Ferrule, credentials: Option<(&str, &str)>, topic: &str) -> Child {
    let (host, port) = f.mqtt.split_once(':').unwrap();
    let mut c = Command::new("mosquitto_sub");
    c.args(["-h", host, "-p", port, "-V", "mqttv311", "-t", topic]);
    if let Some((user, password)) = credentials {
        c.args(["-u", user, "-P", password]);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto-clients is installed")
}

fn metrics(f: &Ferrule) -> String {
    curl(&[&format!("{}/metrics", f.health)]).1
}

#[test]
fn connections_are_counted_while_open_and_timed_when_closed() {
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    f.admin_ok(
        "POST",
        &format!("/v1/tenants/{tenant}"),
        r#"{"adapters": [{"type": "hono-mqtt", "enabled": true,
                          "device-authentication-required": false}]}"#,
    );
    f.admin_ok("POST", &format!("/v1/devices/{tenant}/sensor"), "{}");
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/sensor"),
        r#"[{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"pwd-plain": "dev-secret"}]}]"#,
    );
    let mqtt = [("component_name", "hono-mqtt")];
    let of_tenant = [("component_name", "hono-mqtt"), ("tenant", tenant.as_str())];
    f.wait_for_metric("hono_connections_unauthenticated", &mqtt, 0.0);

    // Two devices without credentials, one with.
    let anonymous_topic = format!("command/{tenant}/sensor/req/#");
    let mut anonymous = [
        subscriber(&f, None, &anonymous_topic),
        subscriber(&f, None, &anonymous_topic),
    ];
    let user = format!("sensor@{tenant}");
    let mut device = subscriber(&f, Some((&user, "dev-secret")), "command///req/#");
    f.wait_for_metric("hono_connections_unauthenticated", &mqtt, 2.0);
    f.wait_for_metric("hono_connections_authenticated", &of_tenant, 1.0);
    let attempts = "hono_connections_attempts_total";
    let succeeded = [of_tenant[0], of_tenant[1], ("outcome", "succeeded")];
    f.wait_for_metric(attempts, &succeeded, 1.0);
    // A wrong password is an attempt of the tenant that failed, and no connection.
    let refused = Command::new("mosquitto_pub")
        .args(["-h", f.mqtt.split_once(':').unwrap().0])
        .args(["-p", f.mqtt.split_once(':').unwrap().1])
        .args(["-u", &user, "-P", "wrong", "-t", "telemetry", "-m", "x"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let unauthorized = [of_tenant[0], of_tenant[1], ("outcome", "unauthorized")];
    f.wait_for_metric(attempts, &unauthorized, 1.0);
    f.wait_for_metric("hono_connections_authenticated", &of_tenant, 1.0);
    let duration = "hono_connections_authenticated_duration_seconds_count";
    let timed = metric(&metrics(&f), duration, &of_tenant);
    assert_eq!(timed.unwrap_or(0.0), 0.0, "nothing closed yet");

    for c in &mut anonymous {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    f.wait_for_metric("hono_connections_unauthenticated", &mqtt, 0.0);
    std::thread::sleep(Duration::from_millis(500));
    device.kill().unwrap();
    device.wait().unwrap();
    f.wait_for_metric("hono_connections_authenticated", &of_tenant, 0.0);
    // Timed when it closed: one connection, open at least the half second above.
    f.wait_for_metric(duration, &of_tenant, 1.0);
    let sum = metric(
        &metrics(&f),
        "hono_connections_authenticated_duration_seconds_sum",
        &of_tenant,
    )
    .unwrap();
    assert!(sum >= 0.5, "{sum}");
    f.stop();
}
