//! Progress of a long run on the terminal (hidden when stderr is not one, e.g. in CI logs).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar for `total` units of `what` (messages, commands, seconds).
pub fn bar(scenario: &str, total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{prefix:>18}} {{bar:30}} {{pos}}/{{len}} {what} ({{per_sec}}, {{elapsed}})"
    )) {
        bar.set_style(style);
    }
    bar.set_prefix(scenario.to_owned());
    bar
}
