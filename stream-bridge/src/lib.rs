//! Ferrule's stream bridge: an AMQP 1.0 server through which business applications written
//! for Hono consume their tenant's data, served from the same per-tenant Kafka topics that
//! analytics read directly. Applications sign in with SASL PLAIN as `<app-id>@<tenant>` and
//! may attach only to their own tenant's addresses.
#![forbid(unsafe_code)]

pub mod address;
pub mod command;
mod connection;
pub mod message;
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
    /// Link credit is honoured message by message; this bounds how many records the Kafka
    /// consumer of one link prefetches while the application has no credit (KiB).
    pub prefetch_kbytes: u32,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 5672)),
            prefetch_kbytes: 1024,
        }
    }
}

/// How the bridge reaches Kafka and creates the topics it reads before anything was written.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub bootstrap: String,
    pub topic_partitions: i32,
    pub topic_replication: i32,
}

/// Serves AMQP connections on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: BridgeConfig,
    kafka: KafkaSettings,
    registry: DeviceAuthenticator,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "AMQP bridge listening");
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("log_level", "3")
        .create()?;
    let ctx = connection::Context {
        cfg,
        bootstrap: kafka.bootstrap.clone(),
        kafka,
        producer,
        registry,
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an AMQP connection failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = connection::run(stream, ctx, shutdown).await {
                tracing::debug!(%peer, error = %e, "AMQP connection ended");
            }
        });
    }
}
