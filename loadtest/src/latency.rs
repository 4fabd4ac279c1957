//! End-to-end latency as analytics see it: MQTT devices put their send time into every payload
//! and a Kafka consumer on the tenant's telemetry topic times each record when it arrives.
//! The path measured: device → gateway → Kafka → consumer.

use crate::devices::{Fleet, MqttDevice};
use crate::timeline::{Point, Timeline};
use hdrhistogram::Histogram;
use rdkafka::Message;
use rumqttc::mqttbytes::v4;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What an end-to-end run measured.
#[derive(Debug)]
pub struct LatencyRun {
    pub sent: usize,
    pub received: usize,
    /// Device send → consumer receive, microseconds.
    pub latency_us: Histogram<u64>,
    pub seconds: f64,
    pub series: Vec<Point>,
}

impl LatencyRun {
    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "messages_sent": self.sent,
            "messages_received": self.received,
            "latency_ms": {
                "p50": self.percentile_ms(0.5),
                "p99": self.percentile_ms(0.99),
                "p999": self.percentile_ms(0.999),
                "max": self.latency_us.max() as f64 / 1000.0,
            },
        })
    }
}

/// Microseconds since the Unix epoch: devices and consumer share the machine's clock.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Marks this scenario's payloads among other records of the topic.
const MAGIC: &[u8; 4] = b"E2E1";

/// A payload of `size` bytes (at least 12): the marker, then its send time.
pub fn stamped(size: usize) -> Vec<u8> {
    stamped_at(now_us(), size)
}

fn stamped_at(us: u64, size: usize) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&us.to_be_bytes());
    p.resize(size.max(12), b'x');
    p
}

/// The send time in a stamped payload (0 for the warm-up); `None` for anything else.
pub fn stamp_of(payload: &[u8]) -> Option<u64> {
    if payload.get(..4)? != MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?))
}

/// `rate` telemetry messages per second for `seconds`, spread over `fleet`'s devices on MQTT at
/// `addr` with `qos`; a consumer reading the tenant's topic times each one. Waits up to 10 s
/// after the last send for the last records.
#[allow(clippy::too_many_arguments)]
pub async fn mqtt_to_kafka(
    bootstrap: &str,
    fleet: &Fleet,
    addr: &str,
    rate: u32,
    seconds: u64,
    qos: u8,
    size: usize,
    fetch_wait_ms: u64,
) -> anyhow::Result<LatencyRun> {
    let consumer = crate::commands::consumer(bootstrap, &fleet.telemetry_topic(), fetch_wait_ms)?;
    let (tx, arrivals) = tokio::sync::mpsc::channel(65_536);
    let reader = tokio::spawn(async move {
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    let arrival = (now_us(), m.payload().unwrap_or_default().to_vec());
                    if tx.send(arrival).await.is_err() {
                        return anyhow::Ok(());
                    }
                }
                Err(e) if topic_not_there_yet(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    });
    let run = measure(
        fleet,
        addr,
        rate,
        seconds,
        qos,
        size,
        arrivals,
        "e2e-latency",
    )
    .await;
    reader.abort();
    run
}

/// The same through the AMQP bridge: an application (`user`/`password`) attached to
/// `telemetry/<tenant>` at `url` times each message.
#[allow(clippy::too_many_arguments)]
pub async fn mqtt_to_amqp(
    url: &str,
    user: &str,
    password: &str,
    fleet: &Fleet,
    addr: &str,
    rate: u32,
    seconds: u64,
    qos: u8,
    size: usize,
) -> anyhow::Result<LatencyRun> {
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;
    let mut connection = fe2o3_amqp::Connection::builder()
        .container_id(format!(
            "loadtest-latency-{}",
            uuid::Uuid::new_v4().simple()
        ))
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: user.to_owned(),
            password: password.to_owned(),
        })
        .open(url)
        .await?;
    let mut session = fe2o3_amqp::Session::begin(&mut connection).await?;
    let address = format!("telemetry/{}", fleet.tenant);
    let mut receiver = fe2o3_amqp::Receiver::attach(&mut session, "latency", address).await?;
    let (tx, arrivals) = tokio::sync::mpsc::channel(65_536);
    let reader = tokio::spawn(async move {
        loop {
            let delivery = receiver.recv::<Body<Value>>().await?;
            let at = now_us();
            receiver.accept(&delivery).await?;
            let payload = match delivery.body() {
                Body::Data(batch) => batch.iter().next().map(|d| d.0.to_vec()),
                _ => None,
            };
            if tx.send((at, payload.unwrap_or_default())).await.is_err() {
                return anyhow::Ok(());
            }
        }
    });
    let run = measure(
        fleet,
        addr,
        rate,
        seconds,
        qos,
        size,
        arrivals,
        "e2e-latency-amqp",
    )
    .await;
    reader.abort();
    let _ = session.end().await;
    let _ = connection.close().await;
    run
}

