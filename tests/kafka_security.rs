//! `ferrule all` against a Kafka-protocol broker with security on: TLS with a test CA and
//! SASL/SCRAM logins. scripts/test starts that broker (`ensure_secure_broker` in
//! scripts/lib.sh: a SASL_SSL and a SASL_PLAINTEXT listener, one user per SCRAM mechanism) and
//! says where it is in `FERRULE_TEST_SECURE_KAFKA*`. Ferrule is given the connection the way an
//! operator gives it, as `FERRULE_KAFKA__…` variables. The tests' own Kafka clients (confluent-
//! kafka, `tests/apps/kafka_client.py`) log in the same way: an application's view of the topics.

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Debian's interpreter: the one python3-qpid-proton is installed for.
const DEBIAN_PYTHON: &str = "/usr/bin/python3";
const DEVICE: &str = "sensor";
const DEVICE_PASSWORD: &str = "sensor-secret";
const APP: &str = "backend";
const APP_PASSWORD: &str = "app-secret";
/// How long a test waits for a record, a log line or a readiness change on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(40);

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: scripts/test starts the secured broker (ensure_secure_broker in \
             scripts/lib.sh) and exports it; by hand: `source scripts/lib.sh; \
             ensure_secure_broker; source \"$(secure_broker_run)/env\"`"
        )
    })
}

/// A SASL user of the secured broker.
#[derive(Clone)]
struct Login {
    user: String,
    password: String,
}

impl Login {
    fn of(mechanism: &str) -> Login {
        Login {
            user: var(&format!("FERRULE_TEST_SECURE_KAFKA_{mechanism}_USER")),
            password: var(&format!("FERRULE_TEST_SECURE_KAFKA_{mechanism}_PASSWORD")),
        }
    }
}

/// How a client connects to the secured broker.
#[derive(Clone)]
struct Connection {
    bootstrap: String,
    /// librdkafka's `security.protocol`, which Ferrule's `kafka.security_protocol` takes too.
    protocol: &'static str,
    mechanism: &'static str,
    login: Login,
    /// The CA file the broker's certificate is checked against (TLS only).
    ca: Option<String>,
}

impl Connection {
    /// SASL_SSL with the CA that signed the broker's certificate.
    fn sasl_ssl(mechanism: &'static str, login: Login) -> Connection {
        Connection {
            bootstrap: var("FERRULE_TEST_SECURE_KAFKA"),
            protocol: "sasl_ssl",
            mechanism,
            login,
            ca: Some(var("FERRULE_TEST_SECURE_KAFKA_CA")),
        }
    }

    fn sasl_plaintext(mechanism: &'static str, login: Login) -> Connection {
        Connection {
            bootstrap: var("FERRULE_TEST_SECURE_KAFKA_SASL_PLAINTEXT"),
            protocol: "sasl_plaintext",
            mechanism,
            login,
            ca: None,
        }
    }

    /// Ferrule's `[kafka]` keys for this connection, as environment variables.
    fn ferrule_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("FERRULE_KAFKA__BOOTSTRAP_SERVERS", self.bootstrap.clone()),
            ("FERRULE_KAFKA__SECURITY_PROTOCOL", self.protocol.to_owned()),
            ("FERRULE_KAFKA__SASL_MECHANISM", self.mechanism.to_owned()),
            ("FERRULE_KAFKA__SASL_USERNAME", self.login.user.clone()),
            ("FERRULE_KAFKA__SASL_PASSWORD", self.login.password.clone()),
        ];
        if let Some(ca) = &self.ca {
            env.push(("FERRULE_KAFKA__SSL_CA_LOCATION", ca.clone()));
        }
        env
    }

    /// The same settings as librdkafka properties for the test's own client.
    fn client_args(&self) -> Vec<String> {
        let mut props = vec![
            format!("bootstrap.servers={}", self.bootstrap),
            format!("security.protocol={}", self.protocol),
            format!("sasl.mechanism={}", self.mechanism),
            format!("sasl.username={}", self.login.user),
            format!("sasl.password={}", self.login.password),
        ];
        if let Some(ca) = &self.ca {
            props.push(format!("ssl.ca.location={ca}"));
        }
        props
            .into_iter()
            .flat_map(|p| ["-X".to_owned(), p])
            .collect()
    }

    /// Runs `tests/apps/kafka_client.py` with this connection; its JSON lines, and whether it
    /// succeeded.
    fn client(&self, args: &[&str]) -> (bool, Vec<Value>) {
        let out = Command::new(kafka_python())
            .arg(format!(
                "{}/tests/apps/kafka_client.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args(self.client_args())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("the Kafka test client runs");
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect();
        (out.status.success(), lines)
    }

    /// The first `count` records of `topic`, read by an application with this login.
    fn read(&self, topic: &str, count: usize) -> Vec<Value> {
        let (ok, lines) = self.client(&[
            "consume",
            topic,
            &count.to_string(),
            &PATIENCE.as_secs().to_string(),
        ]);
        assert!(ok, "reading {topic}: {lines:?}");
        lines
            .into_iter()
            .filter_map(|l| l.get("record").cloned())
            .collect()
    }

    /// Writes a record with these headers; returns once the broker has it.
    fn write(&self, topic: &str, key: &str, value: &str, headers: &[(&str, &str)]) {
        let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["produce", topic, key, value];
        args.extend(headers.iter().map(String::as_str));
        let (ok, lines) = self.client(&args);
        assert!(ok, "writing to {topic}: {lines:?}");
    }

    /// Creates `topic` as an operator would, logged in with this connection.
    fn create_topic(&self, topic: &str) {
        let (ok, lines) = self.client(&["create", topic, "1"]);
        assert!(ok, "creating {topic}: {lines:?}");
    }

    /// `ferrule check-kafka` with this connection, as an operator runs it.
    fn check_kafka(&self) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ferrule"))
            .arg("check-kafka")
            .env_remove("RUST_LOG")
            .envs(self.ferrule_env())
            .env("FERRULE_KAFKA__METADATA_TIMEOUT_MS", "5000")
            .output()
            .expect("ferrule check-kafka runs")
    }
}

