//! Hono's error policy for a failed PUBLISH: the `on-error` property, the error topic a device
//! may subscribe to, and whether the connection is closed.

use super::ADAPTER;
use super::codec::Outbound;
use super::connection::{ConnectionError, Session};
use super::publish::PublishContext;
use crate::metrics;
use crate::pipeline::{IngestPipeline, Origin, Refusal};
use tokio::io::{AsyncRead, AsyncWrite};

/// What to do when a publish fails (the `on-error` property of the topic's property bag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnError {
    Default,
    Disconnect,
    Ignore,
    SkipAck,
}

/// Hono's error policy (its MQTT adapter guide). Terminal errors (the device, gateway, tenant
/// or adapter is not allowed, or the payload too large: the `terminal` column of the reason
/// table in `refusal.rs`) always disconnect. Otherwise, without
/// an error subscription `default`/`disconnect` disconnect; with one, the error is published
/// to it first and `default` acknowledges. `ignore` acknowledges, `skip-ack` does not.
pub(super) async fn publish_failed<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<S>,
    ctx: &PublishContext,
    errors: Option<&ErrorSubscription>,
    e: Refusal,
) -> Result<(), ConnectionError> {
    let codes = e.codes();
    metrics::rejected(ADAPTER.name(), codes.label);
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
    let closed = |e: Refusal| Err(ConnectionError::Closed(codes.disconnect, e.to_string()));
    let ack = match (codes.terminal, ctx.on_error) {
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
pub(super) struct ErrorSubscription {
    pub(super) prefix: String,
    pub(super) tenant: String,
    /// Empty (the device itself), `+` (any device of a gateway) or one device id.
    pub(super) device: String,
    /// The connection's own device id, for errors of its own messages.
    pub(super) own: String,
}

impl ErrorSubscription {
    /// `None` if `filter` is no error-topic filter (`error/[tenant]/[device]/#` or `e/…`);
    /// else the subscription, if the pipeline allows it.
    pub(super) fn subscribe(
        pipeline: &IngestPipeline,
        origin: &Origin,
        filter: &str,
    ) -> Option<Result<Self, Refusal>> {
        let (prefix, tenant, device) = Self::parse(filter)?;
        Some(
            pipeline
                .authorise_error_subscription(origin, tenant, device)
                .map(|own| ErrorSubscription {
                    prefix: prefix.to_owned(),
                    tenant: tenant.to_owned(),
                    device: device.to_owned(),
                    own,
                }),
        )
    }

    /// Whether `filter` names this subscription (UNSUBSCRIBE).
    pub(super) fn is_filter(&self, filter: &str) -> bool {
        Self::parse(filter).is_some_and(|(p, t, d)| {
            (p, t, d)
                == (
                    self.prefix.as_str(),
                    self.tenant.as_str(),
                    self.device.as_str(),
                )
        })
    }

    fn parse(filter: &str) -> Option<(&str, &str, &str)> {
        let mut parts = filter.split('/');
        let prefix = parts.next().filter(|p| matches!(*p, "error" | "e"))?;
        let (tenant, device) = (parts.next()?, parts.next()?);
        (parts.next() == Some("#") && parts.next().is_none()).then_some((prefix, tenant, device))
    }

    pub(super) fn topic_for(
        &self,
        device: &str,
        endpoint: &str,
        correlation_id: &str,
        status: u16,
    ) -> String {
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
