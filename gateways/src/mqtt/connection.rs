//! One MQTT connection: CONNECT and authentication, then publishes handed to the pipeline in
//! arrival order with PUBACKs sent as the broker acks them, keep-alive, and closing when the
//! registry revokes the device.

use super::acks::{AckQueue, Waiting};
use super::codec::{
    self, Announce, CloseReason, ConnectOutcome, Inbound, Outbound, PublishRequest, Version,
};
use super::topic;
use super::{ConnectionEvents, MqttConfig};
use crate::commands::{CommandDelivery, CommandHub, DeviceResponse, SubscriptionToken};
use crate::metrics;
use crate::pipeline::{
    Accepted, AdapterType, Endpoint, IngestPipeline, Origin, Qos, SubmitNow, Upload, UploadError,
};
use bytes::BytesMut;
use ferrule_registry::AuthenticatedDevice;
use futures_util::FutureExt;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

const ADAPTER: AdapterType = AdapterType::Mqtt;
/// Room for the topic and header next to the largest payload.
const PACKET_OVERHEAD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("no CONNECT in time")]
    ConnectTimeout,
    #[error("refused: {0:?}")]
    Refused(ConnectOutcome),
    #[error("closed: {1}")]
    Closed(CloseReason, String),
}

impl ConnectionError {
    /// What an MQTT 5 client is told in a DISCONNECT before the close; `None` when the
    /// connection is gone already or never got as far as a CONNACK.
    fn close_reason(&self) -> Option<CloseReason> {
        match self {
            ConnectionError::Codec(e) => Some(e.close_reason()),
            ConnectionError::Closed(reason, _) => Some(*reason),
            ConnectionError::Io(_)
            | ConnectionError::ConnectTimeout
            | ConnectionError::Refused(_) => None,
        }
    }
}

/// How a failed publish closes an MQTT 5 connection, by the pipeline's reason: one table.
fn close_reason_for(e: &UploadError) -> CloseReason {
    match e {
        UploadError::BadRequest(_) => CloseReason::ImplementationSpecific,
        UploadError::Unauthorized(_) | UploadError::Forbidden(_) | UploadError::NotFound(_) => {
            CloseReason::NotAuthorized
        }
        UploadError::PayloadTooLarge(_) => CloseReason::PacketTooLarge,
        UploadError::Unavailable(_) => CloseReason::ServerBusy,
    }
}

/// What to do when a publish fails (the `on-error` property of the topic's property bag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    Default,
    Disconnect,
    Ignore,
    SkipAck,
}

/// What answering a publish needs once its outcome is known.
struct PublishContext {
    pkid: u16,
    qos1: bool,
    on_error: OnError,
    /// `telemetry`, `t`, `event` or `e`, as the device wrote it.
    endpoint: std::borrow::Cow<'static, str>,
    /// The property-bag `correlation-id`, else the packet id (QoS 1), else `-1`.
    /// The property-bag `correlation-id`, if the device gave one.
    correlation_id: Option<String>,
    /// The edge device a gateway sent for; `None`: the sender itself.
    device: Option<String>,
}

impl PublishContext {
    /// What the error message calls the publish: the device's correlation id, else the packet
    /// id (QoS 1), else `-1`. Computed only when an error is reported.
    fn correlation(&self) -> String {
        match (&self.correlation_id, self.qos1) {
            (Some(c), _) => c.clone(),
            (None, true) => self.pkid.to_string(),
            (None, false) => "-1".to_owned(),
        }
    }
}

/// The endpoint segment of a topic, without allocating for the usual ones.
fn endpoint_of(topic: &str) -> std::borrow::Cow<'static, str> {
    match topic.split('/').next().unwrap_or_default() {
        "telemetry" => "telemetry".into(),
        "t" => "t".into(),
        "event" => "event".into(),
        "e" => "e".into(),
        other => other.to_owned().into(),
    }
}

struct Session<S> {
    stream: S,
    version: Version,
    out: BytesMut,
    /// The largest packet the client accepts (MQTT 5's Maximum Packet Size).
    client_max: Option<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Sends `packet`, after anything queued; `false` when it was discarded as larger than
    /// the client accepts.
    async fn send(&mut self, packet: Outbound) -> Result<bool, ConnectionError> {
        let queued = self.queue(packet)?;
        self.flush().await?;
        Ok(queued)
    }

    /// Encodes `packet` to leave with the next send or flush: acknowledgements that become
    /// due together leave in one write. A packet larger than the client's Maximum Packet
    /// Size is discarded instead [MQTT-3.1.2-24], [MQTT-3.1.2-25]: `false`.
    fn queue(&mut self, packet: Outbound) -> Result<bool, ConnectionError> {
        Ok(codec::encode_within(
            self.version,
            &packet,
            &mut self.out,
            self.client_max,
        )?)
    }

    async fn flush(&mut self) -> Result<(), ConnectionError> {
        if !self.out.is_empty() {
            let written = self.stream.write_all(&self.out).await;
            self.out.clear();
            written?;
        }
        Ok(())
    }
}

