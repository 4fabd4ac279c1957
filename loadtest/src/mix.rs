//! Hono's CoAP load-test mix: every device, in a loop, `PUT`s one event and one telemetry
//! message with `hono-ttd` (it waits for a command in the answer); an application that reads
//! the tenant's telemetry topic answers each `ttd` with a request/response command to that
//! device (as a Hono application waits for `ttd` before it commands a device), and the device
//! answers the command at the location the gateway names. Counted as Hono counted its run:
//! telemetry + events + commands + responses, each only once acknowledged (2.04 to the
//! device, the response record in Kafka for the application).

use crate::devices::Fleet;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// What a mix run counted.
#[derive(Debug, Default)]
pub struct Mix {
    pub telemetry: u64,
    pub events: u64,
    /// Commands that reached a device.
    pub commands: u64,
    /// Command responses the application read from Kafka.
    pub responses: u64,
    /// Polls that ended without a command (the ttd ran out).
    pub empty_polls: u64,
    /// Requests answered with an error code, or not answered after 4 retransmissions.
    pub errors: u64,
    pub seconds: f64,
}

impl Mix {
    pub fn messages(&self) -> u64 {
        self.telemetry + self.events + self.commands + self.responses
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "telemetry": self.telemetry,
            "events": self.events,
            "commands": self.commands,
            "responses": self.responses,
            "empty_polls": self.empty_polls,
            "errors": self.errors,
        })
    }
}

#[derive(Default)]
struct Counters {
    telemetry: AtomicU64,
    events: AtomicU64,
    commands: AtomicU64,
    responses: AtomicU64,
    empty_polls: AtomicU64,
    errors: AtomicU64,
    /// Commands the application sent.
    issued: AtomicU64,
    /// Responses count from this command on (the warm-up's do not).
    measured_from: AtomicU64,
}

/// How the devices reach the gateway.
pub enum Transport {
    /// Plain UDP, unauthenticated: `PUT /{resource}/{tenant}/{device}`.
    Plain,
    /// DTLS with these pre-shared keys (identity, key; one session per device), authenticated:
    /// `POST /{resource}`, as Hono's own CoAP load test ran.
    Dtls(Vec<(String, Vec<u8>)>),
}

/// Runs the mix for `seconds` with `fleet`'s devices (at `addr`, over `transport`), each
/// waiting up to `ttd_secs` for its command.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    bootstrap: &str,
    fleet: &Fleet,
    addr: SocketAddr,
    transport: Transport,
    seconds: u64,
    ttd_secs: u32,
    size: usize,
    fetch_wait_ms: u64,
) -> anyhow::Result<Mix> {
    // The devices' links first: opening DTLS sessions is not part of the mix.
    let mut links = Vec::with_capacity(fleet.devices.len());
    match transport {
        Transport::Plain => {
            for _ in &fleet.devices {
                let socket = UdpSocket::bind("127.0.0.1:0").await?;
                socket.connect(addr).await?;
                links.push(Link::Plain(socket));
            }
        }
        Transport::Dtls(credentials) => {
            let n = credentials.len();
            let opened = crate::coap_dtls::open_sessions(addr, credentials, n, 64).await?;
            links.extend(opened.sessions.into_iter().map(|s| Link::Dtls(Box::new(s))));
        }
    }
    let authenticated = matches!(links.first(), Some(Link::Dtls(_)));
    let counters = Arc::new(Counters::default());
    counters.measured_from.store(u64::MAX, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let app = tokio::spawn(application(
        crate::commands::consumer(bootstrap, &fleet.telemetry_topic(), fetch_wait_ms)?,
        crate::commands::consumer(
            bootstrap,
            &format!("hono.command_response.{}", fleet.tenant),
            fetch_wait_ms,
        )?,
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "1")
            .set("log_level", "3")
            .create()?,
        format!("hono.command.{}", fleet.tenant),
        counters.clone(),
    ));
    let device = |id: &str, counters: &Arc<Counters>| Device {
        tenant: fleet.tenant.clone(),
        id: id.to_owned(),
        authenticated,
        payload: vec![b'x'; size],
        ttd_secs,
        counters: counters.clone(),
        stop: stop.clone(),
    };
    // Not counted: until one command made the whole trip, the topics are still being found.
    let first = fleet
        .devices
        .first()
        .map(String::as_str)
        .unwrap_or_default();
    let warm_up = Arc::new(Counters::default());
    let mut exchanges: Vec<Exchange> = links.into_iter().map(Exchange::new).collect();
    anyhow::ensure!(!exchanges.is_empty(), "no devices");
    device(first, &warm_up)
        .warm_up(&mut exchanges[0], Duration::from_secs(60))
        .await?;
    let issued = counters.issued.load(Ordering::Relaxed);
    counters.measured_from.store(issued, Ordering::Relaxed);
    let start = Instant::now();
    // Over DTLS a session belongs to the device whose key opened it, whichever that was: the
    // device's id matters only in the unauthenticated paths.
    let devices: Vec<_> = fleet
        .devices
        .iter()
        .zip(exchanges)
        .map(|(d, exchange)| tokio::spawn(device(d, &counters).run(exchange)))
        .collect();
    let progress = crate::progress::bar("coap-mix", seconds, "s");
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        progress.inc(1);
    }
    progress.finish_and_clear();
    stop.store(true, Ordering::Relaxed);
    // Each device finishes its cycle (at most its ttd), so every command sent is answered.
    for d in devices {
        d.await??;
    }
    let seconds = start.elapsed().as_secs_f64();
    // The last responses reach the application within a few fetch waits.
    let commands = counters.commands.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters.responses.load(Ordering::Relaxed) < commands && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.abort();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(Mix {
        telemetry: get(&counters.telemetry),
        events: get(&counters.events),
        commands,
        responses: get(&counters.responses),
        empty_polls: get(&counters.empty_polls),
        errors: get(&counters.errors),
        seconds,
    })
}

