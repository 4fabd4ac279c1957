//! Command round trips as an application sees them: an rdkafka producer sends request/response
//! commands at a fixed offered rate to `hono.command.<tenant>`, MQTT devices answer each at
//! once, and an rdkafka consumer on `hono.command_response.<tenant>` times every answer.
//! The path measured: application → Kafka → router → gateway → device → gateway → Kafka →
//! application.

use crate::devices::{Fleet, MqttDevice};
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::mqttbytes::{QoS, v4};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a round-trip run measured.
#[derive(Debug)]
pub struct RoundTrips {
    pub sent: usize,
    pub answered: usize,
    /// Responses with another status than 200 (delivery failures), by status.
    pub failed: HashMap<u16, usize>,
    /// Round-trip times in microseconds.
    pub latency_us: Histogram<u64>,
    pub seconds: f64,
    /// Answers and their p99 per second, for the plots.
    pub series: Vec<crate::timeline::Point>,
}

impl RoundTrips {
    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "commands_sent": self.sent,
            "commands_answered": self.answered,
            "commands_failed": self.failed.values().sum::<usize>(),
            "commands_failed_by_status": self
                .failed
                .iter()
                .map(|(status, n)| (status.to_string(), serde_json::json!(n)))
                .collect::<serde_json::Map<_, _>>(),
            "latency_ms": {
                "p50": self.percentile_ms(0.5),
                "p99": self.percentile_ms(0.99),
                "p999": self.percentile_ms(0.999),
                "max": self.latency_us.max() as f64 / 1000.0,
            },
        })
    }
}

/// Runs `rate` commands per second for `seconds` against `fleet`'s devices, connected over
/// MQTT at `addr` and subscribed with `qos`; waits up to 10 s for the last answers.
pub async fn round_trips(
    bootstrap: &str,
    fleet: &Fleet,
    addr: &str,
    rate: u32,
    seconds: u64,
    qos: u8,
    fetch_wait_ms: u64,
) -> anyhow::Result<RoundTrips> {
    // Devices: subscribe, then answer every command at once with status 200.
    let mut devices = Vec::new();
    for (i, d) in fleet.devices.iter().enumerate() {
        let mut c = MqttDevice::connect(addr, &fleet.username(d), i).await?;
        let sub_qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        c.write(&[MqttDevice::subscribe_packet("command///req/#", sub_qos)])
            .await?;
        match c.read().await? {
            v4::Packet::SubAck(_) => {}
            other => anyhow::bail!("subscribe: {other:?}"),
        }
        devices.push(tokio::spawn(answer_commands(c)));
    }

    let result = measure_fleet(bootstrap, fleet, rate, seconds, fetch_wait_ms).await;
    for d in devices {
        d.abort();
    }
    result
}

/// The same round trips to HTTP devices that only long-poll: each device posts an empty
/// notification with `hono-ttd` and waits; a command in the answer is answered at once with
/// `POST /command/res/{reqId}` (status 200), then the device polls again.
pub async fn http_round_trips(
    bootstrap: &str,
    fleet: &Fleet,
    url: &str,
    rate: u32,
    seconds: u64,
    ttd_secs: u32,
    fetch_wait_ms: u64,
) -> anyhow::Result<RoundTrips> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(fleet.devices.len() * 2)
        .build()?;
    let devices: Vec<_> = fleet
        .devices
        .iter()
        .map(|d| {
            let (http, url, user) = (http.clone(), url.to_owned(), fleet.username(d));
            tokio::spawn(long_poll_device(http, url, user, ttd_secs))
        })
        .collect();
    let result = measure_fleet(bootstrap, fleet, rate, seconds, fetch_wait_ms).await;
    for d in devices {
        d.abort();
    }
    result
}

