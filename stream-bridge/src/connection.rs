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
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorInfo};
use fe2o3_amqp::types::performatives::Attach;
use ferrule_registry::{AuthenticatedApplication, DeviceAuthenticator};
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

/// Feeds one application receiver from `hono.<kind>.<tenant>`. Links of one tenant share a
/// consumer group, so they compete for the records; the next record is read only once the
/// previous one could be sent, so the application's credit paces Kafka consumption.
async fn stream_to(
    mut sender: Sender,
    kind: &'static str,
    tenant: String,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) {
    let topic = format!("hono.{kind}.{tenant}");
    let consumer: StreamConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &ctx.bootstrap)
        .set("group.id", format!("ferrule-bridge.{kind}.{tenant}"))
        .set("auto.offset.reset", "latest")
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
    loop {
        let record = tokio::select! {
            r = consumer.recv() => r,
            _ = shutdown.wait_for(|s| *s) => break,
            _ = sender.on_detach() => return,
        };
        let record = match record {
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
        // Waits for credit; the outcome is not awaited (at-most-once for telemetry).
        if sender.send_batchable(message).await.is_err() {
            return;
        }
    }
    let _ = sender.close().await;
}
