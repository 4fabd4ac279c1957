//! One application connection: SASL, then sessions, then links. A receiver link on the
//! application's own `telemetry/<tenant>` or `event/<tenant>` is fed from Kafka; any other
//! address is refused with `amqp:unauthorized-access` (another tenant) or
//! `amqp:not-found` (unknown), and never sees data.

use crate::BridgeConfig;
use crate::address::Address;
use crate::credit::{Credits, FlowTap, LinkCredit};
use crate::payload::{self, PayloadFormat};
use crate::sasl::ApplicationSasl;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::Sender;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorInfo, SenderSettleMode};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::types::performatives::Attach;
use ferrule_kafka::{KafkaConfig, RecoveringProducer, TopicAdmin};
use ferrule_registry::{AuthenticatedApplication, DeviceAuthenticator};
use ferrule_schemas::headers as h;
use ferrule_schemas::outcome::Disposition;
use ferrule_schemas::{TopicKind, TopicNames};
use ferrule_telemetry::{KeyValue, SpanKind};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Clone)]
pub(crate) struct Context {
    pub cfg: BridgeConfig,
    pub kafka: Arc<KafkaConfig>,
    pub names: TopicNames,
    pub topics: TopicAdmin,
    /// Writes the applications' commands to `hono.command.<tenant>`.
    pub producer: RecoveringProducer,
    pub registry: DeviceAuthenticator,
    /// Settles the applications' commands by what became of them.
    pub outcomes: crate::outcome::Outcomes,
    /// Spans of deliveries to applications (off unless traces are exported).
    pub tracer: ferrule_telemetry::Tracer,
}

