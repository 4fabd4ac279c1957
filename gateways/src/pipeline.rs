//! The ingest pipeline every protocol adapter calls for telemetry and events: authenticate →
//! authorise (tenant, adapter, device, gateway) → validate → build the Kafka record → produce →
//! answer by QoS. Adapters translate their wire format into an [`Upload`] and the
//! [`Refusal`] back, whose typed [`Reason`] each protocol looks up in one table
//! (`refusal.rs`). Every decision whether something may pass is made here: uploads, command
//! and error subscriptions, long polls and command responses.

use crate::kafka::{Delivery, DownstreamSender, OutboundRecord, ProduceError};
use crate::metrics;
pub use crate::refusal::{Reason, Refusal};
use ferrule_registry::model::device::Device;
use ferrule_registry::model::tenant::Tenant;
use ferrule_registry::{AuthError, AuthenticatedDevice, DeviceAuthenticator, TopicSchemas};
use ferrule_schemas::avro::{self, AVRO_CONTENT_TYPE};
use ferrule_schemas::command::{RequestId, is_valid_response_status};
use ferrule_schemas::content_type::is_empty_notification;
use ferrule_schemas::headers as h;
use ferrule_schemas::ttl::{TtlKind, effective_ttl_millis};
use ferrule_schemas::{ContentType, TopicKind, TopicNames};
use ferrule_telemetry::{KeyValue, Span, SpanKind, TraceContext, Tracer, sampler};
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;

/// Which protocol adapter a message came through (Hono's adapter type names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    Http,
    Mqtt,
    Coap,
}

impl AdapterType {
    pub const fn name(self) -> &'static str {
        match self {
            AdapterType::Http => "hono-http",
            AdapterType::Mqtt => "hono-mqtt",
            AdapterType::Coap => "hono-coap",
        }
    }
}

/// Telemetry (throughput) or event (reliability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Telemetry,
    Event,
}

impl Endpoint {
    pub const fn name(self) -> &'static str {
        match self {
            Endpoint::Telemetry => "telemetry",
            Endpoint::Event => "event",
        }
    }
}

/// The delivery guarantee the device asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

impl Qos {
    const fn as_i64(self) -> i64 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
        }
    }
}

/// Who sent a message: an authenticated device (maybe a gateway) or nobody known.
#[derive(Debug, Clone)]
pub enum Origin {
    /// Shared: a connection sends many messages as the same device.
    Device(Arc<AuthenticatedDevice>),
    Anonymous,
}

impl Origin {
    /// The authenticated device, if the sender is one.
    pub fn device(&self) -> Option<&Arc<AuthenticatedDevice>> {
        match self {
            Origin::Device(d) => Some(d),
            Origin::Anonymous => None,
        }
    }
}

/// One device message as an adapter hands it over.
#[derive(Debug, Clone)]
pub struct Upload {
    pub adapter: AdapterType,
    pub endpoint: Endpoint,
    pub qos: Qos,
    pub origin: Origin,
    /// Tenant and device named in the address: the gateway and unauthenticated forms. An
    /// empty tenant means "the gateway's own".
    pub target: Option<(String, String)>,
    pub content_type: Option<String>,
    /// The device's bytes as read from the wire, never copied before the producer.
    pub payload: bytes::Bytes,
    /// `hono-ttl` in seconds.
    pub ttl_secs: Option<i64>,
    /// Time until disconnect in seconds, already capped by the adapter.
    pub ttd_secs: Option<i64>,
    /// The URI or topic the message was sent to.
    pub orig_address: String,
    pub retain: bool,
    /// The W3C trace context the device sent (HTTP headers, MQTT 5 user properties).
    pub trace: Option<TraceContext>,
    /// When the request arrived, set while tracing is on by adapters that authenticate each
    /// request (HTTP): the upload span then starts there, with an `authenticated` event.
    pub received: Option<std::time::SystemTime>,
    /// A notification the adapter writes itself (a connection event, a ttd notification),
    /// not a device's payload: its topic's schema does not apply (docs/analytics.md).
    pub notification: bool,
}

/// Where an accepted message went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    pub tenant: String,
    pub device: String,
}

/// A sender the pipeline has checked, with the registry documents it was checked against.
#[derive(Debug, Clone)]
pub struct Authorised {
    pub tenant_id: String,
    /// The device the message is for (the sender itself unless a gateway acts for it).
    pub device_id: String,
    /// The gateway acting for the device, if any.
    pub gateway_id: Option<String>,
    tenant: Arc<Option<Tenant>>,
    device: Arc<Option<Device>>,
}

impl Authorised {
    // Only `authorise` builds this, after finding both documents: the `expect`s cannot fire.
    fn tenant(&self) -> &Tenant {
        self.tenant.as_ref().as_ref().expect("authorised tenant")
    }

    fn device(&self) -> &Device {
        self.device.as_ref().as_ref().expect("authorised device")
    }

    /// The tenant's `ext`, which may set its topics' partitions and replication.
    pub fn tenant_ext(&self) -> Option<&serde_json::Map<String, Value>> {
        self.tenant().ext.as_ref()
    }

    /// How long a device may wait for a command (Hono's long-poll rule in its HTTP adapter guide): the
    /// request capped by the tenant's `max-ttd` for the adapter, else `default_max`; `None`
    /// when that leaves no time.
    pub fn effective_ttd_secs(
        &self,
        adapter: AdapterType,
        requested: i64,
        default_max: i64,
    ) -> Option<i64> {
        let max = self.max_ttd_secs(adapter).unwrap_or(default_max);
        Some(requested.min(max)).filter(|t| *t > 0)
    }

    /// The tenant's `max-ttd` for `adapter` (`adapters[].ext.max-ttd`), if it sets one.
    pub fn max_ttd_secs(&self, adapter: AdapterType) -> Option<i64> {
        self.tenant()
            .adapters
            .iter()
            .flatten()
            .find(|a| a.adapter_type == adapter.name())
            .and_then(|a| a.ext.as_ref())
            .and_then(|ext| ext.get("max-ttd"))
            .and_then(Value::as_i64)
    }
}

/// Whose commands a subscription takes (see [`IngestPipeline::authorise_command_subscription`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandScope<'a> {
    /// The subscriber's own (a device, or a gateway for itself).
    Own,
    /// Any device a gateway may act for (MQTT's `+`).
    AllOfGateway,
    /// One device, named.
    One(&'a str),
}

/// An allowed command subscription.
#[derive(Debug, Clone)]
pub struct Subscribed {
    /// The checked subscriber: `device_id` is the id the subscription is registered under.
    pub who: Authorised,
    /// The device it is for as the pipeline takes an address: `None` for the subscriber
    /// itself, else tenant (maybe empty: the subscriber's own) and device. Notifications
    /// about the subscription are sent for it.
    pub target: Option<(String, String)>,
}

