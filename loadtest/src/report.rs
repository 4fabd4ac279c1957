//! The Markdown summary of a run: one row per scenario from the JSON lines the scenarios print,
//! so a whole `scripts/loadtest` run reads as one table.

use serde_json::Value;

/// Renders JSON report lines (as printed by `ferrule-loadtest`) as a Markdown table; lines
/// that are not JSON objects are skipped.
pub fn markdown(lines: &str) -> String {
    let mut out = String::from(
        "| scenario | messages | per second | server CPU s per 100k | generator / broker CPU s per 100k | latency p50 / p99 / p99.9 ms | RSS per connection | notes |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for line in lines.lines() {
        let Ok(Value::Object(r)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let num = |k: &str| r.get(k).and_then(Value::as_f64);
        let cell = |v: Option<String>| v.unwrap_or_else(|| "—".to_owned());
        let latency = r.get("latency_ms").map(|l| {
            let ms = |k: &str| l.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            format!("{:.2} / {:.2} / {:.2}", ms("p50"), ms("p99"), ms("p999"))
        });
        let count = |k: &str| r.get(k).and_then(Value::as_u64);
        let mut notes = Vec::new();
        if r.get("failed").and_then(Value::as_bool) == Some(true) {
            notes.push("FAILED (see the run's output)".to_owned());
        }
        if let Some(f) = count("commands_failed").filter(|f| *f > 0) {
            notes.push(format!("{f} failed"));
        }
        if let (Some(acked), Some(lost)) = (count("events_acked"), count("events_lost")) {
            notes.push(format!("{acked} acked, {lost} lost"));
        }
        if let (Some(open), Some(gateways)) = (count("open_at_once"), count("gateways")) {
            notes.push(format!(
                "{open} open at once over {gateways} gateway processes"
            ));
        }
        if let Some(stall) = count("stall_secs").filter(|s| *s > 0) {
            notes.push(format!("broker stopped {stall} s"));
        }
        if let (Some(peak), Some(before)) = (count("peak_rss_bytes"), count("rss_before_bytes")) {
            notes.push(format!(
                "RSS {:.0} → peak {:.0} MB",
                before as f64 / 1e6,
                peak as f64 / 1e6
            ));
        }
        let rest_of_box = num("generator_cpu_seconds_per_100k").map(|g| {
            let broker = num("broker_cpu_seconds_per_100k");
            format!("{g:.2} / {}", cell(broker.map(|b| format!("{b:.2}"))))
        });
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.get("scenario").and_then(Value::as_str).unwrap_or("?"),
            cell(num("messages").map(|m| format!("{m:.0}"))),
            cell(num("per_second").map(|m| format!("{m:.0}"))),
            cell(num("process_cpu_seconds_per_100k").map(|c| format!("{c:.2}"))),
            cell(rest_of_box),
            cell(latency),
            cell(num("rss_per_connection_bytes").map(|b| format!("{b:.0} B"))),
            cell((!notes.is_empty()).then(|| notes.join("; "))),
        );
    }
    let ratios = ratios(lines);
    if !ratios.is_empty() {
        out += "\nAgainst the baselines of the same run:\n\n";
        for r in ratios {
            out += &format!("- {r}\n");
        }
    }
    out
}

/// Which baseline each Ferrule scenario is measured against: (scenario prefix, baseline,
/// compare rates (`true`) or p99 latencies (`false`)).
const BASELINES: &[(&str, &str, bool)] = &[
    ("mqtt-qos", "kafka-producer", true),
    ("mqtt5-qos", "kafka-producer", true),
    ("mqtt-qos0", "mosquitto-qos0", true),
    ("mqtt-qos1", "mosquitto-qos1", true),
    ("http-qos", "kafka-producer", true),
    ("http-qos", "axum-baseline", true),
    ("coap-con", "coap-baseline-con", true),
    ("coap-non", "coap-baseline-non", true),
    ("coap-dtls-con", "coap-baseline-con", true),
    ("coap-dtls-non", "coap-baseline-non", true),
    ("amqp-", "kafka-consumer", true),
    ("command-rtt-", "kafka-echo", false),
];