pub(crate) async fn run<Io>(
    stream: Io,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let sasl = ApplicationSasl::new(ctx.registry.clone());
    let identity = sasl.identity.clone();
    let acceptor = ConnectionAcceptor::builder()
        .container_id("ferrule-bridge")
        .sasl_acceptor(sasl)
        .build();
    // The application's flow frames, read on the way in: the links' credit.
    let credits = Arc::new(Credits::default());
    let stream = FlowTap::new(stream, credits.clone());
    let mut connection = acceptor.accept(stream).await?;
    let Some(app) = identity.get().cloned() else {
        anyhow::bail!("connection without a verified application");
    };
    tracing::debug!(tenant = %app.tenant_id, app = %app.app_id, "application connected");
    let sessions = SessionAcceptor::new();
    let stop = shutdown.clone();
    loop {
        tokio::select! {
            s = sessions.accept(&mut connection) => match s {
                Ok(session) => {
                    let (app, ctx, credits) = (app.clone(), ctx.clone(), credits.clone());
                    tokio::spawn(serve_session(session, app, ctx, credits, stop.clone()));
                }
                Err(_) => break,
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        }
    }
    let _ = connection.close().await;
    Ok(())
}

/// The address an attaching peer names: the source for its receivers, the target for its
/// senders.
fn attach_address(attach: &Attach) -> Option<String> {
    use fe2o3_amqp::types::definitions::Role;
    use fe2o3_amqp::types::messaging::TargetArchetype;
    match attach.role {
        Role::Receiver => attach.source.as_ref()?.address.clone(),
        Role::Sender => match attach.target.as_deref()? {
            TargetArchetype::Target(t) => t.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        },
    }
}

async fn serve_session(
    mut session: ListenerSessionHandle,
    app: AuthenticatedApplication,
    ctx: Context,
    credits: Arc<Credits>,
    shutdown: watch::Receiver<bool>,
) {
    // A sending link's deliveries count from 0 (what `credit.rs` assumes).
    let links = LinkAcceptor::builder().initial_delivery_count(0).build();
    while let Some(attach) = session.next_incoming_attach().await {
        let address = attach_address(&attach).and_then(|a| Address::parse(&a));
        let format = PayloadFormat::of(&attach);
        // Hono's Event API: an event receiver must let the bridge send unsettled (at-least-once).
        let presettled_events = matches!(address, Some(Address::Event { .. }))
            && attach.snd_settle_mode == SenderSettleMode::Settled;
        let start = match &address {
            Some(a @ (Address::Telemetry { tenant } | Address::Event { tenant }))
                if *tenant == app.tenant_id && !presettled_events =>
            {
                let telemetry = matches!(a, Address::Telemetry { .. });
                let kind = if telemetry {
                    TopicKind::Telemetry
                } else {
                    TopicKind::Event
                };
                // The registry allows only tenant ids that make legal topic names.
                let topic = ctx.names.name(kind, tenant).unwrap_or_default();
                // Applications usually attach before their devices send: with the topic made
                // now, the link's consumer group forms around its partitions rather than
                // re-forming when the first record creates the topic.
                if let Err(e) = ensure_topic(&ctx, tenant, &topic).await {
                    tracing::debug!(error = %e, topic, "topic not created at attach");
                }
                // Telemetry starts where the log ends now, before the application learns that
                // it is attached and may expect what is sent from then on.
                if telemetry {
                    StartAtAttach::record(&ctx.kafka, &topic).await
                } else {
                    StartAtAttach::default()
                }
            }
            // Responses too: one written after the attach, even right after it, is delivered.
            Some(Address::CommandResponse { tenant, .. }) if *tenant == app.tenant_id => {
                let topic = ctx
                    .names
                    .name(TopicKind::CommandResponse, tenant)
                    .unwrap_or_default();
                if let Err(e) = ensure_topic(&ctx, tenant, &topic).await {
                    tracing::warn!(error = %e, topic, "response topic not ready at attach");
                }
                StartAtAttach::record(&ctx.kafka, &topic).await
            }
            _ => StartAtAttach::default(),
        };
        let endpoint = match links.accept_incoming_attach(attach, &mut session).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = ?e, "link attach failed");
                continue;
            }
        };
        let refusal = match &address {
            None => Some((AmqpError::NotFound, "unknown address".to_owned())),
            Some(a) if a.tenant() != app.tenant_id => Some((
                AmqpError::UnauthorizedAccess,
                format!(
                    "application of tenant `{}` may not use `{}`",
                    app.tenant_id,
                    a.tenant()
                ),
            )),
            Some(_) if presettled_events => Some((
                AmqpError::NotAllowed,
                "events are delivered unsettled only (at least once)".to_owned(),
            )),
            Some(_) if format.is_err() => Some((
                AmqpError::InvalidField,
                format.clone().err().unwrap_or_default(),
            )),
            Some(_) => None,
        };
        match (endpoint, address, refusal) {
            (LinkEndpoint::Sender(sender), _, Some((condition, why))) => {
                let _ = sender.close_with_error(error(condition, why)).await;
            }
            (LinkEndpoint::Receiver(receiver), _, Some((condition, why))) => {
                let _ = receiver.close_with_error(error(condition, why)).await;
            }
            (LinkEndpoint::Sender(sender), Some(Address::Telemetry { tenant }), None) => {
                let credit = credits.link(sender.name(), &tenant, "telemetry");
                tokio::spawn(stream_to(
                    sender,
                    "telemetry",
                    format.clone().unwrap_or_default(),
                    tenant,
                    credit,
                    start,
                    ctx.clone(),
                    shutdown.clone(),
                ));
            }
            (LinkEndpoint::Sender(sender), Some(Address::Event { tenant }), None) => {
                let credit = credits.link(sender.name(), &tenant, "event");
                tokio::spawn(stream_to(
                    sender,
                    "event",
                    format.clone().unwrap_or_default(),
                    tenant,
                    credit,
                    start,
                    ctx.clone(),
                    shutdown.clone(),
                ));
            }
            (
                LinkEndpoint::Sender(sender),
                Some(Address::CommandResponse { tenant, reply_id }),
                None,
            ) => {
                let stop = shutdown.clone();
                tokio::spawn(responses_to(
                    sender,
                    tenant,
                    reply_id,
                    start,
                    ctx.clone(),
                    stop,
                ));
            }
            (LinkEndpoint::Receiver(receiver), Some(Address::Command { tenant }), None) => {
                let stop = shutdown.clone();
                tokio::spawn(commands_from(receiver, tenant, ctx.clone(), stop));
            }
            (LinkEndpoint::Sender(sender), _, None) => {
                let why =
                    "applications receive from telemetry, event or command_response".to_owned();
                let _ = sender
                    .close_with_error(error(AmqpError::NotAllowed, why))
                    .await;
            }
            (LinkEndpoint::Receiver(receiver), _, None) => {
                let why = "applications send to command/<tenant> only".to_owned();
                let _ = receiver
                    .close_with_error(error(AmqpError::NotAllowed, why))
                    .await;
            }
        }
    }
}

