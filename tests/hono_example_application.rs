//! Hono's example application (HonoExampleApplication) against `ferrule all`, with real clients
//! on both sides. The application consumes its tenant's events — over AMQP 1.0 with Qpid Proton
//! (`event/<tenant>`), or over Kafka with confluent-kafka (`hono.event.<tenant>`) — and waits
//! until the device announces that it takes commands: the empty notification with `ttd` -1 that
//! an MQTT SUBSCRIBE causes, or the `ttd` > 0 of an HTTP long poll (`hono-ttd`). Only then does
//! it send a request/response command, and it waits for the device's answer on its reply address
//! (`command_response/<tenant>/<id>`, or `hono.command_response.<tenant>`). The device is a
//! paho-mqtt client subscribed at QoS 1, or curl long-polling and posting its answer.
//!
//! The applications and the MQTT device are Python scripts in `tests/apps/`; each prints JSON
//! lines, which are checked here as they come.

mod common;

use common::*;
use serde_json::Value;

const DEVICE: &str = "lamp";
const DEVICE_PASSWORD: &str = "lamp-secret";
const APP: &str = "example-app";
const APP_PASSWORD: &str = "app-secret";
/// The long poll of the HTTP device (below the default cap of 60 s, so the notification says 30).
const HTTP_TTD: i64 = 30;

