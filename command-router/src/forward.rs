//! The router loop: consumes `hono.command.*` as one consumer group, checks each command, finds
//! the gateway instance that can reach the device and forwards the command to that instance's
//! `hono.command_internal.<instance>` topic; what cannot be delivered gets Hono's
//! delivery-failure response. An offset is stored only after the command was forwarded or
//! answered, so a router restart or rebalance redelivers instead of losing commands.

use ferrule_kafka::{KafkaConfig, RecoveringProducer, TopicAdmin};
use ferrule_registry::DeviceAuthenticator;
use ferrule_registry::device_connection::{CommandTarget, RoutingState};
use ferrule_schemas::command::{
    Command, InvalidCommand, delivery_failure_body, parse_command, response_headers,
};
use ferrule_schemas::content_type::DELIVERY_FAILURE_NOTIFICATION;
use ferrule_schemas::headers as h;
use ferrule_schemas::outcome::OutcomeRoute;
use ferrule_schemas::{TopicKind, TopicNames};
use ferrule_telemetry::{KeyValue, Span, SpanKind, TraceContext, Tracer};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use std::time::Duration;
use tokio::sync::watch;

/// The consumer group all router instances share (Hono's name).
pub const GROUP_ID: &str = "cmd-router-group";

/// Why a command was not forwarded, as the status of the delivery-failure response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    status: u16,
    reason: String,
}

/// Commands read and not yet forwarded and acknowledged; reading pauses beyond this.
const IN_FLIGHT: usize = 1024;

/// The source position of a command, stored as consumed once the command was handled.
type Handled = (String, i32, i64);

/// A command record copied out of the consumer, so that its routing can run concurrently
/// with reading the next ones.
struct Incoming {
    position: Handled,
    tenant: String,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    payload: Option<Vec<u8>>,
    /// `delivery-failure-notification-metadata[*]` headers, copied into failure responses.
    failure_metadata: Vec<(String, Vec<u8>)>,
    /// Where the bridge that wrote the command expects its outcome, if it does.
    outcome: Option<OutcomeRoute>,
    /// `route command`, under the application's trace context; it ends once the command was
    /// forwarded or answered.
    span: Span,
    /// When the command was read, while tracing is on: its span starts there.
    consumed: Option<std::time::SystemTime>,
}

/// Where the router writes: its producer, the deployment's topic names, and the admin client
/// that makes sure a response topic exists before a failure is written to it.
#[derive(Clone)]
struct Out {
    producer: RecoveringProducer,
    names: TopicNames,
    topics: TopicAdmin,
}

/// What becomes of one command.
enum Decision {
    /// Not a command of a tenant topic, or invalid without a correlation id: dropped.
    Skip,
    Forward(Command, CommandTarget),
    /// Answered with an outcome when the bridge asked for one, else with a delivery failure
    /// when it has a correlation id.
    Fail {
        device: String,
        correlation_id: Option<String>,
        failure: Failure,
    },
}

/// Logs the command partitions this router takes and gives up (info): which router forwards
/// which tenant's commands is otherwise invisible.
/// Its statistics become metrics.
pub struct RebalanceLog(pub ferrule_kafka::Stats);

impl rdkafka::ClientContext for RebalanceLog {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.0.record(&statistics);
    }
}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &rdkafka::TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| format!("{}/{}", e.topic(), e.partition()))
                .collect::<Vec<_>>()
                .join(",")
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %list(tpl), "command partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = %list(tpl), "command partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "command consumer rebalance failed"),
        }
    }
}

