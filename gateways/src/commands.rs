//! Commands on the gateway side: this instance's id and heartbeat, the command subscriptions of
//! its connections (kept in the router's PostgreSQL state too), its internal command topic, and
//! the responses devices send back.

use crate::delivery::Progress;
use crate::kafka::{DownstreamSender, OutboundRecord};
use crate::pipeline::{AdapterType, DeviceResponse, IngestPipeline, Reason, Refusal};
use ferrule_registry::device_connection::{RoutingError, RoutingState};
use ferrule_schemas::TopicKind;
use ferrule_schemas::command::{RequestId, delivery_failure_body, response_headers};
use ferrule_schemas::content_type::DELIVERY_FAILURE_NOTIFICATION;
use ferrule_schemas::headers as h;
use ferrule_schemas::outcome::{DELIVERED, OutcomeRoute};
use ferrule_telemetry::{KeyValue, Span, SpanKind, TraceContext, Tracer};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// An upload that waits for a command: the long poll opened for it, and how its command
/// must name its device.
pub struct Polling {
    pub poll: LongPoll,
    /// The tenant of the device (or gateway) the poll is registered for.
    pub tenant: String,
    /// The device (or gateway) the poll is registered for.
    pub subscriber: String,
    /// Whether a gateway polls (for one of its devices or all of them).
    pub by_gateway: bool,
    /// The upload's metric, recorded once the poll ended (Hono's `ttd` tag).
    metric: Option<crate::pipeline::TtdMetric>,
}

impl Polling {
    /// The command, counted as delivered ([`LongPoll::wait`]), and whether the answer must
    /// name its device: a gateway's poll, or a command for another device than the
    /// subscriber.
    pub async fn wait(mut self) -> Option<(CommandDelivery, bool)> {
        let metric = self.metric.take();
        let (by_gateway, subscriber) = (self.by_gateway, self.subscriber);
        let cmd = self.poll.wait().await;
        Self::ended(metric, cmd.is_some());
        let cmd = cmd?;
        let named = by_gateway || cmd.device_id != subscriber;
        Some((cmd, named))
    }

    /// Like [`Self::wait`], with delivery left to the caller ([`LongPoll::take`]).
    pub async fn take(mut self) -> Option<(CommandDelivery, bool)> {
        let metric = self.metric.take();
        let (by_gateway, subscriber) = (self.by_gateway, self.subscriber);
        let cmd = self.poll.take().await;
        Self::ended(metric, cmd.is_some());
        let cmd = cmd?;
        let named = by_gateway || cmd.device_id != subscriber;
        Some((cmd, named))
    }

    fn ended(metric: Option<crate::pipeline::TtdMetric>, command: bool) {
        if let Some(m) = metric {
            m.record(command);
        }
    }
}

/// Uploads `up` for a device that may wait for a command (Hono's `hono-ttd`, HTTP and CoAP).
/// With a `requested` ttd (seconds, after the adapter's own cap) and commands enabled, the
/// pipeline authorises the sender and caps the ttd by the tenant's `max-ttd` (else
/// `default_max`); the long poll is opened before the upload, so an application reacting to
/// the ttd notification finds the route. A failed upload ends the poll again.
pub async fn upload_with_ttd(
    pipeline: &IngestPipeline,
    hub: Option<&CommandHub>,
    mut up: crate::pipeline::Upload,
    requested: Option<i64>,
    default_max: i64,
) -> Result<Option<Polling>, Refusal> {
    let requested = requested.filter(|t| *t > 0);
    let mut polling = None;
    up.ttd_secs = match (requested, hub) {
        (Some(requested), Some(hub)) => {
            let who = pipeline
                .authorise(up.adapter, &up.origin, up.target.as_ref())
                .await?;
            let ttd = who.effective_ttd_secs(up.adapter, requested, default_max);
            if let Some(ttd) = ttd {
                let ttd_time = Duration::from_secs(ttd.unsigned_abs());
                let poll = hub
                    .long_poll(up.adapter, &who.tenant_id, &who.device_id, ttd_time)
                    .await?;
                polling = Some(Polling {
                    poll,
                    tenant: who.tenant_id,
                    subscriber: who.device_id,
                    by_gateway: who.gateway_id.is_some(),
                    metric: None,
                });
            }
            ttd
        }
        (requested, _) => requested.map(|t| t.min(default_max)),
    };
    match &mut polling {
        // The upload counts once its poll ended, with what it came to.
        Some(p) => p.metric = Some(pipeline.upload_polled(up).await?.1),
        None => {
            pipeline.upload(up).await?;
        }
    }
    Ok(polling)
}

/// A command for a device connected to this instance.
#[derive(Debug, Clone)]
pub struct CommandDelivery {
    pub device_id: String,
    pub subject: String,
    /// `Some` for request/response commands.
    pub correlation_id: Option<String>,
    /// What the device echoes with its response ([`RequestId`]); `Some` for request/response
    /// commands.
    pub request_id: Option<String>,
    pub content_type: Option<String>,
    pub payload: Vec<u8>,
    /// Set on commands of the AMQP bridge, which settles the application's transfer by the
    /// outcome reported there.
    pub outcome: Option<OutcomeRoute>,
    /// What becomes of it (metrics and its `deliver command` span), reported once.
    pub progress: Progress,
}