/// `ferrule all` connected with `conn`, its router serving `tenant`'s commands only, its log
/// kept in a file.
struct Run {
    ferrule: Ferrule,
    log: LogFile,
}

/// A log file, removed again unless the test failed.
struct LogFile(PathBuf);

impl Drop for LogFile {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Run {
    fn start(conn: &Connection, tenant: &str) -> Run {
        Self::start_with(conn, tenant, &[])
    }

    /// [`Self::start`] with more `FERRULE_…` variables.
    fn start_with(conn: &Connection, tenant: &str, more: &[(&'static str, String)]) -> Run {
        let log = std::env::temp_dir().join(format!(
            "ferrule-kafka-security-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let mut env = conn.ferrule_env();
        env.push((
            "FERRULE_ROUTER__TOPIC_PATTERN",
            format!("hono.command.{tenant}"),
        ));
        env.push((
            "FERRULE_BRIDGE__COMMAND_OUTCOME_TIMEOUT_MS",
            "30000".to_owned(),
        ));
        // librdkafka's reports come through the `log` facade at error and warn level.
        env.push(("RUST_LOG", "warn".to_owned()));
        env.extend(more.iter().cloned());
        let ferrule = Ferrule::start_logging_to(&conn.bootstrap, &env, &log);
        Run {
            ferrule,
            log: LogFile(log),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log.0).unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle` (in any case); returns that line.
    fn wait_log(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.log_text();
            if let Some(line) = find_line(&log, needle) {
                return line;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the log ({}) never said {needle:?}:\n{log}",
                self.log.0.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until readiness reports Kafka down, PostgreSQL up, and the Kafka probe's error
    /// names `cause` (in any case).
    fn wait_kafka_down(&mut self, cause: &str) {
        let start = Instant::now();
        loop {
            let ready = self.ferrule.wait_readiness(503);
            let kafka = &ready["checks"]["kafka"];
            let error = kafka["error"].as_str().unwrap_or_default();
            if ready["checks"]["postgresql"]["status"] == "UP"
                && kafka["status"] == "DOWN"
                && find_line(error, cause).is_some()
            {
                return;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "readiness never named {cause:?}: {ready}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn find_line(text: &str, needle: &str) -> Option<String> {
    let needle = needle.to_lowercase();
    text.lines()
        .find(|l| l.to_lowercase().contains(&needle))
        .map(str::to_owned)
}

fn new_tenant() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

fn admin(f: &Ferrule, method: &str, path: &str, body: &str) {
    f.admin_ok(method, path, body);
}

/// The tenant, with an application's and a device's credentials.
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

/// The device sends `body` to the HTTP adapter's `endpoint` (QoS 1: answered once the broker
/// has it).
fn upload(f: &Ferrule, tenant: &str, endpoint: &str, body: &str) {
    let (code, text) = curl(&[
        "-u",
        &format!("{DEVICE}@{tenant}:{DEVICE_PASSWORD}"),
        "-H",
        "content-type: text/plain",
        "-H",
        "qos-level: 1",
        "--data-binary",
        body,
        &format!("{}/{endpoint}", f.http),
    ]);
    assert_eq!(code, 202, "{endpoint}: {text}");
}

/// Ferrule is ready with `conn`, and telemetry a device uploads lands in the tenant's topic,
/// where an application logged in the same way reads it.
fn telemetry_lands(conn: &Connection) {
    let tenant = new_tenant();
    let mut run = Run::start(conn, &tenant);
    let ready = run.ferrule.wait_readiness(200);
    assert_eq!(ready["checks"]["kafka"]["status"], "UP", "{ready}");
    provision(&run.ferrule, &tenant);
    upload(&run.ferrule, &tenant, "telemetry", "21.5");
    let records = conn.read(&format!("hono.telemetry.{tenant}"), 1);
    let r = &records[0];
    assert_eq!(r["value"], "21.5", "{r}");
    assert_eq!(r["key"], DEVICE, "{r}");
    assert_eq!(r["headers"]["device_id"], DEVICE, "{r}");
    assert_eq!(r["headers"]["orig_adapter"], "hono-http", "{r}");
}

/// A refused connection: readiness reports Kafka down and why, the log says why, and
/// `ferrule check-kafka` fails saying why.
fn refused(conn: &Connection, cause: &str) {
    let mut run = Run::start(conn, &new_tenant());
    run.wait_kafka_down(cause);
    run.wait_log(cause);
    let out = conn.check_kafka();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "check-kafka succeeded:\n{printed}");
    assert!(
        find_line(&printed, cause).is_some(),
        "check-kafka did not say {cause:?}:\n{printed}"
    );
}

/// curl with `-i`: the status, the headers (names in lower case) and the body.
fn curl_with_headers(args: &[&str]) -> (u16, Vec<(String, String)>, String) {
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
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Every path through Kafka over SASL_SSL with SCRAM-SHA-512: the HTTP adapter's telemetry in
/// the tenant's topic, a command an application writes to Kafka reaching a long-polling device
/// and its answer coming back on the response topic, and the AMQP bridge delivering an event.
#[test]
fn ferrule_all_works_over_sasl_ssl_with_scram_sha_512() {
    let conn = Connection::sasl_ssl("SCRAM-SHA-512", Login::of("SCRAM512"));
    let tenant = new_tenant();
    let mut run = Run::start(&conn, &tenant);
    let ready = run.ferrule.wait_readiness(200);
    assert_eq!(ready["checks"]["kafka"]["status"], "UP", "{ready}");
    let f = &run.ferrule;
    provision(f, &tenant);

    // Telemetry in.
    upload(f, &tenant, "telemetry", "21.5");
    let telemetry = format!("hono.telemetry.{tenant}");
    let r = &conn.read(&telemetry, 1)[0];
    assert_eq!(r["value"], "21.5", "{r}");
    assert_eq!(r["headers"]["device_id"], DEVICE, "{r}");
    assert_eq!(r["headers"]["orig_adapter"], "hono-http", "{r}");

    // A request/response command for the device, which long-polls with hono-ttd.
    let (url, auth) = (
        format!("{}/telemetry", f.http),
        format!("{DEVICE}@{tenant}:{DEVICE_PASSWORD}"),
    );
    let poll = std::thread::spawn(move || {
        curl_with_headers(&[
            "-u",
            &auth,
            "-H",
            "hono-ttd: 50",
            "-H",
            "content-type: text/plain",
            "--data-binary",
            "waiting",
            "--max-time",
            "90",
            &url,
        ])
    });
    // The poll is registered before its telemetry is written.
    let waiting = conn.read(&telemetry, 2);
    assert_eq!(waiting[1]["value"], "waiting", "{waiting:?}");
    assert_eq!(waiting[1]["headers"]["ttd"], "50", "{waiting:?}");
    conn.write(
        &format!("hono.command.{tenant}"),
        DEVICE,
        r#"{"level": 3}"#,
        &[
            ("device_id", DEVICE),
            ("subject", "setLevel"),
            ("correlation-id", "secure-1"),
            ("response-required", "true"),
            ("content-type", "application/json"),
        ],
    );
    let (status, headers, body) = poll.join().unwrap();
    assert_eq!(status, 200, "the long poll carries the command: {body}");
    assert_eq!(header(&headers, "hono-command"), Some("setLevel"));
    assert_eq!(body, r#"{"level": 3}"#);
    let req_id = header(&headers, "hono-cmd-req-id").expect("a request id");
    let (code, text) = curl(&[
        "-u",
        &format!("{DEVICE}@{tenant}:{DEVICE_PASSWORD}"),
        "-H",
        "content-type: application/json",
        "--data-binary",
        r#"{"level": "set"}"#,
        &format!("{}/command/res/{req_id}?hono-cmd-status=200", f.http),
    ]);
    assert_eq!(code, 202, "{text}");
    let r = &conn.read(&format!("hono.command_response.{tenant}"), 1)[0];
    assert_eq!(r["headers"]["correlation-id"], "secure-1", "{r}");
    assert_eq!(r["headers"]["status"], "200", "{r}");
    assert_eq!(r["headers"]["device_id"], DEVICE, "{r}");
    assert_eq!(r["headers"]["tenant_id"], tenant.as_str(), "{r}");
    assert_eq!(r["value"], r#"{"level": "set"}"#, "{r}");

    // The bridge delivers an event to an AMQP application.
    upload(f, &tenant, "event", "door opened");
    let out = Command::new(DEBIAN_PYTHON)
        .args([
            &format!("{}/tests/amqp/receive.py", env!("CARGO_MANIFEST_DIR")),
            &f.amqp,
            &format!("{APP}@{tenant}"),
            APP_PASSWORD,
            &format!("event/{tenant}"),
            "1",
            &PATIENCE.as_secs().to_string(),
        ])
        .output()
        .expect("python3-qpid-proton is installed (scripts/test installs it)");
    let got: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let event = got.last().unwrap_or_else(|| {
        panic!(
            "the AMQP application printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(event["body"], "door opened", "{got:?}");
    assert_eq!(event["properties"]["device_id"], DEVICE, "{got:?}");

    assert!(run.ferrule.child.try_wait().unwrap().is_none());
    let Run { ferrule, .. } = run;
    assert!(ferrule.stop().success(), "SIGTERM ends ferrule cleanly");
}

/// The other SCRAM mechanism, with a user of its own.
#[test]
fn telemetry_lands_over_sasl_ssl_with_scram_sha_256() {
    telemetry_lands(&Connection::sasl_ssl(
        "SCRAM-SHA-256",
        Login::of("SCRAM256"),
    ));
}

/// SASL without TLS (a broker listener for `sasl_plaintext`).
#[test]
fn telemetry_lands_over_sasl_plaintext_with_scram_sha_512() {
    telemetry_lands(&Connection::sasl_plaintext(
        "SCRAM-SHA-512",
        Login::of("SCRAM512"),
    ));
}

/// On a secured cluster that Ferrule may not create topics on, a topic created beforehand is
/// used and an upload to a tenant whose topic is missing gets 503; nothing is created.
#[test]
fn without_topic_creation_pre_created_topics_are_used_over_sasl_ssl() {
    let conn = Connection::sasl_ssl("SCRAM-SHA-512", Login::of("SCRAM512"));
    let (tenant, missing) = (new_tenant(), new_tenant());
    conn.create_topic(&format!("hono.telemetry.{tenant}"));
    let mut run = Run::start_with(
        &conn,
        &tenant,
        &[("FERRULE_KAFKA__CREATE_TOPICS", "false".to_owned())],
    );
    run.ferrule.wait_readiness(200);
    provision(&run.ferrule, &tenant);
    provision(&run.ferrule, &missing);
    upload(&run.ferrule, &tenant, "telemetry", "21.5");
    assert_eq!(
        conn.read(&format!("hono.telemetry.{tenant}"), 1)[0]["value"],
        "21.5"
    );
    let (code, body) = curl(&[
        "-u",
        &format!("{DEVICE}@{missing}:{DEVICE_PASSWORD}"),
        "-H",
        "content-type: text/plain",
        "-H",
        "qos-level: 1",
        "--data-binary",
        "22",
        &format!("{}/telemetry", run.ferrule.http),
    ]);
    assert_eq!(code, 503, "{body}");
    run.wait_log(&format!("hono.telemetry.{missing}"));
}

/// The broker offers SCRAM only: a PLAIN login is refused, and Ferrule says so.
#[test]
fn a_mechanism_the_broker_does_not_offer_is_reported() {
    let conn = Connection::sasl_ssl("PLAIN", Login::of("SCRAM512"));
    refused(&conn, "Unsupported SASL mechanism");
}

#[test]
fn a_wrong_sasl_password_is_reported() {
    let mut login = Login::of("SCRAM512");
    login.password.push_str("-wrong");
    let conn = Connection::sasl_ssl("SCRAM-SHA-512", login);
    refused(&conn, "authentication failed");
}

/// The broker's certificate was not signed by the CA Ferrule is given.
#[test]
fn a_ca_that_did_not_sign_the_broker_certificate_is_reported() {
    let mut conn = Connection::sasl_ssl("SCRAM-SHA-512", Login::of("SCRAM512"));
    conn.ca = Some(var("FERRULE_TEST_SECURE_KAFKA_OTHER_CA"));
    refused(&conn, "certificate verify failed");
}