/// A device's response to a request/response command, as an adapter received it.
#[derive(Debug, Clone)]
pub struct DeviceResponse {
    pub adapter: AdapterType,
    pub origin: Origin,
    /// Tenant and device named in the address (gateway and unauthenticated forms).
    pub target: Option<(String, String)>,
    pub request_id: String,
    pub status: u16,
    pub content_type: Option<String>,
    pub payload: Vec<u8>,
}

/// What the pipeline reports about gateways, for whoever routes commands (the command side of
/// the gateway implements it): the pipeline knows nothing else of commands.
pub trait GatewayActivity: Send + Sync {
    /// `gateway` was authorised to act for `device` of `tenant` (an upload or a command
    /// subscription for it).
    fn acted_for(&self, tenant: &str, device: &str, gateway: &str);
}

/// The shared pipeline; cheap to clone into every connection.
#[derive(Clone)]
pub struct IngestPipeline {
    registry: DeviceAuthenticator,
    sender: Arc<DownstreamSender>,
    max_payload_size: usize,
    /// Told of each gateway acting for a device, if commands run.
    gateway_activity: Option<Arc<dyn GatewayActivity>>,
    /// Adapters whose configuration refuses unauthenticated devices whatever a tenant allows.
    anonymous_forbidden: Vec<AdapterType>,
    /// Spans of uploads (off unless traces are exported).
    tracer: Tracer,
}

struct Resolved {
    tenant: String,
    device: String,
    gateway: Option<String>,
    anonymous: bool,
}

impl IngestPipeline {
    pub fn new(
        registry: DeviceAuthenticator,
        sender: Arc<DownstreamSender>,
        max_payload_size: usize,
    ) -> Self {
        IngestPipeline {
            registry,
            sender,
            max_payload_size,
            gateway_activity: None,
            anonymous_forbidden: Vec::new(),
            tracer: Tracer::off(),
        }
    }

    /// Records a span per upload with `tracer` (docs/observability.md).
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    /// Records the span of an upload a protocol module refused before it reached the
    /// pipeline (its body, credentials or headers), from `since`: every refusal is traced,
    /// not only the pipeline's own.
    pub fn trace_refusal(
        &self,
        adapter: AdapterType,
        endpoint: Endpoint,
        parent: Option<&TraceContext>,
        since: std::time::SystemTime,
        e: &Refusal,
    ) {
        let name = match endpoint {
            Endpoint::Event => "upload event",
            Endpoint::Telemetry => "upload telemetry",
        };
        refusal_span(&self.tracer, name, adapter.name(), parent, since, e);
    }

    /// Refuses unauthenticated devices on `adapter` (`gateway.<adapter>.allow_unauthenticated
    /// = false`), even for tenants whose adapter entry sets `device-authentication-required:
    /// false`.
    pub fn forbid_anonymous(mut self, adapter: AdapterType) -> Self {
        self.anonymous_forbidden.push(adapter);
        self
    }

    /// Whether unauthenticated devices may use `adapter` at all; the tenant's adapter entry
    /// then decides per message.
    pub fn allows_anonymous(&self, adapter: AdapterType) -> bool {
        !self.anonymous_forbidden.contains(&adapter)
    }

    /// Reports each gateway acting for a device to `activity`, so that commands find the
    /// device's gateway.
    pub fn with_gateway_activity(mut self, activity: Arc<dyn GatewayActivity>) -> Self {
        self.gateway_activity = Some(activity);
        self
    }

    pub fn max_payload_size(&self) -> usize {
        self.max_payload_size
    }

    /// Authenticates a TLS client certificate: the tenant is the one whose trust anchor has
    /// the certificate's issuer DN and public key, the device the one whose `x509-cert`
    /// credentials name the certificate's subject DN.
    pub async fn authenticate_certificate(
        &self,
        der: &[u8],
    ) -> Result<AuthenticatedDevice, Refusal> {
        let untrusted = || Refusal::unauthenticated("client certificate is not trusted");
        let cert = crate::x509::parse(der).map_err(Refusal::unauthenticated)?;
        let tenant_id = self
            .registry
            .tenant_by_trust_anchor(&cert.issuer_dn)
            .await?
            .ok_or_else(untrusted)?;
        let tenant = self.registry.tenant(&tenant_id).await?;
        let tenant = tenant.as_ref().as_ref().ok_or_else(untrusted)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let trusted = tenant
            .trusted_ca
            .iter()
            .flatten()
            .filter(|ca| ca.subject_dn.as_deref() == Some(cert.issuer_dn.as_str()))
            .filter_map(|ca| ca.public_key.as_deref())
            .filter_map(|k| base64::Engine::decode(&b64, k).ok())
            .any(|spki| crate::x509::signed_by(der, &spki));
        if !trusted {
            return Err(untrusted());
        }
        Ok(self.registry.x509(&tenant_id, &cert.subject_dn).await?)
    }

    /// The registry view, for services that share its pool.
    pub fn registry(&self) -> &DeviceAuthenticator {
        &self.registry
    }

    /// Registry changes, for adapters that hold connections open.
    pub fn registry_changes(
        &self,
    ) -> tokio::sync::broadcast::Receiver<ferrule_registry::auth::RegistryChange> {
        self.registry.subscribe()
    }

    /// Whether an authenticated device may (still) hold a connection: tenant enabled, adapter
    /// enabled for it, device enabled.
    pub async fn authorise_connection(
        &self,
        adapter: AdapterType,
        device: &AuthenticatedDevice,
    ) -> Result<(), Refusal> {
        let tenant = self.registry.tenant(&device.tenant_id).await?;
        let tenant = tenant.as_ref().as_ref().ok_or_else(|| {
            Refusal::new(
                Reason::TenantNotFound,
                format!("tenant `{}` not found", device.tenant_id),
            )
        })?;
        authorise_tenant(tenant, adapter, false)?;
        let doc = self
            .registry
            .device(&device.tenant_id, &device.device_id)
            .await?;
        match doc.as_ref() {
            Some(d) if d.enabled => Ok(()),
            _ => Err(Refusal::new(
                Reason::DeviceNotFound,
                format!("device `{}` not found or disabled", device.device_id),
            )),
        }
    }

