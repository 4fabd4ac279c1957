//! Opening and closing an MQTT connection: CONNECT, authentication and CONNACK, and on the
//! way out the end of its command subscription and the connection event.

use super::acks::AckQueue;
use super::codec::{self, Announce, CloseReason, ConnectOutcome, Inbound, Outbound, Version};
use super::connection::{ConnectionError, Served, Session};
use super::subscriptions::Commands;
use super::{ADAPTER, ConnectionEvents, MqttConfig};
use crate::commands::CommandHub;
use crate::metrics;
use crate::pipeline::{Endpoint, IngestPipeline, Origin, Qos, Refusal, Upload};
use bytes::BytesMut;
use ferrule_registry::AuthenticatedDevice;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Room for the topic and header next to the largest payload.
pub(super) const PACKET_OVERHEAD: usize = 1024;

/// An accepted connection: what serving needs, and what closing reports.
pub(super) struct Open<S> {
    pub(super) served: Served<S>,
    pub(super) commands: Commands,
    pub(super) client_id: String,
    pub(super) _gauge: metrics::ConnectionGuard,
}

/// CONNECT, authentication and CONNACK; the connection's state once accepted.
pub(super) async fn open<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut stream: S,
    tls: super::Tls,
    pipeline: IngestPipeline,
    hub: Option<CommandHub>,
    cfg: &MqttConfig,
    instance_full: bool,
    shutdown: watch::Receiver<bool>,
) -> Result<Open<S>, ConnectionError> {
    let max_packet = pipeline.max_payload_size() + PACKET_OVERHEAD;
    let cipher = tls.cipher_suite;
    let mut buf = BytesMut::with_capacity(256);
    // The CONNECT span starts when the connection was accepted.
    let since = std::time::SystemTime::now();
    // A client that has not sent its CONNECT when the gateway shuts down is simply closed.
    let mut stopping = shutdown.clone();
    let (version, connect) = tokio::select! {
        read = tokio::time::timeout(
            Duration::from_secs(cfg.connect_timeout_secs),
            read_connect(&mut stream, &mut buf, max_packet),
        ) => read.map_err(|_| ConnectionError::ConnectTimeout)??,
        _ = super::connection::stopped(&mut stopping) => return Err(ConnectionError::StoppedBeforeConnect),
    };
    let mut session = Session {
        stream,
        version,
        out: BytesMut::new(),
        client_max: connect
            .max_packet_size
            .map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
    };
    if buf.is_empty() {
        // Most connections idle between messages: give the CONNECT buffer back.
        buf = BytesMut::new();
    }
    if version == Version::V311 && connect.client_id.is_empty() && !connect.clean_session {
        // Without a session to resume nothing can tell a nameless client apart [MQTT-3.1.3-8].
        metrics::connection_attempt(ADAPTER.name(), "", "identifier-rejected", cipher);
        let rejected = ConnectOutcome::IdentifierRejected;
        session.send(Outbound::connack(rejected)).await?;
        return Err(ConnectionError::Refused(rejected));
    }
    if instance_full {
        metrics::connection_attempt(ADAPTER.name(), "", "adapter-connections-exceeded", cipher);
        session
            .send(Outbound::connack(ConnectOutcome::UseAnotherServer))
            .await?;
        return Err(ConnectionError::Refused(ConnectOutcome::UseAnotherServer));
    }
    let client_cert = tls.client_cert.as_deref();
    let origin = match Box::pin(authenticate(&pipeline, &connect, client_cert, since)).await {
        Ok(o) => o,
        Err((outcome, tenant, label)) => {
            metrics::connection_attempt(ADAPTER.name(), &tenant, label, cipher);
            session.send(Outbound::connack(outcome)).await?;
            return Err(ConnectionError::Refused(outcome));
        }
    };
    // Only these outlive the CONNECT; the rest (password, will) is dropped here.
    let (client_id, keep_alive_secs, connect_receive_maximum) = {
        let c = connect;
        (
            c.client_id,
            c.keep_alive_secs,
            c.receive_maximum.unwrap_or(u16::MAX),
        )
    };
    // An MQTT 5 client that left its id to the server is told the one it got
    // [MQTT-3.2.2-16]; it names the connection in connection events.
    let assigned = (client_id.is_empty() && version == Version::V5)
        .then(|| format!("ferrule-{}", uuid::Uuid::new_v4().simple()));
    let client_id = assigned.clone().unwrap_or(client_id);
    let tenant = origin.device().map(|d| d.tenant_id.as_str()).unwrap_or("");
    metrics::connection_attempt(ADAPTER.name(), tenant, "succeeded", cipher);
    let gauge = match origin.device() {
        Some(d) => metrics::ConnectionGuard::new(ADAPTER.name(), &d.tenant_id),
        None => metrics::ConnectionGuard::unauthenticated(ADAPTER.name()),
    };
    let changes = pipeline.registry_changes();
    let announce = (version == Version::V5).then(|| {
        Box::new(Announce {
            assigned_client_id: assigned,
            receive_maximum: u16::try_from(cfg.max_in_flight.max(1)).unwrap_or(u16::MAX),
            maximum_packet_size: u32::try_from(max_packet).unwrap_or(u32::MAX),
            essential_only: false,
        })
    });
    let essential = announce.clone().map(|mut a| {
        a.essential_only = true;
        a
    });
    // A client that takes only small packets gets the CONNACK with what it must be told
    // (its assigned id, Maximum QoS), or without properties; if not even that fits, nothing
    // but the close.
    let mut queued = false;
    for announce in [announce, essential, None] {
        let connack = Outbound::ConnAck {
            outcome: ConnectOutcome::Accepted,
            announce,
        };
        if session.queue(connack)? {
            queued = true;
            break;
        }
    }
    if !queued {
        return Err(ConnectionError::Closed(
            CloseReason::PacketTooLarge,
            "the client's Maximum Packet Size leaves no room for a CONNACK".into(),
        ));
    }
    session.flush().await?;
    if let Some(device) = origin.device() {
        connection_event(&pipeline, cfg, device, &client_id, "connected").await;
    }
    let commands = Commands::new(hub, connect_receive_maximum);
    let idle =
        (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500));
    let served = Served {
        session,
        buf,
        pipeline,
        origin,
        changes,
        shutdown,
        errors: None,
        in_flight: AckQueue::new(),
        idle,
        deadline: idle.map(|d| Instant::now() + d),
        max_packet,
        max_in_flight: cfg.max_in_flight,
    };
    Ok(Open {
        served,
        commands,
        client_id,
        _gauge: gauge,
    })
}

