//! One application connection: SASL, then sessions, then links. A receiver link on the
//! application's own `telemetry/<tenant>` or `event/<tenant>` is fed from Kafka; any other
//! address is refused with `amqp:unauthorized-access` (another tenant) or
//! `amqp:not-found` (unknown), and never sees data.

use crate::BridgeConfig;
use crate::address::Address;
use crate::sasl::ApplicationSasl;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::Sender;
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorInfo, SenderSettleMode};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::types::performatives::Attach;
use ferrule_registry::{AuthenticatedApplication, DeviceAuthenticator};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use tokio::sync::watch;

#[derive(Clone)]
pub(crate) struct Context {
    pub cfg: BridgeConfig,
    pub bootstrap: String,
    pub registry: DeviceAuthenticator,
}

pub(crate) async fn run(
    stream: tokio::net::TcpStream,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let sasl = ApplicationSasl::new(ctx.registry.clone());
    let identity = sasl.identity.clone();
    let acceptor = ConnectionAcceptor::builder()
        .container_id("ferrule-bridge")
        .sasl_acceptor(sasl)
        .build();
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
                    tokio::spawn(serve_session(session, app.clone(), ctx.clone(), stop.clone()));
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
    shutdown: watch::Receiver<bool>,
) {
    let links = LinkAcceptor::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let address = attach_address(&attach).and_then(|a| Address::parse(&a));
        // §2.2: an event receiver must let the bridge send unsettled (at-least-once).
        let presettled_events = matches!(address, Some(Address::Event { .. }))
            && attach.snd_settle_mode == SenderSettleMode::Settled;
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
                tokio::spawn(stream_to(
                    sender,
                    "telemetry",
                    tenant,
                    ctx.clone(),
                    shutdown.clone(),
                ));
            }
            (LinkEndpoint::Sender(sender), Some(Address::Event { tenant }), None) => {
                tokio::spawn(stream_to(
                    sender,
                    "event",
                    tenant,
                    ctx.clone(),
                    shutdown.clone(),
                ));
            }
            (LinkEndpoint::Sender(sender), _, None) => {
                let why = "not served by this bridge yet".to_owned();
                let _ = sender
                    .close_with_error(error(AmqpError::NotImplemented, why))
                    .await;
            }
            (LinkEndpoint::Receiver(receiver), _, None) => {
                let why = "commands are not served by this bridge yet".to_owned();
                let _ = receiver
                    .close_with_error(error(AmqpError::NotImplemented, why))
                    .await;
            }
        }
    }
}

fn error(condition: AmqpError, description: String) -> AmqpErrorInfo {
    AmqpErrorInfo::new(condition, Some(description), None)
}

/// Events sent and not yet settled by the application, per link.
const UNSETTLED: usize = 256;

/// Feeds one application receiver from `hono.<kind>.<tenant>`. Links of one tenant share a
/// consumer group, so they compete for the records; a record is read only once the previous
/// one could be sent, so the application's credit paces Kafka consumption.
///
/// Telemetry is at most once: sent and forgotten, offsets committed as read, a new group
/// starts at the end of the log. Events are at least once: a new group starts at the
/// beginning, and an event's offset is stored only when the application settled it
/// `accepted` (or `rejected`: it will never take it); at the first `released` or `modified`
/// the link stops, so that event and the ones after it come again on the next attach.
async fn stream_to(
    mut sender: Sender,
    kind: &'static str,
    tenant: String,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) {
    let events = kind == "event";
    let topic = format!("hono.{kind}.{tenant}");
    let consumer: StreamConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &ctx.bootstrap)
        .set("group.id", format!("ferrule-bridge.{kind}.{tenant}"))
        .set(
            "auto.offset.reset",
            if events { "earliest" } else { "latest" },
        )
        .set(
            "enable.auto.offset.store",
            if events { "false" } else { "true" },
        )
        .set("auto.commit.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .set(
            "queued.max.messages.kbytes",
            ctx.cfg.prefetch_kbytes.to_string(),
        )
        .set("log_level", "3")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = sender
                .close_with_error(error(AmqpError::InternalError, e.to_string()))
                .await;
            return;
        }
    };
    if let Err(e) = consumer.subscribe(&[&topic]) {
        let _ = sender
            .close_with_error(error(AmqpError::InternalError, e.to_string()))
            .await;
        return;
    }
    type Settled = ((i32, i64), Result<Outcome, fe2o3_amqp::link::SendError>);
    let mut unsettled: FuturesOrdered<BoxFuture<'static, Settled>> = FuturesOrdered::new();
    let mut detached = false;
    loop {
        tokio::select! {
            r = consumer.recv(), if unsettled.len() < UNSETTLED => {
                let record = match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, topic, "bridge consumer error");
                        continue;
                    }
                };
                let headers: Vec<(&str, Option<&[u8]>)> = record
                    .headers()
                    .map(|hs| hs.iter().map(|h| (h.key, h.value)).collect())
                    .unwrap_or_default();
                let message = crate::message::downstream(
                    kind,
                    &tenant,
                    headers.iter().copied(),
                    record.payload().unwrap_or_default(),
                );
                let position = (record.partition(), record.offset());
                // Waits for the application's credit.
                match sender.send_batchable(message).await {
                    Ok(settled) if events => {
                        unsettled.push_back(Box::pin(async move { (position, settled.await) }));
                    }
                    Ok(_) => {}
                    Err(_) => {
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
        let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    }
    if !detached {
        let _ = sender.close().await;
    }
}
