//! Graceful shutdown of `ferrule all` under load, as an operator or Kubernetes does it: SIGTERM
//! while a paho-mqtt device publishes QoS 1 telemetry as fast as it is acknowledged. Readiness
//! goes down first while everything still serves; then the listeners close, the publishes
//! already handed to Kafka are acknowledged, and the process exits by itself — with every
//! acknowledged message in Kafka, the device's command consumer unregistered and the instance's
//! internal command topic deleted.

mod common;

use common::*;
use std::collections::HashSet;
use std::time::Duration;

const DEVICE: &str = "pump";
const PASSWORD: &str = "pump-secret";

fn provision(f: &Ferrule, tenant: &str) {
    f.admin_ok("POST", &format!("/v1/tenants/{tenant}"), "{}");
    f.admin_ok("POST", &format!("/v1/devices/{tenant}/{DEVICE}"), "{}");
    let creds = serde_json::json!([{"type": "hashed-password", "auth-id": DEVICE,
        "secrets": [{"pwd-plain": PASSWORD}]}]);
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/{DEVICE}"),
        &creds.to_string(),
    );
}

/// Every record value of `topic` (once each), read until `want` are all seen and a second
/// passed without more.
fn values_in(topic: &str, want: &HashSet<String>) -> HashSet<String> {
    topic_values(&kafka(), topic, want, Duration::from_secs(1))
        .into_iter()
        .collect()
}

#[test]
fn sigterm_under_qos1_load_drains_and_loses_nothing_acknowledged() {
    let tenant = format!("shutdown-{}", uuid::Uuid::new_v4().simple());
    let instance = format!("gw-{}", uuid::Uuid::new_v4().simple());
    let mut f = Ferrule::start_for_commands_with(
        &tenant,
        "",
        &[
            ("FERRULE_GATEWAY__INSTANCE_ID", instance.clone()),
            ("FERRULE_SHUTDOWN__READINESS_DELAY_MS", "1500".into()),
            // Records wait 200 ms for their batch: at the stop, the device's whole window of
            // publishes is with the producer, not yet acknowledged.
            ("FERRULE_KAFKA__LINGER_MS", "200".into()),
        ],
    );
    provision(&f, &tenant);
    let internal = format!("hono.command_internal.{instance}");
    let (host, port) = f.mqtt.split_once(':').unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut device = Script::spawn(
        "mqtt_publisher.py",
        DEBIAN_PYTHON,
        &[
            host,
            port,
            &format!("{DEVICE}@{tenant}"),
            PASSWORD,
            &run,
            "60",
        ],
    );
    device.expect("subscribed", "the device subscribes to its commands");
    device.expect("flowing", "the device's telemetry is acknowledged");
    assert!(
        topic_exists(&kafka(), &internal),
        "the instance's command topic"
    );

    f.terminate();
    // Readiness goes down while the process still serves: an upload is still taken.
    let down = f.wait_readiness(503);
    assert_eq!(down["checks"]["shutdown"]["status"], "DOWN", "{down}");
    let (code, body) = curl(&[
        "-u",
        &format!("{DEVICE}@{tenant}:{PASSWORD}"),
        "-H",
        "content-type: text/plain",
        "-d",
        "during-readiness-delay",
        &format!("{}/event", f.http),
    ]);
    assert_eq!(code, 202, "the HTTP adapter still serves: {body}");

    // Then it drains and exits by itself.
    let status = f.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    let done = device.expect("done", "the device reports what was acknowledged");
    let acked: HashSet<String> = done["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let published = done["published"].as_u64().unwrap();
    assert!(acked.len() >= 50, "{done}");

    let found = values_in(&format!("hono.telemetry.{tenant}"), &acked);
    let missing: Vec<&String> = acked.difference(&found).collect();
    let ours = found.iter().filter(|v| v.starts_with(&run)).count();
    eprintln!(
        "published {published}, acknowledged {}, in Kafka {ours}, acknowledged but missing {}",
        acked.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but not in Kafka: {missing:?}"
    );
    // And the other way round: what the gateway had handed to Kafka when it stopped reading
    // was acknowledged before it closed the connection, so the device sends none of it again.
    assert_eq!(
        ours,
        acked.len(),
        "in Kafka but never acknowledged to the device"
    );
    let events = values_in(
        &format!("hono.event.{tenant}"),
        &HashSet::from(["during-readiness-delay".to_owned()]),
    );
    assert!(events.contains("during-readiness-delay"));

    // The device's command consumer is gone, and so is the instance's topic.
    let live = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let cfg = ferrule_registry::DatabaseConfig {
                url: database_url(),
                ..Default::default()
            };
            let store = ferrule_registry::open_store(&cfg, &Default::default())
                .await
                .unwrap();
            let db = store.pool().get().await.unwrap();
            db.query_one(
                "SELECT count(*) FROM command_consumers
                  WHERE tenant_id = $1 AND (expires IS NULL OR expires > now())",
                &[&tenant],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        })
    };
    assert_eq!(live, 0, "command consumers still registered");
    assert!(
        !topic_exists(&kafka(), &internal),
        "{internal} was not deleted"
    );
}