/// The devices' side and the timing, whatever the consumer: `arrivals` carries each received
/// payload with its receive time (µs since the epoch).
#[allow(clippy::too_many_arguments)]
async fn measure(
    fleet: &Fleet,
    addr: &str,
    rate: u32,
    seconds: u64,
    qos: u8,
    size: usize,
    mut arrivals: tokio::sync::mpsc::Receiver<(u64, Vec<u8>)>,
    name: &str,
) -> anyhow::Result<LatencyRun> {
    let mut devices = Vec::new();
    for (i, d) in fleet.devices.iter().enumerate() {
        devices.push(MqttDevice::connect(addr, &fleet.username(d), i).await?);
    }
    // Warm-up: a zero-stamped message from every device until one comes through, so that the
    // topic exists and the consumer is reading before the clock starts (telemetry sent before
    // a consumer reads may be gone).
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    'warm: loop {
        anyhow::ensure!(
            Instant::now() < warm_deadline,
            "no warm-up message came through within 60 s"
        );
        for d in &mut devices {
            d.publish("telemetry", 1, 1, stamped_at(0, size)).await?;
            while !matches!(d.read().await?, v4::Packet::PubAck(_)) {}
        }
        let wait = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                a = arrivals.recv() => match a {
                    Some((_, p)) if stamp_of(&p) == Some(0) => break 'warm,
                    Some(_) => {}
                    None => anyhow::bail!("the consumer stopped"),
                },
                _ = &mut wait => break,
            }
        }
    }

    let n = devices.len().max(1);
    let per_device = (u64::from(rate) * seconds).div_ceil(n as u64) as usize;
    let period = Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
    let total = per_device * n;
    let progress = crate::progress::bar(name, total as u64, "messages");
    let start = Instant::now();
    // Records stamped before this (earlier runs on the same topic, the warm-up) are skipped.
    let run_started_us = now_us();
    let senders: Vec<_> = devices
        .into_iter()
        .map(|d| tokio::spawn(send_stamped(d, per_device, period, qos, size)))
        .collect();
    let mut timeline = Timeline::new(start, Duration::from_secs(1));
    let mut latency_us = Histogram::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut received = 0;
    let mut senders_done_at = None;
    let mut senders = futures_util::future::join_all(senders);
    let mut sent_total = 0;
    loop {
        let deadline = senders_done_at.map(|t: Instant| t + Duration::from_secs(10));
        tokio::select! {
            a = arrivals.recv() => {
                let Some((at_us, payload)) = a else {
                    anyhow::bail!("the consumer stopped");
                };
                let Some(stamp) = stamp_of(&payload).filter(|s| *s >= run_started_us) else {
                    continue;
                };
                let us = at_us.saturating_sub(stamp).max(1);
                latency_us.saturating_record(us);
                timeline.latency(Instant::now(), us);
                received += 1;
                progress.inc(1);
            }
            results = &mut senders, if senders_done_at.is_none() => {
                for r in results {
                    sent_total += r??;
                }
                senders_done_at = Some(Instant::now());
            }
            _ = sleep_until(deadline) => break,
        }
        if senders_done_at.is_some() && received >= sent_total {
            break;
        }
    }
    progress.finish_and_clear();
    Ok(LatencyRun {
        sent: sent_total,
        received,
        latency_us,
        seconds: start.elapsed().as_secs_f64(),
        series: timeline.points(),
    })
}

/// The consumer subscribed before the gateway created the topic: it appears shortly.
fn topic_not_there_yet(e: &rdkafka::error::KafkaError) -> bool {
    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Sends `count` stamped messages, one every `period`; returns how many were sent (and, for
/// QoS 1, acknowledged).
async fn send_stamped(
    mut d: MqttDevice,
    count: usize,
    period: Duration,
    qos: u8,
    size: usize,
) -> anyhow::Result<usize> {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut sent, mut acked) = (0usize, 0usize);
    while sent < count || (qos == 1 && acked < sent) {
        tokio::select! {
            _ = ticker.tick(), if sent < count => {
                let pkid = (sent % 65_535 + 1) as u16;
                d.publish("telemetry", qos, pkid, stamped(size)).await?;
                sent += 1;
            }
            p = d.read(), if qos == 1 => {
                if let v4::Packet::PubAck(_) = p? {
                    acked += 1;
                }
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_payload_carries_its_send_time_and_has_the_asked_size() {
        let before = now_us();
        let p = stamped(64);
        assert_eq!(p.len(), 64);
        let stamp = stamp_of(&p).unwrap();
        assert!(stamp >= before && stamp <= now_us());
        assert_eq!(stamped(2).len(), 12, "the stamp always fits");
        assert_eq!(stamp_of(&stamped_at(0, 64)), Some(0));
        assert_eq!(stamp_of(b"short"), None);
        assert_eq!(
            stamp_of(&[b'x'; 64]),
            None,
            "other records of the topic are no stamps"
        );
    }
}