/// Closes a link the bridge cannot serve because Kafka failed it.
async fn refuse(sender: Sender, e: impl std::fmt::Display) {
    let _ = sender
        .close_with_error(error(AmqpError::InternalError, e.to_string()))
        .await;
}

/// Every refusal the bridge sends is counted by its condition.
fn error(condition: AmqpError, description: String) -> AmqpErrorInfo {
    crate::metrics::refused(match condition {
        AmqpError::UnauthorizedAccess => "unauthorized-access",
        AmqpError::NotFound => "not-found",
        AmqpError::NotAllowed => "not-allowed",
        AmqpError::InvalidField => "malformed-command",
        _ => "internal-error",
    });
    AmqpErrorInfo::new(condition, Some(description), None)
}

/// How long a link's consumer waits before fetching again when its prefetch queue was full.
const PREFETCH_BACKOFF_MS: &str = "5";

/// Events sent and not yet settled by the application, per link.
const UNSETTLED: usize = 256;

/// Where a new consumer group of a telemetry link starts: the end of each partition as it was
/// when the link attached. With `auto.offset.reset=latest` alone, a group starts at the end as
/// it is once its partitions are assigned, and telemetry sent while the group forms is missed.
#[derive(Default)]
struct StartAtAttach {
    /// Partition → end offset at attach; `None` keeps the group's committed offsets or reset.
    ends: Option<std::collections::HashMap<i32, i64>>,
    /// The link consumer's statistics, as metrics (set when the consumer is built).
    stats: Option<ferrule_kafka::Stats>,
}

impl StartAtAttach {
    /// Reads the end of every partition of `topic`; a topic that does not exist yet is created
    /// later, so all its records come after the attach.
    async fn record(kafka: &KafkaConfig, topic: &str) -> Self {
        let owned = topic.to_owned();
        let probe: Option<rdkafka::consumer::BaseConsumer> = kafka.consumer().create().ok();
        let ends = tokio::task::spawn_blocking(move || {
            let timeout = std::time::Duration::from_secs(5);
            let probe = probe?;
            let topic = owned;
            let md = probe.fetch_metadata(Some(&topic), timeout).ok()?;
            let t = md.topics().first()?;
            let mut ends = std::collections::HashMap::new();
            if t.error()
                == Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
            {
                return Some(ends);
            }
            for p in 0..t.partitions().len() as i32 {
                ends.insert(p, probe.fetch_watermarks(&topic, p, timeout).ok()?.1);
            }
            Some(ends)
        })
        .await
        .ok()
        .flatten();
        // Unknown (the broker did not answer): the group's own reset rule applies.
        tracing::debug!(?ends, topic, "the link starts at the attach-time end");
        StartAtAttach { ends, stats: None }
    }
}

impl rdkafka::client::ClientContext for StartAtAttach {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(stats) = &self.stats {
            stats.record(&statistics);
        }
    }
}

