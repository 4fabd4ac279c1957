//! `ferrule-loadtest`: drives a running Ferrule with simulated devices and measures what
//! reaches Kafka, next to a raw rdkafka producer against the same broker as the ceiling.
//! Every scenario provisions its own tenant through the registry API.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use ferrule_loadtest::devices;
use ferrule_loadtest::measure::{self, ProcessSample, Report};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "ferrule-loadtest", version)]
struct Cli {
    /// Kafka bootstrap servers (the same broker Ferrule writes to).
    #[arg(long, default_value = "127.0.0.1:9092", global = true)]
    kafka: String,
    /// Registry management API.
    #[arg(long, default_value = "http://127.0.0.1:28080", global = true)]
    registry: String,
    /// Registry management credentials `user:password`.
    #[arg(long, default_value = "admin:admin-secret", global = true)]
    registry_auth: String,
    /// Ferrule's process id, for CPU seconds and resident memory.
    #[arg(long, global = true)]
    pid: Option<u32>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64, global = true)]
    size: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Raw rdkafka producer (idempotent, acks=all, 3 headers): the Kafka-leg ceiling.
    KafkaProducer {
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
    },
    /// MQTT devices publishing telemetry as fast as the gateway takes it.
    Mqtt {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 1000)]
        messages_per_device: usize,
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// The MQTT ingest reference: `addr` is a plain MQTT broker (Mosquitto), nothing is
        /// provisioned, and the run ends when every device's last packet was answered.
        #[arg(long)]
        baseline: bool,
    },
    /// The HTTP ceiling: the same HTTP load against a bare axum handler in this process
    /// that answers 202 to `POST /telemetry` after reading the body.
    HttpBaseline {
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 50_000)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// HTTP devices posting telemetry with a fixed number of requests in flight.
    Http {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 50_000)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
    /// Request/response command round trips at a fixed offered rate: application (rdkafka) →
    /// router → gateway → MQTT device → response → application; latency percentiles.
    CommandRtt {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Commands per second offered.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// QoS of the devices' command subscriptions.
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// `fetch.wait.max.ms` of the application's response consumer.
        #[arg(long, default_value_t = 100)]
        fetch_wait_ms: u64,
    },
    /// The Kafka-leg floor of a command round trip: request topic → echo consumer/producer →
    /// response topic, at the same rate and fetch wait (two broker hops; Ferrule takes three).
    KafkaEcho {
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        fetch_wait_ms: u64,
    },
    /// Events read through the AMQP bridge by 1..n competing applications, after the same
    /// events were read by a raw rdkafka consumer (the ceiling), from one topic in one run.
    AmqpConsume {
        /// `amqp://host:port` of the bridge.
        #[arg(long, default_value = "amqp://127.0.0.1:5672")]
        url: String,
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        #[arg(long, default_value_t = 1)]
        receivers: usize,
    },
    /// Renders the JSON lines of a run (a file, or `-` for stdin) as a Markdown table.
    Report {
        #[arg(default_value = "-")]
        input: String,
    },
    /// Idle MQTT connections: resident memory per connection.
    IdleMqtt {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let before = cli.pid.map(ProcessSample::read).transpose()?;
    let report = match &cli.scenario {
        Scenario::KafkaProducer { messages } => {
            let topic = format!("loadtest.baseline.{}", uuid::Uuid::new_v4().simple());
            let started = Instant::now();
            devices::raw_producer(&cli.kafka, &topic, *messages, cli.size).await?;
            let secs =
                measure::wait_for_records(&cli.kafka, &topic, *messages as i64, started).await?;
            Report::new("kafka-producer", *messages, secs)
        }
        Scenario::Mqtt {
            addr,
            devices: n,
            messages_per_device,
            qos,
            baseline: true,
        } => {
            let fleet = devices::Fleet::unprovisioned(*n);
            let total = n * messages_per_device;
            let started = Instant::now();
            fleet
                .mqtt_publish(addr, *messages_per_device, *qos, cli.size)
                .await?;
            let secs = started.elapsed().as_secs_f64();
            Report::new(&format!("mosquitto-qos{qos}"), total, secs)
        }
        Scenario::Mqtt {
            addr,
            devices: n,
            messages_per_device,
            qos,
            baseline: false,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let total = n * messages_per_device;
            let started = Instant::now();
            fleet
                .mqtt_publish(addr, *messages_per_device, *qos, cli.size)
                .await?;
            let secs = measure::wait_for_records(
                &cli.kafka,
                &fleet.telemetry_topic(),
                total as i64,
                started,
            )
            .await?;
            Report::new(&format!("mqtt-qos{qos}"), total, secs)
        }
        Scenario::HttpBaseline {
            devices: n,
            requests,
            concurrency,
        } => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let app = axum::Router::new().route(
                "/telemetry",
                axum::routing::post(|_body: axum::body::Bytes| async {
                    axum::http::StatusCode::ACCEPTED
                }),
            );
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            let fleet = devices::Fleet::unprovisioned(*n);
            let started = Instant::now();
            fleet
                .http_post(&url, *requests, *concurrency, 0, cli.size)
                .await?;
            let secs = started.elapsed().as_secs_f64();
            server.abort();
            Report::new("axum-baseline", *requests, secs)
        }
        Scenario::Http {
            url,
            devices: n,
            requests,
            concurrency,
            qos,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let started = Instant::now();
            fleet
                .http_post(url, *requests, *concurrency, *qos, cli.size)
                .await?;
            let secs = measure::wait_for_records(
                &cli.kafka,
                &fleet.telemetry_topic(),
                *requests as i64,
                started,
            )
            .await?;
            Report::new(&format!("http-qos{qos}"), *requests, secs)
        }
        Scenario::CommandRtt {
            addr,
            devices: n,
            rate,
            seconds,
            qos,
            fetch_wait_ms,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let rt = ferrule_loadtest::commands::round_trips(
                &cli.kafka,
                &fleet,
                addr,
                *rate,
                *seconds,
                *qos,
                *fetch_wait_ms,
            )
            .await?;
            let mut r = Report::new(&format!("command-rtt-qos{qos}"), rt.answered, rt.seconds);
            r.extra = Some(rt.to_json());
            r
        }
        Scenario::KafkaEcho {
            rate,
            seconds,
            fetch_wait_ms,
        } => {
            let rt = ferrule_loadtest::commands::kafka_echo_round_trips(
                &cli.kafka,
                *rate,
                *seconds,
                *fetch_wait_ms,
            )
            .await?;
            let mut r = Report::new("kafka-echo", rt.answered, rt.seconds);
            r.extra = Some(rt.to_json());
            r
        }
        Scenario::AmqpConsume {
            url,
            events,
            receivers,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, 1).await?;
            ferrule_loadtest::amqp::provision_application(
                &cli.registry,
                &cli.registry_auth,
                &fleet.tenant,
                "loadtest",
                "loadtest-app",
            )
            .await?;
            let topic = format!("hono.event.{}", fleet.tenant);
            devices::raw_producer(&cli.kafka, &topic, *events, cli.size).await?;
            measure::wait_for_records(&cli.kafka, &topic, *events as i64, Instant::now()).await?;
            let raw = ferrule_loadtest::amqp::raw_consume(&cli.kafka, &topic, *events).await?;
            let raw_report = Report::new("kafka-consumer", *events, raw);
            println!("{}", raw_report.to_json());
            eprintln!("{}", raw_report.summary());
            let secs = ferrule_loadtest::amqp::amqp_consume(
                url,
                &format!("loadtest@{}", fleet.tenant),
                "loadtest-app",
                &format!("event/{}", fleet.tenant),
                *events,
                *receivers,
            )
            .await?;
            Report::new(&format!("amqp-events-{receivers}"), *events, secs)
        }
        Scenario::Report { input } => {
            let text = match input.as_str() {
                "-" => std::io::read_to_string(std::io::stdin())?,
                path => std::fs::read_to_string(path)?,
            };
            print!("{}", ferrule_loadtest::report::markdown(&text));
            return Ok(());
        }
        Scenario::IdleMqtt { addr, connections } => {
            let fleet =
                devices::Fleet::provision(&cli.registry, &cli.registry_auth, *connections).await?;
            let baseline = cli.pid.map(ProcessSample::read).transpose()?;
            let started = Instant::now();
            let held = fleet.mqtt_hold(addr).await?;
            let secs = started.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut r = Report::new("mqtt-idle", held.len(), secs);
            if let (Some(b), Some(pid)) = (baseline, cli.pid) {
                let now = ProcessSample::read(pid)?;
                r.rss_per_connection_bytes = Some(
                    (now.rss_bytes.saturating_sub(b.rss_bytes)) as f64 / held.len().max(1) as f64,
                );
            }
            drop(held);
            r
        }
    };
    let mut report = report;
    if let (Some(b), Some(pid)) = (before, cli.pid) {
        report.add_process(&b, &ProcessSample::read(pid)?);
    }
    println!("{}", report.to_json());
    eprintln!("{}", report.summary());
    Ok(())
}
