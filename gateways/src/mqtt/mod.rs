//! The MQTT adapter (`hono-mqtt`, 3.1.1 and 5): a thin accept loop around one task per
//! connection. The wire format and the specifications' rules for it (UTF-8 strings, topic
//! names and filters) live in `codec`, the topic grammar in `topic`. A connection is split by
//! job: `connect` (CONNECT, authentication, CONNACK, closing), `connection` (the serving
//! loop), `publish` (PUBLISH into uploads and command responses), `errors` (Hono's error
//! policy and error topic) and `subscriptions` (commands to the device). Whether anything
//! may pass is decided by the shared ingest pipeline; its reasons become MQTT codes in the
//! one table of `crate::refusal`.

mod acks;
pub(crate) mod codec;
mod connect;
mod connection;
mod errors;
mod publish;
mod subscriptions;
mod topic;

use crate::pipeline::{AdapterType, IngestPipeline};
use crate::tls::TlsListener;
use connection::stopped;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

const ADAPTER: AdapterType = AdapterType::Mqtt;

/// The `[gateway.mqtt]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Where the plain MQTT endpoint listens.
    pub bind: SocketAddr,
    /// Where MQTTS listens when `gateway.tls` names a certificate.
    pub tls_bind: SocketAddr,
    /// Most connections this instance holds; more are refused.
    pub max_connections: usize,
    /// How long a client may take to send CONNECT (seconds).
    pub connect_timeout_secs: u64,
    /// Messages of one connection waiting for the broker's ack before the gateway stops
    /// reading from that connection (back-pressure).
    pub max_in_flight: usize,
    /// Connection events: `none`, `logging` (at INFO) or `events` (a dc-notification event
    /// to `hono.event.<tenant>` on connect and disconnect).
    pub connection_events: ConnectionEvents,
    /// `false` refuses a CONNECT without credentials (CONNACK 0x04 / 0x86) whatever a tenant
    /// allows; `true` accepts it, and each publish and subscription of the connection is
    /// then allowed only if the tenant's `hono-mqtt` entry sets
    /// `device-authentication-required: false` and the addressed device exists and is enabled.
    pub allow_unauthenticated: bool,
}

/// How connects and disconnects of devices are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionEvents {
    None,
    Logging,
    Events,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls_bind: SocketAddr::from(([127, 0, 0, 1], 8883)),
            max_connections: 200_000,
            connect_timeout_secs: 10,
            max_in_flight: 100,
            connection_events: ConnectionEvents::Logging,
            allow_unauthenticated: true,
        }
    }
}

/// Accepts connections until `shutdown` turns true; then waits for the open connections, which
/// answer what they handed to Kafka and close (the process bounds the wait). With a TLS
/// acceptor the listener serves MQTTS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    pipeline: IngestPipeline,
    hub: Option<crate::commands::CommandHub>,
    cfg: MqttConfig,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let secure = if tls.is_some() { "MQTTS" } else { "MQTT" };
    tracing::info!(addr = %listener.local_addr()?, "{secure} adapter listening");
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let cfg = Arc::new(cfg);
    let ctx = Accepting {
        slots,
        pipeline,
        hub,
        cfg,
        shutdown: shutdown.clone(),
        connections: TaskTracker::new(),
    };
    let accepted = accept(&ctx, listener, tls, &mut shutdown).await;
    ctx.connections.close();
    ctx.connections.wait().await;
    accepted
}

async fn accept(
    ctx: &Accepting,
    listener: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    match tls {
        Some(acceptor) => {
            let mut listener = TlsListener::new(listener, acceptor)?;
            loop {
                tokio::select! {
                    next = listener.next() => match next {
                        Some((stream, peer)) => {
                        let tls = Tls {
                            client_cert: crate::tls::client_certificate(&stream),
                            cipher_suite: crate::tls::cipher_suite(&stream),
                        };
                        ctx.spawn(stream, peer, tls)
                    }
                        None => return Ok(()),
                    },
                    _ = stopped(shutdown) => return Ok(()),
                }
            }
        }
        None => loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        ctx.spawn(stream, peer, Tls::default());
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the others.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                _ = stopped(shutdown) => return Ok(()),
            }
        },
    }
}

/// What TLS told of a connection: the device's certificate, if it showed one, and the cipher
/// suite (for `hono_connections_attempts_total`).
pub(crate) struct Tls {
    pub client_cert: Option<Arc<Vec<u8>>>,
    pub cipher_suite: &'static str,
}

impl Default for Tls {
    /// A connection without TLS.
    fn default() -> Self {
        Tls {
            client_cert: None,
            cipher_suite: crate::metrics::NO_CIPHER_SUITE,
        }
    }
}

/// What every accepted connection needs.
struct Accepting {
    slots: Arc<Semaphore>,
    pipeline: IngestPipeline,
    hub: Option<crate::commands::CommandHub>,
    cfg: Arc<MqttConfig>,
    shutdown: watch::Receiver<bool>,
    /// The open connections, waited for at shutdown.
    connections: TaskTracker,
}

impl Accepting {
    fn spawn<S>(&self, stream: S, peer: std::net::SocketAddr, tls: Tls)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let permit = self.slots.clone().try_acquire_owned().ok();
        let hub = self.hub.clone();
        let (pipeline, cfg, shutdown) = (
            self.pipeline.clone(),
            self.cfg.clone(),
            self.shutdown.clone(),
        );
        self.connections.spawn(async move {
            let full = permit.is_none();
            if let Err(e) = connection::run(stream, tls, pipeline, hub, &cfg, full, shutdown).await
            {
                tracing::debug!(%peer, error = %e, "MQTT connection ended");
            }
            drop(permit);
        });
    }
}
