//! The serving loop of one MQTT connection: reads packets and hands each to its job (publish,
//! subscriptions), answers publishes as the broker acknowledges them, sends commands, keeps
//! the keep-alive, and closes when the registry revokes the device or the gateway stops.

use super::acks::AckQueue;
use super::codec::{self, CloseReason, ConnectOutcome, Inbound, Outbound, Version};
use super::connect::{close, open};
use super::errors::{ErrorSubscription, publish_failed};
use super::publish::{PublishContext, publish, publish_now};
use super::subscriptions::{Commands, on_subscribe, on_unsubscribe};
use super::{ADAPTER, MqttConfig};
use crate::commands::{CommandDelivery, CommandHub};
use crate::metrics;
use crate::pipeline::{IngestPipeline, Origin, Refusal};
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

pub(super) struct Session<S> {
    pub(super) stream: S,
    pub(super) version: Version,
    pub(super) out: BytesMut,
    /// The largest packet the client accepts (MQTT 5's Maximum Packet Size).
    pub(super) client_max: Option<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Sends `packet`, after anything queued; `false` when it was discarded as larger than
    /// the client accepts.
    pub(super) async fn send(&mut self, packet: Outbound) -> Result<bool, ConnectionError> {
        let queued = self.queue(packet)?;
        self.flush().await?;
        Ok(queued)
    }

    /// Encodes `packet` to leave with the next send or flush: acknowledgements that become
    /// due together leave in one write. A packet larger than the client's Maximum Packet
    /// Size is discarded instead [MQTT-3.1.2-24], [MQTT-3.1.2-25]: `false`.
    pub(super) fn queue(&mut self, packet: Outbound) -> Result<bool, ConnectionError> {
        Ok(codec::encode_within(
            self.version,
            &packet,
            &mut self.out,
            self.client_max,
        )?)
    }

    pub(super) async fn flush(&mut self) -> Result<(), ConnectionError> {
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
    tls: super::Tls,
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
        tls,
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

/// What an authenticated connection works with while it serves; kept in `run`'s frame and
/// lent to `serve`, so the connection's future holds each of these once.
pub(super) struct Served<S> {
    pub(super) session: Session<S>,
    pub(super) buf: BytesMut,
    pub(super) pipeline: IngestPipeline,
    /// The authenticated device, or an unauthenticated one that names tenant and device in
    /// every topic.
    pub(super) origin: Origin,
    pub(super) changes: broadcast::Receiver<ferrule_registry::auth::RegistryChange>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// The device's subscription to its error topic, if any (Hono's MQTT adapter).
    /// Boxed: most devices never subscribe to errors.
    pub(super) errors: Option<Box<ErrorSubscription>>,
    /// Publishes waiting for the broker, in arrival order.
    pub(super) in_flight: AckQueue<PublishContext>,
    /// A client that says nothing for this long is gone (1.5 keep-alive periods, MQTT 3.1.1
    /// §3.1.2.10).
    pub(super) idle: Option<Duration>,
    pub(super) deadline: Option<Instant>,
    pub(super) max_packet: usize,
    pub(super) max_in_flight: usize,
}

/// The boxed rest of handling one packet: `false` when the device disconnected.
pub(super) type PacketHandling<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, ConnectionError>> + Send + 'a>>;

pub(super) async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
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
                    Inbound::Publish(p) => match publish_now(c, commands.hub(), p)? {
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
        let wake = match (commands.deadline(), c.deadline) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        };
        let event = tokio::select! {
            read = c.session.stream.read_buf(&mut c.buf), if can_read => Event::Read(read),
            done = c.in_flight.next(), if !c.in_flight.is_empty() => Event::Acked(done),
            // No more QoS 1 commands in flight than the client's Receive Maximum allows.
            cmd = commands.next() => Event::Command(cmd),
            // One timer for both deadlines keeps an idle connection small.
            _ = sleep_until(wake) => Event::Timer,
            change = c.changes.recv() => Event::Change(change),
            _ = stopped(&mut c.shutdown) => Event::Stop,
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
            // Nothing more is read; the publishes already handed to the producer are answered
            // first (PUBACK, or the error policy), so the device knows which of them Kafka
            // has and sends only the others again, to another instance. The process bounds
            // how long this may take (`shutdown.drain_timeout_secs`).
            Event::Stop => {
                while !c.in_flight.is_empty() {
                    let done = c.in_flight.next().await;
                    Box::pin(on_event(c, commands, Event::Acked(done))).await?;
                }
                return Err(ConnectionError::Closed(
                    CloseReason::ServerShuttingDown,
                    "the gateway is shutting down".into(),
                ));
            }
            // Boxed, and the event moved in whole: what handling an event keeps while it
            // waits is then no part of the idle connection's state.
            event => Box::pin(on_event(c, commands, event)).await?,
        }
    }
}

/// What woke a serving connection.
pub(super) enum Event {
    Read(std::io::Result<usize>),
    Acked((PublishContext, Result<crate::pipeline::Accepted, Refusal>)),
    Command(CommandDelivery),
    Timer,
    Change(Result<ferrule_registry::auth::RegistryChange, broadcast::error::RecvError>),
    /// The gateway is shutting down.
    Stop,
}

/// Handles every event but a read.
pub(super) async fn on_event<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    commands: &mut Commands,
    event: Event,
) -> Result<(), ConnectionError> {
    match event {
        // Reads and the stop are handled where they happen, in the serving loop.
        Event::Read(_) | Event::Stop => {}
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
        Event::Command(cmd) => commands.deliver(&mut c.session, cmd).await?,
        Event::Timer => {
            let now = Instant::now();
            if c.deadline.is_some_and(|d| d <= now) {
                return Err(ConnectionError::Closed(
                    CloseReason::KeepAliveTimeout,
                    "keep-alive expired".into(),
                ));
            }
            // Commands the device did not acknowledge in time are released: 503.
            commands.expire_overdue(now).await;
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

/// Handles one packet from the device; `false` when the device disconnected.
pub(super) async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    commands: &mut Commands,
    packet: Inbound,
) -> Result<bool, ConnectionError> {
    match packet {
        Inbound::Publish(p) => {
            if let Some(prepared) = publish_now(c, commands.hub(), p)? {
                publish(c, prepared).await?;
            }
        }
        Inbound::PingReq => {
            c.session.send(Outbound::PingResp).await?;
        }
        Inbound::Subscribe { pkid, filters } => {
            on_subscribe(c, commands, pkid, &filters).await?;
        }
        Inbound::Unsubscribe { pkid, filters } => {
            on_unsubscribe(c, commands, pkid, &filters).await?;
        }
        Inbound::PubAck(pkid) => commands.acked(pkid),
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

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves when `shutdown` turns true (the borrow of the flag ends inside).
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("no CONNECT in time")]
    ConnectTimeout,
    #[error("the gateway shut down before the CONNECT came")]
    StoppedBeforeConnect,
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
            | ConnectionError::StoppedBeforeConnect
            | ConnectionError::Refused(_) => None,
        }
    }
}
