//! Kafka stopped mid-run: MQTT devices send events (QoS 1) at a fixed rate while the broker is
//! frozen (SIGSTOP) for a while and then resumed. Every event a device got a PUBACK for must
//! be in the topic afterwards; the gateway's memory must stay bounded while Kafka is away
//! (back-pressure reaches the devices: a device with a full window sends nothing).

use crate::devices::{Fleet, MqttDevice};
use crate::measure::ProcessSample;
use crate::timeline::{Point, Timeline};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rumqttc::mqttbytes::v4;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Events a device keeps unacknowledged before it waits (its in-flight window).
const WINDOW: usize = 100;

/// What a stall run counted.
#[derive(Debug)]
pub struct StallRun {
    pub sent: usize,
    pub acked: usize,
    /// Acknowledged events found in the topic afterwards.
    pub stored: usize,
    /// Acknowledged events missing from the topic: must be 0.
    pub lost: usize,
    /// Records of this run in the topic more than once (allowed: at least once).
    pub duplicates: usize,
    /// Send ticks skipped because the device's window was full (back-pressure).
    pub held_back: usize,
    pub reconnects: usize,
    pub peak_rss_bytes: Option<u64>,
    pub rss_before_bytes: Option<u64>,
    pub stall_secs: u64,
    pub seconds: f64,
    pub series: Vec<Point>,
}

impl StallRun {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "events_sent": self.sent,
            "events_acked": self.acked,
            "events_stored": self.stored,
            "events_lost": self.lost,
            "events_duplicated": self.duplicates,
            "sends_held_back": self.held_back,
            "reconnects": self.reconnects,
            "peak_rss_bytes": self.peak_rss_bytes,
            "rss_before_bytes": self.rss_before_bytes,
            "stall_secs": self.stall_secs,
        })
    }
}

/// Marks this scenario's events among others in the topic (e.g. connection events).
const MAGIC: &[u8; 4] = b"STL1";

/// An event payload: marker, device index, sequence number, padding to `size`.
fn payload(device: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&device.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(size.max(16), b'x');
    p
}

fn parse(payload: &[u8]) -> Option<(u32, u64)> {
    if payload.get(..4)? != MAGIC {
        return None;
    }
    let device = u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((device, seq))
}

/// Where the broker stall happens: the broker's pid, when to freeze it and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    pub broker_pid: Option<u32>,
    pub after_secs: u64,
    pub secs: u64,
}

/// Resumes the broker when dropped, so an error never leaves it frozen.
struct Frozen(u32);

impl Frozen {
    fn freeze(pid: u32) -> anyhow::Result<Frozen> {
        signal(pid, "-STOP")?;
        Ok(Frozen(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}

/// Runs the scenario: `rate` events per second for `seconds` over `fleet`'s devices, the
/// broker frozen as `stall` says, then counts what reached the topic.
#[allow(clippy::too_many_arguments)]
pub async fn events_through_stall(
    bootstrap: &str,
    fleet: &Fleet,
    addr: &str,
    rate: u32,
    seconds: u64,
    size: usize,
    stall: Stall,
    gateway_pid: Option<u32>,
) -> anyhow::Result<StallRun> {
    let n = fleet.devices.len().max(1);
    let per_device = (u64::from(rate) * seconds).div_ceil(n as u64) as usize;
    let period = Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
    let start = Instant::now();
    let rss_before = gateway_pid.and_then(|p| ProcessSample::read(p).ok().map(|s| s.rss_bytes));
    let progress = crate::progress::bar("broker-stall", seconds, "s");

    // Bounded like every queue: a full one makes the devices wait, it never grows.
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::channel::<Instant>(65_536);
    let devices: Vec<_> = fleet
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (addr, user, acks) = (addr.to_owned(), fleet.username(d), acks_tx.clone());
            tokio::spawn(device_events(
                addr, user, i, per_device, period, size, start, seconds, acks,
            ))
        })
        .collect();
    drop(acks_tx);

    let controller = tokio::spawn(async move {
        let Some(pid) = stall.broker_pid else {
            return anyhow::Ok(());
        };
        tokio::time::sleep(Duration::from_secs(stall.after_secs)).await;
        let frozen = Frozen::freeze(pid)?;
        tokio::time::sleep(Duration::from_secs(stall.secs)).await;
        drop(frozen);
        Ok(())
    });

    // Acks over time and the gateway's memory, until every device is done.
    let mut timeline = Timeline::new(start, Duration::from_secs(1));
    let mut peak_rss = rss_before;
    let mut sample = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            ack = acks_rx.recv() => match ack {
                Some(at) => timeline.count(at, 1),
                None => break,
            },
            _ = sample.tick() => {
                if let Some(rss) = gateway_pid.and_then(|p| ProcessSample::read(p).ok()) {
                    peak_rss = peak_rss.max(Some(rss.rss_bytes));
                }
                progress.set_position(start.elapsed().as_secs().min(seconds));
            }
        }
    }
    progress.finish_and_clear();
    controller.await??;
    let mut run = StallRun {
        sent: 0,
        acked: 0,
        stored: 0,
        lost: 0,
        duplicates: 0,
        held_back: 0,
        reconnects: 0,
        peak_rss_bytes: peak_rss,
        rss_before_bytes: rss_before,
        stall_secs: if stall.broker_pid.is_some() {
            stall.secs
        } else {
            0
        },
        seconds: start.elapsed().as_secs_f64(),
        series: timeline.points(),
    };
    let mut acked: HashSet<(u32, u64)> = HashSet::new();
    for (i, d) in devices.into_iter().enumerate() {
        let outcome = d.await??;
        run.sent += outcome.sent;
        run.held_back += outcome.held_back;
        run.reconnects += outcome.reconnects;
        acked.extend(outcome.acked.into_iter().map(|seq| (i as u32, seq)));
    }
    run.acked = acked.len();

    let topic = format!("hono.event.{}", fleet.tenant);
    let found = read_all(bootstrap, &topic).await?;
    let mut seen: HashMap<(u32, u64), usize> = HashMap::new();
    for key in found {
        *seen.entry(key).or_default() += 1;
    }
    run.stored = acked.iter().filter(|k| seen.contains_key(k)).count();
    run.lost = run.acked - run.stored;
    run.duplicates = seen.values().map(|c| c - 1).sum();
    Ok(run)
}

