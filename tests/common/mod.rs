//! `ferrule all` started the way a user starts it, on free ports, against the real
//! PostgreSQL and broker; and curl.
#![allow(dead_code)]

pub mod otlp;
pub mod script;
#[allow(unused_imports)]
pub use script::*;

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "all-in-one-test-secret";

/// A port for a server of the test to listen on. Taken below Linux's ephemeral range
/// (32768–60999): a port the kernel handed out for `:0` is free again once probed, and an
/// outgoing connection (curl, a Kafka client) may take it as its local port before the
/// server binds it. Ports are handed out in turn from a random start, so the tests of one
/// process never get the same one, and each is checked to be free now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (uuid::Uuid::new_v4().as_u128() % u128::from(COUNT)) as u16;
    let _ = NEXT.compare_exchange(0, start + 1, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        // Free for TCP and UDP alike: CoAP listens on UDP.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// Where scripts/lib.sh keeps the tools it installs: `FERRULE_HOME`, else
/// `~/.local/share/ferrule`.
pub fn ferrule_home() -> String {
    std::env::var("FERRULE_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.local/share/ferrule",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

/// Every record value of `topic` on the cluster at `bootstrap`, read from the start until
/// `want` are all seen and nothing more came for `quiet` (the writers are gone), or a minute
/// passed; duplicates included.
pub fn topic_values(
    bootstrap: &str,
    topic: &str,
    want: &std::collections::HashSet<String>,
    quiet: Duration,
) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("log_level", "3")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let (mut values, mut seen) = (Vec::new(), std::collections::HashSet::new());
    let (start, mut last) = (Instant::now(), Instant::now());
    while (!want.is_subset(&seen) || last.elapsed() < quiet)
        && start.elapsed() < Duration::from_secs(60)
    {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            seen.insert(value.clone());
            values.push(value);
            last = Instant::now();
        }
    }
    values
}

/// The rows `query` returns from the database at `url` (psql, one line per row, columns
/// separated by `|`); panics when it fails.
pub fn psql(url: &str, query: &str) -> Vec<String> {
    let out = Command::new("psql")
        .args([url, "-Atqc", query])
        .output()
        .expect("psql is installed");
    assert!(out.status.success(), "{query}: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every live command subscription of `tenant` as (device, instance), newest last per device,
/// as the routers see it: read from the route topic on `bootstrap`.
pub fn subscriptions(bootstrap: &str, tenant: &str) -> Vec<(String, String)> {
    let kafka = ferrule_kafka::KafkaConfig {
        bootstrap_servers: bootstrap.to_owned(),
        consumer_fetch_wait_ms: 20,
        ..Default::default()
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            ferrule_registry::device_connection::RouteLog::shared(&kafka)
                .await
                .unwrap()
                .subscriptions_of(tenant)
                .await
                .unwrap()
        })
}

pub fn database_url() -> String {
    std::env::var("FERRULE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into())
}

pub fn kafka() -> String {
    std::env::var("FERRULE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub struct Ferrule {
    pub child: Child,
    pub registry: String,
    pub health: String,
    pub http: String,
    /// `amqp://127.0.0.1:<port>` of the AMQP bridge.
    pub amqp: String,
    /// `127.0.0.1:<port>` of the MQTT adapter.
    pub mqtt: String,
    /// `127.0.0.1:<port>` of the CoAP adapter (UDP).
    pub coap: String,
    /// `127.0.0.1:<port>` of the CoAP adapter over DTLS (UDP).
    pub coaps: String,
}

impl Ferrule {
    pub fn start(kafka: &str) -> Ferrule {
        Self::start_with(kafka, &[])
    }

    /// Started and ready for command tests of `tenant`: its router serves only that tenant
    /// (a new router group reads every command topic from the beginning), and the bridge
    /// waits up to 30 s for a command's fate, room for a loaded machine.
    pub fn start_for_commands(tenant: &str) -> Ferrule {
        Self::start_for_commands_with(tenant, "", &[])
    }

    /// [`Self::start_for_commands`] with topic names behind `prefix` (`kafka.topic_prefix`)
    /// and extra `FERRULE_…` variables.
    pub fn start_for_commands_with(tenant: &str, prefix: &str, env: &[(&str, String)]) -> Ferrule {
        let mut all = vec![
            (
                "FERRULE_ROUTER__TOPIC_PATTERN",
                format!("{prefix}hono.command.{tenant}"),
            ),
            (
                "FERRULE_BRIDGE__COMMAND_OUTCOME_TIMEOUT_MS",
                "30000".to_owned(),
            ),
        ];
        all.extend(env.iter().cloned());
        let mut f = Self::start_with(&kafka(), &all);
        f.wait_readiness(200);
        f
    }

    /// Starts with extra `FERRULE_…` variables, e.g. a TLS certificate.
    pub fn start_with(kafka: &str, env: &[(&str, String)]) -> Ferrule {
        // The logs (on stdout) show only when asked for with FERRULE_TEST_LOG.
        let stdout = if std::env::var_os("FERRULE_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        Self::spawn(kafka, env, stdout)
    }

    /// Like [`Ferrule::start_with`], its log (stdout) written to the file `log`.
    pub fn start_logging_to(kafka: &str, env: &[(&str, String)], log: &Path) -> Ferrule {
        let file = std::fs::File::create(log).expect("the log file can be created");
        Self::spawn(kafka, env, Stdio::from(file))
    }

    fn spawn(kafka: &str, env: &[(&str, String)], stdout: Stdio) -> Ferrule {
        let (registry, health, http, mqtt) = (free_port(), free_port(), free_port(), free_port());
        let (amqp, coap, coaps) = (free_port(), free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_ferrule"))
            .arg("all")
            .env("FERRULE_REGISTRY__BIND", format!("127.0.0.1:{registry}"))
            .env("FERRULE_HEALTH__BIND", format!("127.0.0.1:{health}"))
            .env("FERRULE_GATEWAY__HTTP__BIND", format!("127.0.0.1:{http}"))
            .env("FERRULE_GATEWAY__MQTT__BIND", format!("127.0.0.1:{mqtt}"))
            .env("FERRULE_GATEWAY__COAP__BIND", format!("127.0.0.1:{coap}"))
            .env(
                "FERRULE_GATEWAY__COAP__DTLS_BIND",
                format!("127.0.0.1:{coaps}"),
            )
            .env("FERRULE_BRIDGE__BIND", format!("127.0.0.1:{amqp}"))
            .env("FERRULE_DATABASE__URL", database_url())
            .env("FERRULE_KAFKA__BOOTSTRAP_SERVERS", kafka)
            .env("FERRULE_KAFKA__METADATA_TIMEOUT_MS", "500")
            .env("FERRULE_REGISTRY__MANAGEMENT__PASSWORD", PASSWORD)
            // A router group of its own: a killed test process must not hold partitions of another.
            .env(
                "FERRULE_ROUTER__GROUP_ID",
                format!("router-{}", uuid::Uuid::new_v4().simple()),
            )
            .env("FERRULE_REGISTRY__PLAIN_PASSWORD_COST", "4")
            .env(
                "RUST_LOG",
                std::env::var("FERRULE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(stdout)
            .spawn()
            .expect("ferrule binary starts");
        Ferrule {
            child,
            registry: format!("http://127.0.0.1:{registry}"),
            health: format!("http://127.0.0.1:{health}"),
            http: format!("http://127.0.0.1:{http}"),
            amqp: format!("amqp://127.0.0.1:{amqp}"),
            mqtt: format!("127.0.0.1:{mqtt}"),
            coap: format!("127.0.0.1:{coap}"),
            coaps: format!("127.0.0.1:{coaps}"),
        }
    }

    /// Polls `/readiness` until it answers `want` (or panics after 20 s).
    pub fn wait_readiness(&mut self, want: u16) -> Value {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ferrule exited early: {status}");
            }
            let (code, body) = curl(&["-s", &format!("{}/readiness", self.health)]);
            if code == want {
                return serde_json::from_str(&body).unwrap();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "readiness stayed {code}: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A request to the registry's management API as its administrator, with a JSON body:
    /// the status and the answer.
    pub fn admin(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        admin_request(&self.registry, method, path, body)
    }

    /// [`Self::admin`], which must succeed (2xx).
    pub fn admin_ok(&self, method: &str, path: &str, body: &str) {
        admin_ok(&self.registry, method, path, body);
    }

    /// SIGTERM, then the exit status (panics after 15 s).
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate();
        self.wait_exit(Duration::from_secs(15))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        sigterm(&self.child);
    }

    /// The exit status once the process ended by itself (panics after `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        exited(&mut self.child, limit, "ferrule")
    }
}

/// Sends SIGTERM to `child`, as an operator (or Kubernetes) stops a process.
pub fn sigterm(child: &Child) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// The exit status of `child` (called `name`) once it ended by itself (panics after `limit`).
pub fn exited(child: &mut Child, limit: Duration, name: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "{name}: no exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A request to the management API of the registry at `base` as its administrator, with a JSON
/// body: the status and the answer.
pub fn admin_request(base: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    curl(&[
        "-X",
        method,
        "-u",
        &format!("admin:{PASSWORD}"),
        "-H",
        "content-type: application/json",
        "-d",
        body,
        &format!("{base}{path}"),
    ])
}

/// [`admin_request`], which must succeed (2xx).
pub fn admin_ok(base: &str, method: &str, path: &str, body: &str) {
    let (code, text) = admin_request(base, method, path, body);
    assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
}

/// Whether `topic` exists (with partitions) on the cluster at `bootstrap`.
pub fn topic_exists(bootstrap: &str, topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    md.topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
}

impl Drop for Ferrule {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Runs curl, returning the HTTP status and the body.
pub fn curl(args: &[&str]) -> (u16, String) {
    let out: Output = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

impl Ferrule {
    /// Waits (up to 15 s) until this platform's series `name` with `labels` (a subset of its
    /// labels) has the value `want` on `/metrics`.
    pub fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let start = std::time::Instant::now();
        loop {
            let (_, text) = curl(&[&format!("{}/metrics", self.health)]);
            if metric(&text, name, labels) == Some(want) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{name}{labels:?} never {want}: {text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The value of the series `name` in Prometheus text `metrics` whose labels include every
/// `label="value"` of `labels`; `None` when there is none.
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (series_labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let wanted = labels
            .iter()
            .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
        wanted.then(|| value.trim().parse().ok()).flatten()
    })
}

/// Writes a request/response command for `device` to `hono.command.<tenant>` as a Kafka
/// application does, with the W3C trace context `traceparent`.
pub fn send_command(tenant: &str, device: &str, correlation_id: &str, traceparent: &str) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let headers = [
        ("device_id", device),
        ("subject", "ping"),
        ("correlation-id", correlation_id),
        ("response-required", "true"),
        ("traceparent", traceparent),
    ]
    .iter()
    .fold(OwnedHeaders::new(), |hs, (k, v)| {
        hs.insert(Header {
            key: k,
            value: Some(*v),
        })
    });
    let topic = format!("hono.command.{tenant}");
    producer
        .send(
            BaseRecord::to(&topic)
                .key(device)
                .payload("x")
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(std::time::Duration::from_secs(5)).unwrap();
}
