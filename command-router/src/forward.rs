//! The router loop: consumes `hono.command.*` as one consumer group, checks each command, finds
//! the gateway instance that can reach the device and forwards the command to that instance's
//! `hono.command_internal.<instance>` topic; what cannot be delivered gets Hono's
//! delivery-failure response. An offset is stored only after the command was forwarded or
//! answered, so a router restart or rebalance redelivers instead of losing commands.

use crate::routing::RoutingState;
use ferrule_registry::DeviceAuthenticator;
use ferrule_schemas::command::{
    InvalidCommand, delivery_failure_body, parse_command, response_headers,
};
use ferrule_schemas::content_type::DELIVERY_FAILURE_NOTIFICATION;
use ferrule_schemas::headers as h;
use ferrule_schemas::{HonoTopic, TopicKind};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
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

/// Runs until `shutdown` turns true.
pub async fn run(
    bootstrap: &str,
    group_id: &str,
    registry: DeviceAuthenticator,
    routing: RoutingState,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .set("log_level", "3")
        .create()?;
    consumer.subscribe(&[ferrule_schemas::topic::COMMAND_TOPIC_PATTERN])?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("log_level", "3")
        .create()?;
    loop {
        let msg = tokio::select! {
            m = consumer.recv() => m,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "command consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = handle(&msg, &registry, &routing, &producer).await {
            // Not stored: the command comes again after a restart or rebalance.
            tracing::warn!(error = %e, topic = msg.topic(), offset = msg.offset(), "command not handled");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        consumer.store_offset_from_message(&msg)?;
    }
}

async fn handle(
    msg: &BorrowedMessage<'_>,
    registry: &DeviceAuthenticator,
    routing: &RoutingState,
    producer: &FutureProducer,
) -> anyhow::Result<()> {
    let Ok(topic) = HonoTopic::parse(msg.topic()) else {
        return Ok(());
    };
    if topic.kind != TopicKind::Command {
        return Ok(());
    }
    let tenant = topic.suffix.as_str();
    let headers: Vec<(&str, Option<&[u8]>)> = msg
        .headers()
        .map(|hs| hs.iter().map(|hd| (hd.key, hd.value)).collect())
        .unwrap_or_default();
    let command = match parse_command(msg.key(), headers.iter().copied()) {
        Ok(c) => c,
        Err(InvalidCommand {
            reason,
            correlation_id,
        }) => {
            if let Some(cid) = correlation_id {
                let device = h::first(headers.iter().copied(), h::DEVICE_ID)
                    .and_then(h::decode_str)
                    .unwrap_or("");
                respond(
                    producer,
                    tenant,
                    device,
                    &cid,
                    &headers,
                    Failure {
                        status: 400,
                        reason,
                    },
                )
                .await?;
            }
            return Ok(());
        }
    };
    let target = async {
        let t = registry
            .tenant(tenant)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        if !t.as_ref().as_ref().is_some_and(|t| t.enabled) {
            return anyhow::Ok(Err(Failure {
                status: 404,
                reason: "tenant unknown or disabled".into(),
            }));
        }
        let d = registry
            .device(tenant, &command.device_id)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
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
    .await?;
    let failure = match target {
        Ok(target) => {
            let internal = HonoTopic::command_internal(&target.instance_id)?.to_string();
            let mut out = OwnedHeaders::new_with_capacity(headers.len() + 4);
            for (k, v) in &headers {
                out = out.insert(Header { key: k, value: *v });
            }
            out = out.insert(Header {
                key: h::TENANT_ID,
                value: Some(tenant),
            });
            if let Some(gw) = &target.gateway_id {
                out = out.insert(Header {
                    key: h::VIA,
                    value: Some(gw.as_str()),
                });
            }
            let partition = msg.partition().to_string();
            let offset = msg.offset().to_string();
            out = out
                .insert(Header {
                    key: h::ORIG_PARTITION,
                    value: Some(&partition),
                })
                .insert(Header {
                    key: h::ORIG_OFFSET,
                    value: Some(&offset),
                });
            let mut record = FutureRecord::to(&internal)
                .key(command.device_id.as_bytes())
                .headers(out);
            if let Some(p) = msg.payload() {
                record = record.payload(p);
            }
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => None,
                Err((e, _)) => Some(Failure {
                    status: 503,
                    reason: format!("forwarding failed: {e}"),
                }),
            }
        }
        Err(f) => Some(f),
    };
    if let (Some(f), Some(cid)) = (failure, &command.correlation_id) {
        respond(producer, tenant, &command.device_id, cid, &headers, f).await?;
    }
    Ok(())
}

/// Writes a delivery-failure response for a request/response command.
async fn respond(
    producer: &FutureProducer,
    tenant: &str,
    device: &str,
    correlation_id: &str,
    command_headers: &[(&str, Option<&[u8]>)],
    failure: Failure,
) -> anyhow::Result<()> {
    let topic = HonoTopic::command_response(tenant)?.to_string();
    let fixed = response_headers(
        tenant,
        device,
        correlation_id,
        failure.status,
        Some(DELIVERY_FAILURE_NOTIFICATION),
    );
    let mut out = OwnedHeaders::new_with_capacity(fixed.len() + 2);
    for (k, v) in &fixed {
        out = out.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    for (k, v) in command_headers {
        if k.starts_with(h::DELIVERY_FAILURE_METADATA_PREFIX) {
            out = out.insert(Header { key: k, value: *v });
        }
    }
    let payload = delivery_failure_body(&failure.reason);
    producer
        .send(
            FutureRecord::to(&topic)
                .key(device)
                .headers(out)
                .payload(&payload),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!(e))?;
    Ok(())
}