    /// Admits a connection (an MQTT CONNECT, a finished DTLS handshake): the device its
    /// credentials `authenticated` must still be allowed to hold one on `adapter`
    /// ([`Self::authorise_connection`]). Traced as a span `name` (Hono's `CONNECT`) from
    /// `since`, when the connection's first packet came, with the events `authenticated` and
    /// `authorised`, or the refusal; sampled as the device's tenant says.
    pub async fn admit_connection(
        &self,
        adapter: AdapterType,
        name: &'static str,
        since: std::time::SystemTime,
        authenticated: Result<AuthenticatedDevice, Refusal>,
    ) -> Result<AuthenticatedDevice, Refusal> {
        let authenticated_at = std::time::SystemTime::now();
        let admitted = match authenticated {
            Ok(device) => match self.authorise_connection(adapter, &device).await {
                Ok(()) => Ok(device),
                Err(e) => Err((Some(device), e)),
            },
            Err(e) => Err((None, e)),
        };
        if self.tracer.is_on() {
            let (device, refusal) = match &admitted {
                Ok(d) => (Some(d), None),
                Err((d, e)) => (d.as_ref(), Some(e)),
            };
            let sampling = device.and_then(|d| {
                let tenant = self.registry.cached_tenant(&d.tenant_id)?;
                let tracing = (*tenant).as_ref()?.tracing.as_ref();
                sampling_mode(tracing, Some(&d.auth_id))
            });
            let span =
                self.tracer.start(
                    name,
                    SpanKind::Server,
                    None,
                    Some(since),
                    || match sampling {
                        Some(mode) => vec![KeyValue::new(sampler::SAMPLING_MODE, mode)],
                        None => Vec::new(),
                    },
                );
            span.describe(|| {
                let mut attributes = vec![KeyValue::new("component_name", adapter.name())];
                if let Some(d) = device {
                    attributes.push(KeyValue::new("tenant_id", d.tenant_id.clone()));
                    attributes.push(KeyValue::new("device_id", d.device_id.clone()));
                    attributes.push(KeyValue::new("auth_id", d.auth_id.clone()));
                }
                attributes
            });
            if device.is_some() {
                span.add_event_at("authenticated", authenticated_at);
            }
            match refusal {
                None => span.add_event("authorised", Vec::new()),
                Some(e) => span.fail(e.to_string()),
            }
            span.end();
        }
        admitted.map_err(|(_, e)| e)
    }

    /// The pre-shared key of a DTLS identity `authId@tenant` (credentials of type `psk`), with
    /// the device it authenticates; asks the registry, and leaves the answer in its cache for
    /// [`Self::cached_psk`].
    pub async fn psk(&self, identity: &str) -> Result<(AuthenticatedDevice, Vec<u8>), Refusal> {
        Ok(self.registry.psk_key(identity).await?)
    }

    /// [`Self::psk`] from the registry cache alone, for a TLS library's synchronous key
    /// callback; `None` when the cache does not hold the identity.
    pub fn cached_psk(
        &self,
        identity: &str,
    ) -> Option<Result<(AuthenticatedDevice, Vec<u8>), Refusal>> {
        self.registry
            .cached_psk_key(identity)
            .map(|r| r.map_err(Refusal::from))
    }

    /// Checks `authId@tenant` + password for any adapter. `target` is the device the message
    /// is addressed to, if any: a disabled device sending for another one is a disabled
    /// gateway (403), a disabled device sending its own data is unknown (404), as in Hono.
    pub async fn authenticate(
        &self,
        username: &str,
        password: &[u8],
        target: Option<&(String, String)>,
    ) -> Result<AuthenticatedDevice, Refusal> {
        self.registry
            .verify_password(username, password)
            .await
            .map_err(|e| {
                let for_other = target.is_some_and(|(_, device)| {
                    ferrule_registry::auth::split_username(username)
                        .is_ok_and(|(auth_id, _)| auth_id != device)
                });
                match e {
                    AuthError::DeviceDisabled if for_other => {
                        Refusal::new(Reason::GatewayNotAuthorised, "gateway is disabled")
                    }
                    other => other.into(),
                }
            })
    }

    /// Checks that a sender may send for the addressed device (or itself): tenant enabled,
    /// adapter enabled for it, anonymous senders only where allowed, device enabled, and an
    /// acting gateway enabled and in the device's `via`/`viaGroups`. Every message, long poll
    /// and command response passes here.
    pub async fn authorise(
        &self,
        adapter: AdapterType,
        origin: &Origin,
        target: Option<&(String, String)>,
    ) -> Result<Authorised, Refusal> {
        let who = resolve(origin, target)?;
        let tenant = self.registry.tenant(&who.tenant).await?;
        let device = self.registry.device(&who.tenant, &who.device).await?;
        let gateway = match &who.gateway {
            Some(gw) => Some(self.registry.device(&who.tenant, gw).await?),
            None => None,
        };
        self.decide(adapter, who, tenant, device, gateway)
    }

    /// [`Self::authorise`] from the registry cache alone; `None` when a document is not
    /// cached, and the caller has to ask the registry.
    fn authorise_cached(
        &self,
        adapter: AdapterType,
        origin: &Origin,
        target: Option<&(String, String)>,
    ) -> Option<Result<Authorised, Refusal>> {
        let who = match resolve(origin, target) {
            Ok(who) => who,
            Err(e) => return Some(Err(e)),
        };
        let tenant = self.registry.cached_tenant(&who.tenant)?;
        let device = self.registry.cached_device(&who.tenant, &who.device)?;
        let gateway = match &who.gateway {
            Some(gw) => Some(self.registry.cached_device(&who.tenant, gw)?),
            None => None,
        };
        Some(self.decide(adapter, who, tenant, device, gateway))
    }

    /// The authorisation rules, given the registry documents of tenant, device and gateway.
    fn decide(
        &self,
        adapter: AdapterType,
        who: Resolved,
        tenant: Arc<Option<Tenant>>,
        device: Arc<Option<Device>>,
        gateway: Option<Arc<Option<Device>>>,
    ) -> Result<Authorised, Refusal> {
        if who.anonymous && !self.allows_anonymous(adapter) {
            return Err(Refusal::unauthenticated(format!(
                "the {} adapter requires device authentication",
                adapter.name()
            )));
        }
        let t = tenant.as_ref().as_ref().ok_or_else(|| {
            Refusal::new(
                Reason::TenantNotFound,
                format!("tenant `{}` not found", who.tenant),
            )
        })?;
        authorise_tenant(t, adapter, who.anonymous)?;
        let d = device
            .as_ref()
            .as_ref()
            .filter(|d| d.enabled)
            .ok_or_else(|| {
                Refusal::new(
                    Reason::DeviceNotFound,
                    format!("device `{}` not found or disabled", who.device),
                )
            })?;
        if let (Some(gw), Some(gateway)) = (&who.gateway, &gateway) {
            let gateway = gateway
                .as_ref()
                .as_ref()
                .filter(|g| g.enabled)
                .ok_or_else(|| {
                    Refusal::new(
                        Reason::GatewayNotAuthorised,
                        format!("gateway `{gw}` unknown or disabled"),
                    )
                })?;
            if !may_act_for(gw, gateway, d) {
                return Err(Refusal::new(
                    Reason::GatewayNotAuthorised,
                    format!("gateway `{gw}` may not act for device `{}`", who.device),
                ));
            }
            if let Some(activity) = &self.gateway_activity {
                activity.acted_for(&who.tenant, &who.device, gw);
            }
        }
        Ok(Authorised {
            tenant_id: who.tenant,
            device_id: who.device,
            gateway_id: who.gateway,
            tenant,
            device,
        })
    }

