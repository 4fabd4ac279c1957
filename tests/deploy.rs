//! The deployments in `compose/`: the docker-compose file is valid for docker-compose (no
//! engine runs here), the Kubernetes manifests render with `kubectl kustomize`, every Ferrule
//! workload there is probed on the paths Ferrule serves, and every metric the Grafana dashboard
//! (shared by both) queries is exported by a running `ferrule all`.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::process::Command;

/// The compose file's Ferrule services.
const FERRULE_SERVICES: [&str; 6] = [
    "registry",
    "gateway-1",
    "gateway-2",
    "router-1",
    "router-2",
    "bridge",
];

fn compose_dir() -> String {
    format!("{}/compose", env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The metric names the dashboard's queries use (`hono_…`, `ferrule_…`) in the dashboard
/// JSON `text`.
fn dashboard_metrics_in(text: &str) -> BTreeSet<String> {
    let dashboard: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.starts_with("hono_") || token.starts_with("ferrule_") {
                    names.insert(token.to_owned());
                }
            }
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    names
}

/// The metrics of the dashboard docker-compose's Grafana provisions.
fn dashboard_metrics() -> BTreeSet<String> {
    let file = format!("{}/grafana/dashboards/ferrule.json", compose_dir());
    dashboard_metrics_in(&std::fs::read_to_string(file).unwrap())
}

/// The Kubernetes manifests as `kubectl kustomize` renders them, one document each.
fn kubernetes_manifests() -> Vec<String> {
    let rendered = run("kubectl", &["kustomize", &compose_dir()]);
    rendered.split("\n---\n").map(str::to_owned).collect()
}

/// The metrics of the dashboard in the rendered ConfigMap Grafana's sidecar picks up: its JSON
/// is the value of the `ferrule.json` key, a YAML block scalar.
fn kubernetes_dashboard_metrics(docs: &[String]) -> BTreeSet<String> {
    let map = docs
        .iter()
        .find(|d| d.contains("grafana_dashboard"))
        .expect("the dashboard ConfigMap");
    let (_, block) = map
        .split_once("ferrule.json: |")
        .expect("the dashboard's key");
    let mut lines = block.lines().skip_while(|l| l.trim().is_empty());
    let first = lines.next().expect("the dashboard's JSON");
    let indent = first.len() - first.trim_start().len();
    let json: String = std::iter::once(first)
        .chain(lines.take_while(|l| l.len() > indent && l[..indent].trim().is_empty()))
        .map(|l| format!("{}\n", &l[indent..]))
        .collect();
    dashboard_metrics_in(&json)
}

#[test]
fn the_compose_file_is_valid_and_has_the_whole_fleet() {
    let file = format!("{}/docker-compose.yml", compose_dir());
    let rendered = run("docker-compose", &["-f", &file, "config"]);
    let services = run("docker-compose", &["-f", &file, "config", "--services"]);
    let services: BTreeSet<&str> = services.lines().collect();
    let others = [
        "kafka-1",
        "kafka-2",
        "kafka-3",
        "postgres",
        "haproxy",
        "nginx",
        "prometheus",
        "otel-collector",
        "grafana",
    ];
    for s in FERRULE_SERVICES.iter().chain(&others) {
        assert!(services.contains(s), "no service {s}: {services:?}");
    }
    // Hono's topics with replication 3 on the three brokers.
    assert!(
        rendered.contains("FERRULE_KAFKA__TOPIC_REPLICATION: 3")
            || rendered.contains("FERRULE_KAFKA__TOPIC_REPLICATION: '3'"),
        "{rendered}"
    );
    // Kafka formats its storage only with a KRaft cluster id that is a UUID: 16 bytes in
    // URL-safe base64 without padding, 22 characters whose last holds 2 bits (its low 4 zero).
    let id = rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("CLUSTER_ID:"))
        .expect("the brokers' CLUSTER_ID")
        .trim()
        .trim_matches(['"', '\'']);
    const BASE64URL: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let digits: Option<Vec<usize>> = id.chars().map(|c| BASE64URL.find(c)).collect();
    assert!(
        id.len() == 22 && digits.is_some_and(|d| d[21] % 16 == 0),
        "CLUSTER_ID {id:?} is not a base64 UUID"
    );
    // Applications reach every broker from the host: each advertises an external listener.
    for port in [29092, 29093, 29094] {
        assert!(
            rendered.contains(&format!("EXTERNAL://localhost:{port}")),
            "no broker advertises localhost:{port}"
        );
    }
    // HAProxy takes its configuration (the containers' names resolve once they run), and
    // balances over every gateway and the bridge.
    let haproxy = format!("{}/haproxy/haproxy.cfg", compose_dir());
    run("haproxy", &["-c", "-q", "-f", &haproxy]);
    let balanced = std::fs::read_to_string(&haproxy).unwrap();
    for s in ["gateway-1", "gateway-2", "bridge"] {
        assert!(
            balanced.contains(&format!("server {s} {s}:")),
            "{s} not balanced"
        );
    }
    // Prometheus scrapes every Ferrule service on its health port.
    let scrape =
        std::fs::read_to_string(format!("{}/prometheus/prometheus.yml", compose_dir())).unwrap();
    for s in FERRULE_SERVICES {
        assert!(scrape.contains(&format!("{s}:8088")), "{s} is not scraped");
    }
}