/// Ends a connection: tells an MQTT 5 client why (`reason`) while the socket is still there,
/// then ends the command subscription and reports the disconnect.
pub(super) async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    open: Open<S>,
    cfg: &MqttConfig,
    reason: Option<CloseReason>,
) {
    let Open {
        mut served,
        mut commands,
        client_id,
        _gauge,
    } = open;
    if let Some(reason) = reason {
        // Bounded: a client that does not read must not hold up the clean-up.
        let goodbye = served.session.send(Outbound::Disconnect(reason));
        let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
    }
    // The socket and buffers go first.
    let (pipeline, origin) = {
        let s = served;
        (s.pipeline, s.origin)
    };
    commands.close(&pipeline, &origin).await;
    if let Some(device) = origin.device() {
        connection_event(&pipeline, cfg, device, &client_id, "disconnected").await;
    }
}

/// Reads the CONNECT. A malformed MQTT 5 CONNECT is answered with a CONNACK saying why before
/// the close (MQTT 5 §3.1.4 allows it; no DISCONNECT may come before a CONNACK); an MQTT 3.1.1
/// client has no code for it and is just closed.
pub(super) async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<(Version, codec::ConnectRequest), ConnectionError> {
    loop {
        if let Some(version) = codec::detect_version(buf)? {
            let packet = match codec::decode(version, buf, max_packet) {
                Ok(packet) => packet,
                Err(e) => {
                    if version == Version::V5 {
                        let connack = [0x20, 3, 0, codec::connack_reason_for(&e), 0];
                        let refuse = stream.write_all(&connack);
                        let _ = tokio::time::timeout(Duration::from_secs(1), refuse).await;
                    }
                    return Err(e.into());
                }
            };
            if let Some(packet) = packet {
                return match packet {
                    Inbound::Connect(c) => Ok((version, c)),
                    _ => Err(codec::CodecError::NotConnect.into()),
                };
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnectionError::Closed(
                CloseReason::Unspecified,
                "closed before CONNECT".into(),
            ));
        }
    }
}

