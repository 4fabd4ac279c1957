//! `ferrule`: one binary, one subcommand per service, `ferrule all` for all of them in one
//! process. This file only wires configuration, logging, probes and shutdown around the
//! service crates.
#![forbid(unsafe_code)]

mod config;
mod health;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use config::Config;
use health::Readiness;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's allocator: a CoAP or HTTP request allocates and frees a few
/// buffers and tasks of a few KB, which glibc serves by consolidating its free lists — a fifth
/// of the workers' time in the CoAP mix (docs/performance.md, "The mix, fifth look").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hono-compatible IoT connectivity: device registry, gateways, command routing, AMQP bridge.
#[derive(Parser)]
#[command(name = "ferrule", version)]
struct Cli {
    /// TOML configuration file; every key can also be set as FERRULE_<SECTION>__<KEY>.
    #[arg(long, short, env = "FERRULE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in one process (the laptop, CI and quick-start setup).
    All,
    /// Run the device registry (Hono Device Registry Management API v1).
    Registry,
    /// Run the protocol gateways (HTTP and MQTT adapters) that write device data into Kafka.
    Gateway,
    /// Run the command router (consumes hono.command.*, forwards to gateway instances).
    Router,
    /// Run the AMQP 1.0 bridge through which applications consume their tenant's data.
    Bridge,
    /// Send a metadata request to the configured Kafka cluster and print what it answered.
    CheckKafka,
    /// Print the default configuration as TOML.
    PrintConfig,
}

fn main() -> anyhow::Result<()> {
    let help = format!(
        "Configuration keys, their defaults and environment variables:\n{}",
        config::key_reference()
    );
    let matches = Cli::command().after_long_help(help).get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    if let Command::PrintConfig = cli.command {
        print!("{}", Config::defaults_toml());
        return Ok(());
    }
    let cfg = Config::load(cli.config.as_deref())?;
    init_logging(&cfg.log)?;
    ferrule_telemetry::install(&cfg.telemetry)
        .map_err(|e| anyhow::anyhow!("telemetry.sampler: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        match cli.command {
            Command::All => run_services(cfg, Services::ALL).await,
            Command::Registry => run_services(cfg, Services::REGISTRY).await,
            Command::Gateway => run_services(cfg, Services::GATEWAY).await,
            Command::Router => run_services(cfg, Services::ROUTER).await,
            Command::Bridge => run_services(cfg, Services::BRIDGE).await,
            Command::CheckKafka => check_kafka(&cfg).await,
            Command::PrintConfig => Ok(()),
        }
    });
    // The spans of the last messages still go out.
    ferrule_telemetry::shutdown();
    result
}

fn init_logging(log: &config::LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .context("log.filter is not a valid tracing filter")?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log.format.as_str() {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => anyhow::bail!("log.format must be text or json, not {other}"),
    }
    Ok(())
}

