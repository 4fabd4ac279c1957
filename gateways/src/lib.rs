//! Ferrule's protocol gateways (HTTP, MQTT and CoAP): stateless adapters that authenticate devices
//! against the registry, write their telemetry and events into per-tenant Kafka topics through
//! one shared ingest pipeline, and deliver the commands the router forwards to this instance.
#![forbid(unsafe_code)]

pub mod coap;
pub mod delivery;

/// The `service.name` of the gateway's spans.
pub const SERVICE_NAME: &str = "ferrule-gateway";
pub mod commands;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod mqtt;
pub mod pipeline;
pub mod refusal;
pub mod tls;
pub mod x509;

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
    /// How long the router waits for this instance's heartbeat before it counts it dead;
    /// set it like `router.instance_timeout_secs` (30). The gateway beats three times within
    /// it (every 10 s at most).
    pub instance_timeout_secs: u64,
    /// This instance's id: names its internal command topic
    /// (`<kafka.topic_prefix>hono.command_internal.<id>`) and its command routing entries.
    /// Set a stable, unique one per instance when topics are created beforehand
    /// (`kafka.create_topics = false`); empty: `ferrule-gateway-<random uuid>` at each start.
    pub instance_id: String,
    /// How long an application waits for a device's answer to a request/response command;
    /// after that the gateway answers 503 itself and refuses a late answer.
    pub command_response_timeout_secs: u64,
    pub http: http::HttpConfig,
    pub mqtt: mqtt::MqttConfig,
    pub coap: coap::CoapConfig,
    pub tls: tls::TlsConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_payload_size: 2048,
            instance_timeout_secs: 30,
            instance_id: String::new(),
            command_response_timeout_secs: 60,
            http: http::HttpConfig::default(),
            mqtt: mqtt::MqttConfig::default(),
            coap: coap::CoapConfig::default(),
            tls: tls::TlsConfig::default(),
        }
    }
}

/// The sockets the gateway serves; an adapter without one is not run.
pub struct Listeners {
    pub http: Option<tokio::net::TcpListener>,
    pub mqtt: Option<tokio::net::TcpListener>,
    /// HTTPS; served only when `gateway.tls` names a certificate.
    pub https: Option<tokio::net::TcpListener>,
    /// MQTTS; served only when `gateway.tls` names a certificate.
    pub mqtts: Option<tokio::net::TcpListener>,
    /// Plain CoAP over UDP.
    pub coap: Option<tokio::net::UdpSocket>,
    /// CoAP over DTLS.
    pub coaps: Option<tokio::net::UdpSocket>,
}

/// Serves the protocol adapters until `shutdown` turns true, then flushes the producer. All
/// adapters share one pipeline and so one Kafka producer.
pub async fn serve(
    listeners: Listeners,
    cfg: GatewayConfig,
    kafka: &KafkaConfig,
    registry: DeviceAuthenticator,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    metrics::init();
    let sender = Arc::new(DownstreamSender::new(kafka).context("creating the Kafka producer")?);
    let routing = ferrule_registry::device_connection::RoutingState::new(
        registry.pool().clone(),
        Duration::from_secs(cfg.instance_timeout_secs),
        kafka,
    );
    let mut pipeline = IngestPipeline::new(registry, sender.clone(), cfg.max_payload_size)
        .with_gateway_activity(Arc::new(commands::LastGateways::new(routing.clone())))
        .with_tracer(ferrule_telemetry::tracer(SERVICE_NAME));
    for (allowed, adapter) in [
        (cfg.http.allow_unauthenticated, pipeline::AdapterType::Http),
        (cfg.mqtt.allow_unauthenticated, pipeline::AdapterType::Mqtt),
        (cfg.coap.allow_unauthenticated, pipeline::AdapterType::Coap),
    ] {
        if !allowed {
            pipeline = pipeline.forbid_anonymous(adapter);
        }
    }
    // A stable id outlives a crash: the registrations of the earlier run are stale, and must go
    // before this run's connections register theirs.
    if !cfg.instance_id.is_empty() {
        match routing.forget_instance(&cfg.instance_id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                instance = %cfg.instance_id,
                subscriptions = n,
                "removed the command subscriptions of this instance's previous run"
            ),
            Err(e) => tracing::warn!(error = %e, "could not remove stale command subscriptions"),
        }
    }
    let hub = commands::CommandHub::new(
        routing,
        sender.clone(),
        Duration::from_secs(cfg.command_response_timeout_secs),
        (!cfg.instance_id.is_empty()).then(|| cfg.instance_id.clone()),
        pipeline.tracer().clone(),
    );
    if !kafka.create_topics && cfg.instance_id.is_empty() {
        tracing::warn!(
            instance = hub.instance_id(),
            "kafka.create_topics is false but gateway.instance_id is not set: commands reach \
             this instance only once its internal command topic exists; give each instance a \
             stable id and create its topic beforehand"
        );
    }
    let mut adapters = tokio::task::JoinSet::new();
    adapters.spawn(hub.clone().run(kafka.clone(), shutdown.clone()));
    if let Some(listener) = listeners.http {
        let app = http::router(pipeline.clone(), Some(hub.clone()), cfg.http.clone());
        let mut shutdown = shutdown.clone();
        tracing::info!(addr = %listener.local_addr()?, "HTTP adapter listening");
        adapters.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await
                .context("HTTP adapter failed")
        });
    }
    if let Some(listener) = listeners.mqtt {
        adapters.spawn(mqtt::serve(
            listener,
            None,
            pipeline.clone(),
            Some(hub.clone()),
            cfg.mqtt.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(socket) = listeners.coap {
        adapters.spawn(coap::serve(
            socket,
            pipeline.clone(),
            Some(hub.clone()),
            cfg.coap.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(socket) = listeners.coaps {
        adapters.spawn(coap::dtls::serve(
            socket,
            pipeline.clone(),
            Some(hub.clone()),
            cfg.coap.clone(),
            cfg.tls.clone(),
            shutdown.clone(),
        ));
    }
    let https = cfg.tls.acceptor(&[b"http/1.1"])?;
    if let (Some(listener), Some(acceptor)) = (listeners.https, https) {
        let app = http::router(pipeline.clone(), Some(hub.clone()), cfg.http.clone());
        let mut shutdown = shutdown.clone();
        let listener = tls::TlsListener::new(listener, acceptor)?;
        tracing::info!(addr = %listener.local_addr_or_unknown(), "HTTPS adapter listening");
        adapters.spawn(async move {
            let app = app.into_make_service_with_connect_info::<tls::TlsPeer>();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await
                .context("HTTPS adapter failed")
        });
    }
    let mqtts = cfg.tls.acceptor(&[])?;
    if let (Some(listener), Some(acceptor)) = (listeners.mqtts, mqtts) {
        adapters.spawn(mqtt::serve(
            listener,
            Some(acceptor),
            pipeline.clone(),
            Some(hub.clone()),
            cfg.mqtt,
            shutdown.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(done) = adapters.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            result = Err(e);
            break;
        }
    }
    tokio::task::spawn_blocking(move || sender.flush(Duration::from_secs(5))).await?;
    result
}