/// Serves one MQTT connection from CONNECT to its end. Not an `async fn`: the arguments go
/// straight into the boxed CONNECT handling, so the connection's task does not keep a
/// second, moved-from copy of each for as long as it lives.
pub fn run<'a, S: AsyncRead + AsyncWrite + Unpin + Send + 'a>(
    stream: S,
    client_cert: Option<std::sync::Arc<Vec<u8>>>,
    pipeline: IngestPipeline,
    hub: Option<CommandHub>,
    cfg: &'a MqttConfig,
    instance_full: bool,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = Result<(), ConnectionError>> + Send + 'a {
    // Boxed: CONNECT and authentication need far more space than an open connection, and
    // only briefly; the task itself keeps only what serving needs.
    let opening = Box::pin(open(
        stream,
        client_cert,
        pipeline,
        hub,
        cfg,
        instance_full,
        shutdown,
    ));
    async move {
        let mut open = opening.await?;
        let result = serve(&mut open.served, &mut open.commands).await;
        let reason = result
            .as_ref()
            .err()
            .and_then(ConnectionError::close_reason);
        Box::pin(close(open, cfg, reason)).await;
        result
    }
}

/// An accepted connection: what serving needs, and what closing reports.
struct Open<S> {
    served: Served<S>,
    commands: Commands,
    client_id: String,
    _gauge: metrics::ConnectionGuard,
}