    /// Runs one message through the pipeline; returns once the message may be acknowledged
    /// to the device under its QoS.
    /// Decides a subscription for commands (an MQTT SUBSCRIBE, a long poll's scope):
    /// `tenant` may be empty (the subscriber's own); `device` is the subscriber itself, all
    /// devices of a gateway, or one device. `bound_tenant` is the tenant an earlier
    /// subscription of the same connection took: a connection serves one tenant.
    pub async fn authorise_command_subscription(
        &self,
        adapter: AdapterType,
        origin: &Origin,
        tenant: &str,
        device: CommandScope<'_>,
        bound_tenant: Option<&str>,
    ) -> Result<Subscribed, Refusal> {
        let target = match device {
            CommandScope::Own | CommandScope::AllOfGateway if tenant.is_empty() => None,
            CommandScope::Own | CommandScope::AllOfGateway => origin
                .device()
                .map(|d| (tenant.to_owned(), d.device_id.clone())),
            CommandScope::One(d) => Some((tenant.to_owned(), d.to_owned())),
        };
        if device == CommandScope::AllOfGateway && origin.device().is_none() {
            return Err(Refusal::unauthenticated(
                "only an authenticated gateway subscribes for all its devices",
            ));
        }
        let who = self.authorise(adapter, origin, target.as_ref()).await?;
        if bound_tenant.is_some_and(|t| t != who.tenant_id) {
            return Err(Refusal::new(
                Reason::OtherTenant,
                "a connection takes commands of one tenant",
            ));
        }
        Ok(Subscribed { who, target })
    }

    /// Decides a subscription to error messages (Hono's MQTT error topic) for `device` of
    /// `tenant` (either may be empty: the subscriber's own; `device` may be `+`: any device
    /// of a gateway). Returns the device id errors of the subscriber's own messages name.
    /// Errors are only ever told to the connection that caused them, so no registry look-up
    /// is needed: an authenticated device may not name another tenant, an unauthenticated one
    /// must name both tenant and device.
    pub fn authorise_error_subscription(
        &self,
        origin: &Origin,
        tenant: &str,
        device: &str,
    ) -> Result<String, Refusal> {
        match origin.device() {
            Some(d) if tenant.is_empty() || tenant == d.tenant_id => Ok(d.device_id.clone()),
            Some(_) => Err(Refusal::new(
                Reason::OtherTenant,
                "errors of another tenant's devices",
            )),
            None if tenant.is_empty() || device.is_empty() || device == "+" => Err(
                Refusal::unauthenticated("an unauthenticated device names tenant and device"),
            ),
            None => Ok(device.to_owned()),
        }
    }

    /// Decides a device's response to a request/response command: a request id Ferrule
    /// issued that is still awaited, a valid status, a payload within `max_payload_size`, and
    /// a sender that may answer for the device. Returns whom the response is for.
    pub async fn authorise_response(
        &self,
        r: &DeviceResponse,
    ) -> Result<(Authorised, RequestId), Refusal> {
        let request = RequestId::decode(&r.request_id)
            .ok_or_else(|| Refusal::malformed("unknown request id"))?;
        if !is_valid_response_status(r.status) {
            return Err(Refusal::malformed(format!(
                "invalid response status {}",
                r.status
            )));
        }
        if r.payload.len() > self.max_payload_size {
            return Err(Refusal::payload_too_large(self.max_payload_size));
        }
        let who = self
            .authorise(r.adapter, &r.origin, r.target.as_ref())
            .await?;
        if request.expired_at(h::now_millis()) {
            return Err(Refusal::new(
                Reason::NoConsumer,
                "the application no longer waits for this response",
            ));
        }
        Ok((who, request))
    }

    pub async fn upload(&self, up: Upload) -> Result<Accepted, Refusal> {
        self.submit(up).await?.outcome().await
    }

    /// [`Self::upload`] for an upload that opened a long poll: once forwarded, its metric
    /// waits for the poll's end ([`TtdMetric::record`]); a refusal counts at once.
    pub async fn upload_polled(&self, up: Upload) -> Result<(Accepted, TtdMetric), Refusal> {
        let mut pending = self.submit(up).await?;
        pending.meta.deferred = true;
        let accepted = std::future::poll_fn(|cx| pending.poll_outcome(cx)).await?;
        let tenant = accepted.tenant.clone();
        Ok((accepted, TtdMetric(Some((pending.meta, tenant)))))
    }

    /// Checks the message and hands it to the producer, in the order of calls; the returned
    /// [`Pending`] resolves when the device may be answered. Adapters that keep several
    /// messages in flight (MQTT) call this in arrival order to keep each device's order.
    pub async fn submit(&self, up: Upload) -> Result<Pending, Refusal> {
        match self.submit_now(up) {
            SubmitNow::Done(done) => done,
            // Boxed: asking the registry or creating the topic is rare, and the future of
            // every message would otherwise carry room for it.
            SubmitNow::Deferred(up) => Box::pin(self.submit_asking(up)).await,
        }
    }

    /// [`Self::submit`] without waiting, for the usual message whose registry documents are
    /// cached and whose topic exists; the message comes back when something has to be asked
    /// first — hand it to [`Self::submit`] then.
    pub fn submit_now(&self, up: Upload) -> SubmitNow {
        let meta = Meta::of(&up, &self.tracer);
        if let Err(e) = self.check(&up) {
            return SubmitNow::Done(Err(meta.finish_err(e)));
        }
        let who = match self.authorise_cached(up.adapter, &up.origin, up.target.as_ref()) {
            None => return SubmitNow::Deferred(up),
            Some(Err(e)) => return SubmitNow::Done(Err(meta.finish_err(e))),
            Some(Ok(who)) => who,
        };
        let topic = match topic_for(self.sender.names(), &up, &who) {
            Ok(t) => t,
            Err(e) => return SubmitNow::Done(Err(meta.finish_err(e))),
        };
        if !self.sender.is_known(&topic) {
            return SubmitNow::Deferred(up);
        }
        let Some(schemas) = self.registry().cached_topic_schemas(&who.tenant_id, &topic) else {
            return SubmitNow::Deferred(up);
        };
        let record = match record_for(&up, &who, topic, schemas.as_ref().as_ref()) {
            Ok(r) => r,
            Err(e) => return SubmitNow::Done(Err(meta.finish_err_of(&who.tenant_id, e))),
        };
        SubmitNow::Done(self.enqueue(&up, who, record, meta))
    }

    /// [`Self::submit`] asking the registry and creating the topic where needed.
    async fn submit_asking(&self, up: Upload) -> Result<Pending, Refusal> {
        let meta = Meta::of(&up, &self.tracer);
        let result = async {
            self.check(&up)?;
            let who = self
                .authorise(up.adapter, &up.origin, up.target.as_ref())
                .await?;
            let topic = topic_for(self.sender.names(), &up, &who)?;
            self.sender
                .ensure_topic(&topic, who.tenant().ext.as_ref())
                .await
                .map_err(produce_error)?;
            let schemas = self
                .registry()
                .topic_schemas(&who.tenant_id, &topic)
                .await?;
            // A refusal from here on is counted for the tenant.
            Ok(
                match record_for(&up, &who, topic, schemas.as_ref().as_ref()) {
                    Ok(record) => Ok((who, record)),
                    Err(e) => Err((who.tenant_id, e)),
                },
            )
        }
        .await;
        match result {
            Ok(Ok((who, record))) => self.enqueue(&up, who, record, meta),
            Ok(Err((tenant, e))) => Err(meta.finish_err_of(&tenant, e)),
            Err(e) => Err(meta.finish_err(e)),
        }
    }

