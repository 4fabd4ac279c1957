//! Ferrule's command router: consumes `hono.command.*`, finds the gateway instance that can
//! reach each device from routing state kept in PostgreSQL, and forwards the command to that
//! instance (or answers with a delivery failure); that gateway instance delivers it to the
//! device. Gateways use [`RoutingState`] too: they register subscriptions, record last
//! gateways and send heartbeats.
#![forbid(unsafe_code)]

pub mod forward;

pub use ferrule_registry::device_connection::{CommandTarget, RoutingError, RoutingState};

use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::watch;

/// The `[router]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Kafka consumer group of all router instances.
    pub group_id: String,
    /// The command topics this router group serves, as a topic name or a `^`-regex; empty:
    /// every tenant's (`^<kafka.topic_prefix>hono\.command\..+`). A narrower pattern
    /// splits tenants across router groups.
    pub topic_pattern: String,
    /// A gateway instance without a heartbeat for this long is dead (seconds).
    pub instance_timeout_secs: u64,
    /// How often expired and dead subscriptions are purged (seconds).
    pub purge_interval_secs: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            group_id: forward::GROUP_ID.into(),
            topic_pattern: String::new(),
            instance_timeout_secs: 30,
            purge_interval_secs: 60,
        }
    }
}

/// Runs the router until `shutdown` turns true.
pub async fn run(
    cfg: RouterConfig,
    kafka: &ferrule_kafka::KafkaConfig,
    registry: ferrule_registry::DeviceAuthenticator,
    pool: deadpool_postgres::Pool,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let routing = RoutingState::new(pool, Duration::from_secs(cfg.instance_timeout_secs));
    let purger = {
        let (routing, mut shutdown) = (routing.clone(), shutdown.clone());
        let every = Duration::from_secs(cfg.purge_interval_secs.max(1));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                if let Err(e) = routing.purge().await {
                    tracing::warn!(error = %e, "purging routing state failed");
                }
            }
        })
    };
    let names = kafka.topic_names()?;
    let pattern = match cfg.topic_pattern.as_str() {
        "" => names.command_pattern(),
        p => p.to_owned(),
    };
    tracing::info!(group = %cfg.group_id, %pattern, "command router consuming commands");
    let result = forward::run(kafka, &cfg.group_id, &pattern, registry, routing, shutdown).await;
    purger.abort();
    result
}