impl rdkafka::consumer::ConsumerContext for StartAtAttach {
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(ends) = &self.ends {
                    let timeout = std::time::Duration::from_secs(5);
                    // Partitions the group never committed start at the attach-time end.
                    if let Ok(committed) = consumer.committed_offsets(tpl.clone(), timeout) {
                        for e in committed.elements() {
                            if e.offset() != rdkafka::Offset::Invalid {
                                continue;
                            }
                            let start = ends
                                .get(&e.partition())
                                .map_or(rdkafka::Offset::Beginning, |o| {
                                    rdkafka::Offset::Offset(*o)
                                });
                            let _ = tpl.set_partition_offset(e.topic(), e.partition(), start);
                        }
                    }
                }
                tracing::debug!(?tpl, "assigning partitions");
                if let Err(e) = consumer.assign(tpl) {
                    tracing::warn!(error = %e, "assigning partitions failed");
                }
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::debug!("revoking partitions");
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "revoking partitions failed");
                }
            }
            other => tracing::warn!(error = ?other, "rebalance failed"),
        }
    }
}

/// Feeds one application receiver from `hono.<kind>.<tenant>`. Links of one tenant share a
/// consumer group, so they compete for the records; a record is read only once the previous
/// one could be sent, so the application's credit paces Kafka consumption.
///
/// Telemetry is at most once: sent and forgotten, offsets committed as read, a new group
/// starts at the end the log had when the link attached (`start`). Events are at least
/// once: a new group starts at the beginning, and an event's offset is stored only when the
/// application settled it `accepted` (or `rejected`: it will never take it); at the first
/// `released` or `modified` the link stops, so that event and the ones after it come again
/// on the next attach.
#[allow(clippy::too_many_arguments)]
async fn stream_to(
    mut sender: Sender,
    kind: &'static str,
    format: PayloadFormat,
    tenant: String,
    credit: Arc<LinkCredit>,
    start: StartAtAttach,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) {
    let events = kind == "event";
    let topic_kind = if events {
        TopicKind::Event
    } else {
        TopicKind::Telemetry
    };
    let topic = ctx.names.name(topic_kind, &tenant).unwrap_or_default();
    let group = format!("ferrule-bridge.{kind}.{tenant}");
    let start = StartAtAttach {
        stats: Some(ferrule_kafka::Stats::consumer("bridge", group.clone())),
        ..start
    };
    let consumer: StreamConsumer<StartAtAttach> = match ctx
        .kafka
        .consumer()
        .with_statistics()
        .set("group.id", group)
        .set(
            "auto.offset.reset",
            if events { "earliest" } else { "latest" },
        )
        .set(
            "enable.auto.offset.store",
            if events { "false" } else { "true" },
        )
        .set("auto.commit.interval.ms", "1000")
        // Members learn of a rebalance at their next heartbeat: a newly attached link gets its
        // share of the partitions within about a second rather than three.
        .set("heartbeat.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .set(
            "queued.max.messages.kbytes",
            ctx.cfg.prefetch_kbytes.to_string(),
        )
        // A full prefetch queue postpones the next fetch by this much (librdkafka's default
        // is a second): with the default, a link drained its 1 MiB and then waited, ~21k
        // messages/s whatever the application took.
        .set("fetch.queue.backoff.ms", PREFETCH_BACKOFF_MS)
        .set(
            "fetch.wait.max.ms",
            ctx.kafka.consumer_fetch_wait_ms.to_string(),
        )
        .create_with_context(start)
    {
        Ok(c) => c,
        Err(e) => return refuse(sender, e).await,
    };
    if let Err(e) = consumer.subscribe(&[&topic]) {
        return refuse(sender, e).await;
    }
    type Settled = ((i32, i64), Result<Outcome, fe2o3_amqp::link::SendError>);
    let mut unsettled: FuturesOrdered<BoxFuture<'static, Settled>> = FuturesOrdered::new();
    let mut detached = false;
    let mut gauges = crate::metrics::LinkGauges::new(&tenant, kind);
    loop {
        gauges.unsettled(unsettled.len());
        credit.set_unsettled(unsettled.len());
        tokio::select! {
            r = consumer.recv(), if unsettled.len() < UNSETTLED => {
                let record = match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, topic, "bridge consumer error");
                        continue;
                    }
                };
                let mut headers = header_list(&record);
                let span = delivery_span(&ctx.tracer, kind, &tenant, &headers);
                let mut payload = record.payload().unwrap_or_default();
                let restored = match format {
                    PayloadFormat::AsSent => {
                        payload::as_sent(&ctx.registry, &tenant, &headers, payload).await
                    }
                    PayloadFormat::Avro => Ok(None),
                };
                let restored = match restored {
                    Ok(r) => r,
                    Err(e) => {
                        crate::metrics::undecodable(&tenant, kind);
                        tracing::warn!(error = e, tenant, "record not decoded from Avro; delivered as stored");
                        None
                    }
                };
                if let Some((json, source_ct)) = &restored {
                    payload::restore_headers(&mut headers, source_ct);
                    payload = json;
                }
                // The application continues the delivery's span, else the record's trace.
                let trace = span.context();
                let message = crate::message::downstream(
                    kind,
                    &tenant,
                    trace_headers(trace.as_ref()).chain(headers.iter().copied()),
                    payload,
                );
                let position = (record.partition(), record.offset());
                // Waits for the application's credit.
                let send = sender.send_batchable(message);
                tokio::pin!(send);
                let sent = match (&mut send).now_or_never() {
                    Some(sent) => sent,
                    None => {
                        let _waiting = gauges.waiting();
                        send.await
                    }
                };
                if sent.is_ok() {
                    credit.sent();
                }
                match sent {
                    Ok(settled) if events => {
                        unsettled.push_back(Box::pin(async move {
                            let outcome = settled.await;
                            end_delivery(span, &outcome);
                            (position, outcome)
                        }));
                    }
                    Ok(_) => {
                        span.set_attribute(KeyValue::new("disposition", "pre-settled"));
                        span.end();
                    }
                    Err(_) => {
                        span.fail("the application's link detached");
                        detached = true;
                        break;
                    }
                }
            }
            Some(((partition, offset), outcome)) = unsettled.next(), if !unsettled.is_empty() => {
                match outcome {
                    Ok(Outcome::Accepted(_) | Outcome::Rejected(_)) => {
                        if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                            tracing::debug!(error = %e, "event offset not stored");
                        }
                    }
                    _ => break,
                }
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            _ = sender.on_detach() => {
                detached = true;
                break;
            }
        }
    }
    // Nothing more is sent: the link's credit is no longer exported.
    drop(credit);
    if events {
        // Settlements that arrived with the detach still count, in order.
        while let Some(Some(((partition, offset), outcome))) = unsettled.next().now_or_never() {
            match outcome {
                Ok(Outcome::Accepted(_) | Outcome::Rejected(_)) => {
                    let _ = consumer.store_offset(&topic, partition, offset);
                }
                _ => break,
            }
        }
    }
    // The synchronous commit and the consumer's close (it leaves its group) block for a
    // round trip or more: off the runtime, whose worker serves other links meanwhile.
    let closing = tokio::task::spawn_blocking(move || {
        if events {
            let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        }
        drop(consumer);
    });
    if !detached {
        let _ = sender.close().await;
    }
    let _ = closing.await;
}