/// An HTTP device that polls for commands with `hono-ttd` and answers each with 200.
async fn long_poll_device(
    http: reqwest::Client,
    url: String,
    user: String,
    ttd_secs: u32,
) -> anyhow::Result<()> {
    let password = crate::devices::PASSWORD;
    loop {
        let r = http
            .post(format!("{url}/telemetry"))
            .basic_auth(&user, Some(password))
            .header(
                "content-type",
                "application/vnd.eclipse-hono-empty-notification",
            )
            .header("hono-ttd", ttd_secs.to_string())
            .send()
            .await?;
        let req_id = r
            .headers()
            .get("hono-cmd-req-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = r.status();
        let body = r.bytes().await?;
        match (status.as_u16(), req_id) {
            (200, Some(id)) => {
                http.post(format!("{url}/command/res/{id}"))
                    .basic_auth(&user, Some(password))
                    .header("hono-cmd-status", "200")
                    .header("content-type", "application/octet-stream")
                    .body(body)
                    .send()
                    .await?;
            }
            (200 | 202, _) => {}
            // Overloaded or refused: back off a little instead of spinning.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Request/response round trips to CoAP devices (plain UDP, unauthenticated) that long-poll
/// with `hono-ttd`, as [`http_round_trips`] does for HTTP. The fleet's tenant must allow
/// unauthenticated CoAP devices ([`Fleet::allow_anonymous_coap`]).
pub async fn coap_round_trips(
    bootstrap: &str,
    fleet: &Fleet,
    addr: std::net::SocketAddr,
    rate: u32,
    seconds: u64,
    ttd_secs: u32,
    fetch_wait_ms: u64,
) -> anyhow::Result<RoundTrips> {
    let devices: Vec<_> = fleet
        .coap_paths()
        .into_iter()
        .map(|path| tokio::spawn(coap_long_poll_device(addr, path, ttd_secs)))
        .collect();
    // As Hono's example application does, a command goes to a device that announced a poll
    // (its ttd notification on the telemetry topic) and has had none since; only when no
    // device is waiting does the next one in turn get it (and may miss it between polls).
    let waiting: Arc<Mutex<Waiting>> = Arc::default();
    let notifications = {
        let consumer = consumer(
            bootstrap,
            &format!("hono.telemetry.{}", fleet.tenant),
            fetch_wait_ms,
        )?;
        let waiting = waiting.clone();
        tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let polls = m
                    .headers()
                    .is_some_and(|h| h.iter().any(|h| h.key == "ttd"));
                if let (true, Some(Ok(device))) = (polls, m.key_view::<str>()) {
                    waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .polls
                        .push_back((device.to_owned(), Instant::now()));
                }
            }
        })
    };
    let topic = format!("hono.command.{}", fleet.tenant);
    let responses = format!("hono.command_response.{}", fleet.tenant);
    let ids = fleet.devices.clone();
    let result = measure(
        bootstrap,
        &topic,
        &responses,
        move |seq| {
            let poll_lasts = Duration::from_secs(u64::from(ttd_secs));
            waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next(poll_lasts)
                .unwrap_or_else(|| ids[(seq as usize) % ids.len()].clone())
        },
        rate,
        seconds,
        fetch_wait_ms,
    )
    .await;
    notifications.abort();
    for d in devices {
        d.abort();
    }
    result
}

/// Devices whose announced poll may still be open, oldest first, and when each was last sent
/// a command.
#[derive(Default)]
struct Waiting {
    polls: std::collections::VecDeque<(String, Instant)>,
    commanded: HashMap<String, Instant>,
}

impl Waiting {
    /// The device of the oldest poll that is still open (younger than `poll_lasts`) and has
    /// had no command since it was announced; polls passed over are dropped.
    fn next(&mut self, poll_lasts: Duration) -> Option<String> {
        while let Some((device, announced)) = self.polls.pop_front() {
            let answered = self.commanded.get(&device).is_some_and(|c| *c >= announced);
            if answered || announced.elapsed() >= poll_lasts {
                continue;
            }
            self.commanded.insert(device.clone(), Instant::now());
            return Some(device);
        }
        None
    }
}

/// A CoAP device that polls for commands with `hono-ttd` (a CON `PUT` of an empty
/// notification) and answers each command with 2.00 at the location the command names. It
/// acknowledges a separate response, and sends a request again when no answer came in 2 s.
async fn coap_long_poll_device(
    addr: std::net::SocketAddr,
    path: String,
    ttd_secs: u32,
) -> anyhow::Result<()> {
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(addr).await?;
    let mut mid: u16 = 0;
    let mut buf = vec![0u8; 4096];
    let request = |mid: u16, segments: &[&str], queries: &[String]| {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Put);
        p.header.message_id = mid;
        p.set_token(mid.to_be_bytes().to_vec());
        for seg in segments {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in queries {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p
    };
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let poll_queries = [format!("hono-ttd={ttd_secs}"), "empty".to_owned()];
    loop {
        mid = mid.wrapping_add(1);
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let poll = request(mid, &segs, &poll_queries).to_bytes()?;
        socket.send(&poll).await?;
        // The answer: piggybacked, or an empty ACK and a separate CON later.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(ttd_secs) + 5);
        let answer = loop {
            let Ok(n) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await else {
                break None;
            };
            let Ok(p) = Packet::from_bytes(&buf[..n?]) else {
                continue;
            };
            if p.get_token() != mid.to_be_bytes() {
                continue;
            }
            if p.header.get_type() == MessageType::Confirmable {
                let ack = crate::coap::empty_ack(p.header.message_id);
                socket.send(&ack.to_bytes()?).await?;
            }
            if p.header.code == MessageClass::Empty {
                continue;
            }
            break Some(p);
        };
        let Some(answer) = answer else { continue };
        if answer.header.code != MessageClass::Response(ResponseType::Changed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let Some(location) = crate::coap::command_location(&answer) else {
            continue;
        };
        mid = mid.wrapping_add(1);
        let segs: Vec<&str> = location.iter().map(String::as_str).collect();
        let mut response = request(mid, &segs, &["hono-cmd-status=200".to_owned()]);
        response.payload = answer.payload.clone();
        socket.send(&response.to_bytes()?).await?;
        // Its 2.04 (or a lost one: the application then counts a timeout).
        let _ = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await;
    }
}

/// Round trips to `fleet`'s devices, round robin, through its tenant's command topics.
async fn measure_fleet(
    bootstrap: &str,
    fleet: &Fleet,
    rate: u32,
    seconds: u64,
    fetch_wait_ms: u64,
) -> anyhow::Result<RoundTrips> {
    let topic = format!("hono.command.{}", fleet.tenant);
    let responses = format!("hono.command_response.{}", fleet.tenant);
    let ids = fleet.devices.clone();
    measure(
        bootstrap,
        &topic,
        &responses,
        move |seq| ids[(seq as usize) % ids.len()].clone(),
        rate,
        seconds,
        fetch_wait_ms,
    )
    .await
}

/// The Kafka-leg floor of a round trip: the application's record goes to a topic, an echo
/// service (an rdkafka consumer and producer with the same fetch wait) answers on a second
/// topic. Two broker hops, where a Ferrule command takes three (the router's internal topic).
pub async fn kafka_echo_round_trips(
    bootstrap: &str,
    rate: u32,
    seconds: u64,
    fetch_wait_ms: u64,
) -> anyhow::Result<RoundTrips> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (requests, responses) = (
        format!("loadtest.echo-req.{id}"),
        format!("loadtest.echo-res.{id}"),
    );
    let echo = {
        let consumer = consumer(bootstrap, &requests, fetch_wait_ms)?;
        let producer = producer(bootstrap)?;
        let responses = responses.clone();
        tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let mut hs = OwnedHeaders::new_with_capacity(2).insert(Header {
                    key: "status",
                    value: Some("200"),
                });
                if let Some(cid) = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "correlation-id"))
                {
                    hs = hs.insert(Header {
                        key: "correlation-id",
                        value: cid.value,
                    });
                }
                let mut record = FutureRecord::to(&responses).headers(hs);
                if let Some(k) = m.key() {
                    record = record.key(k);
                }
                if let Some(p) = m.payload() {
                    record = record.payload(p);
                }
                let _ = producer.send_result(record);
            }
        })
    };
    let result = measure(
        bootstrap,
        &requests,
        &responses,
        |_| "dev".to_owned(),
        rate,
        seconds,
        fetch_wait_ms,
    )
    .await;
    echo.abort();
    result
}

fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "0")
        .set("log_level", "3")
        .create()?)
}

/// Offers request records with a `correlation-id` to `requests` at `rate` per second and
/// times the records with the same `correlation-id` on `responses` (status 200 = answered).
async fn measure(
    bootstrap: &str,
    requests: &str,
    responses: &str,
    device_for: impl Fn(u64) -> String,
    rate: u32,
    seconds: u64,
    fetch_wait_ms: u64,
) -> anyhow::Result<RoundTrips> {
    let started_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let responses = consumer(bootstrap, responses, fetch_wait_ms)?;
    let producer = producer(bootstrap)?;
    let send = |seq: u64| {
        let device = device_for(seq);
        let cid = format!("rt-{seq}");
        started_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cid.clone(), Instant::now());
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "device_id",
                value: Some(device.as_str()),
            })
            .insert(Header {
                key: "subject",
                value: Some("rtt"),
            })
            .insert(Header {
                key: "response-required",
                value: Some("true"),
            })
            .insert(Header {
                key: "correlation-id",
                value: Some(cid.as_str()),
            });
        let record = FutureRecord::to(requests)
            .key(device.as_str())
            .headers(headers)
            .payload("ping");
        producer
            .send_result(record)
            .map(drop)
            .map_err(|(e, _)| anyhow::anyhow!(e))
    };

    // Warm-up: until one request comes back, the router may not know the new topic yet.
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    let mut seq = 0u64;
    loop {
        send(seq)?;
        seq += 1;
        let got = tokio::time::timeout(Duration::from_millis(500), responses.recv()).await;
        if let Ok(Ok(m)) = got
            && status_of(&m) == Some(200)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < warm_deadline,
            "no request came back within 60 s"
        );
    }
    // Drain stragglers of the warm-up.
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), responses.recv()).await {
    }
    started_at.lock().unwrap_or_else(|p| p.into_inner()).clear();

    let mut result = RoundTrips {
        sent: 0,
        answered: 0,
        failed: HashMap::new(),
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        seconds: 0.0,
        series: Vec::new(),
    };
    let total = u64::from(rate) * seconds;
    let start = Instant::now();
    let tick = Duration::from_millis(10);
    let per_tick = (f64::from(rate) / 100.0).max(1.0);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut due = 0.0f64;
    let mut sent = 0u64;
    let mut last_send = Instant::now();
    let mut timeline = crate::timeline::Timeline::new(start, Duration::from_secs(1));
    let progress = crate::progress::bar(requests, total, "commands");
    loop {
        tokio::select! {
            _ = ticker.tick(), if sent < total => {
                due += per_tick;
                while due >= 1.0 && sent < total {
                    send(seq)?;
                    seq += 1;
                    sent += 1;
                    due -= 1.0;
                }
                last_send = Instant::now();
            }
            m = responses.recv() => {
                let m = m?;
                let now = Instant::now();
                let cid = m.headers().and_then(|hs| {
                    hs.iter().find(|h| h.key == "correlation-id").and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                let Some(sent_at) = cid.and_then(|c| started_at.lock().unwrap_or_else(|p| p.into_inner()).remove(&c)) else {
                    continue;
                };
                match status_of(&m) {
                    Some(200) => {
                        result.answered += 1;
                        let us = now.duration_since(sent_at).as_micros().max(1) as u64;
                        result.latency_us.saturating_record(us);
                        timeline.latency(now, us);
                        progress.inc(1);
                    }
                    other => *result.failed.entry(other.unwrap_or(0)).or_default() += 1,
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if sent >= total => {}
        }
        let done = result.answered + result.failed.values().sum::<usize>();
        if sent >= total && (done as u64 >= total || last_send.elapsed() > Duration::from_secs(10))
        {
            break;
        }
    }
    progress.finish_and_clear();
    result.sent = sent as usize;
    result.seconds = start.elapsed().as_secs_f64();
    result.series = timeline.points();
    Ok(result)
}

fn status_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<u16> {
    m.headers()?
        .iter()
        .find(|h| h.key == "status")
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
}

pub(crate) fn consumer(
    bootstrap: &str,
    topic: &str,
    fetch_wait_ms: u64,
) -> anyhow::Result<StreamConsumer> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("loadtest-app-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("log_level", "3")
        .create()?;
    c.subscribe(&[topic])?;
    Ok(c)
}

/// A device that answers every command with status 200 and the command's payload.
async fn answer_commands(mut c: MqttDevice) -> anyhow::Result<()> {
    loop {
        let v4::Packet::Publish(p) = c.read().await? else {
            continue;
        };
        let mut out = Vec::with_capacity(2);
        if p.qos == QoS::AtLeastOnce {
            out.push(v4::Packet::PubAck(v4::PubAck::new(p.pkid)));
        }
        // command///req/{reqId}/{subject}
        let req_id = p.topic.split('/').nth(4).unwrap_or_default();
        out.push(v4::Packet::Publish(v4::Publish::new(
            format!("command///res/{req_id}/200"),
            QoS::AtMostOnce,
            p.payload.to_vec(),
        )));
        c.write(&out).await?;
    }
}