struct DeviceOutcome {
    sent: usize,
    acked: Vec<u64>,
    held_back: usize,
    reconnects: usize,
}

/// One device: an event per tick while its window has room, reconnecting when the gateway
/// closes the connection (a failed event closes it, as Hono's adapter does without an error
/// subscription); stops sending after `seconds` and waits up to 60 s more for its acks.
#[allow(clippy::too_many_arguments)]
async fn device_events(
    addr: String,
    user: String,
    index: usize,
    count: usize,
    period: Duration,
    size: usize,
    start: Instant,
    seconds: u64,
    acks: tokio::sync::mpsc::Sender<Instant>,
) -> anyhow::Result<DeviceOutcome> {
    let mut out = DeviceOutcome {
        sent: 0,
        acked: Vec::new(),
        held_back: 0,
        reconnects: 0,
    };
    let send_until = start + Duration::from_secs(seconds);
    let give_up = send_until + Duration::from_secs(60);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seq = 0u64;
    'connection: loop {
        let mut d = loop {
            match MqttDevice::connect(&addr, &user, index).await {
                Ok(d) => break d,
                Err(_) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        // Packet id → sequence number of the events this connection has in flight.
        let mut in_flight: HashMap<u16, u64> = HashMap::new();
        loop {
            let sending = out.sent < count && Instant::now() < send_until;
            if !sending && in_flight.is_empty() {
                return Ok(out);
            }
            tokio::select! {
                _ = ticker.tick(), if sending => {
                    if in_flight.len() >= WINDOW {
                        out.held_back += 1;
                        continue;
                    }
                    let pkid = (seq % 65_535 + 1) as u16;
                    if d.publish("event", 1, pkid, payload(index as u32, seq, size)).await.is_err() {
                        out.reconnects += 1;
                        continue 'connection;
                    }
                    in_flight.insert(pkid, seq);
                    seq += 1;
                    out.sent += 1;
                }
                p = d.read() => match p {
                    Ok(v4::Packet::PubAck(a)) => {
                        if let Some(s) = in_flight.remove(&a.pkid) {
                            out.acked.push(s);
                            let _ = acks.send(Instant::now()).await;
                        }
                    }
                    Ok(_) => {}
                    // Events in flight on a closed connection were not acknowledged: the
                    // device would send them again; here they simply do not count.
                    Err(_) => {
                        out.reconnects += 1;
                        continue 'connection;
                    }
                },
                _ = tokio::time::sleep_until(give_up.into()) => return Ok(out),
            }
        }
    }
}

/// Every (device, seq) in `topic`, read from the beginning to the current end.
async fn read_all(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<(u32, u64)>> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set(
                "group.id",
                format!("loadtest-verify-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        let mut ends = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            if high > low {
                ends.insert(p, high);
                tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let mut found = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ends.is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "could not read {topic} back in 120 s"
            );
            let Some(m) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m?;
            if let Some(key) = m.payload().and_then(parse) {
                found.push(key);
            }
            if ends
                .get(&m.partition())
                .is_some_and(|end| m.offset() + 1 >= *end)
            {
                ends.remove(&m.partition());
            }
        }
        Ok(found)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_payload_names_its_device_and_sequence() {
        let p = payload(7, 123_456, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse(&p), Some((7, 123_456)));
        assert_eq!(payload(1, 2, 0).len(), 16);
        assert_eq!(parse(b"short"), None);
        assert_eq!(parse(br#"{"cause":"connected","remote-id":"x"}"#), None);
    }
}