/// Commands of one link written to Kafka and not yet settled; beyond this the bridge reads no
/// more of the link, and the application's credit runs out.
const UNSETTLED_COMMANDS: usize = 256;

/// How one command ends for the application: the disposition and why.
type Settlement = (Disposition, String);

/// Takes an application's commands from its sender on `command/<tenant>` (Hono's AMQP APIs) and settles
/// each by its fate: a malformed one is `rejected` at once; one written to
/// `hono.command.<tenant>` stays unsettled until the router or gateway reports it — `accepted`
/// once it reached the device, `released` when the device is not connected, did not
/// acknowledge it in time or Kafka did not take it, `rejected` for an unknown device.
/// Responses of request/response commands come back on the application's
/// `command_response/<tenant>/<replyId>` receiver.
async fn commands_from(
    mut receiver: fe2o3_amqp::link::Receiver,
    tenant: String,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) {
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;
    let mut settling: FuturesUnordered<BoxFuture<'static, (DeliveryInfo, Settlement)>> =
        FuturesUnordered::new();
    // The command topic exists before the first command is written (or, with
    // `kafka.create_topics = false`, is known to be missing: then each command is released).
    if let Ok(topic) = ctx.names.name(TopicKind::Command, &tenant)
        && let Err(e) = ensure_topic(&ctx, &tenant, &topic).await
    {
        tracing::warn!(error = %e, topic, "command topic not ready");
    }
    loop {
        tokio::select! {
            d = receiver.recv::<Body<Value>>(), if settling.len() < UNSETTLED_COMMANDS => {
                let Ok(delivery) = d else {
                    return;
                };
                let info = DeliveryInfo::from(&delivery);
                match write_command(&ctx, &tenant, delivery.message()) {
                    Ok(fate) => settling.push(Box::pin(async move { (info, fate.await) })),
                    Err(settlement) => settle(&receiver, info, settlement).await,
                }
            }
            Some((info, settlement)) = settling.next(), if !settling.is_empty() => {
                settle(&receiver, info, settlement).await;
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        }
    }
    let _ = receiver.close().await;
}

/// Checks an application's command and hands it to the producer, asking for its outcome; the
/// future tells how to settle it. A malformed command or a full producer settles at once.
fn write_command(
    ctx: &Context,
    tenant: &str,
    message: &fe2o3_amqp::types::messaging::Message<
        fe2o3_amqp::types::messaging::Body<fe2o3_amqp::types::primitives::Value>,
    >,
) -> Result<BoxFuture<'static, Settlement>, Settlement> {
    use ferrule_schemas::headers as h;
    use rdkafka::message::{Header, OwnedHeaders};
    let command = crate::command::parse_command(tenant, message)
        .map_err(|why| (Disposition::Rejected, why))?;
    let correlation = command
        .reply
        .as_ref()
        .map(|(reply, id)| crate::command::kafka_correlation(reply, id));
    let expected = ctx.outcomes.expect();
    let mut fields = vec![
        (h::DEVICE_ID, command.device_id.as_str()),
        (h::SUBJECT, command.subject.as_str()),
    ];
    fields.extend(
        command
            .content_type
            .as_deref()
            .map(|ct| (h::CONTENT_TYPE, ct)),
    );
    if let Some(cid) = &correlation {
        fields.extend([(h::RESPONSE_REQUIRED, "true"), (h::CORRELATION_ID, cid)]);
    }
    if let Some(t) = &command.trace {
        fields.push((h::TRACEPARENT, &t.traceparent));
        fields.extend(t.tracestate.as_deref().map(|s| (h::TRACESTATE, s)));
    }
    fields.extend(expected.route.command_headers());
    let headers = fields.iter().fold(
        OwnedHeaders::new_with_capacity(fields.len()),
        |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: Some(*v),
            })
        },
    );
    let topic = ctx
        .names
        .name(TopicKind::Command, tenant)
        .map_err(|e| (Disposition::Rejected, e.to_string()))?;
    let record = FutureRecord::to(&topic)
        .key(command.device_id.as_str())
        .headers(headers)
        .payload(command.payload.as_slice());
    // Enqueued here, in the order the application sent its commands.
    let written = ctx.producer.send_result(record).map_err(|(e, _)| {
        tracing::debug!(error = %e, "command not written to Kafka");
        (Disposition::Released, format!("not written to Kafka: {e}"))
    })?;
    Ok(Box::pin(async move {
        match written.await {
            Ok(Ok(_)) => expected.settled().await,
            Ok(Err((e, _))) => (Disposition::Released, format!("not written to Kafka: {e}")),
            Err(_) => (Disposition::Released, "the producer stopped".into()),
        }
    }))
}

