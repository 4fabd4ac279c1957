//! Ferrule's protocol gateways: stateless adapters that authenticate devices against the
//! registry and write their telemetry and events into per-tenant Kafka topics through one
//! shared ingest pipeline.
#![forbid(unsafe_code)]

pub mod http;
pub mod kafka;
pub mod metrics;
pub mod pipeline;

pub use kafka::{DownstreamSender, KafkaConfig};
pub use pipeline::IngestPipeline;

use anyhow::Context;
use ferrule_registry::DeviceAuthenticator;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The `[gateway]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Largest device payload accepted (bytes); Hono's default is 2048.
    pub max_payload_size: usize,
    pub http: http::HttpConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_payload_size: 2048,
            http: http::HttpConfig::default(),
        }
    }
}

/// Serves the HTTP adapter on `listener` until `shutdown` turns true, then flushes the producer.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    cfg: GatewayConfig,
    kafka: &KafkaConfig,
    registry: DeviceAuthenticator,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    metrics::init();
    let sender = Arc::new(DownstreamSender::new(kafka).context("creating the Kafka producer")?);
    let pipeline = IngestPipeline::new(registry, sender.clone(), cfg.max_payload_size);
    let app = http::router(pipeline, cfg.http);
    tracing::info!(addr = %listener.local_addr()?, "HTTP adapter listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
        .context("HTTP adapter failed")?;
    tokio::task::spawn_blocking(move || sender.flush(Duration::from_secs(5))).await?;
    Ok(())
}
