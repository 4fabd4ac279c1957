//! The router against the real broker and PostgreSQL: commands reach the internal topic of the
//! instance that holds the device (directly or through a gateway), malformed and undeliverable
//! request/response commands get Hono's delivery-failure responses, and a router that starts
//! after the command was sent still delivers it.

use ferrule_command_router::{RoutingState, forward};
use ferrule_registry::db::Connector;
use ferrule_registry::{DatabaseConfig, DeviceAuthenticator, RegistryConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn kafka() -> String {
    std::env::var("FERRULE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

struct Setup {
    tenant: String,
    routing: RoutingState,
    auth: DeviceAuthenticator,
    _stop_listener: watch::Sender<bool>,
}

async fn setup() -> Setup {
    let db = DatabaseConfig {
        url: std::env::var("FERRULE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into()),
        pool_size: 4,
        ..Default::default()
    };
    let store = ferrule_registry::open_store(&db, &RegistryConfig::default())
        .await
        .unwrap();
    let tenant = id("t");
    let parse_t = |b: &[u8]| ferrule_registry::model::tenant::Tenant::parse(b).unwrap();
    let parse_d = |b: &[u8]| ferrule_registry::model::device::Device::parse(b).unwrap();
    store
        .create_tenant(Some(tenant.clone()), parse_t(b"{}"))
        .await
        .unwrap();
    store
        .create_device(&tenant, Some("dev".into()), parse_d(b"{}"))
        .await
        .unwrap();
    store
        .create_device(&tenant, Some("gw".into()), parse_d(b"{}"))
        .await
        .unwrap();
    store
        .create_device(&tenant, Some("edge".into()), parse_d(br#"{"via": ["gw"]}"#))
        .await
        .unwrap();
    let auth = DeviceAuthenticator::new(store.pool().clone(), &Default::default());
    let (tx, rx) = watch::channel(false);
    auth.spawn_listener(Connector::new(&db).unwrap(), rx);
    Setup {
        tenant,
        routing: RoutingState::new(store.pool().clone(), Duration::from_secs(30)),
        auth,
        _stop_listener: tx,
    }
}

fn start_router(s: &Setup, group: &str) -> watch::Sender<bool> {
    let (tx, rx) = watch::channel(false);
    let (auth, routing, group) = (s.auth.clone(), s.routing.clone(), group.to_owned());
    // Only this test's tenant: routers of tests running alongside never answer its commands.
    let topic = format!("hono.command.{}", s.tenant);
    tokio::spawn(async move {
        if let Err(e) = forward::run(&kafka(), &group, &topic, 20, auth, routing, rx).await {
            eprintln!("ROUTER FAILED: {e:#}");
        }
    });
    tx
}

async fn send_command(tenant: &str, device: &str, headers: &[(&str, &str)], payload: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("log_level", "3")
        .create()
        .unwrap();
    let mut hs = OwnedHeaders::new();
    for (k, v) in headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    producer
        .send(
            FutureRecord::to(&format!("hono.command.{tenant}"))
                .key(device)
                .headers(hs)
                .payload(payload),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
}

/// The first record of `topic` (read from the beginning), as key, headers and payload.
async fn first_record(topic: &str) -> (String, HashMap<String, String>, String) {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .set("group.id", id("reader"))
            .set("topic.metadata.refresh.interval.ms", "500")
            .set("auto.offset.reset", "earliest")
            .set("log_level", "3")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nothing arrived on {topic}"
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let mut headers = HashMap::new();
                for hd in m
                    .headers()
                    .map(|h| h.iter().collect::<Vec<_>>())
                    .unwrap_or_default()
                {
                    headers.entry(hd.key.to_owned()).or_insert_with(|| {
                        String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned()
                    });
                }
                let text =
                    |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                return (text(m.key()), headers, text(m.payload()));
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn commands_reach_the_instance_that_holds_the_device() {
    let s = setup().await;
    let (direct, via_gw) = (id("inst"), id("inst"));
    for i in [&direct, &via_gw] {
        s.routing.heartbeat(i).await.unwrap();
    }
    s.routing
        .register(&s.tenant, "dev", &direct, None)
        .await
        .unwrap();
    s.routing
        .register(&s.tenant, "gw", &via_gw, None)
        .await
        .unwrap();
    let _router = start_router(&s, &id("group"));
    send_command(
        &s.tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "setVolume")],
        "{\"v\":5}",
    )
    .await;
    send_command(
        &s.tenant,
        "edge",
        &[
            ("device_id", "edge"),
            ("subject", "getState"),
            ("response-required", "true"),
            ("correlation-id", "c-7"),
        ],
        "",
    )
    .await;

    let (key, h, payload) = first_record(&format!("hono.command_internal.{direct}")).await;
    assert_eq!(key, "dev");
    assert_eq!(payload, "{\"v\":5}");
    assert_eq!(h["subject"], "setVolume");
    assert_eq!(h["tenant_id"], s.tenant);
    assert!(
        h["orig-partition"].parse::<i32>().is_ok() && h["orig-offset"].parse::<i64>().is_ok(),
        "{h:?}"
    );
    assert!(!h.contains_key("via"));

    let (key, h, _) = first_record(&format!("hono.command_internal.{via_gw}")).await;
    assert_eq!(key, "edge");
    assert_eq!(h["via"], "gw", "mapped to the gateway");
    assert_eq!(h["correlation-id"], "c-7");
}

#[tokio::test]
async fn malformed_and_undeliverable_commands_get_responses() {
    let s = setup().await;
    let _router = start_router(&s, &id("group"));
    // No subject, response wanted: 400 with the correlation id and the metadata header.
    send_command(
        &s.tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("response-required", "true"),
            ("correlation-id", "bad-1"),
            ("delivery-failure-notification-metadata[app]", "x"),
        ],
        "",
    )
    .await;
    let (key, h, payload) = first_record(&format!("hono.command_response.{}", s.tenant)).await;
    assert_eq!(key, "dev");
    assert_eq!(h["status"], "400");
    assert_eq!(h["correlation-id"], "bad-1");
    assert_eq!(
        h["content-type"],
        "application/vnd.eclipse-hono-delivery-failure-notification+json"
    );
    assert_eq!(h["delivery-failure-notification-metadata[app]"], "x");
    assert!(payload.contains("\"error\""), "{payload}");

    // Well-formed, but nobody holds the device: 503.
    let s2 = setup().await;
    let _router2 = start_router(&s2, &id("group"));
    send_command(
        &s2.tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "x"),
            ("response-required", "true"),
            ("correlation-id", "c-9"),
        ],
        "",
    )
    .await;
    let (_, h, _) = first_record(&format!("hono.command_response.{}", s2.tenant)).await;
    assert_eq!(h["status"], "503");
    assert_eq!(h["correlation-id"], "c-9");
}

#[tokio::test]
async fn a_router_started_after_the_command_still_delivers_it() {
    let s = setup().await;
    let inst = id("inst");
    s.routing.heartbeat(&inst).await.unwrap();
    s.routing
        .register(&s.tenant, "dev", &inst, None)
        .await
        .unwrap();
    send_command(
        &s.tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "late")],
        "p",
    )
    .await;
    let _router = start_router(&s, &id("group"));
    let (_, h, _) = first_record(&format!("hono.command_internal.{inst}")).await;
    assert_eq!(h["subject"], "late");
}