/// Settles one command transfer; each disposition is counted.
async fn settle(
    receiver: &fe2o3_amqp::link::Receiver,
    info: DeliveryInfo,
    (disposition, why): Settlement,
) {
    crate::metrics::command_settled(disposition);
    let _ = match disposition {
        Disposition::Accepted => receiver.accept(info).await,
        Disposition::Released => {
            tracing::debug!(why, "command released");
            receiver.release(info).await
        }
        Disposition::Rejected => {
            receiver
                .reject(info, error(AmqpError::InvalidField, why))
                .await
        }
    };
}

/// Feeds an application's `command_response/<tenant>/<replyId>` receiver: every response of the
/// tenant from now on is read, and the ones made for commands this reply id sent are delivered
/// with the properties of Hono's AMQP Command & Control API. Reads from the end of each partition, assigned directly (no group),
/// so nothing written after the attach is missed.
async fn responses_to(
    mut sender: Sender,
    tenant: String,
    reply_id: String,
    start: StartAtAttach,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) {
    use ferrule_schemas::headers as h;
    let topic = ctx
        .names
        .name(TopicKind::CommandResponse, &tenant)
        .unwrap_or_default();
    let consumer = match response_consumer(&ctx, &tenant, &topic, start).await {
        Ok(c) => c,
        Err(e) => return refuse(sender, e).await,
    };
    loop {
        let record = tokio::select! {
            r = consumer.recv() => r,
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            _ = sender.on_detach() => return,
        };
        let Ok(record) = record else {
            continue;
        };
        let headers = header_list(&record);
        let text = |name: &str| h::first(headers.iter().copied(), name).and_then(h::decode_str);
        let num = |name: &str| h::first(headers.iter().copied(), name).and_then(h::decode_i64);
        let Some((reply, correlation)) =
            text(h::CORRELATION_ID).and_then(crate::command::parse_kafka_correlation)
        else {
            continue;
        };
        if reply != reply_id {
            continue;
        }
        let message = crate::command::response_message(
            &tenant,
            text(h::DEVICE_ID).unwrap_or_default(),
            num(h::STATUS)
                .and_then(|s| i32::try_from(s).ok())
                .unwrap_or(500),
            correlation,
            text(h::CONTENT_TYPE),
            num(h::CREATION_TIME).unwrap_or_else(h::now_millis),
            record.payload().unwrap_or_default(),
        );
        let trace = ferrule_telemetry::TraceContext::of(text(h::TRACEPARENT), text(h::TRACESTATE));
        let message = crate::command::with_trace(message, trace.as_ref());
        if sender.send_batchable(message).await.is_err() {
            return;
        }
    }
    let _ = sender.close().await;
}