/// CONNECT, authentication and CONNACK; the connection's state once accepted.
async fn open<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut stream: S,
    client_cert: Option<std::sync::Arc<Vec<u8>>>,
    pipeline: IngestPipeline,
    hub: Option<CommandHub>,
    cfg: &MqttConfig,
    instance_full: bool,
    shutdown: watch::Receiver<bool>,
) -> Result<Open<S>, ConnectionError> {
    let max_packet = pipeline.max_payload_size() + PACKET_OVERHEAD;
    let mut buf = BytesMut::with_capacity(256);
    let (version, connect) = tokio::time::timeout(
        Duration::from_secs(cfg.connect_timeout_secs),
        read_connect(&mut stream, &mut buf, max_packet),
    )
    .await
    .map_err(|_| ConnectionError::ConnectTimeout)??;
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
        metrics::connection_attempt(ADAPTER.name(), "", "identifier-rejected");
        let rejected = ConnectOutcome::IdentifierRejected;
        session.send(Outbound::connack(rejected)).await?;
        return Err(ConnectionError::Refused(rejected));
    }
    if instance_full {
        metrics::connection_attempt(ADAPTER.name(), "", "adapter-connections-exceeded");
        session
            .send(Outbound::connack(ConnectOutcome::UseAnotherServer))
            .await?;
        return Err(ConnectionError::Refused(ConnectOutcome::UseAnotherServer));
    }
    let origin = match Box::pin(authenticate(&pipeline, &connect, client_cert.as_deref())).await {
        Ok(o) => o,
        Err((outcome, tenant, label)) => {
            metrics::connection_attempt(ADAPTER.name(), &tenant, label);
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
    metrics::connection_attempt(ADAPTER.name(), tenant, "succeeded");
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
    let commands = Commands {
        hub,
        sub: None,
        tenant: None,
        queue: None,
        sender: None,
        unacked: Default::default(),
        last_pkid: 0,
        receive_maximum: connect_receive_maximum,
        overdue: Default::default(),
    };
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
async fn close<S: AsyncRead + AsyncWrite + Unpin>(
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
    if let Some(sub) = commands.sub.take() {
        commands.end(&pipeline, &origin, *sub).await;
    }
    if let Some(tenant) = commands.tenant.clone() {
        commands.release_all(&tenant).await;
    }
    if let Some(device) = origin.device() {
        connection_event(&pipeline, cfg, device, &client_id, "disconnected").await;
    }
}

/// Tells applications whether commands reach a device (Hono's empty notification with
/// `ttd`: -1 while subscribed, 0 once gone), sent as the subscriber for the device it
/// subscribed for (`target`: `None` for itself).
async fn reachability(
    pipeline: &IngestPipeline,
    origin: &Origin,
    target: Option<(String, String)>,
    ttd: i64,
) {
    let device = target.as_ref().map(|(_, d)| d.clone());
    let up = Upload {
        adapter: ADAPTER,
        endpoint: Endpoint::Event,
        qos: Qos::AtLeastOnce,
        origin: origin.clone(),
        target,
        content_type: Some(ferrule_schemas::content_type::EMPTY_NOTIFICATION.into()),
        payload: bytes::Bytes::new(),
        ttl_secs: None,
        ttd_secs: Some(ttd),
        orig_address: String::new(),
        retain: false,
        traceparent: None,
    };
    if let Err(e) = pipeline.upload(up).await {
        tracing::warn!(error = %e, ?device, ttd, "ttd notification lost");
    }
}

/// Reports a connect or disconnect as configured (Hono's `dc-notification` event).
async fn connection_event(
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
                traceparent: None,
            };
            if let Err(e) = pipeline.upload(up).await {
                tracing::warn!(error = %e, device = %device.device_id, "connection event lost");
            }
        }
    }
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<(Version, codec::ConnectRequest), ConnectionError> {
    loop {
        if let Some(version) = codec::detect_version(buf)?
            && let Some(packet) = codec::decode(version, buf, max_packet)?
        {
            return match packet {
                Inbound::Connect(c) => Ok((version, c)),
                _ => Err(codec::CodecError::NotConnect.into()),
            };
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
/// known) and Hono's metric outcome label. A CONNECT without any credentials is an
/// unauthenticated device where the adapter allows them; what it may do is decided per
/// message by the pipeline.
async fn authenticate(
    pipeline: &IngestPipeline,
    c: &codec::ConnectRequest,
    client_cert: Option<&Vec<u8>>,
) -> Result<Origin, (ConnectOutcome, String, &'static str)> {
    let user = c.username.as_deref().unwrap_or_default();
    let tenant_of = || {
        ferrule_registry::auth::split_username(user)
            .map(|(_, t)| t.to_owned())
            .unwrap_or_default()
    };
    let refused = |e: &UploadError| match e {
        UploadError::Unauthorized(_) => (ConnectOutcome::BadCredentials, "unauthorized"),
        UploadError::Unavailable(_) => (ConnectOutcome::ServerUnavailable, "unavailable"),
        UploadError::Forbidden(m) if m.contains("adapter") => {
            (ConnectOutcome::NotAuthorized, "adapter-disabled")
        }
        _ => (ConnectOutcome::NotAuthorized, "unknown"),
    };
    // Hono's order: a client certificate first, then user name and password.
    let device = match (client_cert, &c.username, &c.password) {
        (None, None, None) if pipeline.allows_anonymous(ADAPTER) => return Ok(Origin::Anonymous),
        (Some(der), _, _) => pipeline.authenticate_certificate(ADAPTER, der).await,
        (None, Some(user), Some(password)) => {
            pipeline
                .authenticate(ADAPTER, user, password.as_bytes(), None)
                .await
        }
        _ => Err(UploadError::Unauthorized("no credentials".into())),
    }
    .map_err(|e| {
        let (o, l) = refused(&e);
        (o, tenant_of(), l)
    })?;
    pipeline
        .authorise_connection(ADAPTER, &device)
        .await
        .map_err(|e| {
            let (o, l) = refused(&e);
            (o, tenant_of(), l)
        })?;
    Ok(Origin::Device(std::sync::Arc::new(device)))
}

/// What an authenticated connection works with while it serves; kept in `run`'s frame and
/// lent to `serve`, so the connection's future holds each of these once.
struct Served<S> {
    session: Session<S>,
    buf: BytesMut,
    pipeline: IngestPipeline,
    /// The authenticated device, or an unauthenticated one that names tenant and device in
    /// every topic.
    origin: Origin,
    changes: broadcast::Receiver<ferrule_registry::auth::RegistryChange>,
    shutdown: watch::Receiver<bool>,
    /// The device's subscription to its error topic, if any (Hono's MQTT adapter).
    /// Boxed: most devices never subscribe to errors.
    errors: Option<Box<ErrorSubscription>>,
    /// Publishes waiting for the broker, in arrival order.
    in_flight: AckQueue<PublishContext>,
    /// A client that says nothing for this long is gone (1.5 keep-alive periods, MQTT 3.1.1
    /// §3.1.2.10).
    idle: Option<Duration>,
    deadline: Option<Instant>,
    max_packet: usize,
    max_in_flight: usize,
}

/// The boxed rest of handling one packet: `false` when the device disconnected.
type PacketHandling<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, ConnectionError>> + Send + 'a>>;

async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    commands: &mut Commands,
) -> Result<(), ConnectionError> {
    // Bytes the last read brought: a busy device fills its buffer, an idle one sends little.
    let mut last_read = 0;
    loop {
        // Everything already buffered is handled before reading more.
        while c.in_flight.len() < c.max_in_flight {
            // The packet is turned into what is left to await in a block of its own, so neither
            // the packet nor a temporary of its handling is kept in the connection's state
            // while that runs: an idle connection carries only its waiting.
            let rest: Option<PacketHandling<'_>> = {
                let Some(packet) = codec::decode(c.session.version, &mut c.buf, c.max_packet)?
                else {
                    break;
                };
                match packet {
                    // The usual PUBLISH reaches the producer right here, without a future of
                    // its own; only one that needs the registry asked first takes the boxed path.
                    Inbound::Publish(p) => match publish_now(c, commands.hub.as_ref(), p)? {
                        None => None,
                        Some(prepared) => {
                            let c = &mut *c;
                            Some(Box::pin(async move {
                                publish(c, prepared).await.map(|()| true)
                            }))
                        }
                    },
                    // Boxed: handling a packet needs far more space than waiting.
                    other => Some(Box::pin(handle(c, commands, other))),
                }
            };
            let go_on = match rest {
                None => true,
                Some(handling) => handling.await?,
            };
            if !go_on {
                return Ok(());
            }
        }
        if c.buf.is_empty() && c.buf.capacity() > 4096 && last_read < 1024 {
            // A burst is over: an idle connection should not keep its largest buffer. While
            // reads come in full, the buffer stays: freeing and regrowing it per read costs
            // more than the whole rest of a message.
            c.buf = BytesMut::new();
        }
        let can_read = c.in_flight.len() < c.max_in_flight;
        let wake = match (commands.earliest_deadline(), c.deadline) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        };
        let event = tokio::select! {
            read = c.session.stream.read_buf(&mut c.buf), if can_read => Event::Read(read),
            done = c.in_flight.next(), if !c.in_flight.is_empty() => Event::Acked(done),
            // No more QoS 1 commands in flight than the client's Receive Maximum allows.
            Some(cmd) = next_command(&mut commands.queue), if commands.may_send() => {
                Event::Command(cmd)
            }
            // One timer for both deadlines keeps an idle connection small.
            _ = sleep_until(wake) => Event::Timer,
            change = c.changes.recv() => Event::Change(change),
            _ = stopped(&mut c.shutdown) => {
                return Err(ConnectionError::Closed(
                    CloseReason::ServerShuttingDown,
                    "the gateway is shutting down".into(),
                ));
            }
        };
        match event {
            // Reads, the most frequent event, need no waiting.
            Event::Read(read) => {
                last_read = read?;
                if last_read == 0 {
                    return Ok(());
                }
                c.deadline = c.idle.map(|d| Instant::now() + d);
            }
            // Boxed, and the event moved in whole: what handling an event keeps while it
            // waits is then no part of the idle connection's state.
            event => Box::pin(on_event(c, commands, event)).await?,
        }
    }
}

