//! What a run measures: records that reached Kafka (high watermarks), throughput, and the
//! CPU seconds and resident memory of the Ferrule process from /proc.

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::{Duration, Instant};

/// CPU time and resident memory of a process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSample {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

impl ProcessSample {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Linux reports CPU time in clock ticks of 1/100 s on every common configuration.
        Ok(ProcessSample {
            cpu_secs: ticks / 100.0,
            rss_bytes: rss_kb * 1024,
        })
    }
}

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub messages: usize,
    pub seconds: f64,
    pub cpu_secs: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    /// The highest resident memory seen during the run (sampled every 100 ms).
    pub peak_rss_bytes: Option<u64>,
    /// Scenario-specific fields (e.g. latency percentiles), merged into the JSON.
    pub extra: Option<serde_json::Value>,
    /// The run over time, for the plots.
    pub series: Vec<crate::timeline::Point>,
    /// CPU seconds of the load generator's own process during the run (for a baseline served
    /// in-process, such as the bare axum or coap-lite server, that server's too).
    pub generator_cpu_secs: Option<f64>,
    /// CPU seconds of the broker process during the run, when its process id was given.
    pub broker_cpu_secs: Option<f64>,
}

impl Report {
    pub fn new(scenario: &str, messages: usize, seconds: f64) -> Self {
        Report {
            scenario: scenario.to_owned(),
            messages,
            seconds,
            cpu_secs: None,
            rss_bytes: None,
            rss_per_connection_bytes: None,
            peak_rss_bytes: None,
            extra: None,
            series: Vec::new(),
            generator_cpu_secs: None,
            broker_cpu_secs: None,
        }
    }

    pub fn add_process(&mut self, before: &ProcessSample, after: &ProcessSample) {
        self.cpu_secs = Some(after.cpu_secs - before.cpu_secs);
        self.rss_bytes = Some(after.rss_bytes);
    }

    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "scenario": self.scenario,
            "messages": self.messages,
            "seconds": self.seconds,
            "per_second": self.rate(),
            "process_cpu_seconds": self.cpu_secs,
            "process_cpu_seconds_per_100k": self.cpu_secs.map(|c| c * 100_000.0 / self.messages.max(1) as f64),
            "process_rss_bytes": self.rss_bytes,
            "process_peak_rss_bytes": self.peak_rss_bytes,
            "rss_per_connection_bytes": self.rss_per_connection_bytes,
        });
        let per_100k = |c: f64| c * 100_000.0 / self.messages.max(1) as f64;
        if let Some(obj) = v.as_object_mut() {
            for (name, secs) in [
                ("generator_cpu_seconds_per_100k", self.generator_cpu_secs),
                ("broker_cpu_seconds_per_100k", self.broker_cpu_secs),
            ] {
                if let Some(s) = secs {
                    obj.insert(name.into(), per_100k(s).into());
                }
            }
        }
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (&self.extra, v.as_object_mut())
        {
            obj.extend(extra.clone());
        }
        if !self.series.is_empty() {
            v["series"] = self.series.iter().map(|p| p.to_json()).collect();
        }
        v.to_string()
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:<16} {:>9} msgs in {:>7.2} s = {:>10.0} /s",
            self.scenario,
            self.messages,
            self.seconds,
            self.rate()
        );
        if let Some(c) = self.cpu_secs {
            s += &format!(
                ", server CPU {:.2} s ({:.2} s per 100k)",
                c,
                c * 100_000.0 / self.messages.max(1) as f64
            );
        }
        if let Some(r) = self.rss_per_connection_bytes {
            s += &format!(", {r:.0} B RSS per connection");
        }
        if let Some(l) = self.extra.as_ref().and_then(|e| e.get("latency_ms")) {
            let ms = |k: &str| l.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
            let what = if self
                .extra
                .as_ref()
                .is_some_and(|e| e.get("commands_sent").is_some())
            {
                "round trip"
            } else {
                "latency"
            };
            s += &format!(
                ", {what} p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms",
                ms("p50"),
                ms("p99"),
                ms("p999"),
                ms("max")
            );
        }
        s
    }
}

/// Samples a process's resident memory every 100 ms while a run goes on; `peak` reads the
/// highest value so far.
pub struct PeakRss {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    pub fn start(pid: u32) -> Self {
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = peak.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Ok(s) = ProcessSample::read(pid) {
                    seen.fetch_max(s.rss_bytes, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        PeakRss { peak, sampler }
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

/// Waits until `topic` holds `expected` records and returns the seconds since `started`.
pub async fn wait_for_records(
    bootstrap: &str,
    topic: &str,
    expected: i64,
    started: Instant,
) -> anyhow::Result<f64> {
    Ok(
        watch_records(bootstrap.to_owned(), topic.to_owned(), expected, started)
            .await?
            .0,
    )
}

/// Like `wait_for_records`, and also returns the record count at every poll (every 20 ms),
/// for the run's timeline. Runs beside the load when spawned before it.
pub async fn watch_records(
    bootstrap: String,
    topic: String,
    expected: i64,
    started: Instant,
) -> anyhow::Result<(f64, Vec<(Instant, u64)>)> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "ferrule-loadtest-watermarks")
            .set("log_level", "3")
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut samples = Vec::new();
        loop {
            let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            let partitions = md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            let mut total = 0;
            for p in 0..partitions {
                // A topic still being created has no leader yet: count it as empty.
                if let Ok((low, high)) =
                    consumer.fetch_watermarks(&topic, p as i32, Duration::from_secs(5))
                {
                    total += high - low;
                }
            }
            samples.push((Instant::now(), total.max(0) as u64));
            if total >= expected {
                return Ok((started.elapsed().as_secs_f64(), samples));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {total} of {expected} records arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await?
}
