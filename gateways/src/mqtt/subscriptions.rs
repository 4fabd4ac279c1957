//! Command subscriptions of one connection: SUBSCRIBE and UNSUBSCRIBE (command and error
//! topics), the commands sent to the device and their PUBACKs, and the `ttd` notifications
//! that tell applications whether the device can be reached.

use super::ADAPTER;
use super::codec::{self, Outbound, SubAckFailure};
use super::connection::{ConnectionError, Served, Session};
use super::errors::ErrorSubscription;
use super::topic;
use crate::commands::{CommandDelivery, CommandHub, SubscriptionToken};
use crate::metrics;
use crate::pipeline::{
    AdapterType, CommandScope, Endpoint, IngestPipeline, Origin, Qos, Refusal, Upload,
};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

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
pub(super) struct Unacked {
    pub(super) deadline: Instant,
    pub(super) device_id: String,
    pub(super) correlation_id: Option<String>,
    pub(super) outcome: Option<ferrule_schemas::outcome::OutcomeRoute>,
    /// Reported with the PUBACK, or with the failure.
    pub(super) progress: crate::delivery::Progress,
}

impl Unacked {
    async fn undelivered(self, hub: &CommandHub, tenant: &str, reason: &str) {
        self.progress.failed(503, reason);
        let (cid, outcome) = (self.correlation_id.as_deref(), self.outcome.as_ref());
        hub.undelivered(tenant, &self.device_id, cid, outcome, reason)
            .await;
    }
}

/// How long a device has to acknowledge a QoS 1 command (Hono's `sendMessageToDeviceTimeout`).
pub(super) const COMMAND_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Commands a connection may hold unsent before further ones fail with 503.
pub(super) const COMMAND_QUEUE: usize = 16;

/// A live command subscription and how to address commands to it.
pub(super) struct CommandSubscription {
    pub(super) filter: topic::CommandFilter,
    /// The QoS granted to the subscription, used for every command.
    pub(super) qos: u8,
    /// The device (or gateway) id the subscription is registered under.
    pub(super) registered: String,
    /// The device the subscriber subscribed for as the pipeline takes it: `None` for itself
    /// (a device, or a gateway for all its devices), else tenant (maybe empty: the
    /// subscriber's own) and device.
    pub(super) target: Option<(String, String)>,
    pub(super) token: SubscriptionToken,
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
    pub(super) fn new(hub: Option<CommandHub>, receive_maximum: u16) -> Self {
        Commands {
            hub,
            sub: None,
            tenant: None,
            queue: None,
            sender: None,
            unacked: Default::default(),
            last_pkid: 0,
            receive_maximum,
            overdue: Default::default(),
        }
    }

    /// Subscribes for commands. `None` for a filter that is not a command filter (or when
    /// commands are not enabled); `Err` when the pipeline refuses it (another tenant, a device
    /// the gateway may not act for, an unknown or disabled device, an unauthenticated device
    /// where the tenant requires authentication); otherwise the subscription this one
    /// replaced, if the device had one for another target (Hono uses only the last).
    async fn subscribe(
        &mut self,
        pipeline: &IngestPipeline,
        origin: &Origin,
        filter: &str,
        qos: u8,
    ) -> Option<Result<Option<CommandSubscription>, Refusal>> {
        let (Some(hub), Some(f)) = (self.hub.clone(), topic::parse_command_filter(filter)) else {
            return None;
        };
        let scope = match f.device.as_str() {
            "" => CommandScope::Own,
            "+" => CommandScope::AllOfGateway,
            d => CommandScope::One(d),
        };
        let allowed = pipeline
            .authorise_command_subscription(
                ADAPTER,
                origin,
                &f.tenant,
                scope,
                self.tenant.as_deref(),
            )
            .await;
        let crate::pipeline::Subscribed { who, target } = match allowed {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
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
        let token = match hub
            .subscribe(AdapterType::Mqtt, &tenant, &registered, tx, None)
            .await
        {
            Ok(token) => token,
            Err(e) => return Some(Err(e)),
        };
        self.tenant = Some(tenant);
        let old = self.sub.replace(Box::new(CommandSubscription {
            filter: f,
            qos,
            registered,
            target,
            token,
        }));
        // A subscription for the same device was just taken over by the new one.
        Some(Ok(old
            .filter(|o| {
                self.sub
                    .as_ref()
                    .is_none_or(|n| n.registered != o.registered)
            })
            .map(|o| *o)))
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
                c.progress.failed(503, reason);
                let (cid, outcome) = (c.correlation_id.as_deref(), c.outcome.as_ref());
                hub.undelivered(tenant, &c.device_id, cid, outcome, reason)
                    .await;
            }
        }
    }
}

