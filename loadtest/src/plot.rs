//! Plots of a run: one SVG per scenario with its throughput over time and, where measured, its
//! p99 latency over time. Drawn as plain SVG elements, so the harness needs no font or
//! graphics libraries and any browser shows the result.

use crate::timeline::Point;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const WIDTH: f64 = 760.0;
const PANEL: f64 = 260.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 40.0;

/// Writes `<dir>/<scenario>.svg` for every JSON report line that carries a `series`; returns
/// the files written.
pub fn render_run(lines: &str, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for line in lines.lines() {
        let Ok(report) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(scenario) = report.get("scenario").and_then(Value::as_str) else {
            continue;
        };
        let points: Vec<Point> = report
            .get("series")
            .and_then(Value::as_array)
            .map(|s| s.iter().filter_map(Point::from_json).collect())
            .unwrap_or_default();
        if points.is_empty() {
            continue;
        }
        let name: String = scenario
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = dir.join(format!("{name}.svg"));
        std::fs::write(&path, chart(scenario, &points))?;
        written.push(path);
    }
    Ok(written)
}

/// One scenario's chart: throughput on top, p99 latency below when the points have it.
pub fn chart(title: &str, points: &[Point]) -> String {
    let latency: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.p99_ms.map(|l| (p.t, l)))
        .collect();
    let panels = if latency.is_empty() { 1.0 } else { 2.0 };
    let height = panels * PANEL;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let t_max = points.iter().map(|p| p.t).fold(0.0, f64::max);
    let rates: Vec<(f64, f64)> = points.iter().map(|p| (p.t, p.rate)).collect();
    panel(
        &mut svg,
        0.0,
        &format!("{} — messages per second", escape(title)),
        &rates,
        t_max,
        "#1f77b4",
    );
    if !latency.is_empty() {
        panel(
            &mut svg,
            PANEL,
            &format!("{} — p99 latency (ms)", escape(title)),
            &latency,
            t_max,
            "#d62728",
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Draws one panel (axes, ticks, labels, the line) with its top edge at `y0`.
fn panel(svg: &mut String, y0: f64, title: &str, data: &[(f64, f64)], t_max: f64, colour: &str) {
    let (x_left, x_right) = (LEFT, WIDTH - RIGHT);
    let (y_top, y_bottom) = (y0 + TOP, y0 + PANEL - BOTTOM);
    let y_max = nice_ceiling(data.iter().map(|d| d.1).fold(0.0, f64::max));
    let t_max = nice_ceiling(t_max);
    let x = |t: f64| x_left + (x_right - x_left) * t / t_max;
    let y = |v: f64| y_bottom - (y_bottom - y_top) * v / y_max;
    let _ = writeln!(
        svg,
        "<text x=\"{x_left}\" y=\"{}\" font-size=\"14\">{title}</text>",
        y0 + 24.0
    );
    let _ = writeln!(
        svg,
        "<path d=\"M{x_left},{y_top} V{y_bottom} H{x_right}\" stroke=\"black\" fill=\"none\"/>"
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{x_left}\" x2=\"{x_right}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            x_left - 6.0,
            y(v) + 4.0,
            label(v),
            yy = y(v),
        );
        let t = t_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{} s</text>",
            x(t),
            y_bottom + 18.0,
            label(t)
        );
    }
    let line: Vec<String> = data
        .iter()
        .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
        .collect();
    let _ = writeln!(
        svg,
        "<polyline points=\"{}\" stroke=\"{colour}\" stroke-width=\"1.5\" fill=\"none\"/>",
        line.join(" ")
    );
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10ⁿ) at or above `v`, so the
/// line fills most of the panel (1 for nothing to show).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v * 0.999_999)
        .unwrap_or(10.0 * magnitude)
}

/// A short axis label: 250, 1.5, 12k, 3.2M.
fn label(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", trim(v / 1e6)),
        v if v >= 1e4 => format!("{}k", trim(v / 1e3)),
        v => trim(v),
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: f64, rate: f64, p99_ms: Option<f64>) -> Point {
        Point { t, rate, p99_ms }
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 8.0);
        assert_eq!(nice_ceiling(21.0), 25.0);
        assert_eq!(nice_ceiling(120_000.0), 150_000.0);
        assert!((nice_ceiling(0.3) - 0.3).abs() < 1e-9);
        assert_eq!(nice_ceiling(0.45), 0.5);
        assert_eq!(nice_ceiling(2.0), 2.0);
        assert_eq!(label(200_000.0), "200k");
        assert_eq!(label(2_500_000.0), "2.5M");
        assert_eq!(label(0.25), "0.25");
    }

    #[test]
    fn throughput_only_runs_get_one_panel_and_latency_runs_two() {
        let plain = chart("mqtt-qos1", &[p(0.5, 1000.0, None), p(1.0, 2000.0, None)]);
        assert!(plain.starts_with("<svg") && plain.trim_end().ends_with("</svg>"));
        assert_eq!(plain.matches("<polyline").count(), 1);
        assert!(plain.contains("mqtt-qos1 — messages per second"));
        // The 2000/s point sits on the top grid line (axis maximum 2000).
        assert!(
            plain.contains(&format!("{:.1},{:.1}", WIDTH - RIGHT, TOP)),
            "{plain}"
        );

        let rtt = chart("command-rtt <1>", &[p(1.0, 1000.0, Some(12.5))]);
        assert_eq!(rtt.matches("<polyline").count(), 2);
        assert!(rtt.contains("command-rtt &lt;1&gt; — p99 latency (ms)"));
    }

    #[test]
    fn a_run_file_becomes_one_svg_per_scenario_with_a_series() {
        let dir = std::env::temp_dir().join(format!("plots-{}", uuid::Uuid::new_v4().simple()));
        let lines = [
            r#"{"scenario":"kafka-producer","messages":10}"#,
            r#"{"scenario":"e2e-latency","series":[{"t":1.0,"rate":5.0,"p99_ms":3.0}]}"#,
            "not json",
        ]
        .join("\n");
        let written = render_run(&lines, &dir).unwrap();
        assert_eq!(written, vec![dir.join("e2e-latency.svg")]);
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
