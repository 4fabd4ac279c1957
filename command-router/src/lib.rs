//! Ferrule's command router: consumes `hono.command.*`, finds the gateway instance that can
//! reach each device from routing state kept in PostgreSQL, and forwards the command to that
//! instance (or answers with a delivery failure); that gateway instance delivers it to the
//! device. Gateways use [`RoutingState`] too: they register subscriptions, record last
//! gateways and send heartbeats.
#![forbid(unsafe_code)]

pub mod forward;
pub mod metrics;

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
    /// A gateway instance silent for this long (seconds; at least `instance_timeout_secs`) is
    /// forgotten: its internal command topic is deleted. An instance that restarts under the
    /// same id sooner keeps its topic.
    pub forget_instances_after_secs: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            group_id: forward::GROUP_ID.into(),
            topic_pattern: String::new(),
            instance_timeout_secs: 30,
            purge_interval_secs: 60,
            forget_instances_after_secs: 3600,
        }
    }
}

/// The `service.name` of the router's spans.
pub const SERVICE_NAME: &str = "ferrule-command-router";

/// Runs the router until `shutdown` turns true.
pub async fn run(
    cfg: RouterConfig,
    kafka: &ferrule_kafka::KafkaConfig,
    registry: ferrule_registry::DeviceAuthenticator,
    pool: deadpool_postgres::Pool,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let routing = RoutingState::new(pool, Duration::from_secs(cfg.instance_timeout_secs), kafka);
    // Read the route topic before the first command: a router must know every subscription.
    // Kafka may be down, or the topic not created yet (`kafka.create_topics = false`).
    let mut waiting = shutdown.clone();
    while let Err(e) = routing.routes().await {
        tracing::warn!(error = %e, "the route topic cannot be read yet; retrying");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = waiting.wait_for(|s| *s) => return Ok(()),
        }
    }
    let names = kafka.topic_names()?;
    // One admin client for the forwarder (response topics) and the purger (dead instances'
    // topics).
    let topics = ferrule_kafka::TopicAdmin::new(kafka)?;
    let purger = {
        let (routing, mut shutdown) = (routing.clone(), shutdown.clone());
        let every = Duration::from_secs(cfg.purge_interval_secs.max(1));
        let forget_after = Duration::from_secs(cfg.forget_instances_after_secs);
        let (topics, names) = (topics.clone(), names.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                if let Err(e) = routing.purge().await {
                    tracing::warn!(error = %e, "purging routing state failed");
                }
                forget_silent_instances(&routing, &topics, &names, forget_after).await;
            }
        })
    };
    let pattern = match cfg.topic_pattern.as_str() {
        "" => names.command_pattern(),
        p => p.to_owned(),
    };
    tracing::info!(group = %cfg.group_id, %pattern, "command router consuming commands");
    let result = forward::run(
        kafka,
        &cfg.group_id,
        &pattern,
        registry,
        routing,
        topics,
        shutdown,
    )
    .await;
    purger.abort();
    result
}

/// Deletes the internal command topics of gateway instances silent for `after`, then forgets
/// them; an instance whose topic could not be deleted is tried again at the next purge.
async fn forget_silent_instances(
    routing: &RoutingState,
    topics: &ferrule_kafka::TopicAdmin,
    names: &ferrule_schemas::TopicNames,
    after: Duration,
) {
    let silent = match routing.silent_instances(after).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "listing silent gateway instances failed");
            return;
        }
    };
    for instance in silent {
        let Ok(topic) = names.name(ferrule_schemas::TopicKind::CommandInternal, &instance) else {
            continue;
        };
        if let Err(e) = topics.delete(&topic).await {
            tracing::warn!(%topic, error = %e, "could not delete a silent instance's topic");
            continue;
        }
        match routing.forget_silent_instance(&instance, after).await {
            Ok(true) => tracing::info!(%instance, %topic, "forgot a silent gateway instance"),
            Ok(false) => {}
            Err(e) => tracing::warn!(%instance, error = %e, "forgetting an instance failed"),
        }
    }
}