/// Ferrule's figures as ratios to the baselines measured in the same run: throughput as a
/// share (or multiple) of the baseline's, command p99 as a multiple of the Kafka echo's.
pub fn ratios(lines: &str) -> Vec<String> {
    let reports: Vec<serde_json::Map<String, Value>> = lines
        .lines()
        .filter_map(|l| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(r)) => Some(r),
            _ => None,
        })
        .collect();
    // The latest line of a latency baseline before a scenario counts.
    let latest = |name: &str, before: usize| {
        reports[..before]
            .iter()
            .rev()
            .find(|r| r.get("scenario").and_then(Value::as_str) == Some(name))
    };
    let p99 = |r: &serde_json::Map<String, Value>| {
        r.get("latency_ms")
            .and_then(|l| l.get("p99"))
            .and_then(Value::as_f64)
    };
    let rate = |r: &serde_json::Map<String, Value>| r.get("per_second").and_then(Value::as_f64);
    let best = |name: &str| {
        reports
            .iter()
            .filter(|r| r.get("scenario").and_then(Value::as_str) == Some(name))
            .filter(|r| rate(r).is_some())
            .max_by(|a, b| rate(a).unwrap_or(0.0).total_cmp(&rate(b).unwrap_or(0.0)))
    };
    let mut out = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let Some(name) = r.get("scenario").and_then(Value::as_str) else {
            continue;
        };
        for (prefix, baseline, by_rate) in BASELINES {
            if !name.starts_with(prefix) {
                continue;
            }
            // A throughput ceiling counts at its best run of the file: one measurement on
            // shared cores is noisy, and the best one keeps the ratio conservative. A latency
            // floor counts as measured last before the scenario (or after it).
            let b = if *by_rate {
                best(baseline)
            } else {
                latest(baseline, i).or_else(|| latest(baseline, reports.len()))
            };
            let Some(b) = b else {
                continue;
            };
            let line = if *by_rate {
                let (Some(x), Some(y)) = (rate(r), rate(b)) else {
                    continue;
                };
                let share = x / y.max(1e-9);
                if share < 1.0 {
                    format!("{name}: {:.0} % of {baseline}", share * 100.0)
                } else {
                    format!("{name}: {share:.2} × {baseline}")
                }
            } else {
                let (Some(x), Some(y)) = (p99(r), p99(b)) else {
                    continue;
                };
                format!(
                    "{name}: p99 {x:.1} ms = {:.1} × {baseline} (p99 {y:.1} ms)",
                    x / y.max(1e-9)
                )
            };
            out.push(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ferrule_figures_become_ratios_to_the_baselines_of_the_same_run() {
        let lines = [
            r#"{"scenario":"kafka-producer","per_second":200000.0}"#,
            r#"{"scenario":"mosquitto-qos1","per_second":100000.0}"#,
            r#"{"scenario":"mqtt-qos1","per_second":150000.0}"#,
            r#"{"scenario":"kafka-producer","per_second":300000.0}"#,
            r#"{"scenario":"kafka-echo","latency_ms":{"p99":10.0}}"#,
            r#"{"scenario":"command-rtt-qos0","latency_ms":{"p99":25.0}}"#,
            r#"{"scenario":"kafka-consumer","per_second":1000000.0}"#,
            r#"{"scenario":"amqp-event-1-fe2o3","per_second":20000.0}"#,
            r#"{"scenario":"http-qos1","failed":true}"#,
        ]
        .join("\n");
        assert_eq!(
            ratios(&lines),
            vec![
                "mqtt-qos1: 50 % of kafka-producer",
                "mqtt-qos1: 1.50 × mosquitto-qos1",
                "command-rtt-qos0: p99 25.0 ms = 2.5 × kafka-echo (p99 10.0 ms)",
                "amqp-event-1-fe2o3: 2 % of kafka-consumer",
            ]
        );
        assert!(markdown(&lines).contains("- mqtt-qos1: 50 % of kafka-producer\n"));
    }

    #[test]
    fn one_row_per_scenario_with_dashes_for_what_it_does_not_measure() {
        let lines = [
            r#"{"scenario":"mqtt-qos1","messages":200000,"per_second":121910.2,"process_cpu_seconds_per_100k":1.045,"generator_cpu_seconds_per_100k":0.5,"broker_cpu_seconds_per_100k":0.254}"#,
            "compiling… not JSON",
            r#"{"scenario":"command-rtt-qos0","messages":20000,"per_second":998.0,"latency_ms":{"p50":40.7,"p99":125.57,"p999":169.73,"max":201.9}}"#,
            r#"{"scenario":"mqtt-idle","messages":19000,"per_second":3069.1,"rss_per_connection_bytes":6763.8}"#,
            r#"{"scenario":"command-rtt-http","failed":true}"#,
            r#"{"scenario":"broker-stall","messages":39000,"per_second":1500.0,"events_acked":39000,"events_lost":0,"stall_secs":6,"peak_rss_bytes":52000000,"rss_before_bytes":40000000}"#,
            r#"{"scenario":"mqtt-idle-spread","messages":100002,"per_second":2500.4,"rss_per_connection_bytes":3012.6,"gateways":6,"open_at_once":100002}"#,
        ]
        .join("\n");
        let md = markdown(&lines);
        let rows: Vec<&str> = md.lines().collect();
        assert_eq!(rows.len(), 8, "{md}");
        assert_eq!(
            rows[2],
            "| mqtt-qos1 | 200000 | 121910 | 1.04 | 0.50 / 0.25 | — | — | — |"
        );
        assert_eq!(
            rows[3],
            "| command-rtt-qos0 | 20000 | 998 | — | — | 40.70 / 125.57 / 169.73 | — | — |"
        );
        assert_eq!(
            rows[4],
            "| mqtt-idle | 19000 | 3069 | — | — | — | 6764 B | — |"
        );
        assert_eq!(
            rows[5],
            "| command-rtt-http | — | — | — | — | — | — | FAILED (see the run's output) |"
        );
        assert_eq!(
            rows[6],
            "| broker-stall | 39000 | 1500 | — | — | — | — | 39000 acked, 0 lost; broker stopped 6 s; RSS 40 → peak 52 MB |"
        );
        assert_eq!(
            rows[7],
            "| mqtt-idle-spread | 100002 | 2500 | — | — | — | 3013 B | 100002 open at once over 6 gateway processes |"
        );
    }
}