/// Commands every device that announces `ttd` > 0 on the telemetry topic; counts the 200
/// responses.
async fn application(
    notifications: StreamConsumer,
    responses: StreamConsumer,
    producer: FutureProducer,
    commands: String,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            m = notifications.recv() => {
                // A topic that does not exist yet is reported as an error: wait for it.
                let Ok(m) = m else { continue };
                let header = |key: &str| {
                    m.headers()?
                        .iter()
                        .find(|h| h.key == key)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                let ttd: i64 = header("ttd").and_then(|t| t.parse().ok()).unwrap_or(0);
                let Some(device) = header("device_id").filter(|_| ttd > 0) else {
                    continue;
                };
                let seq = counters.issued.fetch_add(1, Ordering::Relaxed);
                let cid = format!("mix-{seq}");
                let headers = OwnedHeaders::new_with_capacity(4)
                    .insert(Header { key: "device_id", value: Some(device.as_str()) })
                    .insert(Header { key: "subject", value: Some("mix") })
                    .insert(Header { key: "response-required", value: Some("true") })
                    .insert(Header { key: "correlation-id", value: Some(cid.as_str()) });
                let record = FutureRecord::to(&commands)
                    .key(device.as_str())
                    .headers(headers)
                    .payload("set");
                producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!(e))?;
            }
            m = responses.recv() => {
                let Ok(m) = m else { continue };
                let header = |key: &str| {
                    m.headers()?.iter().find(|h| h.key == key).and_then(|h| h.value)
                };
                let measured = header("correlation-id")
                    .and_then(|c| std::str::from_utf8(c).ok()?.strip_prefix("mix-")?.parse().ok())
                    .is_some_and(|seq: u64| seq >= counters.measured_from.load(Ordering::Relaxed));
                if measured && header("status") == Some(b"200".as_slice()) {
                    counters.responses.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

struct Device {
    tenant: String,
    id: String,
    /// Over DTLS: `POST /{resource}` for itself; else `PUT /{resource}/{tenant}/{device}`.
    authenticated: bool,
    payload: Vec<u8>,
    ttd_secs: u32,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl Device {
    /// The path of `resource` and the method for it.
    fn upload<'a>(&'a self, resource: &'a str) -> (RequestType, Vec<&'a str>) {
        if self.authenticated {
            (RequestType::Post, vec![resource])
        } else {
            (
                RequestType::Put,
                vec![resource, self.tenant.as_str(), self.id.as_str()],
            )
        }
    }

    async fn run(self, mut exchange: Exchange) -> anyhow::Result<()> {
        let c = &self.counters;
        while !self.stop.load(Ordering::Relaxed) {
            let (method, path) = self.upload("event");
            let put = exchange.request(method, &path, &[], self.payload.clone());
            match exchange.send(put, Duration::from_secs(2)).await? {
                Some(r) if r.header.code == changed() => c.events.fetch_add(1, Ordering::Relaxed),
                _ => c.errors.fetch_add(1, Ordering::Relaxed),
            };
            self.poll(&mut exchange).await?;
        }
        Ok(())
    }

    /// Polls until a command came and was answered, for at most `within` (the application's
    /// consumers and the router find a new tenant's topics only after a while).
    async fn warm_up(&self, exchange: &mut Exchange, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.poll(exchange).await? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no command reached a polling device within {within:?}"
            );
        }
        Ok(())
    }

    /// One telemetry message with `hono-ttd` (the device waits for a command in its
    /// answer), and the answer to the command it brought; whether a command came.
    async fn poll(&self, exchange: &mut Exchange) -> anyhow::Result<bool> {
        let c = &self.counters;
        let queries = [format!("hono-ttd={}", self.ttd_secs)];
        let (method, path) = self.upload("telemetry");
        let poll = exchange.request(method, &path, &queries, self.payload.clone());
        let wait = Duration::from_secs(u64::from(self.ttd_secs) + 5);
        let answer = match exchange.send(poll, wait).await? {
            Some(r) if r.header.code == changed() => r,
            _ => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
        };
        c.telemetry.fetch_add(1, Ordering::Relaxed);
        let Some(location) = crate::coap::command_location(&answer) else {
            c.empty_polls.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        };
        c.commands.fetch_add(1, Ordering::Relaxed);
        let segments: Vec<&str> = location.iter().map(String::as_str).collect();
        let status = ["hono-cmd-status=200".to_owned()];
        // The location names the form: `cr/{reqId}` (authenticated, POST) or
        // `command_response/{tenant}/{device}/{reqId}` (PUT).
        let method = if self.authenticated {
            RequestType::Post
        } else {
            RequestType::Put
        };
        let response = exchange.request(method, &segments, &status, answer.payload.clone());
        match exchange.send(response, Duration::from_secs(2)).await? {
            Some(r) if r.header.code == changed() => {}
            _ => {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(true)
    }
}

fn changed() -> MessageClass {
    MessageClass::Response(ResponseType::Changed)
}

/// A device's way to the gateway.
enum Link {
    Plain(UdpSocket),
    Dtls(Box<crate::coap_dtls::Session>),
}

impl Link {
    async fn send(&mut self, message: &[u8]) -> anyhow::Result<()> {
        match self {
            Link::Plain(socket) => {
                socket.send(message).await?;
            }
            Link::Dtls(session) => session.send(message).await?,
        }
        Ok(())
    }

    /// The next CoAP message, or `None` at `until`.
    async fn receive(
        &mut self,
        buf: &mut [u8],
        until: tokio::time::Instant,
    ) -> anyhow::Result<Option<usize>> {
        match self {
            Link::Plain(socket) => match tokio::time::timeout_at(until, socket.recv(buf)).await {
                Ok(n) => Ok(Some(n?)),
                Err(_) => Ok(None),
            },
            Link::Dtls(session) => session.receive(buf, until).await,
        }
    }
}

/// One device's CON exchanges: a request, its retransmissions, its answer (piggybacked, or
/// an empty ACK and a separate response, which is acknowledged).
struct Exchange {
    link: Link,
    mid: u16,
    buf: Vec<u8>,
}

impl Exchange {
    fn new(link: Link) -> Self {
        Exchange {
            link,
            mid: 0,
            buf: vec![0u8; 4096],
        }
    }

    fn request(
        &mut self,
        method: RequestType,
        segments: &[&str],
        queries: &[String],
        payload: Vec<u8>,
    ) -> Packet {
        self.mid = self.mid.wrapping_add(1);
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = self.mid;
        p.set_token(self.mid.to_be_bytes().to_vec());
        for seg in segments {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in queries {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        if !payload.is_empty() {
            // application/octet-stream
            p.add_option(CoapOption::ContentFormat, vec![42]);
        }
        p.payload = payload;
        p
    }

    /// Sends `request` (again every 2 s until it is acknowledged, at most 4 times) and waits
    /// up to `wait` for its response; `None` when none came.
    async fn send(&mut self, request: Packet, wait: Duration) -> anyhow::Result<Option<Packet>> {
        let bytes = request.to_bytes()?;
        let token = request.get_token().to_vec();
        let deadline = tokio::time::Instant::now() + wait;
        let mut acked = false;
        for _attempt in 0..5 {
            self.link.send(&bytes).await?;
            let resend = tokio::time::Instant::now() + Duration::from_secs(2);
            loop {
                let until = if acked {
                    deadline
                } else {
                    resend.min(deadline)
                };
                let Some(n) = self.link.receive(&mut self.buf, until).await? else {
                    break;
                };
                let Ok(p) = Packet::from_bytes(&self.buf[..n]) else {
                    continue;
                };
                if p.header.get_type() == MessageType::Confirmable {
                    let ack = crate::coap::empty_ack(p.header.message_id);
                    self.link.send(&ack.to_bytes()?).await?;
                }
                if p.header.get_type() == MessageType::Acknowledgement
                    && p.header.message_id == request.header.message_id
                {
                    acked = true;
                }
                if p.header.code != MessageClass::Empty && p.get_token() == token.as_slice() {
                    return Ok(Some(p));
                }
            }
            if acked || tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
        }
        Ok(None)
    }
}