#[test]
fn the_kubernetes_manifests_render_with_probes_and_the_dashboard() {
    let docs = kubernetes_manifests();
    let workloads: Vec<&String> = docs
        .iter()
        .filter(|d| d.contains("image: ferrule"))
        .collect();
    assert_eq!(workloads.len(), 4, "registry, gateway, router, bridge");
    for w in workloads {
        for probe in [
            "path: /started",
            "path: /readiness",
            "path: /liveness",
            "containerPort: 8088",
        ] {
            assert!(w.contains(probe), "{probe} missing in\n{w}");
        }
        assert!(w.contains("prometheus.io/port: \"8088\""), "{w}");
        assert!(w.contains("terminationGracePeriodSeconds: 30"), "{w}");
    }
    // Stable instance ids: the gateway and bridge pods' names.
    for (kind, key) in [
        ("name: gateway\n", "FERRULE_GATEWAY__INSTANCE_ID"),
        ("name: bridge\n", "FERRULE_BRIDGE__INSTANCE_ID"),
    ] {
        let doc = docs
            .iter()
            .find(|d| d.contains("kind: StatefulSet") && d.contains(kind))
            .unwrap_or_else(|| panic!("no StatefulSet {kind}"));
        assert!(
            doc.contains(key) && doc.contains("fieldPath: metadata.name"),
            "{doc}"
        );
    }
    // The ConfigMap carries the dashboard docker-compose provisions, queries and all
    // (that they are exported is checked against a running Ferrule below).
    assert_eq!(kubernetes_dashboard_metrics(&docs), dashboard_metrics());
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let tenant = format!("dash-{}", uuid::Uuid::new_v4().simple());
    // The router serves this tenant; librdkafka reports statistics often.
    let f = Ferrule::start_for_commands_with(
        &tenant,
        "",
        &[("FERRULE_KAFKA__STATISTICS_INTERVAL_MS", "300".to_owned())],
    );
    for (path, body) in [
        (format!("/v1/tenants/{tenant}"), "{}".to_owned()),
        (format!("/v1/devices/{tenant}/d1"), "{}".to_owned()),
    ] {
        f.admin_ok("POST", &path, &body);
    }
    let creds = serde_json::json!([{"type": "hashed-password", "auth-id": "d1",
        "secrets": [{"pwd-plain": "d1-secret"}]}]);
    f.admin_ok(
        "PUT",
        &format!("/v1/credentials/{tenant}/d1"),
        &creds.to_string(),
    );
    // A message forwarded, one refused, an MQTT connection.
    let user = format!("d1@{tenant}");
    let (code, _) = curl(&[
        "-u",
        &format!("{user}:d1-secret"),
        "-H",
        "hono-ttd: 1",
        "-d",
        "21.5",
        &format!("{}/telemetry", f.http),
    ]);
    assert!(code == 200 || code == 202, "{code}");
    let (code, _) = curl(&[
        "-u",
        &format!("{user}:wrong"),
        "-d",
        "x",
        &format!("{}/telemetry", f.http),
    ]);
    assert_eq!(code, 401);
    let (host, port) = f.mqtt.split_once(':').unwrap();
    run(
        "mosquitto_pub",
        &[
            "-h",
            host,
            "-p",
            port,
            "-u",
            &user,
            "-P",
            "d1-secret",
            "-q",
            "1",
            "-t",
            "telemetry",
            "-m",
            "22",
        ],
    );
    // A command answered by an MQTT device (paho-mqtt) for a Kafka application
    // (confluent-kafka), one for a device the registry does not know, and an AMQP link.
    f.admin_ok(
        "PUT",
        &format!("/v1/applications/{tenant}/app"),
        r#"{"secrets": [{"pwd-plain": "app-secret"}]}"#,
    );
    let timeout = SCRIPT_SECS.to_string();
    let mut application = Script::spawn(
        "kafka_application.py",
        &kafka_python(),
        &[&kafka(), &tenant, "d1", &timeout],
    );
    application.expect("ready", "the application did not start");
    let mut device = Script::spawn(
        "mqtt_device.py",
        DEBIAN_PYTHON,
        &[host, port, &user, "d1-secret", &timeout],
    );
    device.expect("responded", "the MQTT device did not answer its command");
    application.expect("response", "the application got no response");
    device.finish();
    application.finish();
    run(
        DEBIAN_PYTHON,
        &[
            &format!("{}/tests/amqp/receive.py", env!("CARGO_MANIFEST_DIR")),
            &f.amqp,
            &format!("app@{tenant}"),
            "app-secret",
            &format!("telemetry/{tenant}"),
            "1",
            "1",
        ],
    );
    // A command for a device the registry does not know: the router answers it (404).
    send_command(
        &tenant,
        "nobody",
        "c-1",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    // The router answers it; statistics come every 300 ms.
    let queried: BTreeSet<String> = dashboard_metrics()
        .into_iter()
        .chain(kubernetes_dashboard_metrics(&kubernetes_manifests()))
        .collect();
    // The router answers that command, and statistics come every 300 ms: within a few
    // seconds every series the dashboard queries is there.
    let start = std::time::Instant::now();
    loop {
        let (code, metrics) = curl(&[&format!("{}/metrics", f.health)]);
        assert_eq!(code, 200);
        let exported: BTreeSet<&str> = metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<&String> = queried
            .iter()
            .filter(|m| !exported.contains(m.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "not exported: {missing:?}\n{metrics}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        curl(&[&format!("{}/metrics", f.health)])
            .1
            .lines()
            .find_map(|l| l
                .starts_with("ferrule_router_commands_failed_total{")
                .then_some(l)
                .filter(|l| l.contains(&tenant) && l.contains("status=\"404\""))
                .and_then(|l| l.rsplit(' ').next())),
        Some("1"),
        "the router answered the command for an unknown device"
    );
    // The probe paths the manifests use answer.
    for path in ["/started", "/readiness", "/liveness"] {
        let (code, _) = curl(&[&format!("{}{path}", f.health)]);
        assert_eq!(code, 200, "{path}");
    }
}