/// Commands waiting for one connection; bounded, a full queue fails the command (503).
pub type CommandQueue = mpsc::Sender<CommandDelivery>;

/// Who holds a device's subscription: its token, its queue and its adapter's name.
type Subscriber = (SubscriptionToken, CommandQueue, &'static str);

/// How often this instance tells the router it is alive, at most: three times within the
/// instance timeout, so one late or lost beat does not make it dead.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// How often overdue request/response commands are answered with a timeout.
const SWEEP: Duration = Duration::from_millis(250);

/// Request/response commands one instance tracks at most; more fail at once with 503.
const MAX_AWAITING: usize = 65_536;

/// Identifies one subscription, so that ending an old one never ends a newer one for the
/// same device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionToken(u64);

/// The command side of one gateway instance; cheap to clone.
#[derive(Clone)]
pub struct CommandHub {
    inner: Arc<Inner>,
}

struct Inner {
    instance_id: String,
    routing: RoutingState,
    sender: Arc<DownstreamSender>,
    /// How long an application waits for a device's response to a request/response command.
    response_timeout: Duration,
    /// Spans of command deliveries and responses.
    tracer: Tracer,
    /// (tenant, device or gateway) → the connection or request holding the subscription.
    subscribers: Mutex<HashMap<(String, String), Subscriber>>,
    next_token: AtomicU64,
    /// Request/response commands handed to a device and not answered yet.
    awaiting: Mutex<AwaitingResponses>,
    /// Recently delivered commands by source (tenant, partition, offset): a rebalance or a
    /// second router may forward one twice, the device must see it once.
    seen: Mutex<RecentSet>,
}

/// A bounded set that forgets its oldest entries.
struct RecentSet {
    set: std::collections::HashSet<(String, i64, i64)>,
    order: std::collections::VecDeque<(String, i64, i64)>,
}

const RECENT: usize = 4096;
/// How long a command waits for room in its device's queue before the device counts as busy.
const BUSY_WAIT: Duration = Duration::from_secs(1);

impl RecentSet {
    /// `true` when `key` was new.
    fn insert(&mut self, key: (String, i64, i64)) -> bool {
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// An awaited command: its deadline slot, its device and the trace context its response
/// continues.
type Awaited = ((i64, u64), String, Option<TraceContext>);

/// Request/response commands waiting for the device's answer, by (tenant, correlation id),
/// and ordered by deadline so that overdue ones are found without a scan.
#[derive(Default)]
struct AwaitingResponses {
    by_key: HashMap<(String, String), Awaited>,
    by_deadline: BTreeMap<(i64, u64), (String, String)>,
    seq: u64,
}

impl AwaitingResponses {
    /// Tracks a command until `deadline` (ms); `false` when the table is full.
    fn insert(
        &mut self,
        tenant: &str,
        cid: &str,
        device: &str,
        deadline: i64,
        trace: Option<TraceContext>,
    ) -> bool {
        let key = (tenant.to_owned(), cid.to_owned());
        self.remove(tenant, cid);
        if self.by_key.len() >= MAX_AWAITING {
            return false;
        }
        self.seq += 1;
        let slot = (deadline, self.seq);
        self.by_deadline.insert(slot, key.clone());
        self.by_key.insert(key, (slot, device.to_owned(), trace));
        true
    }

    /// Stops tracking; `Some` (with the trace context to continue) when the command was
    /// tracked.
    fn remove(&mut self, tenant: &str, cid: &str) -> Option<Option<TraceContext>> {
        let (slot, _, trace) = self.by_key.remove(&(tenant.to_owned(), cid.to_owned()))?;
        self.by_deadline.remove(&slot);
        Some(trace)
    }

    /// Removes and returns (tenant, device, correlation id) of every command overdue at `now`.
    fn take_overdue(&mut self, now: i64) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        while let Some(entry) = self.by_deadline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (tenant, cid) = entry.remove();
            if let Some((_, device, _)) = self.by_key.remove(&(tenant.clone(), cid.clone())) {
                out.push((tenant, device, cid));
            }
        }
        out
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// Remembers which gateway each device last used and records it in the routing state when it
/// changes (Hono's "last known gateway", second step of the target rule). Writes only on a
/// change; forgets everything when full, which costs at most one more write per device.
pub struct LastGateways {
    routing: RoutingState,
    known: Mutex<HashMap<(String, String), String>>,
}

const MAX_LAST_GATEWAYS: usize = 100_000;

impl LastGateways {
    pub fn new(routing: RoutingState) -> Self {
        LastGateways {
            routing,
            known: Mutex::new(HashMap::new()),
        }
    }
}

impl crate::pipeline::GatewayActivity for LastGateways {
    /// Recorded as the device's last known gateway, unless it already is.
    fn acted_for(&self, tenant: &str, device: &str, gateway: &str) {
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let key = (tenant.to_owned(), device.to_owned());
            if known.get(&key).is_some_and(|g| g == gateway) {
                return;
            }
            if known.len() >= MAX_LAST_GATEWAYS {
                known.clear();
            }
            known.insert(key, gateway.to_owned());
        }
        let routing = self.routing.clone();
        let (t, d, g) = (tenant.to_owned(), device.to_owned(), gateway.to_owned());
        tokio::spawn(async move {
            if let Err(e) = routing.set_last_gateway(&t, &d, &g).await {
                tracing::warn!(error = %e, "recording the last known gateway failed");
            }
        });
    }
}

/// Whom a command response is for.
struct ResponseTo<'a> {
    tenant: &'a str,
    /// Sizes the response topic if writing the response creates it; `None`: the defaults.
    tenant_ext: Option<&'a serde_json::Map<String, serde_json::Value>>,
    device: &'a str,
    correlation_id: &'a str,
    /// The trace context the application reads on the response record.
    trace: Option<&'a TraceContext>,
}

/// A command response handed to the producer; resolves when the broker has it (and its span,
/// if any, then ends).
pub struct PendingResponse(crate::kafka::Delivery, Span, Option<ResponseMeter>);

/// A device's response on its way to Kafka, for `hono_command_*` (direction `response`).
struct ResponseMeter {
    adapter: &'static str,
    tenant: String,
    started: std::time::Instant,
    bytes: usize,
}

impl ResponseMeter {
    fn record(&self, status: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        let (adapter, tenant) = (self.adapter, self.tenant.as_str());
        crate::metrics::command(adapter, tenant, "response", status, secs, self.bytes);
    }
}

impl PendingResponse {
    pub async fn acked(mut self) -> Result<(), Refusal> {
        std::future::poll_fn(|cx| self.poll_acked(cx)).await
    }

    /// The broker's answer once it is there.
    pub fn poll_acked(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Refusal>> {
        let acked = std::task::ready!(self.0.poll_acked(cx)).map_err(Refusal::downstream);
        let span = std::mem::take(&mut self.1);
        if let Err(e) = &acked {
            span.fail(e.to_string());
        }
        span.end();
        if let Some(meter) = self.2.take() {
            meter.record(if acked.is_ok() {
                "forwarded"
            } else {
                "undeliverable"
            });
        }
        std::task::Poll::Ready(acked)
    }
}

/// The command hub of an adapter that runs one. A command response that reaches an adapter
/// running without commands is refused: nothing waits for it (no consumer).
pub fn hub(hub: Option<&CommandHub>) -> Result<&CommandHub, Refusal> {
    hub.ok_or_else(|| Refusal::new(Reason::NoConsumer, "commands are not enabled"))
}

impl CommandHub {
    /// A hub for this instance; `instance_id` names its internal command topic and its
    /// routing entries — a stable one (`gateway.instance_id`) lets the topic be created
    /// beforehand, `None` picks `ferrule-gateway-<uuid>`.
    pub fn new(
        routing: RoutingState,
        sender: Arc<DownstreamSender>,
        response_timeout: Duration,
        instance_id: Option<String>,
        tracer: Tracer,
    ) -> Self {
        let instance_id = instance_id
            .unwrap_or_else(|| format!("ferrule-gateway-{}", uuid::Uuid::new_v4().simple()));
        CommandHub {
            inner: Arc::new(Inner {
                instance_id,
                routing,
                sender,
                response_timeout,
                tracer,
                subscribers: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(1),
                awaiting: Mutex::new(AwaitingResponses::default()),
                seen: Mutex::new(RecentSet {
                    set: Default::default(),
                    order: Default::default(),
                }),
            }),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    fn subscribers(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Subscriber>> {
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn awaiting(&self) -> std::sync::MutexGuard<'_, AwaitingResponses> {
        self.inner
            .awaiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Request/response commands delivered here and not answered yet.
    pub fn awaiting_responses(&self) -> usize {
        self.awaiting().len()
    }

    /// Routes commands for `device` (a device, or a gateway for all its devices) to `queue`,
    /// for `lifespan` or until unsubscribed; the newest subscription wins and the queue of a
    /// replaced one is dropped, which ends a long poll waiting on it.
    pub async fn subscribe(
        &self,
        adapter: AdapterType,
        tenant: &str,
        device: &str,
        queue: CommandQueue,
        lifespan: Option<Duration>,
    ) -> Result<SubscriptionToken, Refusal> {
        let token = SubscriptionToken(self.inner.next_token.fetch_add(1, Ordering::Relaxed));
        // The local change and the routing change are queued together, so this instance's
        // changes of one device reach the route topic in the order they happened here.
        let registered = {
            let mut subs = self.subscribers();
            subs.insert(
                (tenant.to_owned(), device.to_owned()),
                (token, queue, adapter.name()),
            );
            self.inner
                .routing
                .register_queued(tenant, device, &self.inner.instance_id, lifespan)
        };
        match registered.await {
            Ok(()) => Ok(token),
            Err(e) => {
                self.forget(tenant, device, token);
                Err(Refusal::new(
                    Reason::RegistryUnavailable,
                    format!("routing state: {e}"),
                ))
            }
        }
    }

    /// Removes the local subscription if `token` still holds it and queues its release in the
    /// routing state at once (in order with this instance's other changes of the device);
    /// `None` when a newer subscription holds the device.
    fn forget_releasing(
        &self,
        tenant: &str,
        device: &str,
        token: SubscriptionToken,
    ) -> Option<futures_util::future::BoxFuture<'static, Result<(), RoutingError>>> {
        self.forget_then(tenant, device, token, || {
            self.inner
                .routing
                .release(tenant, device, &self.inner.instance_id)
        })
    }

    /// Removes the local subscription if `token` still holds it; `true` when it did.
    fn forget(&self, tenant: &str, device: &str, token: SubscriptionToken) -> bool {
        self.forget_then(tenant, device, token, || ()).is_some()
    }

    /// Removes the local subscription if `token` still holds it and, with the subscribers
    /// still locked, runs `then` (which queues the routing change in order with the local
    /// one); `None` when a newer subscription holds the device.
    fn forget_then<T>(
        &self,
        tenant: &str,
        device: &str,
        token: SubscriptionToken,
        then: impl FnOnce() -> T,
    ) -> Option<T> {
        let mut subs = self.subscribers();
        let key = (tenant.to_owned(), device.to_owned());
        if !subs.get(&key).is_some_and(|(t, _, _)| *t == token) {
            return None;
        }
        subs.remove(&key);
        Some(then())
    }

    /// Ends a subscription unless a newer one replaced it, here or on another instance (the
    /// routing state then names that instance). `true` when this ended the device's
    /// reachability, so that its end may be announced (`ttd=0`); `false` when a newer
    /// subscription lives on. Without an answer from the routing state, this instance's own
    /// view decides.
    pub async fn unsubscribe(&self, tenant: &str, device: &str, token: SubscriptionToken) -> bool {
        let Some(released) = self.forget_then(tenant, device, token, || {
            self.inner
                .routing
                .unregister_queued(tenant, device, &self.inner.instance_id)
        }) else {
            return false;
        };
        match released.await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "unregistering a command consumer failed");
                true
            }
        }
    }

    /// Opens a long poll: the next command for `device` (within `ttd`) goes to the returned
    /// [`LongPoll`]. Registered before the caller uploads its ttd notification, so an
    /// application reacting to the notification finds the route.
    pub async fn long_poll(
        &self,
        adapter: AdapterType,
        tenant: &str,
        device: &str,
        ttd: Duration,
    ) -> Result<LongPoll, Refusal> {
        // One command per request: room for exactly one.
        let (tx, rx) = mpsc::channel(1);
        let lifespan = Some(ttd + Duration::from_secs(1));
        let token = self
            .subscribe(adapter, tenant, device, tx, lifespan)
            .await?;
        Ok(LongPoll {
            hub: self.clone(),
            tenant: tenant.to_owned(),
            device: device.to_owned(),
            token,
            queue: rx,
            ttd,
            ended: false,
        })
    }

    /// Checks and forwards a device's response: the request id must be one Ferrule issued and
    /// still awaited, the status valid, the sender allowed to answer for the device.
    pub async fn accept_response(
        &self,
        pipeline: &IngestPipeline,
        r: DeviceResponse,
    ) -> Result<(), Refusal> {
        self.submit_response(pipeline, r).await?.acked().await
    }

    /// Like [`Self::accept_response`], but returns once the response is handed to the
    /// producer: the caller (MQTT, which keeps reading meanwhile) awaits the broker's ack
    /// later, and a device that disconnects right after answering does not lose its answer.
    pub async fn submit_response(
        &self,
        pipeline: &IngestPipeline,
        r: DeviceResponse,
    ) -> Result<PendingResponse, Refusal> {
        let (who, request) = pipeline.authorise_response(&r).await?;
        let command = self
            .awaiting()
            .remove(&who.tenant_id, &request.correlation_id)
            .flatten();
        // The response continues the command's trace.
        let span = self.inner.tracer.start(
            "upload command response",
            SpanKind::Server,
            command.as_ref(),
            None,
            || {
                vec![
                    KeyValue::new("tenant_id", who.tenant_id.clone()),
                    KeyValue::new("device_id", who.device_id.clone()),
                    KeyValue::new("component_name", r.adapter.name()),
                    KeyValue::new("status", i64::from(r.status)),
                ]
            },
        );
        let trace = span.context().or(command);
        let meter = ResponseMeter {
            adapter: r.adapter.name(),
            tenant: who.tenant_id.clone(),
            started: std::time::Instant::now(),
            bytes: r.payload.len(),
        };
        let mut pending = self
            .enqueue_response(
                ResponseTo {
                    tenant: &who.tenant_id,
                    tenant_ext: who.tenant_ext(),
                    device: &who.device_id,
                    correlation_id: &request.correlation_id,
                    trace: trace.as_ref(),
                },
                r.status,
                r.content_type.as_deref(),
                &r.payload,
            )
            .await;
        match &mut pending {
            Ok(p) => {
                p.1 = span;
                p.2 = Some(meter);
            }
            Err(e) => {
                span.fail(e.to_string());
                meter.record("undeliverable");
            }
        }
        pending
    }

    /// Writes a command response to the application's topic and waits for the broker.
    async fn respond(
        &self,
        to: ResponseTo<'_>,
        status: u16,
        content_type: Option<&str>,
        payload: &[u8],
    ) -> Result<(), Refusal> {
        self.enqueue_response(to, status, content_type, payload)
            .await?
            .acked()
            .await
    }

    /// Hands a command response to the producer.
    async fn enqueue_response(
        &self,
        to: ResponseTo<'_>,
        status: u16,
        content_type: Option<&str>,
        payload: &[u8],
    ) -> Result<PendingResponse, Refusal> {
        let ResponseTo {
            tenant,
            tenant_ext,
            device,
            correlation_id,
            trace,
        } = to;
        let topic = self
            .inner
            .sender
            .names()
            .name(TopicKind::CommandResponse, tenant)
            .map_err(|e| Refusal::malformed(e.to_string()))?;
        let ct = content_type
            .or((!payload.is_empty()).then_some(ferrule_schemas::content_type::OCTET_STREAM));
        let trace_headers = trace.into_iter().flat_map(|t| {
            let state = t
                .tracestate
                .as_deref()
                .map(|s| (h::TRACESTATE, s.as_bytes()));
            std::iter::once((h::TRACEPARENT, t.traceparent.as_bytes())).chain(state)
        });
        let headers = response_headers(tenant, device, correlation_id, status, ct)
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .chain(trace_headers)
            .fold(OwnedHeaders::new_with_capacity(8), |hs, (k, v)| {
                hs.insert(Header {
                    key: k,
                    value: Some(v),
                })
            });
        let unavailable = |e: crate::kafka::ProduceError| Refusal::downstream(e);
        self.inner
            .sender
            .ensure_topic(&topic, tenant_ext)
            .await
            .map_err(unavailable)?;
        self.inner
            .sender
            .enqueue(OutboundRecord {
                topic: &topic,
                key: device,
                headers,
                payload,
            })
            .map(|d| PendingResponse(d, Span::none(), None))
            .map_err(unavailable)
    }

    /// Tells the application that a request/response command was not delivered.
    pub async fn fail(
        &self,
        tenant: &str,
        device: &str,
        correlation_id: &str,
        status: u16,
        reason: &str,
    ) {
        let trace = self.awaiting().remove(tenant, correlation_id).flatten();
        let body = delivery_failure_body(reason);
        let sent = self
            .respond(
                ResponseTo {
                    tenant,
                    tenant_ext: None,
                    device,
                    correlation_id,
                    trace: trace.as_ref(),
                },
                status,
                Some(DELIVERY_FAILURE_NOTIFICATION),
                &body,
            )
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, device, "delivery-failure response lost");
        }
    }

    /// A command that cannot reach its device. Its sender learns it from the outcome when it
    /// asked for one (the bridge releases the application's transfer), otherwise from a
    /// delivery-failure response (503) when it expects a response.
    pub async fn undelivered(
        &self,
        tenant: &str,
        device: &str,
        correlation_id: Option<&str>,
        outcome: Option<&OutcomeRoute>,
        reason: &str,
    ) {
        self.not_delivered(tenant, device, correlation_id, outcome, 503, reason)
            .await
    }

    /// [`Self::undelivered`] with the status that says why: 503 for a device that could not
    /// be reached now, a 4xx for a command the device can never take (the bridge rejects the
    /// application's transfer then instead of releasing it).
    pub async fn not_delivered(
        &self,
        tenant: &str,
        device: &str,
        correlation_id: Option<&str>,
        outcome: Option<&OutcomeRoute>,
        status: u16,
        reason: &str,
    ) {
        match (outcome, correlation_id) {
            (Some(route), cid) => {
                if let Some(cid) = cid {
                    self.awaiting().remove(tenant, cid);
                }
                self.report_outcome(device, route, status, reason);
            }
            (None, Some(cid)) => self.fail(tenant, device, cid, status, reason).await,
            (None, None) => {}
        }
    }

    /// Tells the bridge that sent `cmd` that it reached the device; nothing for other commands.
    pub fn delivered(&self, cmd: &CommandDelivery) {
        cmd.progress.delivered();
        self.delivered_to(&cmd.device_id, cmd.outcome.as_ref());
    }

    /// [`Self::delivered`] for a command whose payload was already handed on.
    pub fn delivered_to(&self, device: &str, outcome: Option<&OutcomeRoute>) {
        if let Some(route) = outcome {
            self.report_outcome(device, route, DELIVERED, "");
        }
    }

    /// Hands an outcome record to the producer without waiting: the bridge releases a
    /// command whose outcome never comes.
    fn report_outcome(&self, device: &str, route: &OutcomeRoute, status: u16, reason: &str) {
        let headers = route
            .outcome_headers(status)
            .iter()
            .fold(OwnedHeaders::new_with_capacity(3), |hs, (k, v)| {
                hs.insert(Header {
                    key: k,
                    value: Some(v),
                })
            })
            .insert(Header {
                key: h::DEVICE_ID,
                value: Some(device),
            });
        let queued = self.inner.sender.enqueue(OutboundRecord {
            topic: &route.topic,
            key: &route.id,
            headers,
            payload: reason.as_bytes(),
        });
        if let Err(e) = queued {
            tracing::warn!(error = %e, device, "command outcome lost");
        }
    }

    /// Called when a heartbeat finds this instance forgotten: the routers counted it dead
    /// (it was paused, or cut off from PostgreSQL, for longer than the instance timeout),
    /// deleted its internal topic and dropped its routing entries while its connections lived
    /// on. Both come back, so commands reach those connections again.
    async fn restore(&self, topic: &str) {
        tracing::warn!(
            instance = %self.instance_id(),
            "the routers had counted this instance dead; registering its subscriptions again"
        );
        self.inner.sender.forget_topic(topic);
        if let Err(e) = self.inner.sender.ensure_topic(topic, None).await {
            tracing::warn!(error = %e, topic, "could not create the command topic again");
        }
        let held: Vec<(String, String)> = self.subscribers().keys().cloned().collect();
        for (tenant, device) in held {
            if let Err(e) = self
                .inner
                .routing
                .register(&tenant, &device, self.instance_id(), None)
                .await
            {
                tracing::warn!(error = %e, %tenant, %device, "registering again failed");
            }
        }
    }

    /// The consumer of this instance's internal command topic.
    fn internal_consumer(
        &self,
        kafka: &crate::KafkaConfig,
        topic: &str,
    ) -> anyhow::Result<StreamConsumer<ferrule_kafka::Stats>> {
        let consumer: StreamConsumer<ferrule_kafka::Stats> = kafka
            .consumer()
            .set("group.id", self.instance_id())
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                kafka.consumer_fetch_wait_ms.to_string(),
            )
            .create_with_stats(ferrule_kafka::Stats::consumer(
                "gateway-commands",
                self.instance_id(),
            ))?;
        consumer.subscribe(&[topic])?;
        Ok(consumer)
    }

    /// Heartbeats and the internal command topic, until `shutdown` turns true.
    pub async fn run(
        self,
        kafka: crate::KafkaConfig,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let topic = self
            .inner
            .sender
            .names()
            .name(TopicKind::CommandInternal, self.instance_id())?;
        // Kafka or PostgreSQL may be down at start: keep trying, the adapters run meanwhile
        // (the route topic is read here, so the first subscription does not wait for it).
        loop {
            let ready = async {
                self.inner.sender.ensure_topic(&topic, None).await?;
                self.inner.routing.heartbeat(self.instance_id()).await?;
                self.inner.routing.routes().await?;
                anyhow::Ok(())
            };
            match ready.await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "command topic not ready; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped(&mut shutdown) => return Ok(()),
            }
        }
        let mut consumer = self.internal_consumer(&kafka, &topic)?;
        tracing::info!(instance = %self.instance_id(), "consuming commands");
        let every = HEARTBEAT.min(self.inner.routing.instance_timeout() / 3);
        let mut beat = tokio::time::interval(every.max(Duration::from_secs(1)));
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.answer_overdue().await,
                _ = beat.tick() => match self.inner.routing.heartbeat(self.instance_id()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // The old consumer may have seen the topic go and would not look for
                        // the new one before its next metadata refresh (minutes). It leaves
                        // the group (committing its offsets of the old topic) before the topic
                        // comes back; a new one finds the new topic at once.
                        // Closing it blocks (leave the group, commit): not on a runtime thread.
                        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
                        self.restore(&topic).await;
                        consumer = loop {
                            match self.internal_consumer(&kafka, &topic) {
                                Ok(c) => break c,
                                Err(e) => {
                                    tracing::warn!(error = %e, "internal command consumer not created; retrying");
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                            }
                        };
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                },
                msg = consumer.recv() => match msg {
                    Ok(m) => self.deliver(&m).await,
                    Err(e) => tracing::warn!(error = %e, "internal command consumer error"),
                },
                _ = stopped(&mut shutdown) => break,
            }
        }
        // Commands for this instance must fail fast from now on.
        let releases: Vec<_> = {
            let mut subs = self.subscribers();
            let releases = subs
                .keys()
                .map(|(t, d)| self.inner.routing.release(t, d, self.instance_id()))
                .collect();
            subs.clear();
            releases
        };
        futures_util::future::join_all(releases).await;
        // No router sends here any more: the topic goes with the instance (a restart under a
        // stable id creates it again).
        drop(consumer);
        match self.inner.sender.delete_topic(&topic).await {
            Ok(()) => tracing::info!(topic, "deleted this instance's internal command topic"),
            Err(e) => {
                tracing::warn!(topic, error = %e, "could not delete the internal command topic")
            }
        }
        Ok(())
    }

    /// Answers request/response commands the device did not answer in time (503).
    async fn answer_overdue(&self) {
        let overdue = self.awaiting().take_overdue(h::now_millis());
        for (tenant, device, cid) in overdue {
            let reason = format!(
                "the device did not respond within {} s",
                self.inner.response_timeout.as_secs_f64()
            );
            self.fail(&tenant, &device, &cid, 503, &reason).await;
        }
    }

    /// Hands one forwarded command to the connection that subscribed for it.
    async fn deliver(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let headers: Vec<(&str, Option<&[u8]>)> = m
            .headers()
            .map(|hs| hs.iter().map(|hd| (hd.key, hd.value)).collect())
            .unwrap_or_default();
        let text = |name: &str| {
            h::first(headers.iter().copied(), name)
                .and_then(h::decode_str)
                .map(str::to_owned)
        };
        let (Some(tenant), Some(device), Some(subject)) =
            (text(h::TENANT_ID), text(h::DEVICE_ID), text(h::SUBJECT))
        else {
            return;
        };
        let num = |name: &str| h::first(headers.iter().copied(), name).and_then(h::decode_i64);
        if let (Some(p), Some(o)) = (num(h::ORIG_PARTITION), num(h::ORIG_OFFSET)) {
            let fresh = self
                .inner
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((tenant.clone(), p, o));
            if !fresh {
                return;
            }
        }
        let response_required = h::first(headers.iter().copied(), h::RESPONSE_REQUIRED)
            .and_then(h::decode_bool)
            .unwrap_or(false);
        let correlation_id = text(h::CORRELATION_ID).filter(|_| response_required);
        let outcome =
            OutcomeRoute::from_headers(self.inner.sender.names(), headers.iter().copied());
        // Under the router's span; the device's response continues this one.
        let parent = TraceContext::of(
            text(h::TRACEPARENT).as_deref(),
            text(h::TRACESTATE).as_deref(),
        );
        let span = self.inner.tracer.start(
            "deliver command",
            SpanKind::Consumer,
            parent.as_ref(),
            None,
            || {
                vec![
                    KeyValue::new("tenant_id", tenant.clone()),
                    KeyValue::new("device_id", device.clone()),
                    KeyValue::new("subject", subject.clone()),
                    KeyValue::new("request_response", correlation_id.is_some()),
                ]
            },
        );
        let trace = span.context().or(parent);
        // The device's own subscription first, then its gateway's.
        let holder = [Some(device.clone()), text(h::VIA)]
            .into_iter()
            .flatten()
            .find_map(|d| {
                self.subscribers()
                    .get(&(tenant.clone(), d))
                    .map(|(_, q, adapter)| (q.clone(), *adapter))
            });
        let payload = m.payload().unwrap_or_default();
        let adapter = holder.as_ref().map_or("unknown", |(_, a)| *a);
        let progress = Progress::new(
            span,
            adapter,
            &tenant,
            correlation_id.is_some(),
            payload.len(),
        );
        let deadline = h::now_millis()
            + i64::try_from(self.inner.response_timeout.as_millis()).unwrap_or(i64::MAX / 2);
        let delivery = CommandDelivery {
            device_id: device.clone(),
            subject,
            request_id: correlation_id.as_ref().map(|c| {
                RequestId {
                    correlation_id: c.clone(),
                    deadline_millis: deadline,
                }
                .encode()
            }),
            correlation_id: correlation_id.clone(),
            content_type: text(h::CONTENT_TYPE),
            payload: payload.to_vec(),
            outcome: outcome.clone(),
            progress: progress.clone(),
        };
        let cid = correlation_id.as_deref();
        let Some((queue, _)) = holder else {
            let reason = "device is not connected to this gateway";
            progress.failed(503, reason);
            self.undelivered(&tenant, &device, cid, outcome.as_ref(), reason)
                .await;
            return;
        };
        // Tracked before the device can possibly answer.
        if let Some(cid) = cid
            && !self
                .awaiting()
                .insert(&tenant, cid, &device, deadline, trace)
        {
            let reason = "too many commands are awaiting responses";
            progress.failed(503, reason);
            self.undelivered(&tenant, &device, Some(cid), outcome.as_ref(), reason)
                .await;
            return;
        }
        let queued = match queue.try_send(delivery) {
            Ok(()) => true,
            // A burst — a router catching up after a failover, say — can fill a device's queue
            // faster than its connection drains it: wait a little for room before calling the
            // device busy. The instance's later commands wait that long at most.
            Err(mpsc::error::TrySendError::Full(delivery)) => {
                queue.send_timeout(delivery, BUSY_WAIT).await.is_ok()
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        if !queued {
            let reason = "the device is busy with another command";
            progress.failed(503, reason);
            self.undelivered(&tenant, &device, cid, outcome.as_ref(), reason)
                .await;
        }
    }
}

/// One request (HTTP `hono-ttd`) waiting for a single command; dropping it ends the
/// subscription and fails any command that arrived too late to be answered.
pub struct LongPoll {
    hub: CommandHub,
    tenant: String,
    device: String,
    token: SubscriptionToken,
    queue: mpsc::Receiver<CommandDelivery>,
    ttd: Duration,
    ended: bool,
}

impl LongPoll {
    /// The command that arrived within the ttd, if any, counted as delivered: the caller hands
    /// it to the device in its answer. `None` also when a newer request of the same device
    /// took over.
    pub async fn wait(self) -> Option<CommandDelivery> {
        let hub = self.hub.clone();
        let got = self.take().await;
        if let Some(cmd) = &got {
            hub.delivered(cmd);
        }
        got
    }

    /// Like [`Self::wait`], but the caller reports whether the command reached the device
    /// ([`CommandHub::delivered`] or [`CommandHub::undelivered`]): CoAP learns it from the
    /// device's acknowledgement of a separate response.
    pub async fn take(mut self) -> Option<CommandDelivery> {
        let first = tokio::time::timeout(self.ttd, self.queue.recv())
            .await
            .ok()
            .flatten();
        let mut left = self.end();
        // A command that slipped in while the poll ended is still answered here.
        let got = first.or_else(|| (!left.is_empty()).then(|| left.remove(0)));
        self.release(left);
        got
    }

    /// Ends the subscription (unless a newer one replaced it) and returns what is queued.
    fn end(&mut self) -> Vec<CommandDelivery> {
        self.ended = true;
        let released = self
            .hub
            .forget_releasing(&self.tenant, &self.device, self.token);
        self.queue.close();
        let mut left = Vec::new();
        while let Ok(c) = self.queue.try_recv() {
            left.push(c);
        }
        if let Some(released) = released {
            spawn_cleanup(async move {
                if let Err(e) = released.await {
                    tracing::warn!(error = %e, "unregistering a long poll failed");
                }
            });
        }
        left
    }

    /// Commands this poll took but cannot hand to the device: 503 to their applications.
    fn release(&self, left: Vec<CommandDelivery>) {
        if left.is_empty() {
            return;
        }
        let (hub, tenant) = (self.hub.clone(), self.tenant.clone());
        spawn_cleanup(async move {
            for c in left {
                let reason = "the device's request ended before the command was sent";
                c.progress.failed(503, reason);
                let (cid, outcome) = (c.correlation_id.as_deref(), c.outcome.as_ref());
                hub.undelivered(&tenant, &c.device_id, cid, outcome, reason)
                    .await;
            }
        });
    }
}

/// Runs clean-up work of a poll that may end while the runtime shuts down (then it is skipped:
/// the instance's subscriptions expire with it).
fn spawn_cleanup(work: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(work);
    }
}