    /// The checks that need no registry: payload size, QoS of events.
    fn check(&self, up: &Upload) -> Result<(), Refusal> {
        if up.payload.len() > self.max_payload_size {
            return Err(Refusal::payload_too_large(self.max_payload_size));
        }
        if up.endpoint == Endpoint::Event && up.qos == Qos::AtMostOnce {
            return Err(Refusal::malformed("events must be sent with QoS 1"));
        }
        Ok(())
    }

    /// Hands the record to the producer.
    fn enqueue(
        &self,
        up: &Upload,
        who: Authorised,
        record: Record,
        mut meta: Meta,
    ) -> Result<Pending, Refusal> {
        let span = meta.upload_span(up, &who, &record.topic);
        span.add_event("authorised", Vec::new());
        // The next hop continues this span's trace, else the device's.
        let headers = match span.context().as_ref().or(up.trace.as_ref()) {
            Some(trace) => with_trace(record.headers, trace),
            None => record.headers,
        };
        let delivery = self.sender.enqueue(OutboundRecord {
            topic: &record.topic,
            key: &who.device_id,
            headers,
            payload: record.payload.as_deref().unwrap_or(&up.payload),
        });
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                let e = produce_error(e);
                span.fail(e.to_string());
                return Err(meta.finish_err(e));
            }
        };
        span.add_event("produced", Vec::new());
        // QoS 0 telemetry is answered without waiting for the broker.
        let wait = up.endpoint == Endpoint::Event || up.qos == Qos::AtLeastOnce;
        Ok(Pending {
            accepted: Accepted {
                tenant: who.tenant_id,
                device: who.device_id,
            },
            delivery: wait.then_some(delivery),
            meta,
            span,
        })
    }
}

/// The span of an upload refused before it had one: named like the upload's, failed with the
/// refusal, from `since` until now.
fn refusal_span(
    tracer: &Tracer,
    name: &'static str,
    adapter: &'static str,
    parent: Option<&TraceContext>,
    since: std::time::SystemTime,
    e: &Refusal,
) {
    let span = tracer.start(name, SpanKind::Server, parent, Some(since), Vec::new);
    span.describe(|| vec![KeyValue::new("component_name", adapter)]);
    span.fail(e.to_string());
    span.end();
}

/// `headers` with the trace context the next hop continues.
fn with_trace(headers: OwnedHeaders, trace: &TraceContext) -> OwnedHeaders {
    let headers = headers.insert(Header {
        key: h::TRACEPARENT,
        value: Some(trace.traceparent.as_bytes()),
    });
    match &trace.tracestate {
        Some(state) => headers.insert(Header {
            key: h::TRACESTATE,
            value: Some(state.as_bytes()),
        }),
        None => headers,
    }
}

/// A tenant's sampling mode for uploads of `auth_id` (Hono's tenant `tracing`:
/// `sampling-mode-per-auth-id` first, then `sampling-mode`); `None` for `default` or unset.
pub fn sampling_mode(
    tracing: Option<&ferrule_registry::model::tenant::TracingConfig>,
    auth_id: Option<&str>,
) -> Option<&'static str> {
    let tracing = tracing?;
    let per_auth_id = auth_id.and_then(|a| tracing.sampling_mode_per_auth_id.as_ref()?.get(a));
    sampler::mode(
        tracing.sampling_mode.as_deref(),
        per_auth_id.map(String::as_str),
    )
}

/// What [`IngestPipeline::submit_now`] did with a message.
pub enum SubmitNow {
    /// Handed to the producer, or refused.
    Done(Result<Pending, Refusal>),
    /// The registry must be asked or the topic created first: hand it to `submit`.
    Deferred(Upload),
}

/// A message's topic and headers, and its payload when the pipeline changed it (a JSON
/// payload encoded with its topic's schema).
struct Record {
    topic: String,
    headers: OwnedHeaders,
    payload: Option<Vec<u8>>,
}

/// The topic of an authorised message.
fn topic_for(names: &TopicNames, up: &Upload, who: &Authorised) -> Result<String, Refusal> {
    let kind = match up.endpoint {
        Endpoint::Telemetry => TopicKind::Telemetry,
        Endpoint::Event => TopicKind::Event,
    };
    names
        .name(kind, &who.tenant_id)
        .map_err(|e| Refusal::malformed(e.to_string()))
}

