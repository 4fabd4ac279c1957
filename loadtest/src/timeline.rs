//! What a run looked like over time: messages (and latency) per interval, so a stall, a
//! warm-up or a slow drift shows in the plots instead of hiding in one average.

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// One interval of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Seconds since the run started, at the end of the interval.
    pub t: f64,
    /// Messages per second in the interval.
    pub rate: f64,
    /// The interval's 99th-percentile latency, where the scenario measures latency.
    pub p99_ms: Option<f64>,
}

impl Point {
    pub fn to_json(&self) -> Value {
        json!({"t": self.t, "rate": self.rate, "p99_ms": self.p99_ms})
    }

    pub fn from_json(v: &Value) -> Option<Point> {
        Some(Point {
            t: v.get("t")?.as_f64()?,
            rate: v.get("rate")?.as_f64()?,
            p99_ms: v.get("p99_ms").and_then(Value::as_f64),
        })
    }
}

/// Counts and latencies bucketed by fixed intervals since the start of a run.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    interval: Duration,
    counts: Vec<u64>,
    latencies: Vec<Option<Histogram<u64>>>,
}

impl Timeline {
    pub fn new(start: Instant, interval: Duration) -> Self {
        Timeline {
            start,
            interval: interval.max(Duration::from_millis(1)),
            counts: Vec::new(),
            latencies: Vec::new(),
        }
    }

    fn bucket(&mut self, at: Instant) -> usize {
        let i = (at.saturating_duration_since(self.start).as_nanos() / self.interval.as_nanos())
            as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
            self.latencies.resize_with(i + 1, || None);
        }
        i
    }

    /// `n` messages completed at `at`.
    pub fn count(&mut self, at: Instant, n: u64) {
        let i = self.bucket(at);
        self.counts[i] += n;
    }

    /// One message completed at `at` after `latency_us`.
    pub fn latency(&mut self, at: Instant, latency_us: u64) {
        let i = self.bucket(at);
        self.counts[i] += 1;
        self.latencies[i]
            .get_or_insert_with(|| {
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds")
            })
            .saturating_record(latency_us.max(1));
    }

    /// Adds cumulative totals sampled over time (e.g. the records a topic holds): each
    /// sample's growth since the previous one counts at its time.
    pub fn count_totals(&mut self, samples: &[(Instant, u64)]) {
        let mut last = 0;
        for &(at, total) in samples {
            self.count(at, total.saturating_sub(last));
            last = last.max(total);
        }
    }

    pub fn points(&self) -> Vec<Point> {
        let secs = self.interval.as_secs_f64();
        self.counts
            .iter()
            .zip(&self.latencies)
            .enumerate()
            .map(|(i, (n, h))| Point {
                t: (i + 1) as f64 * secs,
                rate: *n as f64 / secs,
                p99_ms: h
                    .as_ref()
                    .filter(|h| !h.is_empty())
                    .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_interval_and_rates_are_per_second() {
        let start = Instant::now();
        let mut t = Timeline::new(start, Duration::from_millis(500));
        t.count(start + Duration::from_millis(100), 10);
        t.count(start + Duration::from_millis(1_200), 5);
        let p = t.points();
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].t, p[0].rate), (0.5, 20.0));
        assert_eq!(
            p[1].rate, 0.0,
            "an interval without messages is a zero, not a gap"
        );
        assert_eq!((p[2].t, p[2].rate), (1.5, 10.0));
        assert_eq!(p[0].p99_ms, None);
    }

    #[test]
    fn latency_percentiles_are_per_interval() {
        let start = Instant::now();
        let mut t = Timeline::new(start, Duration::from_secs(1));
        for _ in 0..100 {
            t.latency(start, 2_000);
        }
        t.latency(start + Duration::from_millis(1_500), 50_000);
        let p = t.points();
        assert_eq!(p[0].rate, 100.0);
        assert!((p[0].p99_ms.unwrap() - 2.0).abs() < 0.05, "{p:?}");
        assert!((p[1].p99_ms.unwrap() - 50.0).abs() < 0.5, "{p:?}");
    }

    #[test]
    fn cumulative_samples_become_increments() {
        let start = Instant::now();
        let mut t = Timeline::new(start, Duration::from_secs(1));
        let at = |ms| start + Duration::from_millis(ms);
        t.count_totals(&[
            (at(200), 100),
            (at(700), 300),
            (at(1_500), 300),
            (at(2_100), 400),
        ]);
        let rates: Vec<f64> = t.points().iter().map(|p| p.rate).collect();
        assert_eq!(rates, vec![300.0, 0.0, 100.0]);
        let back = Point::from_json(&t.points()[2].to_json()).unwrap();
        assert_eq!(back, t.points()[2]);
    }
}
