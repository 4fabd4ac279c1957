//! Ferrule as a fleet on this machine, with real parts on loopback: a Kafka-protocol cluster of
//! two nisshi brokers (one cluster id, PostgreSQL storage), one `ferrule registry`, two
//! `ferrule router`, two `ferrule bridge` and two `ferrule gateway` processes, and HAProxy in
//! front of the gateways (MQTT, HTTP) and the bridges (AMQP). Devices and applications connect
//! only through HAProxy.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const APP: &str = "fleet-app";
const APP_PASSWORD: &str = "fleet-app-secret";

fn nisshi() -> String {
    std::env::var("FERRULE_TEST_NISSHI")
        .unwrap_or_else(|_| format!("{}/tools/nisshi-0.8.1/bin/nisshi", ferrule_home()))
}

/// A child process killed when the test ends, however it ends.
struct Proc {
    name: String,
    child: Child,
    /// How a Ferrule service was started: it starts again the same way, on the same ports.
    start: Option<Start>,
}

struct Start {
    service: String,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Start {
    /// Runs `ferrule <service>`, its output appended to its log.
    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_ferrule"))
            .arg(&self.service)
            .envs(self.env.iter().cloned())
            .stdout(log)
            .spawn()
            .unwrap()
    }

    /// `http://…` of the service's health endpoint.
    fn health(&self) -> String {
        let (_, bind) = self
            .env
            .iter()
            .find(|(k, _)| k == "FERRULE_HEALTH__BIND")
            .unwrap();
        format!("http://{bind}")
    }
}

impl Proc {
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the (ended) Ferrule service again as before and waits until it is ready.
    fn restart(&mut self) {
        self.kill9();
        let start = self.start.as_ref().expect("a Ferrule service");
        self.child = start.spawn();
        wait_ready(&start.health(), &self.name);
    }

    /// Sends SIGTERM, as an operator (or Kubernetes) stops a service.
    fn sigterm(&self) {
        sigterm(&self.child);
    }

