//! PUBLISH from a device: translated into an upload or a command response for the pipeline,
//! handed to the producer, and answered in order once the broker acknowledged it.

use super::ADAPTER;
use super::acks::Waiting;
use super::codec::PublishRequest;
use super::connection::{ConnectionError, Served};
use super::errors::{OnError, publish_failed};
use super::topic;
use crate::commands::CommandHub;
use crate::pipeline::{
    Accepted, DeviceResponse, IngestPipeline, Origin, Qos, Refusal, SubmitNow, Upload,
};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite};

/// What answering a publish needs once its outcome is known.
pub(super) struct PublishContext {
    pub(super) pkid: u16,
    pub(super) qos1: bool,
    pub(super) on_error: OnError,
    /// `telemetry`, `t`, `event` or `e`, as the device wrote it.
    pub(super) endpoint: std::borrow::Cow<'static, str>,
    /// The property-bag `correlation-id`, if the device gave one.
    pub(super) correlation_id: Option<String>,
    /// The edge device a gateway sent for; `None`: the sender itself.
    pub(super) device: Option<String>,
}

impl PublishContext {
    /// What the error message calls the publish: the device's correlation id, else the packet
    /// id (QoS 1), else `-1`. Computed only when an error is reported.
    pub(super) fn correlation(&self) -> String {
        match (&self.correlation_id, self.qos1) {
            (Some(c), _) => c.clone(),
            (None, true) => self.pkid.to_string(),
            (None, false) => "-1".to_owned(),
        }
    }
}

/// The endpoint segment of a topic, without allocating for the usual ones.
pub(super) fn endpoint_of(topic: &str) -> std::borrow::Cow<'static, str> {
    match topic.split('/').next().unwrap_or_default() {
        "telemetry" => "telemetry".into(),
        "t" => "t".into(),
        "event" => "event".into(),
        "e" => "e".into(),
        other => other.to_owned().into(),
    }
}

/// A PUBLISH translated for the pipeline, or the failure to report for it.
pub(super) enum Prepared {
    Upload(PublishContext, Upload),
    Response(PublishContext, CommandHub, DeviceResponse, Accepted),
    Failed(PublishContext, Refusal),
}

/// Translates one PUBLISH (no I/O): a telemetry/event upload, a command response, or the
/// error to report. Whether it may be forwarded (size included) is the pipeline's decision.
pub(super) fn prepare_publish(
    origin: &Origin,
    hub: Option<&CommandHub>,
    p: PublishRequest,
) -> Prepared {
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
            return Prepared::Failed(ctx, Refusal::malformed(e.to_string()));
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
        trace: p.trace,
        received: None,
        notification: false,
    };
    Prepared::Upload(ctx, up)
}

/// Translates a PUBLISH to a command response topic (`command///res/...`).
pub(super) fn prepare_response(
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
        Err(e) => return Prepared::Failed(ctx, Refusal::malformed(e.to_string())),
    };
    let hub = match crate::commands::hub(hub) {
        Ok(hub) => hub.clone(),
        Err(e) => return Prepared::Failed(ctx, e),
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

/// Hands a prepared PUBLISH to the producer; returns what its answer waits for, or the
/// failure to report.
pub(super) async fn submit(
    pipeline: &IngestPipeline,
    prepared: Prepared,
) -> Result<(PublishContext, Waiting), (PublishContext, Refusal)> {
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

/// Hands a PUBLISH to the producer without waiting where the pipeline can; what is left to
/// do (ask the registry, report an error) comes back for [`publish`].
pub(super) fn publish_now<S>(
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
pub(super) async fn publish<S: AsyncRead + AsyncWrite + Unpin + Send>(
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
pub(super) fn answer_when_acked<S>(c: &mut Served<S>, ctx: PublishContext, waiting: Waiting) {
    match waiting {
        Waiting::Upload(p) if p.is_answerable_now() => {
            let _ = p.outcome().now_or_never();
        }
        waiting => c.in_flight.push(ctx, waiting),
    }
}
