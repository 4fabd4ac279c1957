//! How `ferrule all` treats Kafka topics, against the real broker: with
//! `kafka.create_topics = false` it creates none, refuses an upload to a missing tenant topic
//! with 503 (logged and counted with the topic's name) and uses the topic once an operator
//! created it; with topic creation on, a tenant's `ext` sets its topics' partitions; a topic
//! prefix limits the tenant ids the registry accepts.

mod common;

use common::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::time::{Duration, Instant};

fn admin_client() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka())
        // Asking for a topic's metadata must not create it.
        .set("allow.auto.create.topics", "false")
        .set("log_level", "3")
        .create()
        .unwrap()
}

/// Partitions of `topic`, or `None` when the broker does not know it (asked without creating
/// it).
fn partitions(topic: &str) -> Option<usize> {
    let admin = admin_client();
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0)
}

fn admin(f: &Ferrule, method: &str, path: &str, body: &str) -> u16 {
    f.admin(method, path, body).0
}

/// A tenant with a device `dev` that has password `pw`.
fn provision(f: &Ferrule, tenant: &str, tenant_body: &str) {
    assert_eq!(
        admin(f, "POST", &format!("/v1/tenants/{tenant}"), tenant_body),
        201
    );
    assert_eq!(
        admin(f, "POST", &format!("/v1/devices/{tenant}/dev"), "{}"),
        201
    );
    let creds =
        r#"[{"type": "hashed-password", "auth-id": "dev", "secrets": [{"pwd-plain": "pw"}]}]"#;
    assert_eq!(
        admin(f, "PUT", &format!("/v1/credentials/{tenant}/dev"), creds),
        204
    );
}

fn upload(f: &Ferrule, tenant: &str) -> (u16, String) {
    curl(&[
        "-u",
        &format!("dev@{tenant}:pw"),
        "-H",
        "content-type: text/plain",
        "-H",
        "qos-level: 1",
        "--data-binary",
        "21.5",
        &format!("{}/telemetry", f.http),
    ])
}

#[test]
fn without_topic_creation_a_missing_topic_is_refused_until_an_operator_creates_it() {
    let log = std::env::temp_dir().join(format!("ferrule-{}.log", uuid::Uuid::new_v4().simple()));
    let mut f = Ferrule::start_logging_to(
        &kafka(),
        &[
            ("FERRULE_KAFKA__CREATE_TOPICS", "false".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ],
        &log,
    );
    // The gateway's own command topic is missing too; readiness is about the cluster.
    f.wait_readiness(200);
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    provision(&f, &tenant, "{}");
    let topic = format!("hono.telemetry.{tenant}");

    let (status, body) = upload(&f, &tenant);
    assert_eq!(status, 503, "{body}");
    let (_, metrics) = curl(&[&format!("{}/metrics", f.health)]);
    assert!(
        metrics.contains(&format!(
            "ferrule_kafka_topic_missing_total{{topic=\"{topic}\"}}"
        )),
        "{metrics}"
    );
    assert_eq!(partitions(&topic), None, "Ferrule must not create {topic}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains(&topic) && l.contains("does not exist")),
        "the log names the missing topic: {logged}"
    );

    // The operator creates it; uploads get through without a restart.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let new = NewTopic::new(&topic, 2, TopicReplication::Fixed(1));
    for r in rt
        .block_on(admin_client().create_topics([&new], &AdminOptions::new()))
        .unwrap()
    {
        r.unwrap();
    }
    let start = Instant::now();
    loop {
        let (status, body) = upload(&f, &tenant);
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the created topic was not used"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(partitions(&topic), Some(2));
    let _ = std::fs::remove_file(&log);
}

#[test]
fn a_tenants_ext_sets_the_partitions_of_its_topics() {
    let mut f = Ferrule::start(&kafka());
    f.wait_readiness(200);
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    provision(&f, &tenant, r#"{"ext": {"kafka-topic-partitions": 5}}"#);
    let (status, body) = upload(&f, &tenant);
    assert_eq!(status, 202, "{body}");
    assert_eq!(partitions(&format!("hono.telemetry.{tenant}")), Some(5));

    let other = format!("t-{}", uuid::Uuid::new_v4().simple());
    provision(&f, &other, "{}");
    assert_eq!(upload(&f, &other).0, 202);
    // kafka.topic_partitions, 3 by default.
    assert_eq!(partitions(&format!("hono.telemetry.{other}")), Some(3));
}

#[test]
fn a_topic_prefix_shortens_the_tenant_ids_the_registry_accepts() {
    let mut f = Ferrule::start_with(
        &kafka(),
        &[("FERRULE_KAFKA__TOPIC_PREFIX", "staging.".to_owned())],
    );
    f.wait_readiness(200);
    // Behind `staging.hono.` a tenant id may have 227 − 8 = 219 characters.
    let fits = format!("a{}", "b".repeat(218));
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-u",
        &format!("admin:{PASSWORD}"),
        &format!("{}/v1/tenants/{}", f.registry, "c".repeat(220)),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("staging.hono.command_response.<tenant>"),
        "{body}"
    );
    assert_eq!(admin(&f, "POST", &format!("/v1/tenants/{fits}"), "{}"), 201);
    assert_eq!(
        admin(&f, "DELETE", &format!("/v1/tenants/{fits}"), "{}"),
        204
    );
}