/// Builds the Kafka record of an authorised message for `topic`: content type, ttl, every
/// header, and the payload in the topic's schema when it has one (docs/analytics.md).
fn record_for(
    up: &Upload,
    who: &Authorised,
    topic: String,
    schemas: Option<&TopicSchemas>,
) -> Result<Record, Refusal> {
    let (tenant, device) = (who.tenant(), who.device());
    let defaults = merged_defaults(tenant, device);
    let given_ct = up.content_type.clone().or_else(|| {
        defaults
            .get(h::CONTENT_TYPE)
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let ct = ContentType::for_upload(given_ct.as_deref(), up.payload.len())
        .map_err(|e| Refusal::malformed(e.to_string()))?;
    let ttl = ttl_millis(up, tenant, device);
    let typed = match schemas {
        Some(schemas) if !up.notification && !is_empty_notification(ct.as_str()) => {
            typed(schemas, &up.payload)?
        }
        _ => None,
    };
    let headers = match &typed {
        // The record says it is Avro, and what the device sent, so the AMQP bridge can give
        // Hono applications JSON again.
        Some(_) => {
            let mut hs = build_headers(up, &who.device_id, AVRO_CONTENT_TYPE, ttl, &defaults);
            hs = hs.insert(Header {
                key: h::SOURCE_CONTENT_TYPE,
                value: Some(ct.as_str().as_bytes()),
            });
            hs
        }
        None => build_headers(up, &who.device_id, ct.as_str(), ttl, &defaults),
    };
    Ok(Record {
        topic,
        headers,
        payload: typed,
    })
}

/// A payload checked against its topic's schemas: one already in the Confluent wire format
/// must name a live version of the subject and be one whole value of it (kept as sent,
/// `None`); anything else must be a JSON value of the latest version, returned encoded.
fn typed(schemas: &TopicSchemas, payload: &[u8]) -> Result<Option<Vec<u8>>, Refusal> {
    let refuse = |e: &dyn std::fmt::Display| {
        Refusal::new(
            Reason::PayloadNotConforming,
            format!("the payload does not fit the topic's schema: {e}"),
        )
    };
    if avro::is_wire_format(payload) {
        let Some((id, datum)) = avro::split_wire(payload) else {
            return Err(refuse(&"the Avro wire format needs 5 header bytes"));
        };
        let Some(schema) = schemas.by_id(id) else {
            return Err(refuse(&format!(
                "schema {id} is not a live version of the topic's subject"
            )));
        };
        schema.check(datum).map_err(|e| refuse(&e))?;
        return Ok(None);
    }
    let mut out = Vec::new();
    schemas
        .latest()
        .encode_json(payload, &mut out)
        .map_err(|e| refuse(&e))?;
    Ok(Some(out))
}

/// What metrics and the upload's span need to know about a message in flight.
struct Meta {
    adapter: &'static str,
    kind: &'static str,
    qos: i64,
    size: usize,
    started: Instant,
    /// Where the upload's span starts, while tracing is on and it has not started yet.
    trace: Option<Box<Traced>>,
    /// A forwarded upload is counted by its [`TtdMetric`], once its long poll ended.
    deferred: bool,
}

/// The metric of a forwarded upload that opened a long poll, recorded when the poll ends:
/// Hono's `ttd` tag says whether a command came (`command`) or the time ran out (`expired`).
/// Dropped unrecorded, it counts as expired.
pub struct TtdMetric(Option<(Meta, String)>);

impl TtdMetric {
    pub fn record(mut self, command: bool) {
        if let Some((meta, tenant)) = self.0.take() {
            let ttd = if command { "command" } else { "expired" };
            meta.record(&tenant, "forwarded", ttd);
        }
    }
}

impl Drop for TtdMetric {
    fn drop(&mut self) {
        if let Some((meta, tenant)) = self.0.take() {
            meta.record(&tenant, "forwarded", "expired");
        }
    }
}

/// An upload whose span is still to start: it starts once tenant and device are known.
struct Traced {
    tracer: Tracer,
    since: std::time::SystemTime,
    /// When the upload reached the pipeline, its device authenticated by the adapter for
    /// this request alone; `None` for a connection's device or an unauthenticated one.
    authenticated: Option<std::time::SystemTime>,
    parent: Option<TraceContext>,
}

impl Meta {
    fn of(up: &Upload, tracer: &Tracer) -> Self {
        Meta {
            adapter: up.adapter.name(),
            kind: up.endpoint.name(),
            qos: up.qos.as_i64(),
            size: up.payload.len(),
            started: Instant::now(),
            trace: tracer.is_on().then(|| {
                let now = std::time::SystemTime::now();
                let authenticated = up.received.filter(|_| up.origin.device().is_some());
                Box::new(Traced {
                    tracer: tracer.clone(),
                    since: up.received.unwrap_or(now),
                    authenticated: authenticated.map(|_| now),
                    parent: up.trace.clone(),
                })
            }),
            deferred: false,
        }
    }

    /// The span of an upload (Hono's `upload telemetry` / `upload event`), from the moment it
    /// reached the pipeline; sampled as its tenant's `tracing` settings say.
    fn upload_span(&mut self, up: &Upload, who: &Authorised, topic: &str) -> Span {
        let Some(t) = self.trace.take() else {
            return Span::none();
        };
        let auth_id = up.origin.device().map(|d| d.auth_id.as_str());
        let sampling = sampling_mode(who.tenant().tracing.as_ref(), auth_id);
        let span = t.tracer.start(
            self.span_name(),
            SpanKind::Server,
            t.parent.as_ref(),
            Some(t.since),
            || match sampling {
                Some(mode) => vec![KeyValue::new(sampler::SAMPLING_MODE, mode)],
                None => Vec::new(),
            },
        );
        span.describe(|| {
            let mut attributes = vec![
                KeyValue::new("tenant_id", who.tenant_id.clone()),
                KeyValue::new("device_id", who.device_id.clone()),
                KeyValue::new("component_name", self.adapter),
                KeyValue::new("qos", self.qos),
                KeyValue::new("message_size", self.size as i64),
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
            ];
            if let Some(auth_id) = auth_id {
                attributes.push(KeyValue::new("auth_id", auth_id.to_owned()));
            }
            if let Some(gateway) = &who.gateway_id {
                attributes.push(KeyValue::new("gateway_id", gateway.clone()));
            }
            attributes
        });
        if let Some(at) = t.authenticated {
            span.add_event_at("authenticated", at);
        }
        span
    }

    fn span_name(&self) -> &'static str {
        match self.kind {
            "event" => "upload event",
            _ => "upload telemetry",
        }
    }

    /// Counts the message, unless a forwarded one waits for its long poll (`deferred`).
    fn finish(&self, tenant: &str, status: &str) {
        if !(self.deferred && status == "forwarded") {
            self.record(tenant, status, "none");
        }
    }

    fn record(&self, tenant: &str, status: &str, ttd: &str) {
        let qos = if self.qos == 0 { "0" } else { "1" };
        let secs = self.started.elapsed().as_secs_f64();
        let labels = [self.adapter, tenant, self.kind, status, qos, ttd];
        metrics::message(labels, secs, self.size);
    }

    fn finish_err(&self, e: Refusal) -> Refusal {
        self.finish_err_of("", e)
    }

    /// [`Self::finish_err`] for a refusal after the tenant was known, counted for it.
    fn finish_err_of(&self, tenant: &str, e: Refusal) -> Refusal {
        let status = if e.is_unavailable() {
            "undeliverable"
        } else {
            "unprocessable"
        };
        if e.reason == Reason::PayloadNotConforming {
            metrics::payload_schema_refused(self.adapter, tenant, self.kind);
        }
        self.finish(tenant, status);
        // Refused before its tenant was known: a span of the refusal alone.
        if let Some(t) = &self.trace {
            refusal_span(
                &t.tracer,
                self.span_name(),
                self.adapter,
                t.parent.as_ref(),
                t.since,
                &e,
            );
        }
        e
    }
}

/// A message handed to the producer; resolves when the device may be answered.
pub struct Pending {
    accepted: Accepted,
    delivery: Option<Delivery>,
    meta: Meta,
    /// Ends when the broker acknowledged (or at once for QoS 0 telemetry).
    span: Span,
}

impl Pending {
    /// Waits for the broker's ack where the QoS needs one.
    pub async fn outcome(mut self) -> Result<Accepted, Refusal> {
        std::future::poll_fn(|cx| self.poll_outcome(cx)).await
    }

    /// Whether the device may be answered without waiting (QoS 0 telemetry).
    pub fn is_answerable_now(&self) -> bool {
        self.delivery.is_none()
    }

    /// What to answer, once the broker answered where the QoS needs it; counts the message.
    /// Lets a connection keep many messages in a plain queue; not polled again once ready.
    pub fn poll_outcome(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Accepted, Refusal>> {
        let acked = match &mut self.delivery {
            Some(d) => std::task::ready!(d.poll_acked(cx)),
            None => Ok(()),
        };
        let span = std::mem::take(&mut self.span);
        std::task::Poll::Ready(match acked {
            Err(e) => {
                let e = produce_error(e);
                span.fail(e.to_string());
                span.end();
                Err(self.meta.finish_err(e))
            }
            Ok(()) => {
                if self.delivery.is_some() {
                    span.add_event("acknowledged", Vec::new());
                }
                span.end();
                self.meta.finish(&self.accepted.tenant, "forwarded");
                Ok(std::mem::take(&mut self.accepted))
            }
        })
    }
}

/// A setting of `tenant`'s entry for `adapter` (`adapters[].ext.<key>`); `None` when the
/// tenant, the entry or the setting is not there (the adapter's default then applies).
pub fn adapter_setting_of(
    tenant: Option<&Tenant>,
    adapter: AdapterType,
    key: &str,
) -> Option<Value> {
    tenant?
        .adapters
        .iter()
        .flatten()
        .find(|a| a.adapter_type == adapter.name())?
        .ext
        .as_ref()?
        .get(key)
        .cloned()
}

fn produce_error(e: ProduceError) -> Refusal {
    Refusal::downstream(e)
}

/// Works out tenant, device and acting gateway from the sender and the address.
fn resolve(origin: &Origin, target: Option<&(String, String)>) -> Result<Resolved, Refusal> {
    match (origin, target) {
        (Origin::Device(d), None) => Ok(Resolved {
            tenant: d.tenant_id.clone(),
            device: d.device_id.clone(),
            gateway: None,
            anonymous: false,
        }),
        (Origin::Device(d), Some((tenant, device))) => {
            if !tenant.is_empty() && *tenant != d.tenant_id {
                return Err(Refusal::new(
                    Reason::OtherTenant,
                    "a gateway may only act for devices of its own tenant",
                ));
            }
            let gateway = (*device != d.device_id).then(|| d.device_id.clone());
            Ok(Resolved {
                tenant: d.tenant_id.clone(),
                device: device.clone(),
                gateway,
                anonymous: false,
            })
        }
        (Origin::Anonymous, Some((tenant, device))) if !tenant.is_empty() => Ok(Resolved {
            tenant: tenant.clone(),
            device: device.clone(),
            gateway: None,
            anonymous: true,
        }),
        (Origin::Anonymous, _) => Err(Refusal::unauthenticated("authentication required")),
    }
}

/// Tenant enabled, adapter enabled for it, and anonymous uploads only where it allows them.
fn authorise_tenant(tenant: &Tenant, adapter: AdapterType, anonymous: bool) -> Result<(), Refusal> {
    if !tenant.enabled {
        return Err(Refusal::new(Reason::TenantDisabled, "tenant is disabled"));
    }
    let entry = match &tenant.adapters {
        None => None,
        Some(list) => Some(
            list.iter()
                .find(|a| a.adapter_type == adapter.name())
                .filter(|a| a.enabled)
                .ok_or_else(|| {
                    Refusal::new(
                        Reason::AdapterDisabled,
                        format!("adapter {} is disabled for the tenant", adapter.name()),
                    )
                })?,
        ),
    };
    if anonymous && entry.is_none_or(|a| a.device_authentication_required) {
        return Err(Refusal::unauthenticated(
            "the tenant requires device authentication",
        ));
    }
    Ok(())
}

/// A gateway may act for a device that names it in `via` or shares a group via `viaGroups`.
fn may_act_for(gateway_id: &str, gateway: &Device, device: &Device) -> bool {
    device.via.iter().flatten().any(|v| v == gateway_id)
        || device
            .via_groups
            .iter()
            .flatten()
            .any(|g| gateway.member_of.iter().flatten().any(|m| m == g))
}

/// Tenant defaults overlaid with device defaults (the device's win).
fn merged_defaults(tenant: &Tenant, device: &Device) -> serde_json::Map<String, Value> {
    let mut m = tenant.defaults.clone().unwrap_or_default();
    m.extend(device.defaults.clone().unwrap_or_default());
    m
}

fn ttl_millis(up: &Upload, tenant: &Tenant, device: &Device) -> Option<i64> {
    let kind = match (up.endpoint, up.qos) {
        (Endpoint::Event, _) => TtlKind::Event,
        (Endpoint::Telemetry, Qos::AtMostOnce) => TtlKind::TelemetryQos0,
        (Endpoint::Telemetry, Qos::AtLeastOnce) => TtlKind::TelemetryQos1,
    };
    let limits = tenant.resource_limits.as_ref();
    let max = limits.map(|l| match kind {
        TtlKind::Event => l.max_ttl,
        TtlKind::TelemetryQos0 => l.max_ttl_telemetry_qos0,
        TtlKind::TelemetryQos1 => l.max_ttl_telemetry_qos1,
        TtlKind::CommandResponse => l.max_ttl_command_response,
    });
    let default_of = |d: &Option<serde_json::Map<String, Value>>| {
        d.as_ref()
            .and_then(|m| m.get(kind.default_key()))
            .and_then(Value::as_i64)
    };
    // Only events honour a device's own ttl request (`hono-ttl`).
    let requested = if up.endpoint == Endpoint::Event {
        up.ttl_secs
    } else {
        None
    };
    effective_ttl_millis(
        max,
        requested,
        default_of(&device.defaults),
        default_of(&tenant.defaults),
    )
}

/// Every header Hono's Kafka-based Telemetry and Event APIs give a record, then the defaults
/// the message lacks. Written straight into the record's headers: this runs for every message.
fn build_headers(
    up: &Upload,
    device: &str,
    content_type: &str,
    ttl: Option<i64>,
    defaults: &serde_json::Map<String, Value>,
) -> OwnedHeaders {
    let mut out = RecordHeaders::new();
    out.put(h::CONTENT_TYPE, content_type.as_bytes());
    out.put_i64(h::CREATION_TIME, h::now_millis());
    out.put(h::DEVICE_ID, device.as_bytes());
    out.put_i64(h::QOS, up.qos.as_i64());
    out.put(h::ORIG_ADAPTER, up.adapter.name().as_bytes());
    out.put(h::ORIG_ADDRESS, up.orig_address.as_bytes());
    let ttd = up
        .ttd_secs
        .or_else(|| defaults.get(h::TTD).and_then(Value::as_i64));
    if let Some(ttd) = ttd {
        out.put_i64(h::TTD, ttd);
    }
    if let Some(ttl) = ttl {
        out.put_i64(h::TTL, ttl);
    }
    if up.retain {
        out.put(h::RETAIN, h::encode_bool(true));
    }
    for (k, v) in defaults {
        // The trace context is the one of the message (`with_trace`), never a default.
        let consumed = k == h::TTL
            || h::TTL_DEFAULT_KEYS.contains(&k.as_str())
            || k == h::TRACEPARENT
            || k == h::TRACESTATE;
        if !consumed && !out.has(k) {
            out.insert(k, &h::encode(v));
        }
    }
    out.into_headers()
}

/// The headers of one record and the names of the fixed ones, so a default never repeats one.
struct RecordHeaders {
    headers: Option<OwnedHeaders>,
    names: [&'static str; 10],
    len: usize,
}

impl RecordHeaders {
    fn new() -> Self {
        RecordHeaders {
            headers: Some(OwnedHeaders::new_with_capacity(12)),
            names: [""; 10],
            len: 0,
        }
    }

    /// A header whose name defaults may not repeat.
    fn put(&mut self, name: &'static str, value: &[u8]) {
        self.insert(name, value);
        if let Some(slot) = self.names.get_mut(self.len) {
            *slot = name;
            self.len += 1;
        }
    }

    /// An integer header as Hono writes it (decimal text), formatted without allocating.
    fn put_i64(&mut self, name: &'static str, value: i64) {
        let mut buf = itoa::Buffer::new();
        self.put(name, buf.format(value).as_bytes());
    }

    fn insert(&mut self, name: &str, value: &[u8]) {
        // `OwnedHeaders::insert` takes the list by value.
        self.headers = self.headers.take().map(|hs| {
            hs.insert(Header {
                key: name,
                value: Some(value),
            })
        });
    }

    fn into_headers(self) -> OwnedHeaders {
        self.headers.unwrap_or_default()
    }

    fn has(&self, name: &str) -> bool {
        self.names[..self.len].contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn resolve_up(up: &Upload) -> Result<Resolved, Refusal> {
        resolve(&up.origin, up.target.as_ref())
    }

    fn upload(origin: Origin, target: Option<(&str, &str)>) -> Upload {
        Upload {
            adapter: AdapterType::Http,
            endpoint: Endpoint::Telemetry,
            qos: Qos::AtMostOnce,
            origin,
            target: target.map(|(t, d)| (t.to_owned(), d.to_owned())),
            content_type: None,
            payload: bytes::Bytes::from_static(b"{}"),
            ttl_secs: None,
            ttd_secs: None,
            orig_address: "/telemetry".into(),
            retain: false,
            trace: None,
            received: None,
            notification: false,
        }
    }

    fn dev(tenant: &str, device: &str) -> Origin {
        Origin::Device(Arc::new(AuthenticatedDevice {
            tenant_id: tenant.into(),
            device_id: device.into(),
            auth_id: device.into(),
        }))
    }

    #[test]
    fn resolves_devices_gateways_and_anonymous_senders() {
        let r = resolve_up(&upload(dev("t", "d"), None)).unwrap();
        assert_eq!(
            (r.tenant.as_str(), r.device.as_str(), r.gateway),
            ("t", "d", None)
        );
        let r = resolve_up(&upload(dev("t", "gw"), Some(("", "d")))).unwrap();
        assert_eq!(r.gateway.as_deref(), Some("gw"));
        let r = resolve_up(&upload(dev("t", "gw"), Some(("t", "gw")))).unwrap();
        assert_eq!(r.gateway, None);
        assert!(matches!(
            resolve_up(&upload(dev("t", "gw"), Some(("other", "d")))),
            Err(Refusal {
                reason: Reason::OtherTenant,
                ..
            })
        ));
        let r = resolve_up(&upload(Origin::Anonymous, Some(("t", "d")))).unwrap();
        assert!(r.anonymous);
        assert!(matches!(
            resolve_up(&upload(Origin::Anonymous, None)),
            Err(Refusal {
                reason: Reason::Unauthenticated,
                ..
            })
        ));
        assert!(matches!(
            resolve_up(&upload(Origin::Anonymous, Some(("", "d")))),
            Err(Refusal {
                reason: Reason::Unauthenticated,
                ..
            })
        ));
    }

    fn tenant(v: Value) -> Tenant {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn adapter_and_anonymous_rules() {
        assert!(authorise_tenant(&tenant(serde_json::json!({})), AdapterType::Http, false).is_ok());
        assert!(matches!(
            authorise_tenant(&tenant(serde_json::json!({})), AdapterType::Http, true),
            Err(Refusal {
                reason: Reason::Unauthenticated,
                ..
            })
        ));
        assert!(matches!(
            authorise_tenant(
                &tenant(serde_json::json!({"enabled": false})),
                AdapterType::Http,
                false
            ),
            Err(Refusal {
                reason: Reason::TenantDisabled,
                ..
            })
        ));
        let only_mqtt =
            tenant(serde_json::json!({"adapters": [{"type": "hono-mqtt", "enabled": true}]}));
        assert!(matches!(
            authorise_tenant(&only_mqtt, AdapterType::Http, false),
            Err(Refusal {
                reason: Reason::AdapterDisabled,
                ..
            })
        ));
        assert!(authorise_tenant(&only_mqtt, AdapterType::Mqtt, false).is_ok());
        let open = tenant(
            serde_json::json!({"adapters": [{"type": "hono-http", "enabled": true,
            "device-authentication-required": false}]}),
        );
        assert!(authorise_tenant(&open, AdapterType::Http, true).is_ok());
    }

    #[test]
    fn via_and_groups() {
        let d: Device =
            serde_json::from_value(serde_json::json!({"via": ["gw1"], "viaGroups": ["g"]}))
                .unwrap();
        let gw: Device = serde_json::from_value(serde_json::json!({})).unwrap();
        let member: Device =
            serde_json::from_value(serde_json::json!({"memberOf": ["g"]})).unwrap();
        assert!(may_act_for("gw1", &gw, &d));
        assert!(!may_act_for("gw2", &gw, &d));
        assert!(may_act_for("gw2", &member, &d));
    }

    #[test]
    fn headers_and_defaults() {
        let mut up = upload(dev("t", "d"), None);
        up.ttd_secs = Some(30);
        up.retain = true;
        let defaults = serde_json::json!({"ttl": 10, "ttl-telemetry-qos0": 5, "custom": 7,
                                          "qos": 9, "label": "x"});
        let hs = build_headers(
            &up,
            "d",
            "text/plain",
            Some(5000),
            defaults.as_object().unwrap(),
        );
        let get = |k: &str| {
            hs.iter()
                .find(|hd| hd.key == k)
                .and_then(|hd| hd.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("content-type").as_deref(), Some("text/plain"));
        assert_eq!(get("device_id").as_deref(), Some("d"));
        assert_eq!(
            get("qos").as_deref(),
            Some("0"),
            "defaults never override set headers"
        );
        assert_eq!(get("ttd").as_deref(), Some("30"));
        assert_eq!(get("ttl").as_deref(), Some("5000"));
        assert_eq!(get("x-opt-retain").as_deref(), Some("true"));
        assert_eq!(get("orig_adapter").as_deref(), Some("hono-http"));
        assert_eq!(get("custom").as_deref(), Some("7"));
        assert_eq!(get("label").as_deref(), Some("x"));
        assert!(get("ttl-telemetry-qos0").is_none());
        assert!(get("creation-time").unwrap().parse::<i64>().unwrap() > 1_700_000_000_000);
    }
}
