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
    provision_device(f, tenant, DEVICE);
}

/// The device `device` of `tenant`, with the password `PASSWORD`.
fn provision_device(f: &Ferrule, tenant: &str, device: &str) {
    f.admin_ok("POST", &format!("/v1/devices/{tenant}/{device}"), "{}");
    let creds = serde_json::json!([{"type": "hashed-password", "auth-id": device,
        "secrets": [{"pwd-plain": PASSWORD}]}]);
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/{device}"),
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

/// How many command consumers of `tenant` are registered and not expired.
fn live_command_consumers(tenant: &str) -> i64 {
    subscriptions(&kafka(), tenant).len() as i64
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
    provision_device(&f, &tenant, "tank");
    let internal = format!("hono.command_internal.{instance}");
    let (host, port) = f.mqtt.split_once(':').unwrap();
    // `pump` publishes telemetry, `tank` events, both at QoS 1.
    let mut devices: Vec<(Script, String, &str)> = [(DEVICE, "telemetry"), ("tank", "event")]
        .into_iter()
        .map(|(device, kind)| {
            let run = uuid::Uuid::new_v4().simple().to_string();
            let user = format!("{device}@{tenant}");
            let mut args = vec![host, port, &user, PASSWORD, &run, "60"];
            if kind == "event" {
                args.push("event");
            }
            let mut script = Script::spawn("mqtt_publisher.py", DEBIAN_PYTHON, &args);
            script.expect("subscribed", "the device subscribes to its commands");
            script.expect("flowing", "the device's messages are acknowledged");
            (script, run, kind)
        })
        .collect();
    assert!(
        topic_exists(&kafka(), &internal),
        "the instance's command topic"
    );
    assert_eq!(
        live_command_consumers(&tenant),
        2,
        "the devices' subscriptions"
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
    for (device, run, kind) in &mut devices {
        let done = device.expect("done", "the device reports what was acknowledged");
        let acked: HashSet<String> = done["acked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let published = done["published"].as_u64().unwrap();
        assert!(acked.len() >= 50, "{done}");

        let found = values_in(&format!("hono.{kind}.{tenant}"), &acked);
        let missing: Vec<&String> = acked.difference(&found).collect();
        let ours = found.iter().filter(|v| v.starts_with(run.as_str())).count();
        eprintln!(
            "{kind}: published {published}, acknowledged {}, in Kafka {ours}, acknowledged but \
             missing {}",
            acked.len(),
            missing.len()
        );
        assert!(
            missing.is_empty(),
            "acknowledged but not in Kafka: {missing:?}"
        );
        // And the other way round: what the gateway had handed to Kafka when it stopped
        // reading was acknowledged before it closed the connection, so the device sends none of
        // it again.
        assert_eq!(
            ours,
            acked.len(),
            "{kind} in Kafka but never acknowledged to the device"
        );
    }
    let events = values_in(
        &format!("hono.event.{tenant}"),
        &HashSet::from(["during-readiness-delay".to_owned()]),
    );
    assert!(events.contains("during-readiness-delay"));

    // The device's command consumer is gone, and so is the instance's topic.
    let live = live_command_consumers(&tenant);
    assert_eq!(live, 0, "command consumers still registered");
    assert!(
        !topic_exists(&kafka(), &internal),
        "{internal} was not deleted"
    );
}

/// Long polls do not hold a shutdown, and CoAP exchanges in flight finish: an HTTP device
/// (curl) and a CoAP device (aiocoap) wait for a command with a ttd of a minute; at SIGTERM each
/// gets its answer without a command — 202, and 2.04 in a separate response. A third CoAP
/// device (a raw socket) leaves the first transmission of its separate response unacknowledged:
/// meanwhile the MQTT, HTTP and AMQP listeners are closed and a new CoAP request gets 5.03, but
/// the CoAP listener still runs: the gateway sends the response again, takes the device's ACK,
/// and only then exits — long before its drain bound (here 60 s) and the ttd.
#[test]
fn sigterm_answers_open_long_polls_and_waits_for_coap_exchanges() {
    use coap_lite::{MessageClass, MessageType, Packet, RequestType};
    let tenant = format!("shutdown-poll-{}", uuid::Uuid::new_v4().simple());
    let mut f = Ferrule::start_for_commands_with(
        &tenant,
        "",
        &[
            ("FERRULE_SHUTDOWN__READINESS_DELAY_MS", "300".into()),
            ("FERRULE_SHUTDOWN__DRAIN_TIMEOUT_SECS", "60".into()),
        ],
    );
    let adapters = serde_json::json!({"adapters": [
        {"type": "hono-http", "enabled": true},
        {"type": "hono-coap", "enabled": true, "device-authentication-required": false}]});
    f.admin_ok(
        "POST",
        &format!("/v1/tenants/{tenant}"),
        &adapters.to_string(),
    );
    provision_device(&f, &tenant, DEVICE);
    for device in ["valve", "gauge"] {
        f.admin_ok("POST", &format!("/v1/devices/{tenant}/{device}"), "{}");
    }

    let http = {
        let (user, url) = (
            format!("{DEVICE}@{tenant}:{PASSWORD}"),
            format!("{}/telemetry", f.http),
        );
        std::thread::spawn(move || {
            curl(&[
                "-u",
                &user,
                "-H",
                "hono-ttd: 60",
                "-H",
                "content-type: text/plain",
                "-d",
                "waiting",
                &url,
            ])
        })
    };
    let mut coap = Script::spawn(
        "coap_poll.py",
        &kafka_python(),
        &[
            &format!(
                "coap://{}/telemetry/{tenant}/valve?hono-ttd=60&empty",
                f.coap
            ),
            "90",
        ],
    );
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut poll = Packet::new();
    poll.header.set_type(MessageType::Confirmable);
    poll.header.code = MessageClass::Request(RequestType::Put);
    poll.header.message_id = 0x4242;
    poll.set_token(vec![7, 7]);
    for part in ["telemetry", &tenant, "gauge"] {
        poll.add_option(coap_lite::CoapOption::UriPath, part.as_bytes().to_vec());
    }
    for query in ["hono-ttd=60", "empty"] {
        poll.add_option(coap_lite::CoapOption::UriQuery, query.as_bytes().to_vec());
    }
    raw.send_to(&poll.to_bytes().unwrap(), &f.coap).unwrap();
    let receive = || {
        let mut buf = [0u8; 1500];
        let n = raw.recv(&mut buf).expect("an answer from the CoAP adapter");
        Packet::from_bytes(&buf[..n]).unwrap()
    };
    let ack = receive();
    assert_eq!(
        (
            ack.header.get_type(),
            ack.header.code,
            ack.header.message_id
        ),
        (MessageType::Acknowledgement, MessageClass::Empty, 0x4242),
        "the request's empty ACK: the answer comes separately"
    );
    // All three polls are open once the devices are registered as command consumers.
    let start = std::time::Instant::now();
    while live_command_consumers(&tenant) < 3 {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = coap.child.kill();
            panic!(
                "the long polls were not registered: HTTP {:?}, CoAP {:?}",
                http.is_finished().then(|| http.join().unwrap()),
                coap.expect("answer", "-")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    f.terminate();
    let first = receive();
    assert_eq!(first.header.get_type(), MessageType::Confirmable);
    assert_eq!(first.get_token(), &[7, 7]);
    assert_eq!(first.header.get_code(), "2.04", "no command: 2.04 Changed");
    // The drain has begun: the TCP listeners are closed, and a new CoAP request is refused
    // with 5.03 while the exchange in flight goes on.
    for (what, addr) in [
        ("MQTT", f.mqtt.clone()),
        ("HTTP", f.http.trim_start_matches("http://").to_owned()),
        ("AMQP", f.amqp.trim_start_matches("amqp://").to_owned()),
    ] {
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(&addr).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "the {what} listener still accepts while draining"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let late = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut upload = Packet::new();
    upload.header.set_type(MessageType::Confirmable);
    upload.header.code = MessageClass::Request(RequestType::Put);
    upload.header.message_id = 0x5151;
    for part in ["telemetry", &tenant, "valve"] {
        upload.add_option(coap_lite::CoapOption::UriPath, part.as_bytes().to_vec());
    }
    upload.payload = b"too late".to_vec();
    late.send_to(&upload.to_bytes().unwrap(), &f.coap).unwrap();
    let mut buf = [0u8; 1500];
    let n = late.recv(&mut buf).expect("an answer to the late request");
    let refused = Packet::from_bytes(&buf[..n]).unwrap();
    assert_eq!(
        refused.header.get_code(),
        "5.03",
        "a new request while draining"
    );
    // Unacknowledged: the adapter still serves the exchange and sends it again.
    let again = receive();
    assert_eq!(again.header.message_id, first.header.message_id);
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Empty;
    ack.header.message_id = again.header.message_id;
    raw.send_to(&ack.to_bytes().unwrap(), &f.coap).unwrap();

    let status = f.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    let (code, body) = http.join().unwrap();
    assert_eq!(code, 202, "the HTTP long poll's answer: {body}");
    let answer = coap.expect("answer", "the CoAP long poll's answer");
    assert_eq!(answer["code"], "2.04 Changed", "{answer}");
    assert_eq!(answer["payload"], "", "no command: {answer}");
    assert_eq!(
        live_command_consumers(&tenant),
        0,
        "the polls were released"
    );
}

/// The drain has a bound: with a Kafka that never answers (a socket that accepts and stays
/// silent), a QoS 1 publish can never be acknowledged, and the connection holding it never
/// drains — the process exits once `shutdown.drain_timeout_secs` have passed, not later.
#[test]
fn a_drain_that_cannot_finish_ends_at_its_bound() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let kafka = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    let mut f = Ferrule::start_with(
        &kafka,
        &[
            ("FERRULE_SHUTDOWN__READINESS_DELAY_MS", "0".into()),
            ("FERRULE_SHUTDOWN__DRAIN_TIMEOUT_SECS", "2".into()),
            // The telemetry topic's metadata is asked for first: that answer never comes.
            ("FERRULE_KAFKA__METADATA_TIMEOUT_MS", "60000".into()),
        ],
    );
    // Not ready without Kafka; the registry and the MQTT adapter serve all the same.
    let start = std::time::Instant::now();
    while f.admin("GET", "/v1/tenants/none", "").0 == 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "the registry");
        std::thread::sleep(Duration::from_millis(100));
    }
    let tenant = format!("shutdown-bound-{}", uuid::Uuid::new_v4().simple());
    provision(&f, &tenant);
    let (host, port) = f.mqtt.split_once(':').unwrap();
    let mut publisher = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            host,
            "-p",
            port,
            "-q",
            "1",
            "-t",
            "telemetry",
            "-m",
            "stuck",
        ])
        .args(["-u", &format!("{DEVICE}@{tenant}"), "-P", PASSWORD])
        .spawn()
        .expect("mosquitto_pub (Debian mosquitto-clients)");
    // Its PUBLISH waits for Kafka, which never answers.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        publisher.try_wait().unwrap().is_none(),
        "no PUBACK can come"
    );

    let stopped = std::time::Instant::now();
    f.terminate();
    let status = f.wait_exit(Duration::from_secs(30));
    let took = stopped.elapsed();
    let _ = publisher.kill();
    assert!(status.success(), "exit status {status}");
    // The bound, and some room for the process's own start of the drain and its exit.
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM, with a drain bound of 2 s"
    );
}
