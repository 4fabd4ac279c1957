//! The CoAP adapter (`hono-coap`, RFC 7252 over UDP): a thin receive loop around the ingest
//! pipeline. `resource` reads a request's resource and Hono's options; `exchanges` answers a
//! retransmitted request from its cached response; this module turns a request into an
//! upload or a command response and the pipeline's answer into a CoAP response, with the
//! codes of the one reason table (`crate::refusal`).
//!
//! Plain UDP carries no credentials: every request on it is from an unauthenticated device,
//! which names tenant and device in the path (`PUT /telemetry/{tenant}/{device}`).

pub mod blocks;
pub mod dtls;
pub mod dtls_wire;
pub mod exchanges;
pub mod resource;

use crate::commands::{CommandDelivery, CommandHub, upload_with_ttd};
use crate::metrics;
use crate::pipeline::{
    AdapterType, DeviceResponse, Endpoint, IngestPipeline, Origin, Qos, Refusal, SubmitNow, Upload,
    adapter_setting_of,
};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
use exchanges::{Exchanges, Seen};
use ferrule_registry::model::tenant::Tenant;
use resource::{Resource, ResourceError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio_util::task::TaskTracker;

const ADAPTER: AdapterType = AdapterType::Coap;

/// The `[gateway.coap]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// Whether plain CoAP over UDP is served (unauthenticated devices only).
    pub enabled: bool,
    /// Where plain CoAP listens (Hono's insecure port is 5683).
    pub bind: SocketAddr,
    /// `false` refuses unauthenticated devices (4.01) whatever a tenant allows.
    pub allow_unauthenticated: bool,
    /// Requests handled at once; more are answered 5.03 at once.
    pub max_in_flight: usize,
    /// Recent exchanges remembered for answering retransmissions; the oldest are forgotten
    /// first.
    pub max_exchanges: usize,
    /// How long a request's message id is remembered (RFC 7252 §4.8.2's EXCHANGE_LIFETIME,
    /// 247 s).
    pub exchange_lifetime_secs: u64,
    /// The longest `hono-ttd` for tenants without `max-ttd` in their `hono-coap` entry.
    pub max_ttd_secs: i64,
    /// Whether CoAP over DTLS with pre-shared keys is served (authenticated devices).
    pub dtls_enabled: bool,
    /// Where CoAP over DTLS listens (Hono's secure port is 5684).
    pub dtls_bind: SocketAddr,
    /// DTLS sessions at most; further handshakes are dropped.
    pub max_dtls_sessions: usize,
    /// DTLS handshakes in progress at most (each holds a session slot until it ends or times
    /// out); further ones are dropped.
    pub max_dtls_handshakes: usize,
    /// A DTLS session without a datagram for this long ends.
    pub dtls_idle_timeout_secs: u64,
    /// A DTLS handshake not done within this ends.
    pub dtls_handshake_timeout_secs: u64,
    /// Hono's `timeoutToAck` (ms): a response to a CON that takes longer goes separately,
    /// after an empty ACK; 0 acknowledges at once, a negative value always piggybacks. The
    /// tenant's `adapters[hono-coap].ext.timeoutToAck` overrides it.
    pub timeout_to_ack_ms: i64,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            enabled: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 5683)),
            allow_unauthenticated: true,
            max_in_flight: 10_000,
            max_exchanges: 100_000,
            exchange_lifetime_secs: 247,
            max_ttd_secs: 60,
            timeout_to_ack_ms: 500,
            dtls_enabled: true,
            dtls_bind: SocketAddr::from(([127, 0, 0, 1], 5684)),
            max_dtls_sessions: 10_000,
            max_dtls_handshakes: 500,
            dtls_idle_timeout_secs: 300,
            dtls_handshake_timeout_secs: 10,
        }
    }
}

/// What every request handler shares.
pub struct Server {
    pipeline: IngestPipeline,
    hub: Option<CommandHub>,
    exchanges: Exchanges,
    /// Block-wise uploads being received.
    assemblies: blocks::Assemblies,
    /// Responses too large for one block, being fetched block by block.
    downloads: blocks::Downloads,
    in_flight: Arc<Semaphore>,
    /// The exchanges in flight; closed at shutdown, when the listener waits for them.
    exchanges_running: TaskTracker,
    /// Message ids of the messages this server starts (NON and separate responses).
    next_message_id: std::sync::atomic::AtomicU16,
    /// Separate responses waiting for the device's ACK (`true`) or Reset (`false`), by
    /// device and message id; at most one per request in flight.
    awaiting_ack: std::sync::Mutex<HashMap<exchanges::Key, oneshot::Sender<bool>>>,
    cfg: CoapConfig,
}