    /// Its exit status once it ended by itself (panics after 30 s).
    fn exited(&mut self) -> std::process::ExitStatus {
        exited(&mut self.child, Duration::from_secs(30), &self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Gateway {
    id: String,
    health: String,
    proc: Proc,
}

struct Fleet {
    dir: PathBuf,
    /// The fleet's databases: `<server>`, their names.
    storage: (String, Vec<String>),
    /// Ferrule's database.
    database: String,
    bootstrap: String,
    registry: String,
    /// HAProxy's ports.
    mqtt: String,
    http: String,
    amqp: String,
    gateways: Vec<Gateway>,
    /// The bridges' AMQP ports (`bridge-<n>`).
    bridge_ports: Vec<u16>,
    procs: Vec<Proc>,
}

fn wait_port(addr: &str, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} does not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_ready(health: &str, what: &str) {
    let start = Instant::now();
    loop {
        let (code, body) = curl(&[&format!("{health}/readiness")]);
        if code == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} not ready: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Fleet {
    fn start() -> Fleet {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("ferrule-fleet-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut procs = Vec::new();
        // The brokers' storage and Ferrule's registry: databases of their own in the tests'
        // PostgreSQL (the fleet's routers declare instances dead after 12 s: they must not
        // judge the gateways of other tests).
        let (server, _) = database_url()
            .rsplit_once('/')
            .map(|(s, d)| (s.to_owned(), d.to_owned()))
            .unwrap();
        let storage_db = format!("nisshi_fleet_{run}");
        let ferrule_db = format!("ferrule_fleet_{run}");
        for db in [&storage_db, &ferrule_db] {
            psql(
                &format!("{server}/postgres"),
                &format!("CREATE DATABASE {db}"),
            );
        }
        let db_url = format!("{server}/{ferrule_db}");
        let mut brokers = Vec::new();
        for n in 0..2 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let child = Command::new(nisshi())
                .args([
                    "broker",
                    "--cluster-id",
                    &format!("fleet-{run}"),
                    "--listener-url",
                    &format!("tcp://{addr}"),
                    "--advertised-listener-url",
                    &format!("tcp://{addr}"),
                    "--storage-engine",
                    &format!("{server}/{storage_db}?sslmode=disable"),
                    "--group-initial-rebalance-delay",
                    "0s",
                ])
                .stdout(log(&dir, &format!("broker-{n}")))
                .stderr(log(&dir, &format!("broker-{n}.err")))
                .spawn()
                .expect("the nisshi broker (scripts/test builds it; FERRULE_TEST_NISSHI)");
            procs.push(Proc {
                name: format!("broker-{n}"),
                child,
                start: None,
            });
            wait_port(&addr, "a broker");
            brokers.push(addr);
        }
        let bootstrap = brokers.join(",");
        let common = |health: u16| -> Vec<(String, String)> {
            vec![
                ("FERRULE_DATABASE__URL".into(), db_url.clone()),
                ("FERRULE_KAFKA__BOOTSTRAP_SERVERS".into(), bootstrap.clone()),
                ("FERRULE_KAFKA__METADATA_TIMEOUT_MS".into(), "1000".into()),
                ("FERRULE_KAFKA__CONSUMER_FETCH_WAIT_MS".into(), "20".into()),
                ("FERRULE_HEALTH__BIND".into(), format!("127.0.0.1:{health}")),
                (
                    "FERRULE_REGISTRY__MANAGEMENT__PASSWORD".into(),
                    PASSWORD.into(),
                ),
                ("FERRULE_REGISTRY__PLAIN_PASSWORD_COST".into(), "4".into()),
                ("FERRULE_SHUTDOWN__READINESS_DELAY_MS".into(), "0".into()),
                ("FERRULE_ROUTER__GROUP_ID".into(), format!("routers-{run}")),
                // A killed gateway is dead after 12 s (three missed heartbeats would be 30 s)
                // and forgotten, its topic deleted, right then.
                ("FERRULE_ROUTER__INSTANCE_TIMEOUT_SECS".into(), "12".into()),
                // The gateways beat three times within that.
                ("FERRULE_GATEWAY__INSTANCE_TIMEOUT_SECS".into(), "12".into()),
                ("FERRULE_ROUTER__PURGE_INTERVAL_SECS".into(), "1".into()),
                (
                    "FERRULE_ROUTER__FORGET_INSTANCES_AFTER_SECS".into(),
                    "12".into(),
                ),
                // A killed consumer's partitions move after 6 s, not librdkafka's 45.
                (
                    "FERRULE_KAFKA__CONSUMER__PROPERTIES__SESSION_TIMEOUT_MS".into(),
                    "6000".into(),
                ),
                (
                    "FERRULE_KAFKA__CONSUMER__PROPERTIES__HEARTBEAT_INTERVAL_MS".into(),
                    "1000".into(),
                ),
                (
                    "RUST_LOG".into(),
                    // The routers log the partitions they take and give up.
                    std::env::var("FERRULE_TEST_LOG")
                        .unwrap_or_else(|_| "warn,ferrule_command_router::forward=info".into()),
                ),
            ]
        };
        let spawn = |name: &str, service: &str, env: Vec<(String, String)>| -> Proc {
            let start = Start {
                service: service.to_owned(),
                env,
                log: dir.join(format!("{name}.log")),
            };
            Proc {
                name: name.to_owned(),
                child: start.spawn(),
                start: Some(start),
            }
        };
        let registry_port = free_port();
        let health = free_port();
        let mut env = common(health);
        env.push((
            "FERRULE_REGISTRY__BIND".into(),
            format!("127.0.0.1:{registry_port}"),
        ));
        procs.push(spawn("registry", "registry", env));
        wait_ready(&format!("http://127.0.0.1:{health}"), "the registry");
        let mut healths = Vec::new();
        for n in 0..2 {
            let health = free_port();
            procs.push(spawn(&format!("router-{n}"), "router", common(health)));
            healths.push((format!("router-{n}"), health));
        }
        let mut bridges = Vec::new();
        for n in 0..2 {
            let (health, amqp) = (free_port(), free_port());
            let mut env = common(health);
            env.push(("FERRULE_BRIDGE__BIND".into(), format!("127.0.0.1:{amqp}")));
            env.push((
                "FERRULE_BRIDGE__COMMAND_OUTCOME_TIMEOUT_MS".into(),
                "30000".into(),
            ));
            procs.push(spawn(&format!("bridge-{n}"), "bridge", env));
            healths.push((format!("bridge-{n}"), health));
            bridges.push((amqp, health));
        }
        let mut gateways = Vec::new();
        let mut gateway_ports = Vec::new();
        for n in 0..2 {
            let (health, mqtt, http) = (free_port(), free_port(), free_port());
            let id = format!("gw{n}-{run}");
            let mut env = common(health);
            env.extend([
                ("FERRULE_GATEWAY__INSTANCE_ID".into(), id.clone()),
                (
                    "FERRULE_GATEWAY__MQTT__BIND".into(),
                    format!("127.0.0.1:{mqtt}"),
                ),
                (
                    "FERRULE_GATEWAY__HTTP__BIND".into(),
                    format!("127.0.0.1:{http}"),
                ),
                ("FERRULE_GATEWAY__COAP__ENABLED".into(), "false".into()),
                ("FERRULE_GATEWAY__COAP__DTLS_ENABLED".into(), "false".into()),
            ]);
            let proc = spawn(&format!("gateway-{n}"), "gateway", env);
            gateways.push(Gateway {
                id,
                health: format!("http://127.0.0.1:{health}"),
                proc,
            });
            gateway_ports.push((mqtt, http, health));
        }
        for (name, health) in &healths {
            wait_ready(&format!("http://127.0.0.1:{health}"), name);
        }
        for g in &gateways {
            wait_ready(&g.health, &g.id);
        }
        // HAProxy: least connections, a server whose readiness is not 200 gets nothing new.
        let (mqtt, http, amqp) = (free_port(), free_port(), free_port());
        let haproxy_server = |n: usize, port: u16, health: u16| {
            format!(
                "    server s{n} 127.0.0.1:{port} check port {health} inter 500ms fall 1 rise 1\n"
            )
        };
        let mut cfg = String::from(
            "global\n    maxconn 2000\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
             timeout client 1h\n    timeout server 1h\n    retries 3\n    option redispatch\n",
        );
        for (front, port, servers) in [
            (
                "mqtt",
                mqtt,
                gateway_ports
                    .iter()
                    .enumerate()
                    .map(|(n, (p, _, h))| haproxy_server(n, *p, *h))
                    .collect::<String>(),
            ),
            (
                "http",
                http,
                gateway_ports
                    .iter()
                    .enumerate()
                    .map(|(n, (_, p, h))| haproxy_server(n, *p, *h))
                    .collect(),
            ),
            (
                "amqp",
                amqp,
                bridges
                    .iter()
                    .enumerate()
                    .map(|(n, (p, h))| haproxy_server(n, *p, *h))
                    .collect(),
            ),
        ] {
            cfg.push_str(&format!(
                "frontend {front}\n    bind 127.0.0.1:{port}\n    default_backend {front}-servers\n\
                 backend {front}-servers\n    balance leastconn\n    option httpchk GET /readiness\n\
                 {servers}"
            ));
        }
        let cfg_file = dir.join("haproxy.cfg");
        std::fs::write(&cfg_file, cfg).unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg_file)
            .stdout(log(&dir, "haproxy"))
            .stderr(log(&dir, "haproxy.err"))
            .spawn()
            .expect("haproxy (scripts/test installs it)");
        procs.push(Proc {
            name: "haproxy".into(),
            child,
            start: None,
        });
        for port in [mqtt, http, amqp] {
            wait_port(&format!("127.0.0.1:{port}"), "haproxy");
        }
        // The test's own reader of the route topic, ready before the first question to it.
        subscriptions(&bootstrap, "warm-up");
        Fleet {
            dir,
            storage: (server.clone(), vec![storage_db, ferrule_db]),
            database: db_url.clone(),
            bootstrap,
            registry: format!("http://127.0.0.1:{registry_port}"),
            mqtt: format!("127.0.0.1:{mqtt}"),
            http: format!("http://127.0.0.1:{http}"),
            amqp: format!("amqp://127.0.0.1:{amqp}"),
            gateways,
            bridge_ports: bridges.iter().map(|(amqp, _)| *amqp).collect(),
            procs,
        }
    }

    /// The partitions of `topic` the router `name` holds, from its log: what it was assigned
    /// less what was revoked, in order.
    fn held_partitions(&self, name: &str, topic: &str) -> BTreeSet<i32> {
        let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let prefix = format!("{topic}/");
        let mut held = BTreeSet::new();
        for line in log.lines() {
            let assigned = line.contains("command partitions assigned");
            if !assigned && !line.contains("command partitions revoked") {
                continue;
            }
            for (at, _) in line.match_indices(&prefix) {
                let digits: String = line[at + prefix.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                let partition = digits.parse().unwrap();
                if assigned {
                    held.insert(partition);
                } else {
                    held.remove(&partition);
                }
            }
        }
        held
    }

    /// The process called `name`.
    fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    fn admin(&self, method: &str, path: &str, body: &str) {
        admin_ok(&self.registry, method, path, body);
    }

    fn provision(&self, tenant: &str, devices: &[String]) {
        self.admin("POST", &format!("/v1/tenants/{tenant}"), "{}");
        self.admin(
            "PUT",
            &format!("/v1/applications/{tenant}/{APP}"),
            &serde_json::json!({"secrets": [{"pwd-plain": APP_PASSWORD}]}).to_string(),
        );
        for d in devices {
            self.admin("POST", &format!("/v1/devices/{tenant}/{d}"), "{}");
            let creds = serde_json::json!([{"type": "hashed-password", "auth-id": d,
                "secrets": [{"pwd-plain": format!("{d}-secret")}]}]);
            self.admin(
                "PUT",
                &format!("/v1/credentials/{tenant}/{d}"),
                &creds.to_string(),
            );
        }
    }

    /// Runs SQL on the registry's database: the first column of every row, as text.
    fn sql(&self, query: &str) -> Vec<String> {
        psql(&self.database, query)
    }

    /// The gateway instance holding each device's live command consumer.
    fn holders(&self, tenant: &str) -> Vec<(String, String)> {
        // The newest subscription per device is the one that counts.
        let mut newest = std::collections::BTreeMap::new();
        for (d, i) in subscriptions(&self.bootstrap, tenant) {
            newest.insert(d, i);
        }
        newest.into_iter().collect()
    }

    /// Every record value `topic` holds now: each partition read from its start to the high
    /// watermark it had when this began (no consumer group: nothing waits for a join).
    fn records(&self, topic: &str) -> Vec<String> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        let consumer = self.client::<BaseConsumer>();
        let mut ends = std::collections::HashMap::new();
        let mut assignment = rdkafka::TopicPartitionList::new();
        for (partition, low, high) in self.partitions(&consumer, topic) {
            if high > low {
                ends.insert(partition, high);
                assignment
                    .add_partition_offset(topic, partition, rdkafka::Offset::Offset(low))
                    .unwrap();
            }
        }
        consumer.assign(&assignment).unwrap();
        let (start, mut values) = (Instant::now(), Vec::new());
        while !ends.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{topic}: still to read {ends:?}"
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                values.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    ends.remove(&m.partition());
                }
            }
        }
        values
    }