/// Creates a tenant topic the way the gateways do (with the tenant's partitions and
/// replication), unless it exists; with `kafka.create_topics = false`, checks that it does.
async fn ensure_topic(ctx: &Context, tenant: &str, topic: &str) -> anyhow::Result<()> {
    if ctx.topics.is_known(topic) {
        return Ok(());
    }
    let t = ctx.registry.tenant(tenant).await?;
    let spec = ctx
        .topics
        .tenant_spec(t.as_ref().as_ref().and_then(|t| t.ext.as_ref()));
    ctx.topics.ensure(topic, spec).await?;
    Ok(())
}

/// A consumer assigned to the end of every partition of `topic`, which is created first when
/// nothing was ever written to it.
async fn response_consumer(
    ctx: &Context,
    tenant: &str,
    topic: &str,
    start: StartAtAttach,
) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ctx
        .kafka
        .consumer()
        .set(
            "group.id",
            format!("ferrule-bridge.responses.{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set(
            "queued.max.messages.kbytes",
            ctx.cfg.prefetch_kbytes.to_string(),
        )
        .set("fetch.queue.backoff.ms", PREFETCH_BACKOFF_MS)
        .set(
            "fetch.wait.max.ms",
            ctx.kafka.consumer_fetch_wait_ms.to_string(),
        )
        .create()?;
    let ends = start.ends.unwrap_or_default();
    // The partitions read at the attach; only when there were none to read (the broker did
    // not answer, or the topic was not there yet) are they looked up again.
    let partitions = match ends.len() {
        0 => partitions_of(ctx, tenant, topic).await?,
        n => n,
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions as i32 {
        // Where the log ended at the attach; a partition unknown then starts at its end now.
        let from = ends
            .get(&p)
            .map_or(rdkafka::Offset::End, |o| rdkafka::Offset::Offset(*o));
        tpl.add_partition_offset(topic, p, from)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// The partitions of a tenant's `topic`, once it exists (made first where Ferrule may).
async fn partitions_of(ctx: &Context, tenant: &str, topic: &str) -> anyhow::Result<usize> {
    if let Err(e) = ensure_topic(ctx, tenant, topic).await {
        tracing::warn!(error = %e, topic, "topic not ready");
    }
    // Metadata requests block: they run on a blocking thread, with a client of their own.
    let probe: rdkafka::consumer::BaseConsumer = ctx.kafka.consumer().create()?;
    let name = topic.to_owned();
    let partitions = tokio::task::spawn_blocking(move || {
        let timeout = std::time::Duration::from_secs(5);
        for _ in 0..20 {
            let md = probe.fetch_metadata(Some(&name), timeout)?;
            let n = md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if n > 0 {
                return Ok(n);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::Ok(0)
    })
    .await??;
    anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
    Ok(partitions)
}

/// The span of one record's delivery to an application, under the record's trace context.
fn delivery_span(
    tracer: &ferrule_telemetry::Tracer,
    kind: &'static str,
    tenant: &str,
    headers: &[(&str, Option<&[u8]>)],
) -> ferrule_telemetry::Span {
    if !tracer.is_on() {
        return ferrule_telemetry::Span::none();
    }
    let text = |name: &str| h::first(headers.iter().copied(), name).and_then(h::decode_str);
    let parent = ferrule_telemetry::TraceContext::of(text(h::TRACEPARENT), text(h::TRACESTATE));
    let name = match kind {
        "event" => "deliver event",
        _ => "deliver telemetry",
    };
    let span = tracer.start(name, SpanKind::Producer, parent.as_ref(), None, Vec::new);
    span.describe(|| {
        vec![
            KeyValue::new("tenant_id", tenant.to_owned()),
            KeyValue::new(
                "device_id",
                text(h::DEVICE_ID).unwrap_or_default().to_owned(),
            ),
            KeyValue::new("messaging.system", "amqp"),
            KeyValue::new("messaging.destination.name", format!("{kind}/{tenant}")),
        ]
    });
    span
}

/// The trace context headers that go first, so they win over the record's own.
fn trace_headers(
    trace: Option<&ferrule_telemetry::TraceContext>,
) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
    let parent = trace.map(|t| (h::TRACEPARENT, Some(t.traceparent.as_bytes())));
    let state = trace
        .and_then(|t| t.tracestate.as_deref())
        .map(|s| (h::TRACESTATE, Some(s.as_bytes())));
    parent.into_iter().chain(state)
}

/// Ends an event's delivery span with the application's disposition.
fn end_delivery(
    span: ferrule_telemetry::Span,
    outcome: &Result<Outcome, fe2o3_amqp::link::SendError>,
) {
    let disposition = match outcome {
        Ok(Outcome::Accepted(_)) => "accepted",
        Ok(Outcome::Rejected(_)) => "rejected",
        Ok(Outcome::Released(_)) => "released",
        Ok(Outcome::Modified(_)) => "modified",
        Err(_) => "aborted",
    };
    span.set_attribute(KeyValue::new("disposition", disposition));
    if disposition != "accepted" {
        span.fail(format!("the application's disposition: {disposition}"));
    }
    span.end();
}

/// A record's headers in order, as the schemas' header functions take them.
fn header_list<'a>(
    record: &'a rdkafka::message::BorrowedMessage<'_>,
) -> Vec<(&'a str, Option<&'a [u8]>)> {
    record
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default()
}
