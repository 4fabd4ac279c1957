//! Ferrule's stream bridge: an AMQP 1.0 server through which business applications written
//! for Hono consume their tenant's data, served from the same per-tenant Kafka topics that
//! analytics read directly. Applications sign in with SASL PLAIN as `<app-id>@<tenant>` and
//! may attach only to their own tenant's addresses.
#![forbid(unsafe_code)]

pub mod address;
mod batched_io;
pub mod command;
mod connection;
mod credit;
pub mod message;
mod metrics;
mod outcome;
pub mod payload;
mod sasl;

use ferrule_registry::DeviceAuthenticator;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tokio::sync::watch;

/// The `service.name` of the bridge's spans.
pub const SERVICE_NAME: &str = "ferrule-bridge";

/// The `[bridge]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeConfig {
    /// Where the plain AMQP listener binds.
    pub bind: SocketAddr,
    /// Where AMQPS (TLS) listens when `gateway.tls` names a certificate.
    pub tls_bind: SocketAddr,
    /// Link credit is honoured message by message; this bounds how many records the Kafka
    /// consumer of one link prefetches while the application has no credit (KiB).
    pub prefetch_kbytes: u32,
    /// How long an application's command stays unsettled waiting for the router or gateway
    /// to report whether it reached the device; then it is released (ms).
    pub command_outcome_timeout_ms: u64,
    /// This instance's id: names its command outcome topic
    /// (`<kafka.topic_prefix>ferrule.command_outcome.<id>`). Set a stable, unique one per
    /// instance when topics are created beforehand (`kafka.create_topics = false`); empty: a
    /// random id at each start, and the topic is created and deleted with the instance.
    pub instance_id: String,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 5672)),
            tls_bind: SocketAddr::from(([127, 0, 0, 1], 5671)),
            prefetch_kbytes: 1024,
            command_outcome_timeout_ms: 10_000,
            instance_id: String::new(),
        }
    }
}

/// The sockets the bridge serves.
pub struct Listeners {
    pub amqp: Option<tokio::net::TcpListener>,
    /// AMQPS: the listener and the TLS acceptor of the configured certificate.
    pub amqps: Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
}

/// Serves AMQP connections until `shutdown` turns true.
pub async fn serve(
    listeners: Listeners,
    cfg: BridgeConfig,
    kafka: ferrule_kafka::KafkaConfig,
    registry: DeviceAuthenticator,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    metrics::init();
    let producer = ferrule_kafka::RecoveringProducer::new("bridge", kafka.command_producer())?;
    let names = kafka.topic_names()?;
    let topics = ferrule_kafka::TopicAdmin::new(&kafka)?;
    let instance = match cfg.instance_id.as_str() {
        "" => uuid::Uuid::new_v4().simple().to_string(),
        id => id.to_owned(),
    };
    let outcome_topic = names.outcome(&instance);
    if !kafka.create_topics && cfg.instance_id.is_empty() {
        tracing::warn!(
            topic = outcome_topic,
            "kafka.create_topics is false but bridge.instance_id is not set: applications' \
             commands are released until this topic exists; give each instance a stable id and \
             create its topic beforehand"
        );
    }
    anyhow::ensure!(
        ferrule_schemas::topic::is_legal_kafka_name(&outcome_topic),
        "bridge.instance_id `{instance}` makes `{outcome_topic}`, not a legal Kafka topic name"
    );
    let outcomes = outcome::Outcomes::start(
        kafka.clone(),
        topics.clone(),
        outcome_topic,
        std::time::Duration::from_millis(cfg.command_outcome_timeout_ms),
        shutdown.clone(),
    );
    let ctx = connection::Context {
        cfg,
        outcomes,
        kafka: std::sync::Arc::new(kafka),
        names,
        topics,
        producer,
        registry,
        tracer: ferrule_telemetry::tracer(SERVICE_NAME),
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(listener) = listeners.amqp {
        tracing::info!(addr = %listener.local_addr()?, "AMQP bridge listening");
        servers.spawn(accept_loop(listener, None, ctx.clone(), shutdown.clone()));
    }
    if let Some((listener, tls)) = listeners.amqps {
        tracing::info!(addr = %listener.local_addr()?, "AMQPS bridge listening");
        servers.spawn(accept_loop(
            listener,
            Some(tls),
            ctx.clone(),
            shutdown.clone(),
        ));
    }
    while servers.join_next().await.is_some() {}
    Ok(())
}

/// Accepts connections on one listener; with `tls`, each one does its TLS handshake first,
/// on its own task, so a slow or plain-text client holds up nobody.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: connection::Context,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an AMQP connection failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (ctx, shutdown, tls) = (ctx.clone(), shutdown.clone(), tls.clone());
        tokio::spawn(async move {
            let result = match tls {
                None => connection::run(batched_io::batched(stream), ctx, shutdown).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        tls.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            connection::run(batched_io::batched(stream), ctx, shutdown).await
                        }
                        Ok(Err(e)) => {
                            metrics::refused("tls");
                            Err(anyhow::anyhow!("TLS handshake failed: {e}"))
                        }
                        Err(_) => {
                            metrics::refused("tls");
                            Err(anyhow::anyhow!("TLS handshake timed out"))
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "AMQP connection ended");
            }
        });
    }
}