    /// A Kafka client of the fleet's cluster (a consumer assigns partitions itself: its group
    /// only names it).
    fn client<C: rdkafka::config::FromClientConfig>(&self) -> C {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set(
                "group.id",
                format!("reader-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()
            .unwrap()
    }

    /// `topic`'s partitions with their low and high watermarks.
    fn partitions(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer,
        topic: &str,
    ) -> Vec<(i32, i64, i64)> {
        use rdkafka::consumer::Consumer;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
        metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout).unwrap();
                (p.id(), low, high)
            })
            .collect()
    }

    fn topic_exists(&self, topic: &str) -> bool {
        topic_exists(&self.bootstrap, topic)
    }

    /// Successful MQTT connections of `tenant` per gateway, from each gateway's metrics.
    fn connections_per_gateway(&self, tenant: &str) -> Vec<u64> {
        self.gateways
            .iter()
            .map(|g| {
                let (_, text) = curl(&[&format!("{}/metrics", g.health)]);
                text.lines()
                    .filter(|l| {
                        l.starts_with("hono_connections_attempts_total{")
                            && l.contains(&format!("tenant=\"{tenant}\""))
                            && l.contains("outcome=\"succeeded\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum()
            })
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let mut exited = Vec::new();
        for p in self.procs.iter_mut() {
            if p.child.try_wait().ok().flatten().is_some() {
                exited.push(p.name.clone());
            }
            p.kill9();
        }
        for g in self.gateways.iter_mut() {
            g.proc.kill9();
        }
        let (server, dbs) = &self.storage;
        for db in dbs {
            let _ = Command::new("psql")
                .args([&format!("{server}/postgres"), "-qc"])
                .arg(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .output();
        }
        if std::thread::panicking() {
            eprintln!(
                "fleet logs: {} (exited before the end: {exited:?})",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One `mqtt_publisher.py` per device of `tenant`, through HAProxy, for `secs` seconds,
/// connecting again whenever it loses the connection; `mode` adds its other flags (`listen`).
fn device_scripts(
    fleet: &Fleet,
    tenant: &str,
    devices: &[String],
    secs: u32,
    mode: &[&str],
) -> Vec<Script> {
    let (host, port) = fleet.mqtt.split_once(':').unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    devices
        .iter()
        .map(|d| {
            let mut args = vec![
                host.to_owned(),
                port.to_owned(),
                format!("{d}@{tenant}"),
                format!("{d}-secret"),
                format!("{run}-{d}"),
                secs.to_string(),
                "reconnect".to_owned(),
            ];
            args.extend(mode.iter().map(|m| (*m).to_owned()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Script::spawn("mqtt_publisher.py", DEBIAN_PYTHON, &args)
        })
        .collect()
}

/// `devices` of `tenant` publishing QoS 1 telemetry through HAProxy for `secs` seconds as fast as
/// it is acknowledged; each has its first 50 messages acknowledged when this returns.
/// Every other device publishes events instead of telemetry.
fn publishers(fleet: &Fleet, tenant: &str, devices: &[String], secs: u32) -> Vec<Script> {
    let mut publishers: Vec<Script> = devices
        .iter()
        .enumerate()
        .flat_map(|(n, d)| {
            let mode: &[&str] = if n % 2 == 1 { &["event"] } else { &[] };
            device_scripts(fleet, tenant, std::slice::from_ref(d), secs, mode)
        })
        .collect();
    for p in &mut publishers {
        p.expect("flowing", "QoS 1 telemetry and events through HAProxy");
    }
    publishers
}

/// How many records `tenant`'s telemetry and event topics hold now (their high watermarks).
fn upload_count(fleet: &Fleet, tenant: &str) -> i64 {
    let consumer = fleet.client::<rdkafka::consumer::BaseConsumer>();
    ["telemetry", "event"]
        .iter()
        .flat_map(|kind| fleet.partitions(&consumer, &format!("hono.{kind}.{tenant}")))
        .map(|(_, low, high)| high - low)
        .sum()
}

/// The records of `tenant`'s telemetry and event topics.
fn uploads(fleet: &Fleet, tenant: &str) -> Vec<String> {
    let mut records = fleet.records(&format!("hono.telemetry.{tenant}"));
    records.extend(fleet.records(&format!("hono.event.{tenant}")));
    records
}

/// Each publisher's final report (`done`).
fn reports(publishers: &mut [Script]) -> Vec<serde_json::Value> {
    publishers
        .iter_mut()
        .map(|p| p.expect("done", "the publisher's report"))
        .collect()
}

/// Every message the publishers saw acknowledged is in `tenant`'s telemetry or event topic;
/// prints the figures (published, acknowledged, found, duplicated).
fn nothing_acknowledged_lost(
    fleet: &Fleet,
    tenant: &str,
    what: &str,
    reports: &[serde_json::Value],
) {
    let published: u64 = reports
        .iter()
        .map(|r| r["published"].as_u64().unwrap())
        .sum();
    let acked: Vec<&str> = reports
        .iter()
        .flat_map(|r| r["acked"].as_array().unwrap())
        .map(|v| v.as_str().unwrap())
        .collect();
    // Not the empty reachability notifications (`ttd`) on the event topic.
    let records: Vec<String> = uploads(fleet, tenant)
        .into_iter()
        .filter(|r| !r.is_empty())
        .collect();
    let found: std::collections::HashSet<&str> = records.iter().map(String::as_str).collect();
    let missing = acked.iter().filter(|a| !found.contains(*a)).count();
    eprintln!(
        "{what}: published {published}, acknowledged {}, in Kafka {} ({} duplicates), \
         acknowledged but missing {missing}",
        acked.len(),
        found.len(),
        records.len() - found.len()
    );
    assert_eq!(missing, 0, "acknowledged messages lost");
}

fn log(dir: &std::path::Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
}

#[test]
fn commands_reach_devices_on_either_gateway_through_haproxy_from_kafka_and_amqp() {
    let mut fleet = Fleet::start();
    let tenant = format!("fleet-{}", uuid::Uuid::new_v4().simple());
    // Four devices a round, new ones each round: an application must not take an earlier
    // round's notification for a device that is not there.
    const ROUNDS: usize = 4;
    let all: Vec<String> = (0..4 * ROUNDS).map(|n| format!("dev-{n}")).collect();
    fleet.provision(&tenant, &all);
    let (host, port) = fleet.mqtt.split_once(':').unwrap();
    // Which gateways held a device while a Kafka (`false`) or an AMQP (`true`) application's
    // command reached it. The devices come one after the other, so HAProxy's least-connections
    // choice alternates; the applications take turns the other way round each round.
    let mut reached: [BTreeSet<String>; 2] = Default::default();
    for (round, devices) in all.chunks(4).enumerate() {
        if reached.iter().all(|r| r.len() == 2) {
            break;
        }
        for (n, d) in devices.iter().enumerate() {
            let amqp = (n + round) % 2 == 1;
            let mut app = if !amqp {
                Script::spawn(
                    "kafka_application.py",
                    &kafka_python(),
                    &[&fleet.bootstrap, &tenant, d, "60"],
                )
            } else {
                Script::spawn(
                    "amqp_application.py",
                    DEBIAN_PYTHON,
                    &[
                        &fleet.amqp,
                        &format!("{APP}@{tenant}"),
                        APP_PASSWORD,
                        &tenant,
                        d,
                        "60",
                    ],
                )
            };
            app.expect("ready", "the application attaches");
            let mut device = Script::spawn(
                "mqtt_device.py",
                DEBIAN_PYTHON,
                &[
                    host,
                    port,
                    &format!("{d}@{tenant}"),
                    &format!("{d}-secret"),
                    "60",
                    // Connected a while after its answer: the test asks where it is.
                    "1",
                ],
            );
            device.expect("subscribed", "the device subscribes through HAProxy");
            let response = app.expect("response", "the device's response reaches the application");
            assert_eq!(response["status"], 200, "{d}: {response}");
            device.expect("responded", "the device answered");
            let holder = fleet
                .holders(&tenant)
                .into_iter()
                .find(|(x, _)| x == d)
                .map(|(_, instance)| instance)
                .expect("the device's gateway");
            device.finish();
            app.finish();
            reached[usize::from(amqp)].insert(holder);
        }
    }
    eprintln!(
        "commands from Kafka reached devices on {:?}, from AMQP on {:?}",
        reached[0], reached[1]
    );
    assert!(
        reached.iter().all(|r| r.len() == 2),
        "both applications reach devices on both gateways"
    );
    // HTTP through HAProxy as well.
    let (code, body) = curl(&[
        "-u",
        &format!("dev-0@{tenant}:dev-0-secret"),
        "-H",
        "content-type: text/plain",
        "-d",
        "via-haproxy",
        &format!("{}/event", fleet.http),
    ]);
    assert_eq!(code, 202, "{body}");
    let events = fleet.records(&format!("hono.event.{tenant}"));
    assert!(events.iter().any(|e| e == "via-haproxy"), "{events:?}");
    // The gateways counted the device connections they took.
    let per_gateway = fleet.connections_per_gateway(&tenant);
    assert!(
        per_gateway.iter().all(|&n| n >= 1),
        "device connections per gateway: {per_gateway:?}"
    );

    a_killed_gateway_loses_nothing_acknowledged(&mut fleet);
    a_killed_router_loses_and_repeats_no_command(&mut fleet);
    a_killed_bridge_loses_no_event(&mut fleet);
    a_killed_broker_loses_nothing_acknowledged(&mut fleet);
}

/// kill -9 of the bridge an application consumes events from: the application signs in again
/// through HAProxy and goes on. Then the bridge it is on is stopped with SIGTERM (exit 0) and it
/// moves once more. It gets every event (at least once: the ones it had not settled come
/// again).
fn a_killed_bridge_loses_no_event(fleet: &mut Fleet) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let tenant = format!("fleet-kill-bridge-{}", uuid::Uuid::new_v4().simple());
    fleet.provision(&tenant, &["ev-0".to_owned()]);
    // Events in Kafka as a gateway writes them.
    const EVENTS: usize = 2000;
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &fleet.bootstrap)
        .set("log_level", "3")
        .create()
        .unwrap();
    let topic = format!("hono.event.{tenant}");
    for n in 0..EVENTS {
        let body = format!("ev-{n}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "device_id",
                value: Some("ev-0"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("text/plain"),
            });
        loop {
            match producer.send(
                BaseRecord::to(&topic)
                    .key("ev-0")
                    .payload(&body)
                    .headers(headers.clone()),
            ) {
                Ok(()) => break,
                Err(_) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let mut app = Script::spawn(
        "amqp_events.py",
        DEBIAN_PYTHON,
        &[
            &fleet.amqp,
            &format!("{APP}@{tenant}"),
            APP_PASSWORD,
            &tenant,
            &EVENTS.to_string(),
            "90",
            // Some 8 s for all of them: time for a kill and a stop.
            "4",
        ],
    );
    app.expect("progress", "events reach the application");
    let victim = bridge_holding_connections(fleet);
    fleet.proc(&format!("bridge-{victim}")).kill9();
    app.expect("attached", "the application signs in again after the kill");
    let holder = bridge_holding_connections(fleet);
    assert_ne!(holder, victim, "the application is on the other bridge");
    // The killed bridge starts again; the one holding the application is stopped with
    // SIGTERM, and the application moves once more.
    fleet.proc(&format!("bridge-{victim}")).restart();
    let holder = format!("bridge-{holder}");
    fleet.proc(&holder).sigterm();
    let status = fleet.proc(&holder).exited();
    assert!(status.success(), "{holder} after SIGTERM: {status}");
    fleet.proc(&holder).restart();
    let done = app.expect("done", "the application's count");
    let bodies = done["bodies"].as_array().unwrap().len();
    let received = done["received"].as_u64().unwrap();
    let connections = done["connections"].as_u64().unwrap();
    eprintln!(
        "bridge kill and SIGTERM: events {EVENTS}, received {received} ({} again), distinct \
         {bodies}, connections {connections}",
        received.saturating_sub(bodies as u64)
    );
    assert!(
        connections >= 3,
        "the application signed in again twice: {done}"
    );
    assert_eq!(bodies, EVENTS, "events the application never got");
}

/// The bridge (`n` of `bridge-<n>`) that holds an established connection on its AMQP port.
fn bridge_holding_connections(fleet: &Fleet) -> usize {
    let out = Command::new("ss")
        .args(["-tnH", "state", "established"])
        .output()
        .expect("ss (iproute2)");
    let sockets = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..fleet.bridge_ports.len())
        .find(|&n| {
            sockets
                .lines()
                .any(|l| l.contains(&format!("127.0.0.1:{} ", fleet.bridge_ports[n])))
        })
        .unwrap_or_else(|| panic!("no bridge holds the application:\n{sockets}"))
}

/// kill -9 of one of the two brokers while devices publish QoS 1 telemetry: the clients go on
/// through the other broker of their bootstrap list; every acknowledged message is in Kafka.
fn a_killed_broker_loses_nothing_acknowledged(fleet: &mut Fleet) {
    let tenant = format!("fleet-kill-broker-{}", uuid::Uuid::new_v4().simple());
    let devices: Vec<String> = (0..4).map(|n| format!("pub-{n}")).collect();
    fleet.provision(&tenant, &devices);
    let mut publishers = publishers(fleet, &tenant, &devices, 15);
    // The broker the surviving gateway talks to (its producer's connections, from `ss`).
    let gateway = fleet.gateways[1].proc.child.id();
    let out = Command::new("ss")
        .args(["-tnpH"])
        .output()
        .expect("ss (iproute2)");
    let sockets = String::from_utf8_lossy(&out.stdout).into_owned();
    let brokers: Vec<String> = fleet.bootstrap.split(',').map(str::to_owned).collect();
    let used = |addr: &str| {
        sockets
            .lines()
            .filter(|l| l.contains(&format!("pid={gateway},")) && l.contains(&format!(" {addr} ")))
            .count()
    };
    let victim = (0..brokers.len())
        .max_by_key(|&n| used(&brokers[n]))
        .unwrap();
    assert!(
        used(&brokers[victim]) > 0,
        "the gateway's broker connections:\n{sockets}"
    );
    let before = upload_count(fleet, &tenant);
    fleet.proc(&format!("broker-{victim}")).kill9();
    let reports = reports(&mut publishers);
    nothing_acknowledged_lost(fleet, &tenant, "broker kill", &reports);
    // The devices went on: more was acknowledged than Kafka held at the kill, beyond the
    // publishers' windows (4 × 20) that may have been in flight then.
    let acked: usize = reports
        .iter()
        .map(|r| r["acked"].as_array().unwrap().len())
        .sum();
    eprintln!("broker kill: {before} records in Kafka at the kill, {acked} acknowledged in all");
    assert!(
        acked as i64 > before + 100,
        "nothing acknowledged after the kill: {before} at the kill, {acked} in all"
    );
}

/// kill -9 of one router while one-way commands flow at a steady rate: the other router takes
/// its partitions and forwards every command. Then the killed one starts again and joins, and
/// the other is stopped with SIGTERM: it hands its partitions over and exits 0. Every command
/// reaches its device exactly once (counted at the devices).
fn a_killed_router_loses_and_repeats_no_command(fleet: &mut Fleet) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let tenant = format!("fleet-kill-router-{}", uuid::Uuid::new_v4().simple());
    let devices: Vec<String> = (0..4).map(|n| format!("cmd-{n}")).collect();
    fleet.provision(&tenant, &devices);
    let topic = format!("hono.command.{tenant}");
    // Four partitions: both routers hold some.
    let mut create = Script::spawn(
        "kafka_client.py",
        &kafka_python(),
        &[
            "-X",
            &format!("bootstrap.servers={}", fleet.bootstrap),
            "create",
            &topic,
            "4",
        ],
    );
    create.expect("created", "the command topic");
    create.finish();
    let mut listeners = device_scripts(fleet, &tenant, &devices, 40, &["listen"]);
    for l in &mut listeners {
        l.expect("subscribed", "the device takes commands");
    }
    // Both routers see the topic before the first command (they refresh metadata every second).
    std::thread::sleep(Duration::from_secs(3));
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &fleet.bootstrap)
        .set("log_level", "3")
        .create()
        .unwrap();
    let mut sent: Vec<Vec<String>> = vec![Vec::new(); devices.len()];
    // 40 commands a second, the k-th to device k mod 4 in partition k mod 4; `at` runs before
    // the command `k`.
    let send = |fleet: &mut Fleet,
                sent: &mut Vec<Vec<String>>,
                range: std::ops::Range<usize>,
                at: &dyn Fn(&mut Fleet, usize)| {
        for k in range {
            at(fleet, k);
            let n = k % devices.len();
            let subject = format!("c-{k}");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "device_id",
                    value: Some(devices[n].as_str()),
                })
                .insert(Header {
                    key: "subject",
                    value: Some(subject.as_str()),
                });
            producer
                .send(
                    BaseRecord::to(&topic)
                        .key(devices[n].as_str())
                        // Device n's commands in partition n: every partition carries some,
                        // whichever router holds it (keys alone might hash to fewer).
                        .partition(n as i32)
                        .payload("")
                        .headers(headers),
                )
                .map_err(|(e, _)| e)
                .unwrap();
            producer.poll(Duration::ZERO);
            sent[n].push(subject);
            std::thread::sleep(Duration::from_millis(25));
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    // The four partitions are spread over the routers; the victim is one that holds some
    // (router-0 if both do).
    let start = Instant::now();
    let held = |fleet: &Fleet, n: usize| fleet.held_partitions(&format!("router-{n}"), &topic);
    while held(fleet, 0).len() + held(fleet, 1).len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the routers took {:?} and {:?}",
            held(fleet, 0),
            held(fleet, 1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = usize::from(held(fleet, 0).is_empty());
    let (victim, survivor) = (format!("router-{v}"), format!("router-{}", 1 - v));
    eprintln!(
        "router kill: {victim} holds {:?}, {survivor} {:?}",
        held(fleet, v),
        held(fleet, 1 - v)
    );
    // kill -9 of the victim early on: the survivor alone must take its partitions. Every
    // command of this part reaches its device before the victim starts again (the devices
    // print each).
    const KILLED: usize = 300;
    send(fleet, &mut sent, 0..KILLED, &|fleet, k| {
        if k == 50 {
            fleet.proc(&victim).kill9();
        }
    });
    for (n, l) in listeners.iter_mut().enumerate() {
        let mut missing: std::collections::HashSet<String> = sent[n].iter().cloned().collect();
        while !missing.is_empty() {
            let topic = l.expect(
                "command",
                "the survivor forwards the killed router's commands",
            );
            missing.remove(topic.as_str().unwrap().rsplit('/').next().unwrap());
        }
    }
    assert_eq!(
        held(fleet, 1 - v).len(),
        4,
        "{survivor} took the killed router's partitions"
    );
    // The victim starts again and joins; the survivor is stopped with SIGTERM while commands
    // flow: it hands its partitions over and exits 0.
    const COMMANDS: usize = KILLED + 200;
    fleet.proc(&victim).restart();
    send(fleet, &mut sent, KILLED..COMMANDS, &|fleet, k| {
        if k == KILLED + 50 {
            fleet.proc(&survivor).sigterm();
        }
    });
    let (mut lost, mut twice) = (0, 0);
    for (n, l) in listeners.iter_mut().enumerate() {
        let done = l.expect("done", "the device's count");
        let got: Vec<String> = done["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().rsplit('/').next().unwrap().to_owned())
            .collect();
        for subject in &sent[n] {
            match got.iter().filter(|g| *g == subject).count() {
                0 => lost += 1,
                1 => {}
                _ => twice += 1,
            }
        }
    }
    eprintln!(
        "router kill, then SIGTERM: sent {COMMANDS}, received once {}, lost {lost}, received \
         twice {twice}",
        COMMANDS - lost - twice
    );
    let status = fleet.proc(&survivor).exited();
    assert!(status.success(), "{survivor} after SIGTERM: {status}");
    assert_eq!(
        (lost, twice),
        (0, 0),
        "commands lost, commands delivered twice"
    );
}

/// kill -9 of one gateway while its devices publish QoS 1 telemetry: they connect again through
/// HAProxy to the other, every acknowledged message is in Kafka, commands reach the moved
/// devices, and the dead instance's routing entries and internal topic are cleaned up.
fn a_killed_gateway_loses_nothing_acknowledged(fleet: &mut Fleet) {
    let tenant = format!("fleet-kill-gw-{}", uuid::Uuid::new_v4().simple());
    let devices: Vec<String> = (0..4).map(|n| format!("pub-{n}")).collect();
    fleet.provision(&tenant, &devices);
    let mut publishers = publishers(fleet, &tenant, &devices, 20);
    let victim = fleet.gateways[0].id.clone();
    let survivor = fleet.gateways[1].id.clone();
    let holders = fleet.holders(&tenant);
    let moved: Vec<usize> = holders
        .iter()
        .filter(|(_, i)| *i == victim)
        .map(|(d, _)| devices.iter().position(|x| x == d).unwrap())
        .collect();
    assert!(
        !moved.is_empty() && moved.len() < devices.len(),
        "devices on both gateways: {holders:?}"
    );
    let internal = format!("hono.command_internal.{victim}");
    assert!(fleet.topic_exists(&internal), "{internal} before the kill");
    fleet.gateways[0].proc.kill9();
    let killed_at = Instant::now();
    for &n in &moved {
        publishers[n].expect(
            "subscribed",
            "the device connects again, to the other gateway",
        );
    }
    // The moved devices' command consumers are on the survivor now; a command reaches each.
    let start = Instant::now();
    while fleet.holders(&tenant).iter().any(|(_, i)| *i != survivor) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            fleet.holders(&tenant)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for &n in &moved {
        let d = &devices[n];
        let mut app = Script::spawn(
            "kafka_client.py",
            &kafka_python(),
            &[
                "-X",
                &format!("bootstrap.servers={}", fleet.bootstrap),
                "produce",
                &format!("hono.command.{tenant}"),
                d,
                "{}",
                &format!("device_id={d}"),
                &format!("subject=moved-{d}"),
            ],
        );
        app.expect("delivered", "the application's command is in Kafka");
        app.finish();
    }
    let reports = reports(&mut publishers);
    for &n in &moved {
        let commands = reports[n]["commands"].to_string();
        assert!(
            commands.contains(&format!("moved-{}", devices[n])),
            "{}: {commands}",
            devices[n]
        );
    }
    nothing_acknowledged_lost(fleet, &tenant, "gateway kill", &reports);

    // The dead instance: its routing entries and its internal topic go.
    loop {
        let rows = subscriptions(&fleet.bootstrap, &tenant)
            .into_iter()
            .filter(|(_, i)| *i == victim)
            .count()
            .to_string();
        let instance = fleet.sql(&format!(
            "SELECT count(*) FROM adapter_instances WHERE instance_id = '{victim}'"
        ));
        if rows == "0" && instance == ["0"] && !fleet.topic_exists(&internal) {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "dead instance not cleaned up: rows {rows:?}, instance {instance:?}, topic {}",
            fleet.topic_exists(&internal)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