/// A response, and the command it carries, whose delivery is reported once the response is
/// known to have reached the device.
struct Reply {
    packet: Packet,
    command: Option<(String, CommandDelivery)>,
    /// For a command sent in blocks: fires once the device asked for the last one.
    fetched: Option<oneshot::Receiver<()>>,
}

impl From<Packet> for Reply {
    fn from(packet: Packet) -> Self {
        Reply {
            packet,
            command: None,
            fetched: None,
        }
    }
}

/// What a request came to.
enum Outcome {
    Changed,
    /// A command for the device, with its tenant, and whether its device must be named.
    Command(String, Box<CommandDelivery>, bool),
}

/// A request as [`resource::parse`] read it.
type Parsed = Result<resource::Request, ResourceError>;

/// RFC 7252 §4.8: the first retransmission after 2 s, then doubling, at most 4 times.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;

/// Who sent a request, and how answers reach it.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The DTLS session's number (unique in the process); 0 over plain UDP.
    session: u64,
    link: Link,
    /// Anonymous over plain UDP; the device a DTLS session authenticated.
    pub origin: Origin,
}

#[derive(Clone)]
enum Link {
    Plain(Arc<UdpSocket>),
    /// Plaintext for the peer's DTLS session to encrypt and send.
    Dtls(tokio::sync::mpsc::Sender<Vec<u8>>),
}

impl Peer {
    /// A peer of a DTLS session: what is sent to it goes through `session`.
    pub fn dtls(
        addr: SocketAddr,
        session: tokio::sync::mpsc::Sender<Vec<u8>>,
        origin: Origin,
    ) -> Self {
        static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Peer {
            addr,
            session: SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            link: Link::Dtls(session),
            origin,
        }
    }

    /// The endpoint a message id belongs to (see [`exchanges::Endpoint`]).
    fn endpoint(&self) -> exchanges::Endpoint {
        (self.addr, self.session)
    }

    /// Sends one CoAP message; a full socket or session queue drops it (the device retransmits
    /// a CON).
    fn send(&self, bytes: &[u8]) {
        match &self.link {
            Link::Plain(socket) => {
                let _ = socket.try_send_to(bytes, self.addr);
            }
            Link::Dtls(session) => {
                let _ = session.try_send(bytes.to_vec());
            }
        }
    }
}

/// Serves plain CoAP on `socket` until `shutdown` turns true.
pub async fn serve(
    socket: UdpSocket,
    pipeline: IngestPipeline,
    hub: Option<CommandHub>,
    cfg: CoapConfig,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tracing::info!(addr = %socket.local_addr()?, "CoAP adapter listening");
    let server = Server::new(pipeline, hub, cfg);
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Some((n, addr)) = receive(&socket, &mut buf, &server, &mut shutdown).await {
        let peer = Peer {
            addr,
            session: 0,
            link: Link::Plain(socket.clone()),
            origin: Origin::Anonymous,
        };
        server.clone().datagram(&buf[..n], peer);
    }
    Ok(())
}

/// The largest UDP datagram: a longer one cannot arrive, so none is cut short.
const MAX_DATAGRAM: usize = 65_535;