/// Runs until `shutdown` turns true. Routing lookups of consecutive commands run concurrently,
/// but commands are forwarded, and their offsets stored, in the order they were read.
pub async fn run(
    kafka: &KafkaConfig,
    group_id: &str,
    topic_pattern: &str,
    registry: DeviceAuthenticator,
    routing: RoutingState,
    topics: TopicAdmin,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let names = kafka.topic_names()?;
    let tracer = ferrule_telemetry::tracer(crate::SERVICE_NAME);
    crate::metrics::init();
    let consumer: StreamConsumer<RebalanceLog> = kafka
        .consumer()
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .set(
            "fetch.wait.max.ms",
            kafka.consumer_fetch_wait_ms.to_string(),
        )
        .with_statistics()
        .create_with_context(RebalanceLog(ferrule_kafka::Stats::consumer(
            "command-router",
            group_id,
        )))?;
    consumer.subscribe(&[topic_pattern])?;
    // In order, not idempotent (`KafkaConfig::ordered_producer`): a record that librdkafka
    // retries after a lost answer may reach the internal topic twice, and the gateway
    // delivers it once (same source partition and offset, `gateways/src/commands.rs`).
    let producer = RecoveringProducer::new("command-router", kafka.ordered_producer())?;
    let out = Out {
        producer,
        names,
        topics,
    };
    let mut routed: FuturesOrdered<BoxFuture<'static, (Incoming, Decision)>> =
        FuturesOrdered::new();
    let mut forwarded: FuturesOrdered<BoxFuture<'static, Handled>> = FuturesOrdered::new();
    loop {
        tokio::select! {
            m = consumer.recv(), if routed.len() + forwarded.len() < IN_FLIGHT => {
                let msg = match m {
                    Ok(m) => m,
                    Err(e) => {
                        let class = ferrule_kafka::metrics::error("command-router", &e);
                        tracing::warn!(error = %e, class = class.as_str(), "command consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let mut incoming = copy(&out.names, &tracer, &msg);
                if !incoming.tenant.is_empty() {
                    crate::metrics::consumed(&incoming.tenant);
                }
                let (registry, routing) = (registry.clone(), routing.clone());
                let tracer = tracer.clone();
                routed.push_back(Box::pin(async move {
                    // The lookup includes the tenant's document, which the span may ask for.
                    let started = std::time::Instant::now();
                    incoming.start_span(&tracer, &registry).await;
                    let decision = decide(&incoming, &registry, &routing).await;
                    crate::metrics::lookup(started.elapsed().as_secs_f64());
                    (incoming, decision)
                }));
            }
            Some((incoming, decision)) = routed.next(), if !routed.is_empty() => {
                forwarded.push_back(forward(&out, incoming, decision));
            }
            Some((topic, partition, offset)) = forwarded.next(), if !forwarded.is_empty() => {
                if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                    tracing::debug!(error = %e, "offset not stored (partition revoked?)");
                }
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        }
    }
    // Let what was read finish, so its offsets are committed.
    let drain = async {
        while let Some((incoming, decision)) = routed.next().await {
            forwarded.push_back(forward(&out, incoming, decision));
        }
        while let Some((topic, partition, offset)) = forwarded.next().await {
            let _ = consumer.store_offset(&topic, partition, offset);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

fn copy(names: &TopicNames, tracer: &Tracer, msg: &BorrowedMessage<'_>) -> Incoming {
    let headers: Vec<(String, Option<Vec<u8>>)> = msg
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|hd| (hd.key.to_owned(), hd.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    let failure_metadata = headers
        .iter()
        .filter(|(k, _)| k.starts_with(h::DELIVERY_FAILURE_METADATA_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect();
    let tenant = names
        .parse(msg.topic())
        .ok()
        .filter(|t| t.kind == TopicKind::Command)
        .map(|t| t.suffix)
        .unwrap_or_default();
    Incoming {
        span: Span::none(),
        consumed: tracer.is_on().then(std::time::SystemTime::now),
        position: (msg.topic().to_owned(), msg.partition(), msg.offset()),
        outcome: OutcomeRoute::from_headers(
            names,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
        ),
        tenant,
        key: msg.key().map(<[u8]>::to_vec),
        headers,
        payload: msg.payload().map(<[u8]>::to_vec),
        failure_metadata,
    }
}

impl Incoming {
    fn record_headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> + Clone {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// Starts the command's `route command` span (from when it was read), sampled as its
    /// tenant's `tracing` settings say: the tenant's document is asked for when it is not
    /// cached, as the routing decision asks for it anyway.
    async fn start_span(&mut self, tracer: &Tracer, registry: &DeviceAuthenticator) {
        let Some(consumed) = self.consumed else {
            return;
        };
        let text = |name: &str| h::first(self.record_headers(), name).and_then(h::decode_str);
        let parent = TraceContext::of(text(h::TRACEPARENT), text(h::TRACESTATE));
        let tenant = match registry.cached_tenant(&self.tenant) {
            Some(t) => Some(t),
            None if self.tenant.is_empty() => None,
            None => registry.tenant(&self.tenant).await.ok(),
        };
        let mode = tenant.and_then(|t| {
            let tracing = t.as_ref().as_ref()?.tracing.as_ref()?;
            ferrule_telemetry::sampler::mode(tracing.sampling_mode.as_deref(), None)
        });
        let span = tracer.start(
            "route command",
            SpanKind::Consumer,
            parent.as_ref(),
            Some(consumed),
            || match mode {
                Some(m) => vec![KeyValue::new(ferrule_telemetry::sampler::SAMPLING_MODE, m)],
                None => Vec::new(),
            },
        );
        span.describe(|| {
            let key = self.key.as_deref().unwrap_or_default();
            vec![
                KeyValue::new("tenant_id", self.tenant.clone()),
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.source.name", self.position.0.clone()),
                KeyValue::new("device_id", String::from_utf8_lossy(key).into_owned()),
                KeyValue::new("subject", text(h::SUBJECT).unwrap_or_default().to_owned()),
            ]
        });
        self.span = span;
    }
}

/// Validates a command and finds where it goes (Hono's command routing rules).
async fn decide(
    incoming: &Incoming,
    registry: &DeviceAuthenticator,
    routing: &RoutingState,
) -> Decision {
    if incoming.tenant.is_empty() {
        return Decision::Skip;
    }
    let tenant = incoming.tenant.as_str();
    let command = match parse_command(incoming.key.as_deref(), incoming.record_headers()) {
        Ok(c) => c,
        Err(InvalidCommand {
            reason,
            correlation_id,
        }) => {
            let device = h::first(incoming.record_headers(), h::DEVICE_ID)
                .and_then(h::decode_str)
                .unwrap_or("")
                .to_owned();
            let answerable = correlation_id.is_some() || incoming.outcome.is_some();
            return if answerable {
                Decision::Fail {
                    device,
                    correlation_id,
                    failure: Failure {
                        status: 400,
                        reason,
                    },
                }
            } else {
                Decision::Skip
            };
        }
    };
    let target = async {
        let t = registry.tenant(tenant).await?;
        if !t.as_ref().as_ref().is_some_and(|t| t.enabled) {
            return anyhow::Ok(Err(Failure {
                status: 404,
                reason: "tenant unknown or disabled".into(),
            }));
        }
        let d = registry.device(tenant, &command.device_id).await?;
        let Some(device) = d.as_ref().as_ref().filter(|d| d.enabled) else {
            return Ok(Err(Failure {
                status: 404,
                reason: "device unknown or disabled".into(),
            }));
        };
        let via = device.via.as_deref().unwrap_or_default();
        let groups = device.via_groups.as_deref().unwrap_or_default();
        Ok(
            match routing
                .resolve(tenant, &command.device_id, via, groups)
                .await?
            {
                Some(t) => Ok(t),
                None => Err(Failure {
                    status: 503,
                    reason: "device is not connected".into(),
                }),
            },
        )
    }
    .await;
    let failure = match target {
        Ok(Ok(t)) => return Decision::Forward(command, t),
        Ok(Err(f)) => f,
        // Hono releases a command it cannot route: 503.
        Err(e) => Failure {
            status: 503,
            reason: format!("routing unavailable: {e}"),
        },
    };
    tracing::debug!(
        tenant,
        device = %command.device_id,
        status = failure.status,
        reason = %failure.reason,
        "command not forwarded"
    );
    Decision::Fail {
        device: command.device_id,
        correlation_id: command.correlation_id,
        failure,
    }
}

/// Hands a routed command to the producer (or writes its failure response); resolves with its
/// position once the broker has it.
fn forward(out: &Out, incoming: Incoming, decision: Decision) -> BoxFuture<'static, Handled> {
    let Incoming {
        position,
        tenant,
        failure_metadata,
        ..
    } = &incoming;
    let (position, tenant) = (position.clone(), tenant.clone());
    let span = incoming.span.clone();
    let (device, correlation_id, failure, delivery) = match decision {
        Decision::Skip => {
            span.set_attribute(KeyValue::new("outcome", "skipped"));
            span.end();
            return Box::pin(std::future::ready(position));
        }
        Decision::Fail {
            device,
            correlation_id,
            failure,
        } => (device, correlation_id, Some(failure), None),
        Decision::Forward(command, target) => {
            span.add_event(
                "resolved",
                vec![KeyValue::new("target_instance", target.instance_id.clone())],
            );
            span.set_attribute(KeyValue::new("target_instance", target.instance_id.clone()));
            let topic = out
                .names
                .name(TopicKind::CommandInternal, &target.instance_id);
            let sent = topic.map_err(anyhow::Error::from).and_then(|topic| {
                let mut record = FutureRecord::to(&topic)
                    .key(&command.device_id)
                    .headers(forward_headers(&incoming, &target));
                if let Some(p) = &incoming.payload {
                    record = record.payload(p);
                }
                out.producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!(e))
            });
            (command.device_id, command.correlation_id, None, Some(sent))
        }
    };
    let (out, metadata) = (out.clone(), failure_metadata.clone());
    let trace = {
        let text = |name: &str| h::first(incoming.record_headers(), name).and_then(h::decode_str);
        TraceContext::of(text(h::TRACEPARENT), text(h::TRACESTATE))
    };
    let outcome = incoming.outcome.clone();
    Box::pin(async move {
        let failure = match delivery {
            None => failure,
            Some(sent) => {
                let error = match sent {
                    Ok(d) => match d.await {
                        Ok(Ok(_)) => None,
                        Ok(Err((e, _))) => Some(e.to_string()),
                        Err(_) => Some("producer closed".to_owned()),
                    },
                    Err(e) => Some(e.to_string()),
                };
                error.map(|e| Failure {
                    status: 503,
                    reason: format!("forwarding failed: {e}"),
                })
            }
        };
        match &failure {
            None => {
                crate::metrics::forwarded(&tenant);
                span.set_attribute(KeyValue::new("outcome", "forwarded"));
            }
            Some(f) => {
                crate::metrics::failed(&tenant, f.status);
                span.set_attribute(KeyValue::new("status", i64::from(f.status)));
                span.fail(f.reason.clone());
            }
        }
        let answered = match (failure, outcome, correlation_id) {
            (None, _, _) | (Some(_), None, None) => Ok(()),
            // The bridge settles the application's transfer by it (Hono's AMQP APIs).
            (Some(f), Some(route), _) => report_outcome(&out.producer, &device, &route, f).await,
            (Some(f), None, Some(cid)) => {
                // The failure response continues the router's span, else the command's trace.
                let mut metadata = metadata;
                if let Some(t) = span.context().or(trace) {
                    metadata.push((h::TRACEPARENT.to_owned(), t.traceparent.into_bytes()));
                    if let Some(state) = t.tracestate {
                        metadata.push((h::TRACESTATE.to_owned(), state.into_bytes()));
                    }
                }
                respond(&out, &tenant, &device, &cid, &metadata, f).await
            }
        };
        if let Err(e) = answered {
            tracing::warn!(error = %e, "delivery failure not reported");
        }
        span.end();
        position
    })
}

/// The command's headers plus `tenant_id`, `via`, `orig-partition` and `orig-offset` (Hono's
/// internal command records).
fn forward_headers(incoming: &Incoming, target: &CommandTarget) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(incoming.headers.len() + 4);
    // The gateway continues the router's span, else the application's trace.
    let trace = incoming.span.context();
    for (k, v) in incoming.record_headers() {
        if trace.is_some() && (k == h::TRACEPARENT || k == h::TRACESTATE) {
            continue;
        }
        out = out.insert(Header { key: k, value: v });
    }
    if let Some(t) = &trace {
        out = out.insert(Header {
            key: h::TRACEPARENT,
            value: Some(&t.traceparent),
        });
        if let Some(state) = &t.tracestate {
            out = out.insert(Header {
                key: h::TRACESTATE,
                value: Some(state),
            });
        }
    }
    out = out.insert(Header {
        key: h::TENANT_ID,
        value: Some(&incoming.tenant),
    });
    if let Some(gw) = &target.gateway_id {
        out = out.insert(Header {
            key: h::VIA,
            value: Some(gw.as_str()),
        });
    }
    let (_, partition, offset) = &incoming.position;
    out.insert(Header {
        key: h::ORIG_PARTITION,
        value: Some(&partition.to_string()),
    })
    .insert(Header {
        key: h::ORIG_OFFSET,
        value: Some(&offset.to_string()),
    })
}

/// Tells the bridge that sent a command why it was not forwarded.
async fn report_outcome(
    producer: &RecoveringProducer,
    device: &str,
    route: &OutcomeRoute,
    failure: Failure,
) -> anyhow::Result<()> {
    let headers = route
        .outcome_headers(failure.status)
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
    producer
        .send(
            FutureRecord::to(&route.topic)
                .key(&route.id)
                .headers(headers)
                .payload(failure.reason.as_bytes()),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!(e))?;
    Ok(())
}

/// Writes a delivery-failure response for a request/response command.
async fn respond(
    out: &Out,
    tenant: &str,
    device: &str,
    correlation_id: &str,
    failure_metadata: &[(String, Vec<u8>)],
    failure: Failure,
) -> anyhow::Result<()> {
    let topic = out.names.name(TopicKind::CommandResponse, tenant)?;
    out.topics.ensure(&topic, out.topics.default_spec()).await?;
    let fixed = response_headers(
        tenant,
        device,
        correlation_id,
        failure.status,
        Some(DELIVERY_FAILURE_NOTIFICATION),
    );
    let mut headers = OwnedHeaders::new_with_capacity(fixed.len() + failure_metadata.len());
    for (k, v) in fixed
        .iter()
        .map(|(k, v)| (*k, v))
        .chain(failure_metadata.iter().map(|(k, v)| (k.as_str(), v)))
    {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let payload = delivery_failure_body(&failure.reason);
    out.producer
        .send(
            FutureRecord::to(&topic)
                .key(device)
                .headers(headers)
                .payload(&payload),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!(e))?;
    Ok(())
}
