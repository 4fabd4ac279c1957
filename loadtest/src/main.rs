//! `ferrule-loadtest`: drives a running Ferrule with simulated devices and measures what
//! reaches Kafka, next to a raw rdkafka producer against the same broker as the ceiling.
//! Every scenario provisions its own tenant through the registry API.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use ferrule_loadtest::devices;
use ferrule_loadtest::measure::{self, ProcessSample, Report};
use ferrule_loadtest::timeline::Timeline;
use ferrule_loadtest::typed;
use std::time::{Duration, Instant};

/// The same allocator as the `ferrule` binary, so that the baselines this process serves (the
/// bare axum and coap-lite servers) and its simulated devices are measured as Ferrule is.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The Kafka-protocol broker's process id, when it runs on this machine: its CPU seconds
    /// per 100k messages go into the report beside the server's and the load generator's.
    #[arg(long, global = true)]
    broker_pid: Option<u32>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64, global = true)]
    size: usize,
    /// A scenario that has not finished after this many seconds fails (runs never hang).
    #[arg(long, default_value_t = 1200, global = true)]
    max_seconds: u64,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Raw rdkafka producer (idempotent, acks=all, the gateway's six headers): the Kafka-leg
    /// ceiling.
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
        /// Devices send a JSON sensor reading ([`typed::READING`]) instead of `size` bytes of
        /// filler: the same payload for the runs with and without a schema.
        #[arg(long)]
        json: bool,
        /// Registers [`typed::SCHEMA`] for the tenant's telemetry first: the gateway checks
        /// each JSON payload and writes it as Avro (docs/analytics.md). Implies `--json`.
        #[arg(long)]
        avro_schema: bool,
        /// The protocol version the devices speak.
        #[arg(long, value_enum, default_value = "3.1.1")]
        mqtt_version: devices::MqttVersion,
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
    /// The CoAP ceiling: the same CoAP load against a bare coap-lite UDP server in this
    /// process that answers 2.04 without Kafka.
    CoapBaseline {
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 50_000)]
        requests: usize,
        /// Devices sending at once, each with one request in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// NON requests (at most once) instead of CON (at least once).
        #[arg(long)]
        non: bool,
    },
    /// Unauthenticated CoAP devices `PUT`ting telemetry over plain UDP, one request in flight
    /// each.
    Coap {
        #[arg(long, default_value = "127.0.0.1:5683")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 50_000)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        non: bool,
    },
    /// CoAP devices opening DTLS sessions with pre-shared keys and keeping them: handshakes
    /// (with one request each) per second, and the server's memory per session held.
    CoapDtls {
        #[arg(long, default_value = "127.0.0.1:5684")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Sessions opened, spread over the devices.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Telemetry uploads sent over the open sessions afterwards, one in flight per
        /// session (0: none; the report is then the handshakes'). With uploads the report
        /// is theirs: rate, and the server's CPU while they ran.
        #[arg(long, default_value_t = 0)]
        requests: usize,
        /// The uploads as NON requests (default CON).
        #[arg(long)]
        non: bool,
    },
    /// Request/response command round trips to CoAP devices long-polling with `hono-ttd`
    /// over plain UDP, at a fixed offered rate; latency percentiles.
    CommandRttCoap {
        #[arg(long, default_value = "127.0.0.1:5683")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 30)]
        ttd: u32,
        #[arg(long, default_value_t = 100)]
        fetch_wait_ms: u64,
    },
    /// Hono's CoAP load-test mix: each device `PUT`s an event and telemetry with `hono-ttd` in
    /// turn; an application commands every device that announces a ttd, the device answers.
    /// Rate of telemetry + events + commands + responses, and Ferrule's CPU per 100k of them.
    CoapMix {
        #[arg(long, default_value = "127.0.0.1:5683")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 500)]
        devices: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 10)]
        ttd: u32,
        #[arg(long, default_value_t = 100)]
        fetch_wait_ms: u64,
        /// Authenticated devices over DTLS with pre-shared keys (`--addr` is then the DTLS
        /// port), as Hono's own run was made; reported as `coap-mix-dtls`.
        #[arg(long)]
        dtls: bool,
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
        /// `event` (unsettled, accepted by the application) or `telemetry` (pre-settled).
        #[arg(long, default_value = "event")]
        kind: String,
        /// Read with this Qpid Proton-C program (`loadtest/amqp-proton.c`) instead of
        /// fe2o3-amqp, one process per receiver.
        #[arg(long)]
        proton: Option<String>,
    },
    /// The same round trips to HTTP devices that only long-poll (`hono-ttd`).
    CommandRttHttp {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 500)]
        devices: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The `hono-ttd` every poll asks for.
        #[arg(long, default_value_t = 20)]
        ttd: u32,
        #[arg(long, default_value_t = 100)]
        fetch_wait_ms: u64,
    },
    /// End-to-end latency: MQTT devices stamp each telemetry payload with its send time, a
    /// Kafka consumer on the tenant's topic times it on arrival.
    E2eLatency {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 1)]
        qos: u8,
        #[arg(long, default_value_t = 100)]
        fetch_wait_ms: u64,
    },
    /// End-to-end latency through the AMQP bridge: the same devices, an application attached
    /// to `telemetry/<tenant>` times each message.
    E2eLatencyAmqp {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        /// `amqp://host:port` of the bridge.
        #[arg(long, default_value = "amqp://127.0.0.1:5672")]
        url: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
    /// Kafka stopped mid-run: events at a fixed rate while the broker is frozen (SIGSTOP)
    /// and resumed; counts acknowledged events missing afterwards and the gateway's peak RSS.
    BrokerStall {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        // The broker to stop is `--broker-pid`; without it the run has no stall.
        #[arg(long, default_value_t = 5)]
        stall_after: u64,
        #[arg(long, default_value_t = 5)]
        stall_secs: u64,
    },
    /// Draws every scenario of a run that has a time series as `<out>/<scenario>.svg`.
    Plot {
        input: String,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// An OTLP/HTTP trace receiver that counts the spans it gets (`GET /spans`), for the
    /// tracing-cost scenarios; serves until killed.
    OtlpSink {
        #[arg(long, default_value = "127.0.0.1:14318")]
        bind: String,
    },
    /// Renders the JSON lines of a run (a file, or `-` for stdin) as a Markdown table.
    Report {
        #[arg(default_value = "-")]
        input: String,
    },
    /// Idle MQTT connections: connect rate and resident memory per connection.
    IdleMqtt {
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// How the registry stores the passwords (bcrypt makes every connect pay for it).
        #[arg(long, value_enum, default_value = "sha256")]
        hash: devices::PasswordHash,
        /// New connections per second (default: as fast as 64 concurrent connects go).
        #[arg(long)]
        connect_rate: Option<u32>,
        /// Keep the connections open this long after reporting, so a script running several
        /// of these against several gateways can check they are all open at once.
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
        /// Where the devices' loopback source addresses start (in devices, 10 000 per
        /// address): simulators side by side each need their own.
        #[arg(long, default_value_t = 0)]
        source_offset: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let limit = Duration::from_secs(cli.max_seconds);
    match tokio::time::timeout(limit, run(&cli)).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!("the scenario did not finish within {} s", cli.max_seconds),
    }
}

/// Runs `load` while watching `topic` fill up to `expected` records; the seconds until the
/// last one arrived and the run's timeline (100 ms intervals).
async fn timed_ingest(
    kafka: &str,
    topic: &str,
    expected: usize,
    load: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<(f64, Vec<ferrule_loadtest::timeline::Point>)> {
    let started = Instant::now();
    let progress = ferrule_loadtest::progress::bar(topic, expected as u64, "records");
    let watch = tokio::spawn(measure::watch_records(
        kafka.to_owned(),
        topic.to_owned(),
        expected as i64,
        started,
    ));
    if let Err(e) = load.await {
        watch.abort();
        return Err(e);
    }
    let (secs, samples) = watch.await??;
    progress.finish_and_clear();
    let mut timeline = Timeline::new(started, Duration::from_millis(100));
    timeline.count_totals(&samples);
    Ok((secs, timeline.points()))
}

/// `""` for MQTT 3.1.1, `"5"` for MQTT 5: `mqtt5-qos1` next to `mqtt-qos1`.
fn version_tag(v: devices::MqttVersion) -> &'static str {
    match v {
        devices::MqttVersion::V311 => "",
        devices::MqttVersion::V5 => "5",
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    // The raw producer is its own server: without another process named, its CPU is this
    // process's, so Ferrule's CPU per message can be set against it.
    let pid = cli
        .pid
        .or_else(|| matches!(cli.scenario, Scenario::KafkaProducer { .. }).then(std::process::id));
    let before = pid.map(ProcessSample::read).transpose()?;
    let budget = Budget::start(cli.broker_pid)?;
    let peak = pid.map(measure::PeakRss::start);
    let report = match &cli.scenario {
        Scenario::KafkaProducer { messages } => {
            let topic = format!("loadtest.baseline.{}", uuid::Uuid::new_v4().simple());
            // Created with the partitions of a tenant topic of the gateway (3 by default), and
            // the producer connected and its producer id acquired before the clock starts, as
            // a running gateway's is.
            let producer = devices::raw_producer_ready(&cli.kafka, &topic, Some(3)).await?;
            let load = devices::raw_produce(&producer, &topic, *messages, cli.size);
            // The topic also holds the record that readied the producer.
            let (secs, series) = timed_ingest(&cli.kafka, &topic, *messages + 1, load).await?;
            let mut r = Report::new("kafka-producer", *messages, secs);
            r.series = series;
            r
        }
        Scenario::Mqtt {
            addr,
            devices: n,
            messages_per_device,
            qos,
            baseline: true,
            mqtt_version,
            ..
        } => {
            let fleet = devices::Fleet::unprovisioned(*n);
            let total = n * messages_per_device;
            let started = Instant::now();
            fleet
                .mqtt_publish_with(addr, *messages_per_device, *qos, cli.size, *mqtt_version)
                .await?;
            let secs = started.elapsed().as_secs_f64();
            Report::new(
                &format!("mosquitto{}-qos{qos}", version_tag(*mqtt_version)),
                total,
                secs,
            )
        }
        Scenario::Mqtt {
            addr,
            devices: n,
            messages_per_device,
            qos,
            baseline: false,
            json,
            avro_schema,
            mqtt_version,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            if *avro_schema {
                fleet
                    .register_telemetry_schema(&cli.registry, &cli.registry_auth, typed::SCHEMA)
                    .await?;
            }
            let payload = if *json || *avro_schema {
                typed::READING.as_bytes().to_vec()
            } else {
                vec![b'x'; cli.size]
            };
            let total = n * messages_per_device;
            let load = fleet.mqtt_publish_payload(
                addr,
                *messages_per_device,
                *qos,
                payload,
                *mqtt_version,
            );
            let (secs, series) =
                timed_ingest(&cli.kafka, &fleet.telemetry_topic(), total, load).await?;
            let typed_tag = match (*avro_schema, *json) {
                (true, _) => "-avro",
                (false, true) => "-json",
                _ => "",
            };
            let name = format!("mqtt{}-qos{qos}{typed_tag}", version_tag(*mqtt_version));
            let mut r = Report::new(&name, total, secs);
            r.series = series;
            r
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
        Scenario::CoapBaseline {
            devices: n,
            requests,
            concurrency,
            non,
        } => {
            let (addr, server) = ferrule_loadtest::coap::bare_server().await?;
            let fleet = devices::Fleet::unprovisioned(*n);
            let started = Instant::now();
            let load = ferrule_loadtest::coap::put_load(
                addr,
                fleet.coap_paths(),
                *requests,
                *concurrency,
                !*non,
                cli.size,
            );
            load.await?;
            let secs = started.elapsed().as_secs_f64();
            server.abort();
            let kind = if *non { "non" } else { "con" };
            Report::new(&format!("coap-baseline-{kind}"), *requests, secs)
        }
        Scenario::Coap {
            addr,
            devices: n,
            requests,
            concurrency,
            non,
        } => {
            let fleet = anonymous_coap_fleet(cli, *n).await?;
            let load = ferrule_loadtest::coap::put_load(
                *addr,
                fleet.coap_paths(),
                *requests,
                *concurrency,
                !*non,
                cli.size,
            );
            let (secs, series) =
                timed_ingest(&cli.kafka, &fleet.telemetry_topic(), *requests, load).await?;
            let kind = if *non { "non" } else { "con" };
            let mut r = Report::new(&format!("coap-{kind}"), *requests, secs);
            r.series = series;
            r
        }
        Scenario::CommandRttCoap {
            addr,
            devices: n,
            rate,
            seconds,
            ttd,
            fetch_wait_ms,
        } => {
            let fleet = anonymous_coap_fleet(cli, *n).await?;
            let rt = ferrule_loadtest::commands::coap_round_trips(
                &cli.kafka,
                &fleet,
                *addr,
                *rate,
                *seconds,
                *ttd,
                *fetch_wait_ms,
            )
            .await?;
            let mut r = Report::new("command-rtt-coap", rt.answered, rt.seconds);
            r.extra = Some(rt.to_json());
            r.series = rt.series.clone();
            r
        }
        Scenario::CoapMix {
            addr,
            devices: n,
            seconds,
            ttd,
            fetch_wait_ms,
            dtls,
        } => {
            let fleet = anonymous_coap_fleet(cli, *n).await?;
            let transport = if *dtls {
                ferrule_loadtest::mix::Transport::Dtls(
                    fleet
                        .use_psk(&cli.registry, &cli.registry_auth, b"loadtest-psk")
                        .await?,
                )
            } else {
                ferrule_loadtest::mix::Transport::Plain
            };
            let mix = ferrule_loadtest::mix::run(
                &cli.kafka,
                &fleet,
                *addr,
                transport,
                *seconds,
                *ttd,
                cli.size,
                *fetch_wait_ms,
            )
            .await?;
            let name = if *dtls { "coap-mix-dtls" } else { "coap-mix" };
            let mut r = Report::new(name, mix.messages() as usize, mix.seconds);
            r.extra = Some(mix.to_json());
            r
        }
        Scenario::CoapDtls {
            addr,
            devices: n,
            sessions,
            concurrency,
            requests,
            non,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let creds = fleet
                .use_psk(&cli.registry, &cli.registry_auth, b"loadtest-psk")
                .await?;
            let baseline = cli.pid.map(ProcessSample::read).transpose()?;
            let opened =
                ferrule_loadtest::coap_dtls::open_sessions(*addr, creds, *sessions, *concurrency)
                    .await?;
            if *requests > 0 {
                let opening = opened.sessions.len();
                // The CPU counts from here: the uploads', not the handshakes'.
                let before = pid.map(ProcessSample::read).transpose()?;
                let budget = Budget::start(cli.broker_pid)?;
                let load = ferrule_loadtest::coap_dtls::upload(
                    opened.sessions,
                    *requests,
                    !*non,
                    cli.size,
                );
                // The topic also holds each session's first request.
                let (secs, series) = timed_ingest(
                    &cli.kafka,
                    &fleet.telemetry_topic(),
                    *requests + opening,
                    load,
                )
                .await?;
                let kind = if *non { "non" } else { "con" };
                let mut r = Report::new(&format!("coap-dtls-{kind}"), *requests, secs);
                r.series = series;
                return emit(r, before.as_ref(), pid, peak.as_ref(), &budget);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut r = Report::new("coap-dtls-sessions", opened.sessions.len(), opened.seconds);
            if let (Some(b), Some(pid)) = (baseline, cli.pid) {
                let now = ProcessSample::read(pid)?;
                r.rss_per_connection_bytes = Some(
                    now.rss_bytes.saturating_sub(b.rss_bytes) as f64
                        / opened.sessions.len().max(1) as f64,
                );
            }
            drop(opened);
            r
        }
        Scenario::Http {
            url,
            devices: n,
            requests,
            concurrency,
            qos,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let load = fleet.http_post(url, *requests, *concurrency, *qos, cli.size);
            let (secs, series) =
                timed_ingest(&cli.kafka, &fleet.telemetry_topic(), *requests, load).await?;
            let mut r = Report::new(&format!("http-qos{qos}"), *requests, secs);
            r.series = series;
            r
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
            r.series = rt.series.clone();
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
            r.series = rt.series.clone();
            r
        }
        Scenario::CommandRttHttp {
            url,
            devices: n,
            rate,
            seconds,
            ttd,
            fetch_wait_ms,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let rt = ferrule_loadtest::commands::http_round_trips(
                &cli.kafka,
                &fleet,
                url,
                *rate,
                *seconds,
                *ttd,
                *fetch_wait_ms,
            )
            .await?;
            let mut r = Report::new("command-rtt-http", rt.answered, rt.seconds);
            r.extra = Some(rt.to_json());
            r.series = rt.series.clone();
            r
        }
        Scenario::E2eLatency {
            addr,
            devices: n,
            rate,
            seconds,
            qos,
            fetch_wait_ms,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let run = ferrule_loadtest::latency::mqtt_to_kafka(
                &cli.kafka,
                &fleet,
                addr,
                *rate,
                *seconds,
                *qos,
                cli.size,
                *fetch_wait_ms,
            )
            .await?;
            let mut r = Report::new(&format!("e2e-latency-qos{qos}"), run.received, run.seconds);
            r.extra = Some(run.to_json());
            r.series = run.series.clone();
            r
        }
        Scenario::E2eLatencyAmqp {
            addr,
            url,
            devices: n,
            rate,
            seconds,
            qos,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            ferrule_loadtest::amqp::provision_application(
                &cli.registry,
                &cli.registry_auth,
                &fleet.tenant,
                "loadtest",
                "loadtest-app",
            )
            .await?;
            let run = ferrule_loadtest::latency::mqtt_to_amqp(
                url,
                &format!("loadtest@{}", fleet.tenant),
                "loadtest-app",
                &fleet,
                addr,
                *rate,
                *seconds,
                *qos,
                cli.size,
            )
            .await?;
            let mut r = Report::new(
                &format!("e2e-latency-amqp-qos{qos}"),
                run.received,
                run.seconds,
            );
            r.extra = Some(run.to_json());
            r.series = run.series.clone();
            r
        }
        Scenario::BrokerStall {
            addr,
            devices: n,
            rate,
            seconds,
            stall_after,
            stall_secs,
        } => {
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, *n).await?;
            let stall = ferrule_loadtest::resilience::Stall {
                broker_pid: cli.broker_pid,
                after_secs: *stall_after,
                secs: *stall_secs,
            };
            let run = ferrule_loadtest::resilience::events_through_stall(
                &cli.kafka, &fleet, addr, *rate, *seconds, cli.size, stall, cli.pid,
            )
            .await?;
            let mut r = Report::new("broker-stall", run.acked, run.seconds);
            r.extra = Some(run.to_json());
            r.series = run.series.clone();
            r
        }
        Scenario::OtlpSink { bind } => {
            let listener = tokio::net::TcpListener::bind(bind).await?;
            return ferrule_loadtest::otlp_sink::serve(listener).await;
        }
        Scenario::Plot { input, out } => {
            let text = std::fs::read_to_string(input)?;
            for path in ferrule_loadtest::plot::render_run(&text, out)? {
                eprintln!("plot: {}", path.display());
            }
            return Ok(());
        }
        Scenario::AmqpConsume {
            url,
            events,
            receivers,
            kind,
            proton,
        } => {
            anyhow::ensure!(
                kind == "event" || kind == "telemetry",
                "--kind is event or telemetry"
            );
            let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, 1).await?;
            ferrule_loadtest::amqp::provision_application(
                &cli.registry,
                &cli.registry_auth,
                &fleet.tenant,
                "loadtest",
                "loadtest-app",
            )
            .await?;
            let topic = format!("hono.{kind}.{}", fleet.tenant);
            devices::raw_producer(&cli.kafka, &topic, *events, cli.size).await?;
            measure::wait_for_records(&cli.kafka, &topic, *events as i64, Instant::now()).await?;
            if kind == "telemetry" {
                ferrule_loadtest::amqp::commit_beginning(
                    &cli.kafka,
                    &format!("ferrule-bridge.telemetry.{}", fleet.tenant),
                    &topic,
                )
                .await?;
            }
            let raw = ferrule_loadtest::amqp::raw_consume(&cli.kafka, &topic, *events).await?;
            let raw_report = Report::new("kafka-consumer", *events, raw);
            println!("{}", raw_report.to_json());
            eprintln!("{}", raw_report.summary());
            let user = format!("loadtest@{}", fleet.tenant);
            let address = format!("{kind}/{}", fleet.tenant);
            let client = if proton.is_some() { "proton" } else { "fe2o3" };
            let name = format!("amqp-{kind}-{receivers}-{client}");
            match proton {
                Some(program) => {
                    let host_port = url.trim_start_matches("amqp://");
                    let (secs, presettled) = ferrule_loadtest::amqp::proton_consume(
                        program,
                        host_port,
                        &user,
                        "loadtest-app",
                        &address,
                        *events,
                        *receivers,
                    )
                    .await?;
                    let mut r = Report::new(&name, *events, secs);
                    r.extra = Some(serde_json::json!({ "presettled": presettled }));
                    r
                }
                None => {
                    let secs = ferrule_loadtest::amqp::amqp_consume(
                        url,
                        &user,
                        "loadtest-app",
                        &address,
                        *events,
                        *receivers,
                    )
                    .await?;
                    Report::new(&name, *events, secs)
                }
            }
        }
        Scenario::Report { input } => {
            let text = match input.as_str() {
                "-" => std::io::read_to_string(std::io::stdin())?,
                path => std::fs::read_to_string(path)?,
            };
            print!("{}", ferrule_loadtest::report::markdown(&text));
            return Ok(());
        }
        Scenario::IdleMqtt {
            addr,
            connections,
            hash,
            connect_rate,
            hold_secs,
            source_offset,
        } => {
            let mut fleet = devices::Fleet::provision_with(
                &cli.registry,
                &cli.registry_auth,
                *connections,
                *hash,
            )
            .await?;
            fleet.source_offset = *source_offset;
            let baseline = cli.pid.map(ProcessSample::read).transpose()?;
            let started = Instant::now();
            let held = fleet.mqtt_hold_at(addr, *connect_rate).await?;
            let secs = started.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let name = match hash {
                devices::PasswordHash::Sha256 => "mqtt-idle",
                devices::PasswordHash::Bcrypt => "mqtt-idle-bcrypt",
            };
            let mut r = Report::new(name, held.len(), secs);
            if let (Some(b), Some(pid)) = (baseline, cli.pid) {
                let now = ProcessSample::read(pid)?;
                r.rss_per_connection_bytes = Some(
                    (now.rss_bytes.saturating_sub(b.rss_bytes)) as f64 / held.len().max(1) as f64,
                );
            }
            if *hold_secs > 0 {
                emit(r, before.as_ref(), pid, peak.as_ref(), &budget)?;
                tokio::time::sleep(Duration::from_secs(*hold_secs)).await;
                drop(held);
                return Ok(());
            }
            drop(held);
            r
        }
    };
    emit(report, before.as_ref(), pid, peak.as_ref(), &budget)
}

/// The CPU the rest of the box spent on a scenario: the load generator (this process) and
/// the broker. On a machine whose cores all of them share, a server's rate against its
/// baseline's is bounded by what these cost per message.
struct Budget {
    generator: ProcessSample,
    broker: Option<(u32, ProcessSample)>,
}

impl Budget {
    fn start(broker_pid: Option<u32>) -> anyhow::Result<Self> {
        Ok(Budget {
            generator: ProcessSample::read(std::process::id())?,
            broker: broker_pid
                .map(|p| ProcessSample::read(p).map(|s| (p, s)))
                .transpose()?,
        })
    }

    fn add_to(&self, report: &mut Report) -> anyhow::Result<()> {
        let now = ProcessSample::read(std::process::id())?;
        report.generator_cpu_secs = Some(now.cpu_secs - self.generator.cpu_secs);
        if let Some((pid, before)) = &self.broker {
            // A broker that died meanwhile has no figure.
            if let Ok(now) = ProcessSample::read(*pid) {
                report.broker_cpu_secs = Some(now.cpu_secs - before.cpu_secs);
            }
        }
        Ok(())
    }
}

/// Completes a scenario's report with the server process's CPU and memory and prints it: the
/// JSON line on stdout, the summary on stderr.
fn emit(
    mut report: Report,
    before: Option<&ProcessSample>,
    pid: Option<u32>,
    peak: Option<&measure::PeakRss>,
    budget: &Budget,
) -> anyhow::Result<()> {
    budget.add_to(&mut report)?;
    if let (Some(b), Some(pid)) = (before, pid) {
        let now = ProcessSample::read(pid)?;
        report.add_process(b, &now);
        report.peak_rss_bytes = peak.map(|p| p.peak().max(now.rss_bytes));
    }
    println!("{}", report.to_json());
    eprintln!("{}", report.summary());
    Ok(())
}

/// `n` devices of a new tenant that lets them use CoAP without credentials.
async fn anonymous_coap_fleet(cli: &Cli, n: usize) -> anyhow::Result<devices::Fleet> {
    let fleet = devices::Fleet::provision(&cli.registry, &cli.registry_auth, n).await?;
    fleet
        .allow_anonymous_coap(&cli.registry, &cli.registry_auth)
        .await?;
    Ok(fleet)
}