/// The next datagram and its sender; `None` once `shutdown` turned true and every exchange in
/// flight then has finished. Until then datagrams still arrive: a device's ACK of a separate
/// response, or a retransmission, must reach its exchange; a new request is refused
/// ([`Server::datagram`]).
async fn receive(
    socket: &UdpSocket,
    buf: &mut [u8],
    server: &Server,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(usize, SocketAddr)> {
    loop {
        let stopping = server.exchanges_running.is_closed();
        tokio::select! {
            r = socket.recv_from(buf) => match r {
                Ok(r) => return Some(r),
                // An ICMP error of an earlier send to a gone peer surfaces here on some
                // systems: it concerns that peer only.
                Err(e) => tracing::debug!(error = %e, "CoAP receive failed"),
            },
            _ = shutdown.wait_for(|s| *s), if !stopping => {
                server.exchanges_running.close();
                // A command still being fetched block by block is reported undelivered now,
                // not when its device gives up.
                server.downloads.clear();
            }
            _ = server.exchanges_running.wait(), if stopping => return None,
        }
    }
}

impl Server {
    pub fn new(pipeline: IngestPipeline, hub: Option<CommandHub>, cfg: CoapConfig) -> Arc<Self> {
        Arc::new(Server {
            pipeline: pipeline.clone(),
            hub,
            exchanges: Exchanges::new(
                cfg.max_exchanges,
                Duration::from_secs(cfg.exchange_lifetime_secs),
            ),
            assemblies: blocks::Assemblies::new(
                cfg.max_exchanges,
                pipeline.max_payload_size(),
                Duration::from_secs(cfg.exchange_lifetime_secs),
            ),
            downloads: blocks::Downloads::new(
                cfg.max_exchanges,
                Duration::from_secs(cfg.exchange_lifetime_secs),
            ),
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            exchanges_running: TaskTracker::new(),
            next_message_id: std::sync::atomic::AtomicU16::new(rand_u16()),
            awaiting_ack: Default::default(),
            cfg,
        })
    }
}

impl Server {
    /// One datagram: a request is handled in a task of its own (bounded), a retransmitted
    /// one answered from the cache, anything else dropped and counted.
    pub fn datagram(self: Arc<Self>, bytes: &[u8], peer: Peer) {
        let packet = match Packet::from_bytes(bytes) {
            Ok(p) => p,
            Err(_) => {
                metrics::rejected(ADAPTER.name(), "malformed-datagram");
                return;
            }
        };
        // Another version of CoAP is ignored (RFC 7252 §3).
        if packet.header.get_version() != 1 {
            metrics::rejected(ADAPTER.name(), "malformed-datagram");
            return;
        }
        let kind = packet.header.get_type();
        match (kind, packet.header.code) {
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Request(_)) => {}
            // A CoAP ping (an empty CON), and a CON the server cannot process (a response or a
            // reserved code), is answered with a Reset (RFC 7252 §4.2, §4.3).
            (MessageType::Confirmable, code) => {
                if code != MessageClass::Empty {
                    metrics::rejected(ADAPTER.name(), "unprocessable-message");
                }
                let mut rst = Packet::new();
                rst.header.set_type(MessageType::Reset);
                rst.header.code = MessageClass::Empty;
                rst.header.message_id = packet.header.message_id;
                self.send(&rst, &peer);
                return;
            }
            // The device's answer to a separate response.
            (MessageType::Acknowledgement | MessageType::Reset, _) => {
                let waiting = self
                    .awaiting_ack
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(peer.endpoint(), packet.header.message_id));
                if let Some(tx) = waiting {
                    let _ = tx.send(kind == MessageType::Acknowledgement);
                }
                return;
            }
            // Responses the server never asked for.
            _ => return,
        }
        let key = (peer.endpoint(), packet.header.message_id);
        match self.exchanges.begin(key) {
            Seen::New if self.exchanges_running.is_closed() => {
                return self.unavailable(key, &packet, &peer, "the gateway is shutting down");
            }
            Seen::New => {}
            Seen::Answered(response) => {
                metrics::coap_duplicate("answered");
                if kind == MessageType::Confirmable {
                    peer.send(&response);
                }
                return;
            }
            Seen::InProgress => {
                metrics::coap_duplicate("in-progress");
                return;
            }
        }
        // A request for a further block of a response is answered from that response.
        match blocks::block2_of(&packet) {
            Ok(Some(asked)) if asked.num > 0 => return self.next_block(key, &packet, asked, &peer),
            Ok(_) => {}
            Err(blocks::MalformedBlock) => {
                metrics::rejected(ADAPTER.name(), "bad-option");
                let response = self.response(&packet, ResponseType::BadOption);
                self.finish(key, &response, &peer);
                return;
            }
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return self.unavailable(key, &packet, &peer, "too many requests in flight");
        };
        // Read once: the resource and options decide the ACK timeout and the handling.
        let parsed = resource::parse(&packet);
        let Some((packet, parsed, peer, permit)) =
            self.clone().upload_now(key, packet, parsed, peer, permit)
        else {
            return;
        };
        let running = self.exchanges_running.clone();
        running.spawn(async move {
            self.exchange(key, packet, parsed, &peer).await;
            drop(permit);
        });
    }

    /// Answers a request for block `asked` (number 1 or later) of a response being fetched
    /// (RFC 7959 §2.4): the device repeats its request with a Block2 option, which is never
    /// handled as a request of its own. 4.08 when no such response is being fetched (or it
    /// expired), 4.02 for a block past its end.
    fn next_block(&self, key: exchanges::Key, packet: &Packet, asked: blocks::Block, peer: &Peer) {
        let uri = uri_of(packet);
        let shell = self.response(packet, ResponseType::Changed);
        let response = match self.downloads.fetch(peer.endpoint(), &uri, asked) {
            blocks::Fetch::Block(mut block) => {
                block.header.set_type(shell.header.get_type());
                block.header.message_id = shell.header.message_id;
                block.set_token(shell.get_token().to_vec());
                block
            }
            blocks::Fetch::Unknown => {
                metrics::rejected(ADAPTER.name(), "block-unknown");
                let mut r = self.response(packet, ResponseType::RequestEntityIncomplete);
                r.payload = b"no block-wise response of this request is being fetched".to_vec();
                r
            }
            blocks::Fetch::OutOfRange => {
                metrics::rejected(ADAPTER.name(), "bad-option");
                self.response(packet, ResponseType::BadOption)
            }
        };
        self.finish(key, &response, peer);
    }

    /// Answers a request the server cannot take now: 5.03 (the pipeline's `Overloaded`).
    fn unavailable(&self, key: exchanges::Key, packet: &Packet, peer: &Peer, why: &'static str) {
        let refusal = Refusal::overloaded(why);
        let response = self.refusal_response(packet, &refusal);
        self.finish(key, &response, peer);
    }

    /// Handles a request and answers it: piggybacked on the ACK of a CON when the answer is
    /// ready within the ACK timeout, else an empty ACK at that time and the answer later in a
    /// CON of its own (RFC 7252 §5.2.2), which the device acknowledges.
    async fn exchange(&self, key: exchanges::Key, packet: Packet, parsed: Parsed, peer: &Peer) {
        let ack_after = match packet.header.get_type() {
            MessageType::Confirmable => self.ack_timeout(&parsed, peer).await,
            _ => None,
        };
        let token = packet.get_token().to_vec();
        let work = self.handle(packet, parsed, peer);
        tokio::pin!(work);
        let reply = match ack_after {
            None => work.await,
            Some(after) => match tokio::time::timeout(after, &mut work).await {
                Ok(reply) => reply,
                Err(_) => {
                    // Retransmissions of the request get the empty ACK again.
                    self.finish(key, &empty_ack(key.1), peer);
                    let reply = work.await;
                    // Boxed: its retransmission state is needed by late answers only.
                    let acked = Box::pin(self.separate(reply.packet, token, peer)).await;
                    self.report(reply.command, acked, reply.fetched).await;
                    return;
                }
            },
        };
        let sent = self.finish(key, &reply.packet, peer);
        self.report(reply.command, sent, reply.fetched).await;
    }

    /// The ACK timeout for a CON request (see [`Self::ack_timeout_for`]).
    async fn ack_timeout(&self, parsed: &Parsed, peer: &Peer) -> Option<Duration> {
        let request = parsed.as_ref().ok();
        let tenant = match ack_tenant(request, peer) {
            // If the registry cannot be asked, the configured timeout applies.
            Some(t) => self.pipeline.registry().tenant(&t).await.ok(),
            None => None,
        };
        self.ack_timeout_for(tenant.as_deref().and_then(Option::as_ref), request)
    }

    /// [`Self::ack_timeout`] from the registry cache alone; `None` when the tenant is not
    /// cached.
    fn ack_timeout_now(
        &self,
        request: &resource::Request,
        peer: &Peer,
    ) -> Option<Option<Duration>> {
        let tenant = match ack_tenant(Some(request), peer) {
            Some(t) => Some(self.pipeline.registry().cached_tenant(&t)?),
            None => None,
        };
        Some(self.ack_timeout_for(tenant.as_deref().and_then(Option::as_ref), Some(request)))
    }

    /// The tenant's `timeoutToAck`, else the configured one; 0 with `piggy` replaced by the
    /// tenant's `deviceTriggeredTimeoutToAck` if it has one; `None` for a negative value:
    /// always piggyback.
    fn ack_timeout_for(
        &self,
        tenant: Option<&Tenant>,
        request: Option<&resource::Request>,
    ) -> Option<Duration> {
        let setting = |key| adapter_setting_of(tenant, ADAPTER, key).and_then(|v| v.as_i64());
        let mut ms = setting("timeoutToAck").unwrap_or(self.cfg.timeout_to_ack_ms);
        if ms == 0
            && request.is_some_and(|r| r.piggy)
            && let Some(device) = setting("deviceTriggeredTimeoutToAck")
        {
            ms = device;
        }
        u64::try_from(ms).ok().map(Duration::from_millis)
    }

    /// The usual upload — no block-wise transfer, no `hono-ttd`, its sender's registry
    /// documents cached — goes to the producer right here, and only a small task waits for the
    /// broker's answer (a task per request that could need the registry or a long poll is as
    /// large as all of that). Everything else comes back for [`Self::exchange`].
    fn upload_now(
        self: Arc<Self>,
        key: exchanges::Key,
        packet: Packet,
        parsed: Parsed,
        peer: Peer,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Option<(Packet, Parsed, Peer, tokio::sync::OwnedSemaphorePermit)> {
        let back = |packet, parsed, peer, permit| Some((packet, parsed, peer, permit));
        let fast = match &parsed {
            Ok(
                request @ resource::Request {
                    resource: Resource::Upload { endpoint, target },
                    ..
                },
            ) if request.ttd.is_none_or(|t| t <= 0)
                && packet.get_first_option(CoapOption::Block1).is_none() =>
            {
                Some((request, *endpoint, target))
            }
            _ => None,
        };
        let Some((request, endpoint, target)) = fast else {
            return back(packet, parsed, peer, permit);
        };
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let ack_after = match confirmable {
            true => match self.ack_timeout_now(request, &peer) {
                Some(after) => after,
                None => return back(packet, parsed, peer, permit),
            },
            false => None,
        };
        let up = upload_of(
            &packet,
            &peer,
            request,
            endpoint,
            target.clone(),
            confirmable,
        );
        let time = request.time;
        let pending = match self.pipeline.submit_now(up) {
            SubmitNow::Deferred(_) => return back(packet, parsed, peer, permit),
            SubmitNow::Done(Ok(pending)) => pending,
            SubmitNow::Done(Err(e)) => {
                let response = self.refusal_response(&packet, &e);
                self.finish(key, &with_time(response, time), &peer);
                return None;
            }
        };
        // What the answer needs of the request: its type, message id and token.
        let mut head = Packet::new();
        head.header = packet.header.clone();
        head.set_token(packet.get_token().to_vec());
        drop((packet, parsed));
        let running = self.exchanges_running.clone();
        running.spawn(async move {
            let mut pending = pending;
            let mut outcome = std::future::poll_fn(|cx| pending.poll_outcome(cx));
            let answer = |result: Result<_, Refusal>| {
                let response = match result {
                    Ok(_) => self.response(&head, ResponseType::Changed),
                    Err(e) => self.refusal_response(&head, &e),
                };
                with_time(response, time)
            };
            match ack_after {
                None => {
                    let response = answer(outcome.await);
                    self.finish(key, &response, &peer);
                }
                Some(after) => match tokio::time::timeout(after, &mut outcome).await {
                    Ok(result) => {
                        let response = answer(result);
                        self.finish(key, &response, &peer);
                    }
                    Err(_) => {
                        self.finish(key, &empty_ack(key.1), &peer);
                        let response = answer(outcome.await);
                        let token = head.get_token().to_vec();
                        // Rare: its retransmission state lives on the heap, not in every task.
                        Box::pin(self.separate(response, token, &peer)).await;
                    }
                },
            }
            drop(permit);
        });
        None
    }

    /// Sends a separate response as a CON and waits for the device's ACK, retransmitting as
    /// RFC 7252 §4.2 says; whether it was acknowledged.
    async fn separate(&self, mut response: Packet, token: Vec<u8>, peer: &Peer) -> bool {
        let mid = self
            .next_message_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        response.header.set_type(MessageType::Confirmable);
        response.header.message_id = mid;
        response.set_token(token);
        let Ok(bytes) = response.to_bytes_unlimited() else {
            return false;
        };
        let (tx, mut rx) = oneshot::channel();
        let awaiting = || self.awaiting_ack.lock().unwrap_or_else(|p| p.into_inner());
        awaiting().insert((peer.endpoint(), mid), tx);
        let mut wait = ACK_TIMEOUT;
        let mut acked = false;
        for _ in 0..=MAX_RETRANSMIT {
            peer.send(&bytes);
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(answer) => {
                    acked = answer.unwrap_or(false);
                    break;
                }
                Err(_) => wait *= 2,
            }
        }
        awaiting().remove(&(peer.endpoint(), mid));
        acked
    }

    /// Tells the command's sender whether the response carrying it reached the device; for a
    /// command sent in blocks, whether the device then asked for the last block within the
    /// exchange lifetime.
    async fn report(
        &self,
        command: Option<(String, CommandDelivery)>,
        reached: bool,
        fetched: Option<oneshot::Receiver<()>>,
    ) {
        let (Some((tenant, cmd)), Some(hub)) = (command, &self.hub) else {
            return;
        };
        let lifetime = Duration::from_secs(self.cfg.exchange_lifetime_secs);
        let reached = match fetched {
            Some(last) if reached => {
                matches!(tokio::time::timeout(lifetime, last).await, Ok(Ok(())))
            }
            _ => reached,
        };
        if reached {
            hub.delivered(&cmd);
        } else {
            let (cid, outcome) = (cmd.correlation_id.as_deref(), cmd.outcome.as_ref());
            let reason = "the device did not acknowledge the response carrying the command, \
                          or did not fetch all of its blocks";
            cmd.progress.failed(503, reason);
            // Boxed: the failure's record is rare, and every exchange would carry its room.
            Box::pin(hub.undelivered(&tenant, &cmd.device_id, cid, outcome, reason)).await;
        }
    }

    /// Sends `response` and keeps it for retransmissions of its request.
    /// Whether it could be encoded and was handed to the socket or session.
    fn finish(&self, key: exchanges::Key, response: &Packet, peer: &Peer) -> bool {
        // A command larger than one block was cut into blocks before (`blocks::Downloads`).
        match response.to_bytes_unlimited() {
            Ok(bytes) => {
                peer.send(&bytes);
                self.exchanges.answered(key, bytes.into());
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "CoAP response could not be encoded");
                self.exchanges.forget(key);
                false
            }
        }
    }

    fn send(&self, packet: &Packet, peer: &Peer) {
        if let Ok(bytes) = packet.to_bytes_unlimited() {
            peer.send(&bytes);
        }
    }

    /// Handles one request: its response.
    async fn handle(
        &self,
        mut packet: Packet,
        parsed: Result<resource::Request, ResourceError>,
        peer: &Peer,
    ) -> Reply {
        let packet = &mut packet;
        let block1 = match packet.get_first_option(CoapOption::Block1) {
            None => None,
            Some(value) => match blocks::Block::decode(value) {
                Some(b) => Some(b),
                None => {
                    metrics::rejected(ADAPTER.name(), "bad-option");
                    return self.response(packet, ResponseType::BadOption).into();
                }
            },
        };
        if let Some(block) = block1 {
            // Before a body is kept, its sender must be allowed to send there at all.
            if block.num == 0
                && let Ok(resource::Request {
                    resource: Resource::Upload { target, .. },
                    ..
                }) = &parsed
                && let Err(e) = self
                    .pipeline
                    .authorise(ADAPTER, &peer.origin, target.as_ref())
                    .await
            {
                return self.refusal_response(packet, &e).into();
            }
            let uri = uri_of(packet);
            match self
                .assemblies
                .add(peer.endpoint(), &uri, block, &packet.payload)
            {
                blocks::Step::Continue(b) => {
                    let mut r = self.response(packet, ResponseType::Continue);
                    r.add_option(CoapOption::Block1, b.encode());
                    return r.into();
                }
                blocks::Step::Complete(body, _) => packet.payload = body,
                blocks::Step::Incomplete => {
                    metrics::rejected(ADAPTER.name(), "block-incomplete");
                    return self
                        .response(packet, ResponseType::RequestEntityIncomplete)
                        .into();
                }
                blocks::Step::TooLarge => {
                    let limit = self.pipeline.max_payload_size();
                    return self
                        .refusal_response(packet, &Refusal::payload_too_large(limit))
                        .into();
                }
            }
        }
        let packet = &*packet;
        let request = match parsed {
            Ok(r) => r,
            Err(ResourceError::NotFound) => {
                metrics::rejected(ADAPTER.name(), "unknown-resource");
                return self.response(packet, ResponseType::NotFound).into();
            }
            Err(ResourceError::BadOption(number)) => {
                metrics::rejected(ADAPTER.name(), "bad-option");
                let mut r = self.response(packet, ResponseType::BadOption);
                r.payload = format!("option {number} is not supported").into_bytes();
                return r.into();
            }
            Err(ResourceError::MethodNotAllowed) => {
                metrics::rejected(ADAPTER.name(), "method-not-allowed");
                return self.response(packet, ResponseType::MethodNotAllowed).into();
            }
            Err(ResourceError::Refused(e)) => return self.refusal_response(packet, &e).into(),
        };
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let result = match request.resource.clone() {
            Resource::Upload { endpoint, target } => {
                self.upload(packet, peer, &request, endpoint, target, confirmable)
                    .await
            }
            Resource::CommandResponse { target, request_id } => self
                .command_response(packet, peer, &request, target, request_id)
                .await
                .map(|()| Outcome::Changed),
        };
        let (mut command, mut fetched) = (None, None);
        let mut response = match result {
            Ok(Outcome::Changed) => self.response(packet, ResponseType::Changed),
            Ok(Outcome::Command(tenant, cmd, named)) => {
                let mut r = self.response(packet, ResponseType::Changed);
                let anonymous = peer.origin.device().is_none();
                command_into(&mut r, &cmd, named, anonymous, &request, &tenant);
                // The device's Block2 in its request is the largest block it takes (RFC 7959
                // §2.4, early negotiation).
                let szx = blocks::block2_of(packet).ok().flatten().map(|b| b.szx);
                fetched = self
                    .downloads
                    .start(peer.endpoint(), &uri_of(packet), &mut r, szx);
                command = Some((tenant, *cmd));
                r
            }
            Err(e) => self.refusal_response(packet, &e),
        };
        if let Some(b) = block1 {
            response.add_option(CoapOption::Block1, b.encode());
        }
        Reply {
            packet: with_time(response, request.time),
            command,
            fetched,
        }
    }

    async fn upload(
        &self,
        packet: &Packet,
        peer: &Peer,
        request: &resource::Request,
        endpoint: Endpoint,
        target: Option<(String, String)>,
        confirmable: bool,
    ) -> Result<Outcome, Refusal> {
        let up = upload_of(packet, peer, request, endpoint, target, confirmable);
        let polling = upload_with_ttd(
            &self.pipeline,
            self.hub.as_ref(),
            up,
            request.ttd,
            self.cfg.max_ttd_secs,
        )
        .await?;
        let Some(polling) = polling else {
            return Ok(Outcome::Changed);
        };
        let tenant = polling.tenant.clone();
        Ok(match polling.take().await {
            Some((cmd, named)) => Outcome::Command(tenant, Box::new(cmd), named),
            None => Outcome::Changed,
        })
    }

    async fn command_response(
        &self,
        packet: &Packet,
        peer: &Peer,
        request: &resource::Request,
        target: Option<(String, String)>,
        request_id: String,
    ) -> Result<(), Refusal> {
        let hub = crate::commands::hub(self.hub.as_ref())?;
        let response = DeviceResponse {
            adapter: ADAPTER,
            origin: peer.origin.clone(),
            target,
            request_id,
            // `parse` makes sure it is there.
            status: request.status.unwrap_or_default(),
            content_type: request.content_type.clone(),
            payload: packet.payload.clone(),
        };
        hub.accept_response(&self.pipeline, response).await
    }

    /// A response to `request` with `code`: piggybacked on the ACK of a CON, a NON of its
    /// own for a NON (RFC 7252 §5.2).
    fn response(&self, request: &Packet, code: ResponseType) -> Packet {
        let mut response = Packet::new();
        match request.header.get_type() {
            MessageType::Confirmable => {
                response.header.set_type(MessageType::Acknowledgement);
                response.header.message_id = request.header.message_id;
            }
            _ => {
                response.header.set_type(MessageType::NonConfirmable);
                response.header.message_id = self
                    .next_message_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        response.header.code = MessageClass::Response(code);
        response.set_token(request.get_token().to_vec());
        response
    }

    /// The answer to a refused request: the code of the reason table, with the reason as
    /// diagnostic payload (RFC 7252 §5.5.2); counted once, here.
    fn refusal_response(&self, request: &Packet, e: &Refusal) -> Packet {
        let codes = e.codes();
        metrics::rejected(ADAPTER.name(), codes.label);
        let (class, detail) = codes.coap;
        let mut response = self.response(request, ResponseType::BadRequest);
        response.header.code = MessageClass::from((class << 5) | detail);
        response.payload = e.to_string().into_bytes();
        if e.is_too_large() {
            // The largest body the server takes (RFC 7959 §4).
            let limit = u64::try_from(self.pipeline.max_payload_size()).unwrap_or(u64::MAX);
            response.add_option(CoapOption::Size1, resource::uint_option(limit));
        }
        response
    }
}

/// The pipeline's upload for an upload request.
fn upload_of(
    packet: &Packet,
    peer: &Peer,
    request: &resource::Request,
    endpoint: Endpoint,
    target: Option<(String, String)>,
    confirmable: bool,
) -> Upload {
    let content_type = match request.empty {
        true => Some(ferrule_schemas::content_type::EMPTY_NOTIFICATION.to_owned()),
        false => request.content_type.clone(),
    };
    Upload {
        adapter: ADAPTER,
        endpoint,
        // CON is at least once; NON at most once (and refused for events by the pipeline).
        qos: if confirmable {
            Qos::AtLeastOnce
        } else {
            Qos::AtMostOnce
        },
        origin: peer.origin.clone(),
        target,
        content_type,
        payload: bytes::Bytes::copy_from_slice(&packet.payload),
        ttl_secs: request.ttl,
        ttd_secs: None,
        orig_address: request.path.clone(),
        retain: false,
        trace: None,
        received: None,
        notification: false,
    }
}

/// The tenant whose ACK timeout applies: the one the request names, else the sender's own
/// (the gateway forms name none).
fn ack_tenant(request: Option<&resource::Request>, peer: &Peer) -> Option<String> {
    let named = request.and_then(|r| match &r.resource {
        Resource::Upload { target, .. } | Resource::CommandResponse { target, .. } => {
            target.as_ref().map(|(t, _)| t.clone())
        }
    });
    named
        .filter(|t| !t.is_empty())
        .or_else(|| peer.origin.device().map(|d| d.tenant_id.clone()))
        .filter(|t| !t.is_empty())
}

/// An empty ACK of the request with message id `mid`: its answer follows separately.
fn empty_ack(mid: u16) -> Packet {
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Empty;
    ack.header.message_id = mid;
    ack
}

/// `response`, with the server time (Hono's `hono-time` option) when `time` asks for it.
fn with_time(mut response: Packet, time: bool) -> Packet {
    if time {
        let now = chrono::Utc::now().timestamp_millis();
        response.add_option(
            CoapOption::Unknown(resource::HONO_TIME_OPTION),
            resource::uint_option(u64::try_from(now).unwrap_or_default()),
        );
    }
    response
}

/// Puts a command into a 2.04 response (Hono's CoAP adapter guide): its name as `location-query`
/// `hono-command=…`, where to send the answer as `location-path` (mirroring the request's long
/// or short names), its content format and payload.
fn command_into(
    response: &mut Packet,
    cmd: &CommandDelivery,
    named: bool,
    anonymous: bool,
    request: &resource::Request,
    tenant: &str,
) {
    response.add_option(
        CoapOption::LocationQuery,
        format!("hono-command={}", cmd.subject).into_bytes(),
    );
    let (one_way, answer) = match request.short {
        true => ("c", "cr"),
        false => ("command", "command_response"),
    };
    // An unauthenticated device names tenant and device in full; a gateway names the device.
    let device = cmd.device_id.as_str();
    let path: Vec<&str> = match (&cmd.request_id, anonymous, named) {
        (None, true, _) => vec![one_way, tenant, device],
        (None, false, true) => vec![one_way, "", device],
        (None, false, false) => vec![one_way],
        (Some(id), true, _) => vec![answer, tenant, device, id],
        (Some(id), false, true) => vec![answer, "", device, id],
        (Some(id), false, false) => vec![answer, id],
    };
    for segment in path {
        response.add_option(CoapOption::LocationPath, segment.as_bytes().to_vec());
    }
    if let Some(cf) = cmd
        .content_type
        .as_deref()
        .and_then(resource::content_format)
    {
        response.add_option(
            CoapOption::ContentFormat,
            resource::uint_option(u64::from(cf)),
        );
    }
    response.payload = cmd.payload.clone();
}

/// The path and query of a request, naming a block-wise body.
fn uri_of(packet: &Packet) -> String {
    let mut uri = String::new();
    for (option, sep) in [(CoapOption::UriPath, '/'), (CoapOption::UriQuery, '&')] {
        for part in packet.get_option(option).into_iter().flatten() {
            uri.push(sep);
            uri.push_str(&String::from_utf8_lossy(part));
        }
    }
    uri
}

fn rand_u16() -> u16 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u16::from_be_bytes([b[0], b[1]])
}