/// Authenticates and authorises a CONNECT; on refusal the CONNACK outcome, the tenant (if
/// known) and Hono's metric outcome label, all from the pipeline's reason (`refusal.rs`). A
/// CONNECT without any credentials is an unauthenticated device where the adapter allows
/// them; what it may do is decided per message by the pipeline.
pub(super) async fn authenticate(
    pipeline: &IngestPipeline,
    c: &codec::ConnectRequest,
    client_cert: Option<&Vec<u8>>,
    since: std::time::SystemTime,
) -> Result<Origin, (ConnectOutcome, String, &'static str)> {
    let refused = |e: Refusal| {
        let user = c.username.as_deref().unwrap_or_default();
        let tenant = ferrule_registry::auth::split_username(user)
            .map(|(_, t)| t.to_owned())
            .unwrap_or_default();
        let codes = e.codes();
        metrics::rejected(ADAPTER.name(), codes.label);
        (codes.connack, tenant, codes.attempt)
    };
    // Hono's order: a client certificate first, then user name and password.
    let authenticated = match (client_cert, &c.username, &c.password) {
        (None, None, None) if pipeline.allows_anonymous(ADAPTER) => return Ok(Origin::Anonymous),
        (Some(der), _, _) => pipeline.authenticate_certificate(der).await,
        (None, Some(user), Some(password)) => pipeline.authenticate(user, password, None).await,
        _ => Err(Refusal::unauthenticated("no credentials")),
    };
    let device = pipeline
        .admit_connection(ADAPTER, "CONNECT", since, authenticated)
        .await
        .map_err(refused)?;
    Ok(Origin::Device(std::sync::Arc::new(device)))
}

/// Reports a connect or disconnect as configured (Hono's `dc-notification` event).
pub(super) async fn connection_event(
    pipeline: &IngestPipeline,
    cfg: &MqttConfig,
    device: &std::sync::Arc<AuthenticatedDevice>,
    client_id: &str,
    cause: &str,
) {
    match cfg.connection_events {
        ConnectionEvents::None => {}
        ConnectionEvents::Logging => tracing::info!(
            tenant = %device.tenant_id, device = %device.device_id, client = %client_id, "device {cause}"
        ),
        ConnectionEvents::Events => {
            let payload = serde_json::json!({
                "cause": cause,
                "remote-id": client_id,
                "source": ADAPTER.name(),
            });
            let up = Upload {
                adapter: ADAPTER,
                endpoint: Endpoint::Event,
                qos: Qos::AtLeastOnce,
                origin: Origin::Device(device.clone()),
                target: None,
                content_type: Some(ferrule_schemas::content_type::CONNECTION_NOTIFICATION.into()),
                payload: payload.to_string().into_bytes().into(),
                ttl_secs: None,
                ttd_secs: None,
                orig_address: String::new(),
                retain: false,
                trace: None,
                received: None,
                notification: true,
            };
            if let Err(e) = pipeline.upload(up).await {
                tracing::warn!(error = %e, device = %device.device_id, "connection event lost");
            }
        }
    }
}