impl Drop for LongPoll {
    fn drop(&mut self) {
        // The client went away (or the upload failed) before the poll ended.
        if !self.ended {
            let left = self.end();
            self.release(left);
        }
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awaiting_responses_expire_in_deadline_order_and_stay_bounded() {
        let mut a = AwaitingResponses::default();
        assert!(a.insert("t", "c1", "d", 100, None));
        assert!(a.insert("t", "c2", "d", 50, None));
        let trace = TraceContext::of(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None,
        );
        assert!(a.insert("u", "c1", "e", 200, trace.clone()));
        assert_eq!(a.take_overdue(49), vec![]);
        assert_eq!(
            a.take_overdue(100),
            vec![
                ("t".into(), "d".into(), "c2".into()),
                ("t".into(), "d".into(), "c1".into())
            ]
        );
        // Answered commands never time out; a reused correlation id keeps one entry.
        assert_eq!(a.remove("u", "c1"), Some(trace), "with its trace context");
        assert_eq!(a.remove("u", "c1"), None);
        assert!(a.insert("t", "c3", "d", 300, None));
        assert!(a.insert("t", "c3", "d", 400, None));
        assert_eq!(a.len(), 1);
        assert_eq!(a.take_overdue(350), vec![]);
        assert_eq!(a.take_overdue(400).len(), 1);
        assert_eq!(a.len(), 0);
        assert!(a.by_deadline.is_empty());
        for i in 0..MAX_AWAITING {
            assert!(a.insert("t", &i.to_string(), "d", 1, None));
        }
        assert!(!a.insert("t", "one-more", "d", 1, None), "bounded");
        assert_eq!(a.take_overdue(1).len(), MAX_AWAITING);
    }
}