#[derive(Clone, Copy, Debug, PartialEq)]
enum App {
    Amqp,
    Kafka,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Device {
    /// Subscribed to its commands: the notification has `ttd` -1.
    Mqtt,
    /// Long-polling with `hono-ttd`: the notification is its event, with that `ttd`.
    Http,
}

fn admin(f: &Ferrule, method: &str, path: &str, body: &str) {
    f.admin_ok(method, path, body);
}

/// The tenant with the application's credentials and the device with its password.
fn provision(f: &Ferrule, tenant: &str) {
    admin(f, "POST", &format!("/v1/tenants/{tenant}"), "{}");
    admin(
        f,
        "PUT",
        &format!("/v1/applications/{tenant}/{APP}"),
        &serde_json::json!({"secrets": [{"pwd-plain": APP_PASSWORD}]}).to_string(),
    );
    admin(f, "POST", &format!("/v1/devices/{tenant}/{DEVICE}"), "{}");
    let creds = serde_json::json!([{"type": "hashed-password", "auth-id": DEVICE,
        "secrets": [{"pwd-plain": DEVICE_PASSWORD}]}]);
    admin(
        f,
        "PUT",
        &format!("/v1/credentials/{tenant}/{DEVICE}"),
        &creds.to_string(),
    );
}

/// What curl got: the status, the headers (names in lower case) and the body.
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// curl with `-i`: the response split into status, headers and body.
fn curl_with_headers(args: &[&str]) -> HttpResponse {
    let (status, text) = curl(&[&["-i"], args].concat());
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {text}"));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// One run of the example application against one kind of device.
/// How the deployment under test names and creates its topics.
#[derive(Default)]
struct Topics {
    /// `kafka.topic_prefix`.
    prefix: String,
    /// `kafka.create_topics = false`, with every topic the test needs created beforehand.
    created_beforehand: bool,
}

fn command_after_notification(app: App, device: Device) {
    command_after_notification_on(app, device, Topics::default());
}

fn command_after_notification_on(app: App, device: Device, topics: Topics) {
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let prefix = topics.prefix.clone();
    let mut env = vec![("FERRULE_KAFKA__TOPIC_PREFIX", prefix.clone())];
    if topics.created_beforehand {
        let (gateway, bridge) = (format!("gw-{tenant}"), format!("br-{tenant}"));
        let mut names: Vec<String> = ["telemetry", "event", "command", "command_response"]
            .iter()
            .map(|kind| format!("{prefix}hono.{kind}.{tenant}"))
            .collect();
        names.push(format!("{prefix}hono.command_internal.{gateway}"));
        names.push(format!("{prefix}ferrule.command_outcome.{bridge}"));
        create_topics(&names);
        env.extend([
            ("FERRULE_KAFKA__CREATE_TOPICS", "false".to_owned()),
            ("FERRULE_GATEWAY__INSTANCE_ID", gateway),
            ("FERRULE_BRIDGE__INSTANCE_ID", bridge),
        ]);
    }
    let f = Ferrule::start_for_commands_with(&tenant, &prefix, &env);
    provision(&f, &tenant);

    // The application runs first, as it would in production, and sends nothing on its own.
    let timeout = SCRIPT_SECS.to_string();
    let mut application = match app {
        App::Amqp => Script::spawn(
            "amqp_application.py",
            DEBIAN_PYTHON,
            &[
                &f.amqp,
                &format!("{APP}@{tenant}"),
                APP_PASSWORD,
                &tenant,
                DEVICE,
                &timeout,
            ],
        ),
        App::Kafka => Script::spawn(
            "kafka_application.py",
            &kafka_python(),
            &[&kafka(), &tenant, DEVICE, &timeout, &prefix],
        ),
    };
    application.expect("ready", "the application did not start");

    // The device announces itself.
    let auth = format!("{DEVICE}@{tenant}:{DEVICE_PASSWORD}");
    let mut mqtt_device = None;
    let mut long_poll = None;
    match device {
        Device::Mqtt => {
            let (host, port) = f.mqtt.split_once(':').unwrap();
            let mut d = Script::spawn(
                "mqtt_device.py",
                DEBIAN_PYTHON,
                &[
                    host,
                    port,
                    &format!("{DEVICE}@{tenant}"),
                    DEVICE_PASSWORD,
                    &timeout,
                ],
            );
            let granted = d.expect("subscribed", "the MQTT device did not subscribe");
            assert_eq!(granted, serde_json::json!([1]), "SUBACK");
            mqtt_device = Some(d);
        }
        Device::Http => {
            let (url, auth) = (format!("{}/event", f.http), auth.clone());
            long_poll = Some(std::thread::spawn(move || {
                curl_with_headers(&[
                    "-u",
                    &auth,
                    "-H",
                    &format!("hono-ttd: {HTTP_TTD}"),
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                    r#"{"temp": 5}"#,
                    "--max-time",
                    "90",
                    &url,
                ])
            }));
        }
    }

    let n = application.expect(
        "notification",
        "the application never saw the device's notification",
    );
    assert_eq!(n["device_id"], DEVICE, "{n}");
    assert_eq!(n["qos"], 1, "{n}");
    assert_eq!(n["reachable"], true, "{n}");
    match device {
        Device::Mqtt => {
            assert_eq!(n["ttd"], -1, "{n}");
            assert_eq!(
                n["content_type"], "application/vnd.eclipse-hono-empty-notification",
                "{n}"
            );
            assert_eq!(n["body"], "", "{n}");
            assert_eq!(n["orig_adapter"], "hono-mqtt", "{n}");
        }
        Device::Http => {
            assert_eq!(n["ttd"], HTTP_TTD, "{n}");
            assert_eq!(n["content_type"], "application/json", "{n}");
            assert_eq!(n["body"], r#"{"temp": 5}"#, "{n}");
            assert_eq!(n["orig_adapter"], "hono-http", "{n}");
        }
    }
    if app == App::Kafka {
        assert_eq!(n["key"], DEVICE, "record key: {n}");
    }

    let command = application.expect("command", "the application did not send its command");
    let expected_outcome = match app {
        // The bridge settles the transfer once the device got the command (Hono's AMQP Command & Control API).
        App::Amqp => "ACCEPTED",
        App::Kafka => "written",
    };
    assert_eq!(command["outcome"], expected_outcome, "{command}");
    let payload = command["payload"].as_str().unwrap().to_owned();
    let request: Value = serde_json::from_str(&payload).unwrap();
    let answer = serde_json::json!({ "applied": request });

    // The device gets the command and answers it.
    match device {
        Device::Mqtt => {
            let mut d = mqtt_device.take().unwrap();
            let got = d.expect("command", "the MQTT device got no command");
            let topic = got["topic"].as_str().unwrap();
            let parts: Vec<&str> = topic.split('/').collect();
            assert_eq!(parts.len(), 6, "{topic}");
            assert_eq!(&parts[..4], ["command", "", "", "req"], "{topic}");
            assert!(!parts[4].is_empty(), "a request id: {topic}");
            assert_eq!(parts[5], "setBrightness", "{topic}");
            assert_eq!(got["payload"], payload.as_str(), "{got}");
            d.expect("responded", "the MQTT device could not answer");
            d.finish();
        }
        Device::Http => {
            let got = long_poll.take().unwrap().join().unwrap();
            assert_eq!(
                got.status, 200,
                "the long poll carries the command: {}",
                got.body
            );
            assert_eq!(got.header("hono-command"), Some("setBrightness"));
            assert_eq!(got.header("content-type"), Some("application/json"));
            assert_eq!(got.body, payload);
            let req_id = got
                .header("hono-cmd-req-id")
                .expect("a request/response command has hono-cmd-req-id")
                .to_owned();
            let answered = curl_with_headers(&[
                "-u",
                &auth,
                "-H",
                "content-type: application/json",
                "--data-binary",
                &answer.to_string(),
                &format!("{}/command/res/{req_id}?hono-cmd-status=200", f.http),
            ]);
            assert_eq!(answered.status, 202, "{}", answered.body);
        }
    }

    let r = application.expect("response", "the application got no response");
    assert_eq!(r["correlation_id"], command["correlation_id"], "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["device_id"], DEVICE, "{r}");
    assert_eq!(r["tenant_id"], tenant.as_str(), "{r}");
    assert_eq!(r["content_type"], "application/json", "{r}");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap())
        .unwrap_or_else(|_| panic!("a JSON response: {r}"));
    assert_eq!(body, answer, "{r}");
    if app == App::Kafka {
        assert_eq!(r["key"], DEVICE, "record key: {r}");
    }
    application.finish();
}

#[test]
fn amqp_application_commands_an_mqtt_device_once_it_subscribed() {
    command_after_notification(App::Amqp, Device::Mqtt);
}

#[test]
fn amqp_application_commands_a_long_polling_http_device() {
    command_after_notification(App::Amqp, Device::Http);
}

#[test]
fn kafka_application_commands_an_mqtt_device_once_it_subscribed() {
    command_after_notification(App::Kafka, Device::Mqtt);
}

#[test]
fn kafka_application_commands_a_long_polling_http_device() {
    command_after_notification(App::Kafka, Device::Http);
}

#[test]
fn kafka_application_commands_an_http_device_on_prefixed_topics() {
    let prefix = format!("p{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    command_after_notification_on(
        App::Kafka,
        Device::Http,
        Topics {
            prefix,
            created_beforehand: false,
        },
    );
}

#[test]
fn amqp_application_commands_an_mqtt_device_on_topics_created_beforehand() {
    command_after_notification_on(
        App::Amqp,
        Device::Mqtt,
        Topics {
            prefix: String::new(),
            created_beforehand: true,
        },
    );
}

/// Creates topics as an operator would before starting Ferrule with `create_topics = false`.
fn create_topics(names: &[String]) {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("log_level", "3")
        .create()
        .unwrap();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1)))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for r in rt
        .block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .unwrap()
    {
        r.unwrap();
    }
}
