//! Ferrule's stream bridge: an AMQP 1.0 server through which business applications written
//! for Hono consume their tenant's data, served from the same per-tenant Kafka topics that
//! analytics read directly. Applications sign in with SASL PLAIN as `<app-id>@<tenant>` and
//! may attach only to their own tenant's addresses.
#![forbid(unsafe_code)]

pub mod address;
pub mod command;
mod connection;
pub mod message;
mod metrics;
mod outcome;
mod sasl;

use ferrule_registry::DeviceAuthenticator;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tokio::sync::watch;

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
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 5672)),
            tls_bind: SocketAddr::from(([127, 0, 0, 1], 5671)),
            prefetch_kbytes: 1024,
            command_outcome_timeout_ms: 10_000,
        }
    }
}

/// How the bridge reaches Kafka and creates the topics it reads before anything was written.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub bootstrap: String,
    pub topic_partitions: i32,
    pub topic_replication: i32,
    /// `fetch.wait.max.ms` of the bridge's consumers (`kafka.consumer_fetch_wait_ms`): on a
    /// broker that does not wake waiting fetches, every delivery can wait this long.
    pub fetch_wait_ms: u64,
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
    kafka: KafkaSettings,
    registry: DeviceAuthenticator,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("log_level", "3")
        .create()?;
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let outcomes = outcome::Outcomes::start(
        kafka.clone(),
        &instance,
        std::time::Duration::from_millis(cfg.command_outcome_timeout_ms),
        shutdown.clone(),
    );
    let ctx = connection::Context {
        cfg,
        outcomes,
        bootstrap: kafka.bootstrap.clone(),
        kafka,
        producer,
        registry,
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
                None => connection::run(stream, ctx, shutdown).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        tls.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(stream)) => connection::run(stream, ctx, shutdown).await,
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
