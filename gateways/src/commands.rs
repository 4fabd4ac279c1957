//! Commands on the gateway side: this instance's id and heartbeat, the command subscriptions of
//! its connections (kept in the router's PostgreSQL state too), its internal command topic, and
//! the responses devices send back.

use crate::kafka::{DownstreamSender, OutboundRecord};
use crate::pipeline::UploadError;
use ferrule_command_router::RoutingState;
use ferrule_schemas::HonoTopic;
use ferrule_schemas::command::{delivery_failure_body, is_valid_response_status, response_headers};
use ferrule_schemas::content_type::DELIVERY_FAILURE_NOTIFICATION;
use ferrule_schemas::headers as h;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// A command for a device connected to this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandDelivery {
    pub device_id: String,
    pub subject: String,
    /// `Some` for request/response commands.
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub payload: Vec<u8>,
}

/// Commands waiting for one connection; bounded, a full queue fails the command (503).
pub type CommandQueue = mpsc::Sender<CommandDelivery>;

/// How often this instance tells the router it is alive.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// The command side of one gateway instance; cheap to clone.
#[derive(Clone)]
pub struct CommandHub {
    inner: Arc<Inner>,
}

struct Inner {
    instance_id: String,
    routing: RoutingState,
    sender: Arc<DownstreamSender>,
    /// (tenant, device or gateway) → the connection holding the subscription.
    subscribers: Mutex<HashMap<(String, String), CommandQueue>>,
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

impl CommandHub {
    pub fn new(routing: RoutingState, sender: Arc<DownstreamSender>) -> Self {
        // Must be a legal Kafka topic suffix: `ferrule-gateway-<uuid>`.
        let instance_id = format!("ferrule-gateway-{}", uuid::Uuid::new_v4().simple());
        CommandHub {
            inner: Arc::new(Inner {
                instance_id,
                routing,
                sender,
                subscribers: Mutex::new(HashMap::new()),
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

    fn subscribers(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), CommandQueue>> {
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Routes commands for `device` (a device, or a gateway for all its devices) to `queue`;
    /// the newest subscription wins.
    pub async fn subscribe(
        &self,
        tenant: &str,
        device: &str,
        queue: CommandQueue,
    ) -> Result<(), UploadError> {
        self.subscribers()
            .insert((tenant.to_owned(), device.to_owned()), queue);
        self.inner
            .routing
            .register(tenant, device, &self.inner.instance_id, None)
            .await
            .map_err(|e| UploadError::Unavailable(format!("routing state: {e}")))
    }

    /// Ends a subscription of this instance (a newer one elsewhere is left alone).
    pub async fn unsubscribe(&self, tenant: &str, device: &str) {
        self.subscribers()
            .remove(&(tenant.to_owned(), device.to_owned()));
        if let Err(e) = self
            .inner
            .routing
            .unregister(tenant, device, &self.inner.instance_id)
            .await
        {
            tracing::warn!(error = %e, "unregistering a command consumer failed");
        }
    }

    /// Writes a device's (or a Hono-generated) command response.
    pub async fn respond(
        &self,
        tenant: &str,
        device: &str,
        correlation_id: &str,
        status: u16,
        content_type: Option<&str>,
        payload: &[u8],
    ) -> Result<(), UploadError> {
        if !is_valid_response_status(status) {
            return Err(UploadError::BadRequest(format!(
                "invalid response status {status}"
            )));
        }
        let topic = HonoTopic::command_response(tenant)
            .map_err(|e| UploadError::BadRequest(e.to_string()))?
            .to_string();
        let ct = content_type
            .or((!payload.is_empty()).then_some(ferrule_schemas::content_type::OCTET_STREAM));
        let headers = response_headers(tenant, device, correlation_id, status, ct)
            .iter()
            .fold(OwnedHeaders::new_with_capacity(6), |hs, (k, v)| {
                hs.insert(Header {
                    key: k,
                    value: Some(v),
                })
            });
        let unavailable = |e: crate::kafka::ProduceError| {
            UploadError::Unavailable(format!("downstream unavailable: {e}"))
        };
        self.inner
            .sender
            .ensure_topic(&topic)
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
            .map_err(unavailable)?
            .acked()
            .await
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
        let body = delivery_failure_body(reason);
        let sent = self
            .respond(
                tenant,
                device,
                correlation_id,
                status,
                Some(DELIVERY_FAILURE_NOTIFICATION),
                &body,
            )
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, device, "delivery-failure response lost");
        }
    }

    /// Heartbeats and the internal command topic, until `shutdown` turns true.
    pub async fn run(
        self,
        bootstrap: String,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let topic = HonoTopic::command_internal(self.instance_id())?.to_string();
        // Kafka or PostgreSQL may be down at start: keep trying, the adapters run meanwhile.
        loop {
            let ready = async {
                self.inner.sender.ensure_topic(&topic).await?;
                self.inner.routing.heartbeat(self.instance_id()).await?;
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
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", self.instance_id())
            .set("auto.offset.reset", "earliest")
            .set("log_level", "3")
            .create()?;
        consumer.subscribe(&[&topic])?;
        tracing::info!(instance = %self.instance_id(), "consuming commands");
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if let Err(e) = self.inner.routing.heartbeat(self.instance_id()).await {
                        tracing::warn!(error = %e, "heartbeat failed");
                    }
                }
                msg = consumer.recv() => match msg {
                    Ok(m) => self.deliver(&m).await,
                    Err(e) => tracing::warn!(error = %e, "internal command consumer error"),
                },
                _ = stopped(&mut shutdown) => break,
            }
        }
        // Commands for this instance must fail fast from now on.
        let held: Vec<(String, String)> = self.subscribers().keys().cloned().collect();
        for (t, d) in held {
            let _ = self
                .inner
                .routing
                .unregister(&t, &d, self.instance_id())
                .await;
        }
        Ok(())
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
        let delivery = CommandDelivery {
            device_id: device.clone(),
            subject,
            correlation_id: correlation_id.clone(),
            content_type: text(h::CONTENT_TYPE),
            payload: m.payload().unwrap_or_default().to_vec(),
        };
        // The device's own subscription first, then its gateway's.
        let holder = [Some(device.clone()), text(h::VIA)]
            .into_iter()
            .flatten()
            .find_map(|d| self.subscribers().get(&(tenant.clone(), d)).cloned());
        let delivered = match holder {
            Some(queue) => queue.try_send(delivery).is_ok(),
            None => false,
        };
        if !delivered && let Some(cid) = correlation_id {
            self.fail(
                &tenant,
                &device,
                &cid,
                503,
                "device is not connected to this gateway",
            )
            .await;
        }
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