/// What woke a serving connection.
enum Event {
    Read(std::io::Result<usize>),
    Acked(
        (
            PublishContext,
            Result<crate::pipeline::Accepted, UploadError>,
        ),
    ),
    Command(CommandDelivery),
    Timer,
    Change(Result<ferrule_registry::auth::RegistryChange, broadcast::error::RecvError>),
}

/// Handles every event but a read.
async fn on_event<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    commands: &mut Commands,
    event: Event,
) -> Result<(), ConnectionError> {
    match event {
        // Reads are handled where they happen, in the serving loop.
        Event::Read(_) => {}
        Event::Acked(done) => {
            // Every publish the broker has acknowledged by now is answered in one write.
            let mut next = Some(done);
            while let Some((publish, result)) = next.take() {
                match result {
                    Ok(_) if publish.qos1 => {
                        c.session.queue(Outbound::PubAck(publish.pkid))?;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        Box::pin(publish_failed(
                            &mut c.session,
                            &publish,
                            c.errors.as_deref(),
                            e,
                        ))
                        .await?
                    }
                }
                next = c.in_flight.next_now();
            }
            c.session.flush().await?;
        }
        Event::Command(cmd) => {
            if let Some(sub) = &commands.sub {
                let topic = sub.topic_for(&cmd);
                let qos1 = sub.qos == 1;
                // Set with the subscription.
                let tenant = commands.tenant.clone().unwrap_or_default();
                let pkid = commands.next_pkid();
                let CommandDelivery {
                    device_id,
                    correlation_id,
                    outcome,
                    payload,
                    content_type,
                    ..
                } = cmd;
                let sent = Unacked {
                    deadline: Instant::now() + COMMAND_ACK_TIMEOUT,
                    device_id,
                    correlation_id,
                    outcome,
                };
                let publish = Outbound::Publish {
                    topic,
                    payload,
                    qos1,
                    pkid,
                    content_type,
                };
                // A subject or content type MQTT cannot carry (400), or a packet larger than
                // the device takes (413): the command cannot reach it, now or later, and its
                // sender learns why.
                let refused = match codec::check_outbound(&publish) {
                    Err(e) => Some((400, format!("the command cannot be sent over MQTT: {e}"))),
                    Ok(()) if !c.session.send(publish).await? => Some((
                        413,
                        format!(
                            "the command is larger than the device's Maximum Packet Size \
                             ({} bytes)",
                            c.session.client_max.unwrap_or_default()
                        ),
                    )),
                    Ok(()) => None,
                };
                if let Some((status, reason)) = refused {
                    if let Some(hub) = &commands.hub {
                        let (cid, outcome) =
                            (sent.correlation_id.as_deref(), sent.outcome.as_ref());
                        Box::pin(hub.not_delivered(
                            &tenant,
                            &sent.device_id,
                            cid,
                            outcome,
                            status,
                            &reason,
                        ))
                        .await;
                    }
                    return Ok(());
                }
                match &commands.hub {
                    Some(_) if qos1 => {
                        commands.unacked.insert(pkid, sent);
                    }
                    // QoS 0: sent is all the device will ever confirm.
                    Some(hub) => hub.delivered_to(&sent.device_id, sent.outcome.as_ref()),
                    None => {}
                }
            }
        }
        Event::Timer => {
            let now = Instant::now();
            if c.deadline.is_some_and(|d| d <= now) {
                return Err(ConnectionError::Closed(
                    CloseReason::KeepAliveTimeout,
                    "keep-alive expired".into(),
                ));
            }
            // Commands the device did not acknowledge in time are released: 503.
            for u in commands.expire(now) {
                if let (Some(hub), Some(tenant)) = (&commands.hub, &commands.tenant) {
                    let reason = "the device did not acknowledge the command";
                    Box::pin(u.undelivered(hub, tenant, reason)).await;
                }
            }
        }
        Event::Change(change) => {
            // An unauthenticated connection belongs to no device: each of its messages is
            // authorised afresh.
            let Some(device) = c.origin.device() else {
                return Ok(());
            };
            let revoked = match change {
                Ok(change) => {
                    change.revokes_access()
                        && change.tenant == device.tenant_id
                        && change
                            .device
                            .as_ref()
                            .is_none_or(|d| *d == device.device_id)
                }
                // Missed changes: ask the registry again.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    Box::pin(c.pipeline.authorise_connection(ADAPTER, device))
                        .await
                        .is_err()
                }
                Err(broadcast::error::RecvError::Closed) => false,
            };
            if revoked {
                return Err(ConnectionError::Closed(
                    CloseReason::NotAuthorized,
                    "device or tenant revoked".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Hands a PUBLISH to the producer without waiting where the pipeline can; what is left to
/// do (ask the registry, report an error) comes back for [`publish`].
fn publish_now<S>(
    c: &mut Served<S>,
    hub: Option<&CommandHub>,
    p: PublishRequest,
) -> Result<Option<Prepared>, ConnectionError> {
    match prepare_publish(&c.origin, hub, p) {
        Prepared::Upload(ctx, up) => match c.pipeline.submit_now(up) {
            SubmitNow::Done(Ok(pending)) => {
                answer_when_acked(c, ctx, Waiting::Upload(pending));
                Ok(None)
            }
            SubmitNow::Done(Err(e)) => Ok(Some(Prepared::Failed(ctx, e))),
            SubmitNow::Deferred(up) => Ok(Some(Prepared::Upload(ctx, up))),
        },
        other => Ok(Some(other)),
    }
}

/// Submits a prepared PUBLISH, asking the registry where needed, or reports its failure.
async fn publish<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    prepared: Prepared,
) -> Result<(), ConnectionError> {
    match submit(&c.pipeline, prepared).await {
        Ok((ctx, waiting)) => answer_when_acked(c, ctx, waiting),
        Err((ctx, e)) => {
            Box::pin(publish_failed(&mut c.session, &ctx, c.errors.as_deref(), e)).await?
        }
    }
    Ok(())
}

/// Queues a submitted PUBLISH for its answer; QoS 0 telemetry has nothing to wait for.
fn answer_when_acked<S>(c: &mut Served<S>, ctx: PublishContext, waiting: Waiting) {
    match waiting {
        Waiting::Upload(p) if p.is_answerable_now() => {
            let _ = p.outcome().now_or_never();
        }
        waiting => c.in_flight.push(ctx, waiting),
    }
}

/// Handles one packet from the device; `false` when the device disconnected.
async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    commands: &mut Commands,
    packet: Inbound,
) -> Result<bool, ConnectionError> {
    match packet {
        Inbound::Publish(p) => {
            if let Some(prepared) = publish_now(c, commands.hub.as_ref(), p)? {
                publish(c, prepared).await?;
            }
        }
        Inbound::PingReq => {
            c.session.send(Outbound::PingResp).await?;
        }
        Inbound::Subscribe { pkid, filters } => {
            let mut granted = Vec::with_capacity(filters.len());
            // Subscriptions this packet replaced, and the one it started.
            let mut replaced = Vec::new();
            let mut started = None;
            for (filter, qos) in &filters {
                if let Some(sub) = ErrorSubscription::parse(filter, &c.origin) {
                    c.errors = Some(Box::new(sub));
                    granted.push(Some(0));
                } else {
                    let qos = (*qos).min(1);
                    let subscribed =
                        Box::pin(commands.subscribe(&c.pipeline, &c.origin, filter, qos)).await;
                    granted.push(subscribed.as_ref().map(|_| qos));
                    if let Some(old) = subscribed {
                        replaced.extend(old);
                        started = commands.sub.as_ref().map(|sub| sub.target.clone());
                    }
                }
            }
            c.session.send(Outbound::SubAck { pkid, granted }).await?;
            // Applications learn of the change once the route is in place (Hono's
            // `ttd=-1` notification), after the device knows it is subscribed.
            for old in replaced {
                Box::pin(commands.end(&c.pipeline, &c.origin, old)).await;
            }
            if let Some(target) = started {
                Box::pin(reachability(&c.pipeline, &c.origin, target, -1)).await;
            }
        }
        Inbound::Unsubscribe { pkid, filters } => {
            let mut ended = Vec::with_capacity(filters.len());
            for filter in &filters {
                if c.errors
                    .as_ref()
                    .is_some_and(|_| ErrorSubscription::parse(filter, &c.origin).is_some())
                {
                    c.errors = None;
                    ended.push(true);
                } else if let Some(sub) = commands.unsubscribe(filter) {
                    Box::pin(commands.end(&c.pipeline, &c.origin, sub)).await;
                    ended.push(true);
                } else {
                    ended.push(false);
                }
            }
            c.session.send(Outbound::UnsubAck { pkid, ended }).await?;
        }
        Inbound::PubAck(pkid) => {
            commands.overdue.remove(&pkid);
            if let (Some(u), Some(hub)) = (commands.unacked.remove(&pkid), &commands.hub) {
                hub.delivered_to(&u.device_id, u.outcome.as_ref());
            }
        }
        Inbound::Disconnect => return Ok(false),
        Inbound::Connect(_) => {
            metrics::rejected(ADAPTER.name(), "protocol-error");
            return Err(ConnectionError::Closed(
                CloseReason::ProtocolError,
                "second CONNECT".into(),
            ));
        }
        Inbound::Unsupported(what) => {
            metrics::rejected(ADAPTER.name(), "unsupported");
            return Err(ConnectionError::Closed(
                CloseReason::ProtocolError,
                format!("{what} is not supported"),
            ));
        }
    }
    Ok(true)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A PUBLISH translated for the pipeline, or the failure to report for it.
enum Prepared {
    Upload(PublishContext, Upload),
    Response(PublishContext, CommandHub, DeviceResponse, Accepted),
    Failed(PublishContext, UploadError),
}

/// Translates one PUBLISH (no I/O): a telemetry/event upload, a command response, or the
/// error to report. Whether it may be forwarded (size included) is the pipeline's decision.
fn prepare_publish(origin: &Origin, hub: Option<&CommandHub>, p: PublishRequest) -> Prepared {
    // The codec lets only QoS 0 and 1 through.
    let qos1 = p.qos == 1;
    if let Some(response) = topic::parse_response(&p.topic) {
        return prepare_response(origin, hub, p, qos1, response);
    }
    let mut ctx = PublishContext {
        pkid: p.pkid,
        qos1,
        on_error: OnError::Disconnect,
        endpoint: endpoint_of(&p.topic),
        correlation_id: None,
        device: None,
    };
    let address = match topic::parse(&p.topic) {
        Ok(a) => a,
        Err(e) => {
            metrics::rejected(ADAPTER.name(), "bad-topic");
            return Prepared::Failed(ctx, UploadError::BadRequest(e.to_string()));
        }
    };
    ctx.on_error = match address.property("on-error") {
        Some("ignore") => OnError::Ignore,
        Some("skip-ack") => OnError::SkipAck,
        Some("disconnect") => OnError::Disconnect,
        _ => OnError::Default,
    };
    if let Some(c) = address.property("correlation-id") {
        ctx.correlation_id = Some(c.to_owned());
    }
    if let Some((_, d)) = &address.target {
        ctx.device = Some(d.clone());
    }
    let ttl_secs = address.property("hono-ttl").and_then(|v| v.parse().ok());
    let content_type = address
        .property("content-type")
        .map(str::to_owned)
        .or(p.content_type);
    let up = Upload {
        adapter: ADAPTER,
        endpoint: address.endpoint,
        qos: if qos1 {
            Qos::AtLeastOnce
        } else {
            Qos::AtMostOnce
        },
        origin: origin.clone(),
        target: address.target,
        content_type,
        payload: p.payload,
        ttl_secs,
        ttd_secs: None,
        orig_address: p.topic,
        retain: p.retain,
        traceparent: p.traceparent,
    };
    Prepared::Upload(ctx, up)
}

/// Hands a prepared PUBLISH to the producer; returns what its answer waits for, or the
/// failure to report.
async fn submit(
    pipeline: &IngestPipeline,
    prepared: Prepared,
) -> Result<(PublishContext, Waiting), (PublishContext, UploadError)> {
    match prepared {
        Prepared::Upload(ctx, up) => match pipeline.submit(up).await {
            Ok(pending) => Ok((ctx, Waiting::Upload(pending))),
            Err(e) => Err((ctx, e)),
        },
        // Handed to the producer now; acknowledged in order with the device's other
        // publishes once the broker has it, while the connection reads on.
        Prepared::Response(ctx, hub, response, accepted) => {
            // Boxed: responses are rare next to telemetry, whose future stays small.
            match Box::pin(hub.submit_response(pipeline, response)).await {
                Ok(pending) => Ok((ctx, Waiting::Response(pending, accepted))),
                Err(e) => Err((ctx, e)),
            }
        }
        Prepared::Failed(ctx, e) => Err((ctx, e)),
    }
}

/// Hono's error policy (its MQTT adapter guide). Terminal errors (the device, gateway, tenant
/// or adapter is not allowed, or the payload too large) always disconnect. Otherwise, without
/// an error subscription `default`/`disconnect` disconnect; with one, the error is published
/// to it first and `default` acknowledges. `ignore` acknowledges, `skip-ack` does not.
async fn publish_failed<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<S>,
    ctx: &PublishContext,
    errors: Option<&ErrorSubscription>,
    e: UploadError,
) -> Result<(), ConnectionError> {
    if let Some(sub) = errors {
        let payload = serde_json::json!({
            "code": e.status(),
            "message": e.to_string(),
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "correlation-id": ctx.correlation(),
        });
        let device = ctx.device.as_deref().unwrap_or(&sub.own);
        let topic = sub.topic_for(device, &ctx.endpoint, &ctx.correlation(), e.status());
        // Discarded if larger than the device takes, as the specification asks.
        session
            .send(Outbound::Publish {
                topic,
                payload: payload.to_string().into_bytes(),
                qos1: false,
                pkid: 0,
                content_type: Some("application/json".into()),
            })
            .await?;
    }
    let terminal = matches!(
        e,
        UploadError::Forbidden(_)
            | UploadError::NotFound(_)
            | UploadError::Unauthorized(_)
            | UploadError::PayloadTooLarge(_)
    );
    let closed = |e: UploadError| Err(ConnectionError::Closed(close_reason_for(&e), e.to_string()));
    let ack = match (terminal, ctx.on_error) {
        (true, _) | (_, OnError::Disconnect) => return closed(e),
        (false, OnError::Default) if errors.is_none() => return closed(e),
        (false, OnError::Default | OnError::Ignore) => true,
        (false, OnError::SkipAck) => false,
    };
    if ack && ctx.qos1 {
        session.send(Outbound::PubAck(ctx.pkid)).await?;
    }
    Ok(())
}

/// A subscription to the error topic: `error/[tenant]/[device]/#` or `e/…`, or for gateways
/// `…/+/#`. Error messages mirror its prefix and segments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ErrorSubscription {
    prefix: String,
    tenant: String,
    /// Empty (the device itself), `+` (any device of a gateway) or one device id.
    device: String,
    /// The connection's own device id, for errors of its own messages.
    own: String,
}

impl ErrorSubscription {
    /// The subscription if `filter` is a valid error-topic filter for this device; an
    /// unauthenticated device names its tenant and device (`error/{tenant}/{device}/#`).
    fn parse(filter: &str, origin: &Origin) -> Option<Self> {
        let parts: Vec<&str> = filter.split('/').collect();
        let [prefix @ ("error" | "e"), tenant, dev, "#"] = parts.as_slice() else {
            return None;
        };
        let own = match origin.device() {
            Some(d) if tenant.is_empty() || *tenant == d.tenant_id => d.device_id.clone(),
            Some(_) => return None,
            None if tenant.is_empty() || dev.is_empty() || *dev == "+" => return None,
            None => (*dev).to_owned(),
        };
        Some(ErrorSubscription {
            prefix: (*prefix).to_owned(),
            tenant: (*tenant).to_owned(),
            device: (*dev).to_owned(),
            own,
        })
    }

    fn topic_for(&self, device: &str, endpoint: &str, correlation_id: &str, status: u16) -> String {
        let dev = match self.device.as_str() {
            "+" => device,
            d => d,
        };
        format!(
            "{}/{}/{}/{endpoint}/{correlation_id}/{status}",
            self.prefix, self.tenant, dev
        )
    }
}

/// Resolves when `shutdown` turns true (the borrow of the flag ends inside).
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// The command side of one connection: its subscription and the queue commands arrive on.
pub(super) struct Commands {
    hub: Option<CommandHub>,
    /// Boxed: many devices never subscribe to commands.
    sub: Option<Box<CommandSubscription>>,
    /// The tenant of the commands this connection took (set by its first subscription).
    tenant: Option<String>,
    queue: Option<mpsc::Receiver<CommandDelivery>>,
    sender: Option<mpsc::Sender<CommandDelivery>>,
    /// The client's Receive Maximum: QoS 1 commands it takes before it acknowledged them.
    receive_maximum: u16,
    /// QoS 1 commands whose acknowledgement timed out (their senders were answered) but that
    /// the device still holds unacknowledged: they count against its Receive Maximum.
    overdue: std::collections::HashSet<u16>,
    /// QoS 1 commands sent and not yet PUBACKed, by packet id.
    unacked: std::collections::HashMap<u16, Unacked>,
    last_pkid: u16,
}

/// A command sent with QoS 1, waiting for its PUBACK.
struct Unacked {
    deadline: Instant,
    device_id: String,
    correlation_id: Option<String>,
    outcome: Option<ferrule_schemas::outcome::OutcomeRoute>,
}

impl Unacked {
    async fn undelivered(self, hub: &CommandHub, tenant: &str, reason: &str) {
        let (cid, outcome) = (self.correlation_id.as_deref(), self.outcome.as_ref());
        hub.undelivered(tenant, &self.device_id, cid, outcome, reason)
            .await;
    }
}

/// How long a device has to acknowledge a QoS 1 command (Hono's `sendMessageToDeviceTimeout`).
const COMMAND_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Commands a connection may hold unsent before further ones fail with 503.
const COMMAND_QUEUE: usize = 16;

/// A live command subscription and how to address commands to it.
struct CommandSubscription {
    filter: topic::CommandFilter,
    /// The QoS granted to the subscription, used for every command.
    qos: u8,
    /// The device (or gateway) id the subscription is registered under.
    registered: String,
    /// The device the subscriber subscribed for as the pipeline takes it: `None` for itself
    /// (a device, or a gateway for all its devices), else tenant (maybe empty: the
    /// subscriber's own) and device.
    target: Option<(String, String)>,
    token: SubscriptionToken,
}

impl CommandSubscription {
    /// `{prefix}/{tenant}/{device}/{req}/{reqId}/{subject}`, mirroring the filter; a gateway-wide
    /// subscription names the target device (empty when the command is for the gateway itself).
    fn topic_for(&self, cmd: &CommandDelivery) -> String {
        let f = &self.filter;
        let device = match f.device.as_str() {
            "+" if cmd.device_id == self.registered => "",
            "+" => cmd.device_id.as_str(),
            d => d,
        };
        let req_id = cmd.request_id.as_deref().unwrap_or_default();
        format!(
            "{}/{}/{device}/{}/{req_id}/{}",
            f.prefix, f.tenant, f.req, cmd.subject
        )
    }
}

impl Commands {
    /// Subscribes for commands. `None` (SUBACK failure) for a filter that is not a command
    /// filter or that the pipeline does not authorise (another tenant, a device the gateway
    /// may not act for, an unknown or disabled device, an unauthenticated device where the
    /// tenant requires authentication); otherwise the subscription this one replaced, if the
    /// device had one for another target (Hono uses only the last).
    async fn subscribe(
        &mut self,
        pipeline: &IngestPipeline,
        origin: &Origin,
        filter: &str,
        qos: u8,
    ) -> Option<Option<CommandSubscription>> {
        let (Some(hub), Some(f)) = (self.hub.clone(), topic::parse_command_filter(filter)) else {
            return None;
        };
        // The device the subscription is for, as the pipeline takes an address.
        let target = match f.device.as_str() {
            "" | "+" if f.tenant.is_empty() => None,
            "" | "+" => origin
                .device()
                .map(|d| (f.tenant.clone(), d.device_id.clone())),
            d => Some((f.tenant.clone(), d.to_owned())),
        };
        if f.device == "+" && origin.device().is_none() {
            return None;
        }
        let who = pipeline
            .authorise(ADAPTER, origin, target.as_ref())
            .await
            .ok()?;
        if self.tenant.as_ref().is_some_and(|t| *t != who.tenant_id) {
            return None;
        }
        let registered = who.device_id;
        let tenant = who.tenant_id;
        let tx = match &self.sender {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
                self.queue = Some(rx);
                self.sender = Some(tx.clone());
                tx
            }
        };
        let token = hub.subscribe(&tenant, &registered, tx, None).await.ok()?;
        self.tenant = Some(tenant);
        let old = self.sub.replace(Box::new(CommandSubscription {
            filter: f,
            qos,
            registered,
            target,
            token,
        }));
        // A subscription for the same device was just taken over by the new one.
        Some(
            old.filter(|o| {
                self.sub
                    .as_ref()
                    .is_none_or(|n| n.registered != o.registered)
            })
            .map(|o| *o),
        )
    }
}

impl Commands {
    /// Packet ids for commands, 1..=65535, skipping ones still waiting for a PUBACK.
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            if !self.unacked.contains_key(&self.last_pkid)
                && !self.overdue.contains(&self.last_pkid)
            {
                return self.last_pkid;
            }
        }
    }

    /// Ends `sub`; its end is announced (`ttd=0`) only when no newer subscription of the same
    /// device replaced it, on this instance or another.
    async fn end(&self, pipeline: &IngestPipeline, origin: &Origin, sub: CommandSubscription) {
        let (Some(hub), Some(tenant)) = (&self.hub, &self.tenant) else {
            return;
        };
        if hub.unsubscribe(tenant, &sub.registered, sub.token).await {
            reachability(pipeline, origin, sub.target, 0).await;
        }
    }

    /// Ends the command subscription if `filter` is its filter and returns it.
    fn unsubscribe(&mut self, filter: &str) -> Option<CommandSubscription> {
        let f = topic::parse_command_filter(filter)?;
        if self.sub.as_ref().is_some_and(|s| s.filter == f) {
            self.sub.take().map(|s| *s)
        } else {
            None
        }
    }

    /// Whether another command may go out now (the client's Receive Maximum, MQTT 5 §3.3.4).
    fn may_send(&self) -> bool {
        self.unacked.len() + self.overdue.len() < usize::from(self.receive_maximum)
    }

    fn earliest_deadline(&self) -> Option<Instant> {
        self.unacked.values().map(|u| u.deadline).min()
    }

    /// Removes and returns the commands whose acknowledgement is overdue.
    fn expire(&mut self, now: Instant) -> Vec<Unacked> {
        let overdue: Vec<u16> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        self.overdue.extend(overdue.iter().copied());
        overdue
            .into_iter()
            .filter_map(|k| self.unacked.remove(&k))
            .collect()
    }

    /// Commands the connection took and the device will never confirm, once it is gone.
    async fn release_all(&mut self, tenant: &str) {
        let Some(hub) = self.hub.clone() else {
            return;
        };
        let reason = "the device disconnected";
        for (_, u) in self.unacked.drain() {
            u.undelivered(&hub, tenant, reason).await;
        }
        if let Some(mut queue) = self.queue.take() {
            queue.close();
            while let Ok(c) = queue.try_recv() {
                let (cid, outcome) = (c.correlation_id.as_deref(), c.outcome.as_ref());
                hub.undelivered(tenant, &c.device_id, cid, outcome, reason)
                    .await;
            }
        }
    }
}

