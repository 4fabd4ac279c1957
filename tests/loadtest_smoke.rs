//! A seconds-long run of the load-testing harness against a real `ferrule all`, so the harness
//! keeps working; full runs are `scripts/loadtest`, never part of the test suite.

use ferrule_loadtest::devices::{Fleet, raw_produce, raw_producer, raw_producer_ready};
use ferrule_loadtest::measure::{ProcessSample, Report, wait_for_records};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::free_port;

#[tokio::test]
async fn harness_smoke_run() {
    let kafka = std::env::var("FERRULE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let db = std::env::var("FERRULE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into());
    let (registry, http, mqtt, health) = (free_port(), free_port(), free_port(), free_port());
    let (amqp, coap, coaps) = (free_port(), free_port(), free_port());
    let mut ferrule = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .arg("all")
        .env("FERRULE_REGISTRY__BIND", format!("127.0.0.1:{registry}"))
        .env("FERRULE_GATEWAY__HTTP__BIND", format!("127.0.0.1:{http}"))
        .env("FERRULE_GATEWAY__MQTT__BIND", format!("127.0.0.1:{mqtt}"))
        .env("FERRULE_BRIDGE__BIND", format!("127.0.0.1:{amqp}"))
        .env("FERRULE_GATEWAY__COAP__BIND", format!("127.0.0.1:{coap}"))
        .env(
            "FERRULE_GATEWAY__COAP__DTLS_BIND",
            format!("127.0.0.1:{coaps}"),
        )
        .env("FERRULE_HEALTH__BIND", format!("127.0.0.1:{health}"))
        .env("FERRULE_DATABASE__URL", &db)
        .env("FERRULE_KAFKA__BOOTSTRAP_SERVERS", &kafka)
        .env("FERRULE_REGISTRY__MANAGEMENT__PASSWORD", "smoke")
        // A router group of its own: a killed test process must not hold partitions of another.
        .env(
            "FERRULE_ROUTER__GROUP_ID",
            format!("router-{}", uuid::Uuid::new_v4().simple()),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = ferrule.id();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mqtt)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ferrule did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The Kafka baseline, on a topic it creates with a tenant topic's partitions.
    let topic = format!("loadtest.smoke.{}", uuid::Uuid::new_v4().simple());
    let producer = raw_producer_ready(&kafka, &topic, Some(3)).await.unwrap();
    let t = Instant::now();
    raw_produce(&producer, &topic, 500, 32).await.unwrap();
    // 500 and the record that readied the producer.
    let secs = wait_for_records(&kafka, &topic, 501, t).await.unwrap();
    assert!(Report::new("kafka-producer", 500, secs).rate() > 0.0);

    // MQTT QoS 0 and 1, HTTP QoS 1, idle connections, all on one provisioned fleet.
    let before = ProcessSample::read(pid).unwrap();
    let fleet = Fleet::provision(&format!("http://127.0.0.1:{registry}"), "admin:smoke", 5)
        .await
        .unwrap();
    let t = Instant::now();
    fleet
        .mqtt_publish(&format!("127.0.0.1:{mqtt}"), 20, 0, 32)
        .await
        .unwrap();
    fleet
        .mqtt_publish(&format!("127.0.0.1:{mqtt}"), 20, 1, 32)
        .await
        .unwrap();
    fleet
        .http_post(&format!("http://127.0.0.1:{http}"), 50, 4, 1, 32)
        .await
        .unwrap();
    // The same devices speaking MQTT 5.
    fleet
        .mqtt_publish_with(
            &format!("127.0.0.1:{mqtt}"),
            20,
            1,
            32,
            ferrule_loadtest::devices::MqttVersion::V5,
        )
        .await
        .unwrap();
    let secs = wait_for_records(&kafka, &fleet.telemetry_topic(), 350, t)
        .await
        .unwrap();
    let held = fleet
        .mqtt_hold_at(&format!("127.0.0.1:{mqtt}"), Some(50))
        .await
        .unwrap();
    assert_eq!(held.len(), 5);
    let mut report = Report::new("smoke", 350, secs);
    report.add_process(&before, &ProcessSample::read(pid).unwrap());
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["messages"], 350);
    assert!(
        json["process_cpu_seconds"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    assert!(
        json["process_rss_bytes"].as_u64().unwrap() > 1_000_000,
        "{json}"
    );
    drop(held);

    // The typed-telemetry benchmark's path: a fleet whose tenant has a schema sends JSON that
    // the gateway writes as Avro; every message arrives, none is refused.
    let typed = Fleet::provision(&format!("http://127.0.0.1:{registry}"), "admin:smoke", 5)
        .await
        .unwrap();
    typed
        .register_telemetry_schema(
            &format!("http://127.0.0.1:{registry}"),
            "admin:smoke",
            ferrule_loadtest::typed::SCHEMA,
        )
        .await
        .unwrap();
    let t = Instant::now();
    typed
        .mqtt_publish_payload(
            &format!("127.0.0.1:{mqtt}"),
            20,
            1,
            ferrule_loadtest::typed::READING.as_bytes().to_vec(),
            ferrule_loadtest::devices::MqttVersion::V311,
        )
        .await
        .unwrap();
    wait_for_records(&kafka, &typed.telemetry_topic(), 100, t)
        .await
        .unwrap();

    // Command round trips through the router and the gateway, and the Kafka echo floor.
    let rt = ferrule_loadtest::commands::round_trips(
        &kafka,
        &fleet,
        &format!("127.0.0.1:{mqtt}"),
        50,
        1,
        1,
        20,
    )
    .await
    .unwrap();
    assert_eq!((rt.sent, rt.answered), (50, 50), "{:?}", rt.failed);
    assert!(rt.percentile_ms(0.99) > 0.0);
    let echo = ferrule_loadtest::commands::kafka_echo_round_trips(&kafka, 50, 1, 20)
        .await
        .unwrap();
    assert_eq!(echo.answered, 50);

    // Events through the AMQP bridge, after the raw consumer read them.
    let registry_url = format!("http://127.0.0.1:{registry}");
    ferrule_loadtest::amqp::provision_application(
        &registry_url,
        "admin:smoke",
        &fleet.tenant,
        "smoke",
        "smoke-pw",
    )
    .await
    .unwrap();
    let topic = format!("hono.event.{}", fleet.tenant);
    raw_producer(&kafka, &topic, 20, 32).await.unwrap();
    // Each returns only once all 20 events were read (else it fails).
    ferrule_loadtest::amqp::raw_consume(&kafka, &topic, 20)
        .await
        .unwrap();
    ferrule_loadtest::amqp::amqp_consume(
        &format!("amqp://127.0.0.1:{amqp}"),
        &format!("smoke@{}", fleet.tenant),
        "smoke-pw",
        &format!("event/{}", fleet.tenant),
        20,
        1,
    )
    .await
    .unwrap();

    // End to end: every stamped message is read back from Kafka and timed.
    let mqtt_addr = format!("127.0.0.1:{mqtt}");
    let e2e =
        ferrule_loadtest::latency::mqtt_to_kafka(&kafka, &fleet, &mqtt_addr, 50, 1, 1, 32, 20)
            .await
            .unwrap();
    assert_eq!((e2e.sent, e2e.received), (50, 50));
    assert!(e2e.percentile_ms(0.99) > 0.0 && !e2e.series.is_empty());

    // The same through the AMQP bridge (the application was provisioned above).
    let amqp_e2e = ferrule_loadtest::latency::mqtt_to_amqp(
        &format!("amqp://127.0.0.1:{amqp}"),
        &format!("smoke@{}", fleet.tenant),
        "smoke-pw",
        &fleet,
        &mqtt_addr,
        50,
        1,
        1,
        32,
    )
    .await
    .unwrap();
    assert_eq!((amqp_e2e.sent, amqp_e2e.received), (50, 50));

    // Events at a fixed rate (no broker stall here: the broker is shared with other tests):
    // every acknowledged event is found in the topic.
    let stall = ferrule_loadtest::resilience::Stall {
        broker_pid: None,
        after_secs: 0,
        secs: 0,
    };
    let run = ferrule_loadtest::resilience::events_through_stall(
        &kafka,
        &fleet,
        &mqtt_addr,
        100,
        1,
        32,
        stall,
        Some(pid),
    )
    .await
    .unwrap();
    assert_eq!(
        (run.sent, run.acked, run.stored, run.lost),
        (100, 100, 100, 0),
        "{run:?}"
    );
    assert!(run.peak_rss_bytes.unwrap() > 1_000_000);

    // Command round trips to HTTP devices that long-poll with hono-ttd.
    let http_fleet = Fleet::provision(&registry_url, "admin:smoke", 3)
        .await
        .unwrap();
    let rt = ferrule_loadtest::commands::http_round_trips(
        &kafka,
        &http_fleet,
        &format!("http://127.0.0.1:{http}"),
        20,
        1,
        5,
        20,
    )
    .await
    .unwrap();
    // A command that reaches a device between two polls is answered 503: counted, not lost.
    assert_eq!(
        rt.answered + rt.failed.values().sum::<usize>(),
        rt.sent,
        "{rt:?}"
    );
    assert!(rt.answered > 0, "{rt:?}");

    // bcrypt-stored credentials: the device still connects.
    let bcrypt_fleet = Fleet::provision_with(
        &registry_url,
        "admin:smoke",
        1,
        ferrule_loadtest::devices::PasswordHash::Bcrypt,
    )
    .await
    .unwrap();
    assert_eq!(bcrypt_fleet.mqtt_hold(&mqtt_addr).await.unwrap().len(), 1);

    // CoAP over plain UDP, CON and NON, unauthenticated devices; and the bare server's ceiling.
    let coap_fleet = Fleet::provision(&registry_url, "admin:smoke", 3)
        .await
        .unwrap();
    coap_fleet
        .allow_anonymous_coap(&registry_url, "admin:smoke")
        .await
        .unwrap();
    let coap_addr: std::net::SocketAddr = format!("127.0.0.1:{coap}").parse().unwrap();
    let t = Instant::now();
    for confirmable in [true, false] {
        ferrule_loadtest::coap::put_load(
            coap_addr,
            coap_fleet.coap_paths(),
            30,
            3,
            confirmable,
            32,
        )
        .await
        .unwrap();
    }
    wait_for_records(&kafka, &coap_fleet.telemetry_topic(), 60, t)
        .await
        .unwrap();
    // DTLS with pre-shared keys: sessions opened, then uploads over them, CON and NON.
    let psk = coap_fleet
        .use_psk(&registry_url, "admin:smoke", b"smoke-psk")
        .await
        .unwrap();
    let coaps_addr: std::net::SocketAddr = format!("127.0.0.1:{coaps}").parse().unwrap();
    let t = Instant::now();
    for confirmable in [true, false] {
        let opened = ferrule_loadtest::coap_dtls::open_sessions(coaps_addr, psk.clone(), 3, 3)
            .await
            .unwrap();
        assert_eq!(opened.sessions.len(), 3);
        ferrule_loadtest::coap_dtls::upload(opened.sessions, 30, confirmable, 32)
            .await
            .unwrap();
    }
    // Each session's first request, and the uploads: the 60 plain ones before, 66 now.
    wait_for_records(&kafka, &coap_fleet.telemetry_topic(), 60 + 66, t)
        .await
        .unwrap();
    let (bare, server) = ferrule_loadtest::coap::bare_server().await.unwrap();
    ferrule_loadtest::coap::put_load(bare, coap_fleet.coap_paths(), 30, 3, true, 32)
        .await
        .unwrap();
    server.abort();

    // The run's report lines become plots.
    let mut report = Report::new("e2e-latency-qos1", e2e.received, e2e.seconds);
    report.series = e2e.series.clone();
    let dir = std::env::temp_dir().join(format!("smoke-plots-{}", uuid::Uuid::new_v4().simple()));
    let plots = ferrule_loadtest::plot::render_run(&report.to_json(), &dir).unwrap();
    assert_eq!(plots.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();

    let _ = ferrule.kill();
    let _ = ferrule.wait();
}

/// The tracing-cost scenarios' OTLP sink counts the spans of what it receives.
#[tokio::test]
async fn the_otlp_sink_counts_spans() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(ferrule_loadtest::otlp_sink::serve(listener));
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span::default(), Span::default()],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{url}/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let garbage = client
        .post(format!("{url}/v1/traces"))
        .body(vec![0xff; 7])
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let counts: serde_json::Value = client
        .get(format!("{url}/spans"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counts["spans"], 2);
    assert_eq!(counts["requests"], 1);
}