impl Commands {
    /// The next command for the device; pending while there is no subscription, or while
    /// the device holds as many unacknowledged QoS 1 commands as its Receive Maximum allows
    /// (MQTT 5 §3.3.4).
    pub(super) async fn next(&mut self) -> CommandDelivery {
        if self.may_send()
            && let Some(queue) = &mut self.queue
            && let Some(cmd) = queue.recv().await
        {
            return cmd;
        }
        std::future::pending().await
    }

    pub(super) fn hub(&self) -> Option<&CommandHub> {
        self.hub.as_ref()
    }

    /// When the oldest unacknowledged command times out, if any.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.earliest_deadline()
    }

    /// Sends a command to the device, at the subscription's QoS. One MQTT cannot carry, or
    /// one larger than the device takes, is failed back to its sender (400, 413).
    pub(super) async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        session: &mut Session<S>,
        cmd: CommandDelivery,
    ) -> Result<(), ConnectionError> {
        let Some(sub) = &self.sub else {
            return Ok(());
        };
        let topic = sub.topic_for(&cmd);
        let qos1 = sub.qos == 1;
        // Set with the subscription.
        let tenant = self.tenant.clone().unwrap_or_default();
        let pkid = self.next_pkid();
        let CommandDelivery {
            device_id,
            correlation_id,
            outcome,
            payload,
            content_type,
            progress,
            ..
        } = cmd;
        let sent = Unacked {
            deadline: Instant::now() + COMMAND_ACK_TIMEOUT,
            device_id,
            correlation_id,
            outcome,
            progress,
        };
        let publish = Outbound::Publish {
            topic,
            payload,
            qos1,
            pkid,
            content_type,
        };
        // A subject or content type MQTT cannot carry (400), or a packet larger than the
        // device takes (413): the command cannot reach it, now or later, and its sender
        // learns why.
        let refused = match codec::check_outbound(&publish) {
            Err(e) => Some((400, format!("the command cannot be sent over MQTT: {e}"))),
            Ok(()) if !session.send(publish).await? => Some((
                413,
                format!(
                    "the command is larger than the device's Maximum Packet Size ({} bytes)",
                    session.client_max.unwrap_or_default()
                ),
            )),
            Ok(()) => None,
        };
        if let Some((status, reason)) = refused {
            sent.progress.failed(status, &reason);
            if let Some(hub) = &self.hub {
                let (cid, outcome) = (sent.correlation_id.as_deref(), sent.outcome.as_ref());
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
        match &self.hub {
            Some(_) if qos1 => {
                self.unacked.insert(pkid, sent);
            }
            // QoS 0: sent is all the device will ever confirm.
            Some(hub) => {
                sent.progress.delivered();
                hub.delivered_to(&sent.device_id, sent.outcome.as_ref());
            }
            None => {}
        }
        Ok(())
    }

    /// The device acknowledged the QoS 1 command `pkid`.
    pub(super) fn acked(&mut self, pkid: u16) {
        self.overdue.remove(&pkid);
        if let (Some(u), Some(hub)) = (self.unacked.remove(&pkid), &self.hub) {
            u.progress.delivered();
            hub.delivered_to(&u.device_id, u.outcome.as_ref());
        }
    }

    /// Releases the commands the device did not acknowledge in time (503).
    pub(super) async fn expire_overdue(&mut self, now: Instant) {
        for u in self.expire(now) {
            if let (Some(hub), Some(tenant)) = (&self.hub, &self.tenant) {
                let reason = "the device did not acknowledge the command";
                Box::pin(u.undelivered(hub, tenant, reason)).await;
            }
        }
    }

    /// Once the connection is gone: ends the subscription (announcing it, unless a newer one
    /// took over) and releases the commands the device never confirmed.
    pub(super) async fn close(&mut self, pipeline: &IngestPipeline, origin: &Origin) {
        if let Some(sub) = self.sub.take() {
            self.end(pipeline, origin, *sub).await;
        }
        if let Some(tenant) = self.tenant.clone() {
            self.release_all(&tenant).await;
        }
    }
}

/// SUBSCRIBE: each filter is an error-topic or a command subscription, allowed or refused by
/// the pipeline (a refused one gets 0x80 in an MQTT 3.1.1 SUBACK, the refusal table's code in
/// an MQTT 5 one). Applications learn of a new command
/// subscription once the route is in place and the device knows it is subscribed (Hono's
/// `ttd=-1` notification).
pub(super) async fn on_subscribe<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    commands: &mut Commands,
    pkid: u16,
    filters: &[(String, u8)],
) -> Result<(), ConnectionError> {
    let mut granted = Vec::with_capacity(filters.len());
    // Subscriptions this packet replaced, and the one it started.
    let mut replaced = Vec::new();
    let mut started = None;
    for (filter, qos) in filters {
        let result = match ErrorSubscription::subscribe(&c.pipeline, &c.origin, filter) {
            Some(Ok(sub)) => {
                c.errors = Some(Box::new(sub));
                Ok(0)
            }
            Some(Err(e)) => Err(Some(e)),
            None => {
                let qos = (*qos).min(1);
                match Box::pin(commands.subscribe(&c.pipeline, &c.origin, filter, qos)).await {
                    Some(Ok(old)) => {
                        replaced.extend(old);
                        started = commands.sub.as_ref().map(|sub| sub.target.clone());
                        Ok(qos)
                    }
                    Some(Err(e)) => Err(Some(e)),
                    // Neither a command nor an error topic: nothing to subscribe to.
                    None => Err(None),
                }
            }
        };
        granted.push(match result {
            Ok(qos) => Ok(qos),
            Err(refusal) => {
                let label = refusal.as_ref().map_or("bad-subscription", Refusal::label);
                metrics::rejected(ADAPTER.name(), label);
                // A filter that names nothing the adapter offers is an invalid one.
                Err(refusal.map_or(SubAckFailure::TopicFilterInvalid, |r| r.codes().suback))
            }
        });
    }
    c.session.send(Outbound::SubAck { pkid, granted }).await?;
    for old in replaced {
        Box::pin(commands.end(&c.pipeline, &c.origin, old)).await;
    }
    if let Some(target) = started {
        Box::pin(reachability(&c.pipeline, &c.origin, target, -1)).await;
    }
    Ok(())
}

/// UNSUBSCRIBE: ends the error-topic or command subscription each filter names.
pub(super) async fn on_unsubscribe<S: AsyncRead + AsyncWrite + Unpin + Send>(
    c: &mut Served<S>,
    commands: &mut Commands,
    pkid: u16,
    filters: &[String],
) -> Result<(), ConnectionError> {
    let mut ended = Vec::with_capacity(filters.len());
    for filter in filters {
        if c.errors.as_ref().is_some_and(|e| e.is_filter(filter)) {
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
    Ok(())
}

/// Tells applications whether commands reach a device (Hono's empty notification with
/// `ttd`: -1 while subscribed, 0 once gone), sent as the subscriber for the device it
/// subscribed for (`target`: `None` for itself).
pub(super) async fn reachability(
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
        trace: None,
        received: None,
        notification: true,
    };
    if let Err(e) = pipeline.upload(up).await {
        tracing::warn!(error = %e, ?device, ttd, "ttd notification lost");
    }
}
