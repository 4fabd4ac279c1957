//! The AMQP bridge as a Hono application uses it: a Qpid Proton client (python3-qpid-proton,
//! Debian's interpreter) signs in with application credentials from the registry and receives
//! the telemetry a device sends through the HTTP adapter of the same `ferrule all`.

mod common;

use common::*;
use ferrule_loadtest::devices::MqttDevice;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's interpreter: the one python3-qpid-proton is installed for.
const PYTHON: &str = "/usr/bin/python3";

/// An application's W3C trace context.
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn receive_script() -> String {
    format!("{}/tests/amqp/receive.py", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the Proton receiver to completion and returns its JSON lines.
fn receive(amqp: &str, user: &str, password: &str, address: &str, count: u32) -> Vec<Value> {
    receive_with(amqp, user, password, address, count, 10, &[])
}

fn receive_with(
    amqp: &str,
    user: &str,
    password: &str,
    address: &str,
    count: u32,
    timeout_secs: u32,
    extra: &[&str],
) -> Vec<Value> {
    let out = Command::new(PYTHON)
        .args([
            &receive_script(),
            amqp,
            user,
            password,
            address,
            &count.to_string(),
            &timeout_secs.to_string(),
        ])
        .args(extra)
        .output()
        .expect("python3-qpid-proton is installed (scripts/test installs it)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

/// Starts the Proton receiver in the background; its JSON lines can be read as it prints them.
fn spawn_receiver(
    amqp: &str,
    user: &str,
    address: &str,
    count: u32,
    timeout_secs: u32,
    extra: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut app = Command::new(PYTHON)
        .args([
            &receive_script(),
            amqp,
            user,
            "app-secret",
            address,
            &count.to_string(),
            &timeout_secs.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3-qpid-proton is installed (scripts/test installs it)");
    let lines = BufReader::new(app.stdout.take().unwrap()).lines();
    (app, lines)
}

/// The receiver's next JSON line.
fn next_line(lines: &mut std::io::Lines<BufReader<std::process::ChildStdout>>) -> Value {
    serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
}

fn admin(f: &Ferrule, method: &str, path: &str, body: &str) {
    f.admin_ok(method, path, body);
}

/// A new tenant with the application `app` (password `app-secret`) and a device with the
/// password credentials `device` / `device_password`.
fn provision(f: &Ferrule, app: &str, device: &str, device_password: &str) -> String {
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    provision_in(f, &tenant, app, device, device_password);
    tenant
}

/// A tenant `tenant` with application `app` and a device with a password.
fn provision_in(f: &Ferrule, tenant: &str, app: &str, device: &str, device_password: &str) {
    admin(f, "POST", &format!("/v1/tenants/{tenant}"), "{}");
    admin(
        f,
        "PUT",
        &format!("/v1/applications/{tenant}/{app}"),
        r#"{"secrets": [{"pwd-plain": "app-secret"}]}"#,
    );
    admin(f, "POST", &format!("/v1/devices/{tenant}/{device}"), "{}");
    let creds = serde_json::json!([{"type": "hashed-password", "auth-id": device,
        "secrets": [{"pwd-plain": device_password}]}]);
    admin(
        f,
        "PUT",
        &format!("/v1/credentials/{tenant}/{device}"),
        &creds.to_string(),
    );
}

#[test]
fn applications_receive_their_tenants_telemetry_over_amqp() {
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let other = format!("t-{}", uuid::Uuid::new_v4().simple());
    for t in [&tenant, &other] {
        admin(&f, "POST", &format!("/v1/tenants/{t}"), "{}");
        admin(
            &f,
            "PUT",
            &format!("/v1/applications/{t}/dashboard"),
            r#"{"secrets": [{"pwd-plain": "app-secret"}]}"#,
        );
    }
    admin(&f, "POST", &format!("/v1/devices/{tenant}/sensor"), "{}");
    admin(
        &f,
        "PUT",
        &format!("/v1/credentials/{tenant}/sensor"),
        r#"[{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"pwd-plain": "dev-secret"}]}]"#,
    );
    let user = format!("dashboard@{tenant}");

    // A wrong password never gets a connection.
    let got = receive(&f.amqp, &user, "wrong", &format!("telemetry/{tenant}"), 1);
    assert_eq!(got[0]["error"], "connection", "{got:?}");
    // Another tenant's address is refused with amqp:unauthorized-access.
    let got = receive(
        &f.amqp,
        &user,
        "app-secret",
        &format!("telemetry/{other}"),
        1,
    );
    assert_eq!(got.last().unwrap()["error"], "link", "{got:?}");
    assert_eq!(
        got.last().unwrap()["condition"],
        "amqp:unauthorized-access",
        "{got:?}"
    );

    // Telemetry sent after the receiver attached arrives in Hono's message layout.
    let (mut app, mut lines) =
        spawn_receiver(&f.amqp, &user, &format!("telemetry/{tenant}"), 3, 20, &[]);
    let first = next_line(&mut lines);
    assert_eq!(first["attached"], format!("telemetry/{tenant}"), "{first}");
    // The receiver's Kafka consumer joins its group right after the attach: keep sending
    // until three messages came through.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (url, auth, stop) = (
            format!("{}/telemetry", f.http),
            format!("sensor@{tenant}:dev-secret"),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(25)
            {
                let (code, _) = curl(&[
                    "-u",
                    &auth,
                    "-H",
                    "content-type: text/plain",
                    "--data-binary",
                    "21.5",
                    &url,
                ]);
                assert_eq!(code, 202);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let mut received = Vec::new();
    for line in lines.by_ref() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        received.push(v);
        if received.len() == 3 {
            break;
        }
    }
    let _ = app.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    assert_eq!(received.len(), 3, "{received:?}");
    let m = &received[0];
    assert!(m.get("error").is_none(), "{m}");
    assert_eq!(m["body"], "21.5");
    assert_eq!(m["to"], format!("telemetry/{tenant}"));
    assert_eq!(m["content_type"], "text/plain");
    assert_eq!(m["properties"]["device_id"], "sensor");
    assert_eq!(m["properties"]["orig_adapter"], "hono-http");
    assert_eq!(m["properties"]["qos"], 0);
    assert_eq!(m["annotations"]["tenant_id"], tenant);
    assert_eq!(
        m["annotations"]["resource"],
        format!("telemetry/{tenant}/sensor")
    );
    assert!(m["creation_time"].as_f64().unwrap() > 1.7e9, "{m}");

    // The refusals above are counted.
    let (_, metrics) = curl(&[&format!("{}/metrics", f.health)]);
    for reason in ["unauthorized", "unauthorized-access"] {
        let line = format!("ferrule_bridge_refused_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
}

/// Telemetry is at most once from the moment the link attached (Hono's AMQP APIs): a message sent right
/// after the attach arrives although the link's consumer group is new and still forming; one
/// sent (and acknowledged) before the attach does not.
#[test]
fn telemetry_sent_right_after_the_attach_arrives_and_earlier_telemetry_does_not() {
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = provision(&f, "dashboard", "sensor", "dev-secret");
    let send = |body: &str| {
        let (code, text) = curl(&[
            "-u",
            &format!("sensor@{tenant}:dev-secret"),
            "-H",
            "content-type: text/plain",
            // QoS 1: answered once the broker has it.
            "-H",
            "qos-level: 1",
            "--data-binary",
            body,
            &format!("{}/telemetry", f.http),
        ]);
        assert_eq!(code, 202, "{text}");
    };
    send("before");
    let (mut app, mut lines) = spawn_receiver(
        &f.amqp,
        &format!("dashboard@{tenant}"),
        &format!("telemetry/{tenant}"),
        1,
        15,
        &[],
    );
    let first = next_line(&mut lines);
    assert_eq!(first["attached"], format!("telemetry/{tenant}"), "{first}");
    send("after");
    let got = next_line(&mut lines);
    let _ = app.wait();
    assert_eq!(got["body"], "after", "{got}");
}

#[test]
fn events_reach_late_applications_and_are_consumed_once_accepted() {
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = provision(&f, "backend", "door", "dev-secret");
    let user = format!("backend@{tenant}");
    let address = format!("event/{tenant}");
    // Sent while no application is attached.
    send_door_events(&f, &tenant, &["opened", "closed"]);
    // Pre-settled (at-most-once) event receivers are refused.
    let got = receive_with(
        &f.amqp,
        &user,
        "app-secret",
        &address,
        1,
        5,
        &["at-most-once"],
    );
    assert_eq!(
        got.last().unwrap()["condition"],
        "amqp:not-allowed",
        "{got:?}"
    );

    let got = receive(&f.amqp, &user, "app-secret", &address, 2);
    let bodies: Vec<&Value> = got.iter().filter_map(|m| m.get("body")).collect();
    assert_eq!(bodies, ["opened", "closed"], "{got:?}");
    let first = got.iter().find(|m| m.get("body").is_some()).unwrap();
    assert_eq!(first["durable"], true);
    assert_eq!(first["properties"]["qos"], 1);
    // Both were accepted: a later attach gets nothing more.
    let got = receive_with(&f.amqp, &user, "app-secret", &address, 1, 3, &[]);
    assert_eq!(got.last().unwrap()["error"], "timeout", "{got:?}");
}

/// The link gauges of /metrics: an application that takes one event and then holds its link
/// without granting more credit shows as one link waiting for it; once it detached, its link
/// and its unsettled deliveries are gone from the gauges.
#[test]
fn a_link_out_of_credit_shows_as_waiting() {
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = provision(&f, "backend", "door", "dev-secret");
    send_door_events(&f, &tenant, &["opened", "closed", "opened"]);
    let (mut app, mut lines) = spawn_receiver(
        &f.amqp,
        &format!("backend@{tenant}"),
        &format!("event/{tenant}"),
        1,
        10,
        &["hold=6"],
    );
    assert_eq!(next_line(&mut lines)["attached"], format!("event/{tenant}"));
    assert_eq!(next_line(&mut lines)["body"], "opened");
    assert!(next_line(&mut lines).get("holding").is_some());
    let labels = [("tenant", tenant.as_str()), ("type", "event")];
    let gauge = |name: &str| {
        let (_, text) = curl(&[&format!("{}/metrics", f.health)]);
        metric(&text, name, &labels)
    };
    let start = Instant::now();
    while gauge("ferrule_bridge_links_waiting") != Some(1.0) {
        assert!(start.elapsed() < Duration::from_secs(5), "never waiting");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gauge("ferrule_bridge_links"), Some(1.0));
    // Waiting because the application's credit is used up.
    assert_eq!(gauge("ferrule_bridge_link_credit"), Some(0.0));
    let _ = app.wait();
    let start = Instant::now();
    while gauge("ferrule_bridge_links") != Some(0.0) {
        assert!(start.elapsed() < Duration::from_secs(10), "the link stayed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gauge("ferrule_bridge_links_waiting"), Some(0.0));
    assert_eq!(gauge("ferrule_bridge_unsettled_deliveries"), Some(0.0));
}

/// An application that leaves events unsettled: the bridge counts them as unsettled
/// deliveries, and the tenant's event group falls behind the topic by them, since its
/// committed offset stays after the last settled event (`ferrule_kafka_consumer_lag` of the
/// group `ferrule-bridge.event.<tenant>`). When it is killed (no detach), its link's
/// unsettled deliveries and its credit go.
#[test]
fn events_left_unsettled_show_as_unsettled_deliveries_and_consumer_lag() {
    let env = [("FERRULE_KAFKA__STATISTICS_INTERVAL_MS", "500".to_owned())];
    let mut f = Ferrule::start_with(&kafka(), &env);
    f.wait_readiness(200);
    let tenant = provision(&f, "backend", "door", "dev-secret");
    let (mut app, mut lines) = spawn_receiver(
        &f.amqp,
        &format!("backend@{tenant}"),
        &format!("event/{tenant}"),
        3,
        20,
        &["keep=2", "hold=30"],
    );
    let attached = next_line(&mut lines);
    assert_eq!(attached["attached"], format!("event/{tenant}"));
    let granted = attached["credit"].as_f64().unwrap();
    assert!(granted >= 3.0, "{attached}");
    let link = [("tenant", tenant.as_str()), ("type", "event")];
    // Nothing sent yet: the link has the credit the application granted (as Proton counts it).
    f.wait_for_metric("ferrule_bridge_link_credit", &link, granted);
    send_door_events(&f, &tenant, &["opened", "closed", "opened"]);
    for body in ["opened", "closed", "opened"] {
        assert_eq!(next_line(&mut lines)["body"], body);
    }
    assert!(next_line(&mut lines).get("holding").is_some());
    f.wait_for_metric("ferrule_bridge_unsettled_deliveries", &link, 2.0);
    f.wait_for_metric("ferrule_bridge_link_unsettled_deliveries", &link, 2.0);
    let (group, topic) = (
        format!("ferrule-bridge.event.{tenant}"),
        format!("hono.event.{tenant}"),
    );
    let lag = [("group", group.as_str()), ("topic", topic.as_str())];
    f.wait_for_metric("ferrule_kafka_consumer_lag", &lag, 2.0);
    let _ = app.kill();
    let _ = app.wait();
    f.wait_for_metric("ferrule_bridge_links", &link, 0.0);
    f.wait_for_metric("ferrule_bridge_unsettled_deliveries", &link, 0.0);
    let (_, text) = curl(&[&format!("{}/metrics", f.health)]);
    assert_eq!(
        metric(&text, "ferrule_bridge_link_credit", &link),
        None,
        "{text}"
    );
    let per_link = metric(&text, "ferrule_bridge_link_unsettled_deliveries", &link);
    assert_eq!(per_link, None, "{text}");
}

/// Applications of one tenant attached to its event address compete for the events (one
/// consumer group per tenant): each event reaches one of them, none is lost, and both get a
/// share. Events of 20 devices spread over the topic's partitions.
#[test]
fn applications_of_one_tenant_share_its_events() {
    let env = [("FERRULE_KAFKA__STATISTICS_INTERVAL_MS", "500".to_owned())];
    let mut f = Ferrule::start_with(&kafka(), &env);
    f.wait_readiness(200);
    let tenant = provision(&f, "backend", "d0", "dev-secret");
    for i in 1..20 {
        add_device(&f, &tenant, &format!("d{i}"), "dev-secret");
    }
    let (user, address) = (format!("backend@{tenant}"), format!("event/{tenant}"));
    let (mut a, mut a_lines) = spawn_receiver(&f.amqp, &user, &address, 20, 8, &[]);
    let (mut b, mut b_lines) = spawn_receiver(&f.amqp, &user, &address, 20, 8, &[]);
    assert_eq!(next_line(&mut a_lines)["attached"], address.as_str());
    assert_eq!(next_line(&mut b_lines)["attached"], address.as_str());
    for i in 0..20 {
        let (code, text) = curl(&[
            "-u",
            &format!("d{i}@{tenant}:dev-secret"),
            "-H",
            "content-type: text/plain",
            "--data-binary",
            &format!("event {i}"),
            &format!("{}/event", f.http),
        ]);
        assert_eq!(code, 202, "{text}");
        // Spread over four seconds: the group re-forms around the second link meanwhile.
        std::thread::sleep(Duration::from_millis(200));
    }
    // Two consumers of one group: each has its own Kafka client series (by `handle`).
    let group = format!("group=\"ferrule-bridge.event.{tenant}\"");
    let start = Instant::now();
    loop {
        let (_, text) = curl(&[&format!("{}/metrics", f.health)]);
        let handles: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("ferrule_kafka_client_queue_messages{") && l.contains(&group))
            .filter_map(|l| l.split("handle=\"").nth(1)?.split('"').next())
            .collect();
        if handles.len() == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{handles:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let bodies = |lines: std::io::Lines<BufReader<std::process::ChildStdout>>| -> Vec<String> {
        lines
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .filter_map(|m| m.get("body").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    let (got_a, got_b) = (bodies(a_lines), bodies(b_lines));
    let _ = (a.wait(), b.wait());
    let mut all: Vec<&String> = got_a.iter().chain(&got_b).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 20, "a: {got_a:?} b: {got_b:?}");
    // Shared, not copied to both: only redeliveries around the second link's join repeat.
    assert!(got_a.len() + got_b.len() < 30, "a: {got_a:?} b: {got_b:?}");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "a: {got_a:?} b: {got_b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_command_an_mqtt_device_over_amqp() {
    use rumqttc::mqttbytes::{QoS, v4};
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = provision(&f, "backend", "speaker", "loadtest-pw");
    // The device subscribes and answers the first command with 200 and its own payload.
    let mut device = MqttDevice::connect(&f.mqtt, &format!("speaker@{tenant}"), 0)
        .await
        .unwrap();
    device
        .write(&[MqttDevice::subscribe_packet(
            "command///req/#",
            QoS::AtMostOnce,
        )])
        .await
        .unwrap();
    assert!(matches!(
        device.read().await.unwrap(),
        v4::Packet::SubAck(_)
    ));
    let answering = tokio::spawn(async move {
        let v4::Packet::Publish(p) = device.read().await.unwrap() else {
            panic!("expected a command");
        };
        let req_id = p.topic.split('/').nth(4).unwrap().to_owned();
        device
            .write(&[v4::Packet::Publish(v4::Publish::new(
                format!("command///res/{req_id}/200/?content-type=text%2Fplain"),
                QoS::AtMostOnce,
                format!("volume {}", String::from_utf8_lossy(&p.payload)),
            ))])
            .await
            .unwrap();
        // The device goes away right after answering; its answer must still arrive.
        p.topic
    });
    let script = format!("{}/tests/amqp/command.py", env!("CARGO_MANIFEST_DIR"));
    let (amqp, user) = (f.amqp.clone(), format!("backend@{tenant}"));
    let tenant2 = tenant.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(PYTHON)
            .args([
                &script,
                &amqp,
                &user,
                "app-secret",
                &tenant2,
                "speaker",
                "20",
                TRACEPARENT,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "{lines:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[0]["malformed"], "REJECTED", "{lines:?}");
    assert_eq!(lines[1]["sent"], "accepted");
    let r = &lines[2];
    assert_eq!(r["correlation_id"], "corr-1", "{r}");
    assert_eq!(r["status"], 200);
    assert_eq!(r["device_id"], "speaker");
    assert_eq!(r["tenant_id"], tenant);
    assert_eq!(r["content_type"], "text/plain");
    assert_eq!(r["body"], "volume 5");
    // The application's trace context went with the command (as an application property,
    // then a Kafka header) and came back on the response; no spans here, so unchanged.
    assert_eq!(r["traceparent"], TRACEPARENT, "{r}");
    let topic = answering.await.unwrap();
    assert!(topic.ends_with("/setVolume"), "{topic}");
}

/// Events of the device `door` (password `dev-secret`) over HTTP, each acknowledged.
fn send_door_events(f: &Ferrule, tenant: &str, bodies: &[&str]) {
    for body in bodies {
        let (code, text) = curl(&[
            "-u",
            &format!("door@{tenant}:dev-secret"),
            "-H",
            "content-type: text/plain",
            "--data-binary",
            body,
            &format!("{}/event", f.http),
        ]);
        assert_eq!(code, 202, "{text}");
    }
}

/// Another device of `tenant` with the password credentials `device` / `password`.
fn add_device(f: &Ferrule, tenant: &str, device: &str, password: &str) {
    admin(f, "POST", &format!("/v1/devices/{tenant}/{device}"), "{}");
    let creds = serde_json::json!([{"type": "hashed-password", "auth-id": device,
        "secrets": [{"pwd-plain": password}]}]);
    admin(
        f,
        "PUT",
        &format!("/v1/credentials/{tenant}/{device}"),
        &creds.to_string(),
    );
}

/// An MQTT device subscribed to its commands with QoS 1.
async fn qos1_subscriber(f: &Ferrule, device: &str, tenant: &str) -> MqttDevice {
    use rumqttc::mqttbytes::{QoS, v4};
    let mut d = MqttDevice::connect(&f.mqtt, &format!("{device}@{tenant}"), 0)
        .await
        .unwrap();
    d.write(&[MqttDevice::subscribe_packet(
        "command///req/#",
        QoS::AtLeastOnce,
    )])
    .await
    .unwrap();
    assert!(matches!(d.read().await.unwrap(), v4::Packet::SubAck(_)));
    d
}

/// Hono's AMQP Command & Control API: the application learns a command's fate from the disposition of its transfer.
/// Accepted once the device got it (a QoS 1 device: once it sent PUBACK); released when the
/// device is not connected or does not acknowledge in time; rejected for an unknown device.
/// No delivery-failure response is sent on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_settled_by_whether_they_reached_the_device() {
    use rumqttc::mqttbytes::v4;
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let f = Ferrule::start_for_commands(&tenant);
    provision_in(
        &f,
        &tenant,
        "backend",
        "listener",
        ferrule_loadtest::devices::PASSWORD,
    );
    for d in ["mute", "offline"] {
        add_device(&f, &tenant, d, ferrule_loadtest::devices::PASSWORD);
    }
    let mut listener = qos1_subscriber(&f, "listener", &tenant).await;
    let mut mute = qos1_subscriber(&f, "mute", &tenant).await;
    // The listener acknowledges what it gets; the mute device reads and never acknowledges.
    let listening = tokio::spawn(async move {
        let v4::Packet::Publish(p) = listener.read().await.unwrap() else {
            panic!("expected a command");
        };
        listener
            .write(&[v4::Packet::PubAck(v4::PubAck::new(p.pkid))])
            .await
            .unwrap();
        (p.topic, listener)
    });
    let ignoring = tokio::spawn(async move {
        let v4::Packet::Publish(p) = mute.read().await.unwrap() else {
            panic!("expected a command");
        };
        (p.topic, mute)
    });
    let script = format!("{}/tests/amqp/dispositions.py", env!("CARGO_MANIFEST_DIR"));
    let (amqp, user, tenant2) = (f.amqp.clone(), format!("backend@{tenant}"), tenant.clone());
    let steps = [
        "rr:offline",
        "ow:offline",
        "rr:nobody",
        "rr:mute",
        "ow:listener",
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(PYTHON)
            .args([&script, &amqp, &user, "app-secret", &tenant2, "40"])
            .args(steps)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcomes: Vec<(&str, &str)> = lines
        .iter()
        .filter_map(|l| Some((l["step"].as_str()?, l["outcome"].as_str()?)))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("rr:offline", "RELEASED"),
            ("ow:offline", "RELEASED"),
            ("rr:nobody", "REJECTED"),
            ("rr:mute", "RELEASED"),
            ("ow:listener", "ACCEPTED"),
        ],
        "{lines:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.last().unwrap()["responses"], 0, "{lines:?}");
    // The released command did reach the mute device; only its PUBACK was missing.
    let (topic, _mute) = ignoring.await.unwrap();
    assert!(
        topic.contains("/req/") && topic.ends_with("/setVolume"),
        "{topic}"
    );
    let (topic, _listener) = listening.await.unwrap();
    assert!(topic.ends_with("/setVolume"), "{topic}");

    // An HTTP device long-polling with `hono-ttd`: accepted once handed to its response.
    add_device(&f, &tenant, "poller", ferrule_loadtest::devices::PASSWORD);
    let (http, who) = (f.http.clone(), format!("poller@{tenant}"));
    let polling = std::thread::spawn(move || {
        curl(&[
            "-i",
            "-u",
            &format!("{who}:{}", ferrule_loadtest::devices::PASSWORD),
            "-H",
            "hono-ttd: 40",
            "-H",
            "content-type: text/plain",
            "-d",
            "waiting",
            &format!("{http}/telemetry"),
        ])
    });
    // The poll is registered before its telemetry is written.
    wait_for_record(&format!("hono.telemetry.{tenant}"));
    let out = Command::new(PYTHON)
        .args([
            &format!("{}/tests/amqp/dispositions.py", env!("CARGO_MANIFEST_DIR")),
            &f.amqp,
            &format!("backend@{tenant}"),
            "app-secret",
            &tenant,
            "40",
            "ow:poller",
        ])
        .output()
        .unwrap();
    let first: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["outcome"], "ACCEPTED", "{first}");
    let (code, response) = polling.join().unwrap();
    assert_eq!(code, 200, "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("hono-command: setvolume"),
        "{response}"
    );
}

/// Waits until `topic` holds a record.
fn wait_for_record(topic: &str) {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set(
            "group.id",
            format!("test-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(200)) {
            return;
        }
    }
    panic!("nothing arrived on {topic}");
}

/// A CA and a server certificate for 127.0.0.1/localhost, as PEM files in a fresh folder.
fn certificates() -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("ferrule-amqps-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Ferrule Test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let server =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = server
        .signed_by(&key, &rcgen::Issuer::new(ca, ca_key))
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    dir
}

#[test]
fn applications_connect_over_amqps() {
    let dir = certificates();
    let amqps = free_port();
    let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let mut f = Ferrule::start_with(
        &kafka(),
        &[
            ("FERRULE_GATEWAY__TLS__CERT_FILE", path("server.pem")),
            ("FERRULE_GATEWAY__TLS__KEY_FILE", path("server-key.pem")),
            (
                "FERRULE_GATEWAY__HTTP__TLS_BIND",
                format!("127.0.0.1:{}", free_port()),
            ),
            (
                "FERRULE_GATEWAY__MQTT__TLS_BIND",
                format!("127.0.0.1:{}", free_port()),
            ),
            ("FERRULE_BRIDGE__TLS_BIND", format!("127.0.0.1:{amqps}")),
        ],
    );
    f.wait_readiness(200);
    let tenant = provision(&f, "backend", "door", "dev-secret");
    let url = format!("amqps://127.0.0.1:{amqps}");
    let user = format!("backend@{tenant}");
    // A plain-text client on the TLS port gets nowhere and harms nobody.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", amqps)).unwrap();
    std::io::Write::write_all(&mut plain, b"AMQP\x03\x01\x00\x00").unwrap();
    let (code, text) = curl(&[
        "-u",
        &format!("door@{tenant}:dev-secret"),
        "-H",
        "content-type: text/plain",
        "--data-binary",
        "over tls",
        &format!("{}/event", f.http),
    ]);
    assert_eq!(code, 202, "{text}");
    let ca = format!("ca={}", path("ca.pem"));
    let got = receive_with(
        &url,
        &user,
        "app-secret",
        &format!("event/{tenant}"),
        1,
        10,
        &[&ca],
    );
    assert_eq!(got.last().unwrap()["body"], "over tls", "{got:?}");
    // Without trusting the CA the client refuses the server.
    let got = receive_with(
        &url,
        &user,
        "app-secret",
        &format!("event/{tenant}"),
        1,
        5,
        &[&format!("ca={}", path("server.pem"))],
    );
    assert!(got.last().unwrap().get("error").is_some(), "{got:?}");
    drop(plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_application_keeps_the_bridge_memory_bounded() {
    use ferrule_loadtest::measure::ProcessSample;
    // The test's router serves this tenant's commands only: a new router group reads every
    // command topic of the broker from the beginning, and on a broker that kept earlier runs'
    // commands that would count against the bridge here.
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let mut f = Ferrule::start_with(
        &kafka(),
        &[(
            "FERRULE_ROUTER__TOPIC_PATTERN",
            format!("hono.command.{tenant}"),
        )],
    );
    f.wait_readiness(200);
    provision_in(&f, &tenant, "slow", "dev", "dev-secret");
    // 40 MB of events wait in Kafka.
    let topic = format!("hono.event.{tenant}");
    ferrule_loadtest::devices::raw_producer(&kafka(), &topic, 40_000, 1024)
        .await
        .unwrap();
    let pid = f.child.id();
    let before = ProcessSample::read(pid).unwrap();
    // The application takes one event, then sits on its link without granting more credit.
    let (mut app, mut lines) = spawn_receiver(
        &f.amqp,
        &format!("slow@{tenant}"),
        &format!("event/{tenant}"),
        1,
        20,
        &["hold=6"],
    );
    let mut peak = before.rss_bytes;
    let mut held = false;
    while let Some(Ok(line)) = lines.next() {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if v.get("holding").is_some() {
            held = true;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                peak = peak.max(ProcessSample::read(pid).unwrap().rss_bytes);
            }
        }
    }
    let _ = app.wait();
    assert!(held, "the application never got its event");
    let growth = peak.saturating_sub(before.rss_bytes);
    // The link's consumer prefetches at most `bridge.prefetch_kbytes` (1 MiB), not the 40 MB.
    assert!(
        growth < 16 * 1024 * 1024,
        "resident memory grew by {growth} bytes behind a stalled application"
    );
}