async fn bind(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

async fn bind_udp(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

/// Which services one process runs.
#[derive(Clone, Copy)]
struct Services {
    registry: bool,
    gateway: bool,
    router: bool,
    bridge: bool,
}

impl Services {
    const ALL: Services = Services {
        registry: true,
        gateway: true,
        router: true,
        bridge: true,
    };
    const REGISTRY: Services = Services {
        registry: true,
        gateway: false,
        router: false,
        bridge: false,
    };
    const GATEWAY: Services = Services {
        registry: false,
        gateway: true,
        router: false,
        bridge: false,
    };
    const ROUTER: Services = Services {
        registry: false,
        gateway: false,
        router: true,
        bridge: false,
    };
    const BRIDGE: Services = Services {
        registry: false,
        gateway: false,
        router: false,
        bridge: true,
    };
}

/// Runs the chosen services until SIGINT/SIGTERM or until one of them fails.
async fn run_services(cfg: Config, services: Services) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown) = watch::channel(false);
    let readiness = Readiness::default();
    // Bind every port first, so a busy port fails the start at once.
    let health_listener = bind("health", cfg.health.bind).await?;
    let registry_listener = match services.registry {
        true => Some(bind("registry", cfg.registry.bind).await?),
        false => None,
    };
    let bridge_listeners = match services.bridge {
        true => Some(ferrule_stream_bridge::Listeners {
            amqp: Some(bind("AMQP bridge", cfg.bridge.bind).await?),
            amqps: match cfg.gateway.tls.acceptor(&[])? {
                Some(tls) => Some((bind("AMQPS bridge", cfg.bridge.tls_bind).await?, tls)),
                None => None,
            },
        }),
        false => None,
    };
    let tls = cfg.gateway.tls.enabled();
    let gateway_listeners = match services.gateway {
        true => Some(ferrule_gateways::Listeners {
            http: Some(bind("HTTP adapter", cfg.gateway.http.bind).await?),
            mqtt: Some(bind("MQTT adapter", cfg.gateway.mqtt.bind).await?),
            https: match tls {
                true => Some(bind("HTTPS adapter", cfg.gateway.http.tls_bind).await?),
                false => None,
            },
            mqtts: match tls {
                true => Some(bind("MQTTS adapter", cfg.gateway.mqtt.tls_bind).await?),
                false => None,
            },
            coap: match cfg.gateway.coap.enabled {
                true => Some(bind_udp("CoAP adapter", cfg.gateway.coap.bind).await?),
                false => None,
            },
            coaps: match cfg.gateway.coap.dtls_enabled {
                true => Some(bind_udp("CoAP adapter (DTLS)", cfg.gateway.coap.dtls_bind).await?),
                false => None,
            },
        }),
        false => None,
    };
    // The probes are declared before the health port answers: with none declared, readiness
    // would say UP.
    readiness.register("postgresql");
    let uses_kafka = services.gateway || services.router || services.bridge;
    if uses_kafka {
        readiness.register("kafka");
    }
    let mut tasks = tokio::task::JoinSet::new();
    let heartbeat = health::Heartbeat::new(Duration::from_secs(cfg.health.liveness_stall_secs));
    tasks.spawn(heartbeat.clone().run(shutdown.clone()));
    let health_server = health::spawn(
        health_listener.into_std()?,
        readiness.clone(),
        heartbeat,
        shutdown.clone(),
    )?;

    if uses_kafka {
        let client = ferrule_kafka::MetadataClient::new(&cfg.kafka)?;
        tasks.spawn(probe_kafka(client, readiness.clone(), shutdown.clone()));
    }

    if services.registry
        && cfg.registry.management.password == ferrule_registry::ManagementAuth::default().password
    {
        tracing::warn!(
            "the registry management API uses the default password; set \
             FERRULE_REGISTRY__MANAGEMENT__PASSWORD (or registry.management.password)"
        );
    }
    let store = ferrule_registry::open_store(&cfg.database, &cfg.registry)
        .await?
        .with_topic_names(cfg.kafka.topic_names()?);
    tasks.spawn(probe_database(
        store.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));
    if let Some(listener) = registry_listener {
        tasks.spawn(ferrule_registry::serve(
            listener,
            store.clone(),
            cfg.registry.clone(),
            shutdown.clone(),
        ));
    }
    // One registry view (cache + change listener) for the gateway and the router.
    let registry = (services.gateway || services.router || services.bridge).then(|| {
        ferrule_registry::DeviceAuthenticator::new(store.pool().clone(), &cfg.registry.auth_cache)
    });
    if let Some(registry) = &registry {
        let db = ferrule_registry::db::Connector::new(&cfg.database)?;
        let listen = registry.spawn_listener(db, shutdown.clone());
        tasks.spawn(async move {
            let _ = listen.await;
            Ok(())
        });
    }
    if services.router
        && let Some(registry) = registry.clone()
    {
        let (router, kafka, pool) = (cfg.router.clone(), cfg.kafka.clone(), store.pool().clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            ferrule_command_router::run(router, &kafka, registry, pool, shutdown).await
        });
    }
    if let (Some(listeners), Some(registry)) = (bridge_listeners, registry.clone()) {
        let bridge = cfg.bridge.clone();
        let kafka = cfg.kafka.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            ferrule_stream_bridge::serve(listeners, bridge, kafka, registry, shutdown).await
        });
    }
    if let (Some(listeners), Some(registry)) = (gateway_listeners, registry) {
        let (gateway, kafka) = (cfg.gateway.clone(), cfg.kafka.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            ferrule_gateways::serve(listeners, gateway, &kafka, registry, shutdown).await
        });
    }
    tracing::info!(
        registry = services.registry.then(|| cfg.registry.bind.to_string()),
        http = services.gateway.then(|| cfg.gateway.http.bind.to_string()),
        mqtt = services.gateway.then(|| cfg.gateway.mqtt.bind.to_string()),
        amqp = services.bridge.then(|| cfg.bridge.bind.to_string()),
        health = %cfg.health.bind,
        "ferrule started"
    );
    readiness.set_started();

    let result = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err(anyhow::anyhow!("a service stopped unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.into()),
        },
    };
    // Readiness goes down first, while everything still serves: load balancers stop sending
    // new connections here. Then the services stop accepting and drain, within a bound.
    readiness.report("shutdown", Err("the process is shutting down".into()));
    if result.is_ok() {
        let delay = Duration::from_millis(cfg.shutdown.readiness_delay_ms);
        tracing::info!(?delay, "shutting down: readiness is down, still serving");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // A second signal, or a service that fails meanwhile, cuts the wait short.
            _ = shutdown_signal() => {}
            Some(_) = tasks.join_next() => {}
        }
    }
    tracing::info!("shutting down: draining");
    let _ = shutdown_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    let bound = Duration::from_secs(cfg.shutdown.drain_timeout_secs);
    if tokio::time::timeout(bound, drain).await.is_err() {
        tracing::warn!(
            ?bound,
            "services did not finish draining in time; exiting without them"
        );
        // What still runs would hold the exit past the bound: dropping a Kafka consumer, for
        // one, waits for its LeaveGroup request, which a stuck broker never answers.
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    }
    // The health port stopped with the shutdown signal.
    let _ = health_server.join();
    tracing::info!("stopped");
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

const PROBE_INTERVAL: Duration = Duration::from_secs(1);

async fn probe_database(
    store: ferrule_registry::Store,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        let result = match tokio::time::timeout(PROBE_INTERVAL, store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("no answer within 1 s".into()),
        };
        readiness.report("postgresql", result);
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

async fn probe_kafka(
    client: ferrule_kafka::MetadataClient,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = std::sync::Arc::new(client);
    loop {
        let c = client.clone();
        let result = match tokio::task::spawn_blocking(move || c.fetch()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        };
        readiness.report("kafka", result);
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

async fn check_kafka(cfg: &Config) -> anyhow::Result<()> {
    let client = ferrule_kafka::MetadataClient::new(&cfg.kafka)?;
    let info = tokio::task::spawn_blocking(move || client.fetch())
        .await?
        .with_context(|| {
            format!(
                "no metadata from the Kafka cluster at {}",
                cfg.kafka.bootstrap_servers
            )
        })?;
    println!(
        "kafka at {}: brokers [{}], {} topics",
        cfg.kafka.bootstrap_servers,
        info.brokers.join(", "),
        info.topics
    );
    Ok(())
}