async fn next_command(
    queue: &mut Option<mpsc::Receiver<CommandDelivery>>,
) -> Option<CommandDelivery> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}

/// Translates a PUBLISH to a command response topic (`command///res/...`).
fn prepare_response(
    origin: &Origin,
    hub: Option<&CommandHub>,
    p: PublishRequest,
    qos1: bool,
    address: Result<topic::ResponseAddress, topic::TopicError>,
) -> Prepared {
    let ctx = PublishContext {
        pkid: p.pkid,
        qos1,
        on_error: OnError::Default,
        endpoint: if p.topic.starts_with("c/") {
            "c-s".into()
        } else {
            "command-response".into()
        },
        correlation_id: None,
        device: None,
    };
    let a = match address {
        Ok(a) => a,
        Err(e) => return Prepared::Failed(ctx, UploadError::BadRequest(e.to_string())),
    };
    let Some(hub) = hub.cloned() else {
        let e = UploadError::Unavailable("commands are not enabled".into());
        return Prepared::Failed(ctx, e);
    };
    let content_type = a
        .properties
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .or(p.content_type.clone());
    let (own_tenant, own_device) = match origin.device() {
        Some(d) => (d.tenant_id.as_str(), d.device_id.as_str()),
        None => ("", ""),
    };
    let accepted = Accepted {
        tenant: if a.tenant.is_empty() {
            own_tenant.to_owned()
        } else {
            a.tenant.clone()
        },
        device: if a.device.is_empty() {
            own_device.to_owned()
        } else {
            a.device.clone()
        },
    };
    let response = DeviceResponse {
        adapter: ADAPTER,
        origin: origin.clone(),
        target: (!a.device.is_empty()).then(|| (a.tenant.clone(), a.device.clone())),
        request_id: a.request_id,
        status: a.status,
        content_type,
        payload: p.payload.to_vec(),
    };
    Prepared::Response(ctx, hub, response, accepted)
}
