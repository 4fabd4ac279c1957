//! The time-to-live rule of Hono's tenant API: a message's ttl is the smaller of the tenant's
//! maximum and the device's (or default) request, configured in seconds, sent in milliseconds.

/// Which kind of message a ttl is computed for; each has its own maximum and default key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlKind {
    Event,
    TelemetryQos0,
    TelemetryQos1,
    CommandResponse,
}

impl TtlKind {
    /// The tenant `resource-limits` key holding the maximum (seconds).
    pub const fn max_key(self) -> &'static str {
        match self {
            TtlKind::Event => "max-ttl",
            TtlKind::TelemetryQos0 => "max-ttl-telemetry-qos0",
            TtlKind::TelemetryQos1 => "max-ttl-telemetry-qos1",
            TtlKind::CommandResponse => "max-ttl-command-response",
        }
    }

    /// The tenant/device `defaults` key holding the default (seconds).
    pub const fn default_key(self) -> &'static str {
        match self {
            TtlKind::Event => "ttl",
            TtlKind::TelemetryQos0 => "ttl-telemetry-qos0",
            TtlKind::TelemetryQos1 => "ttl-telemetry-qos1",
            TtlKind::CommandResponse => "ttl-command-response",
        }
    }
}

/// Computes the `ttl` header in milliseconds, or `None` when no ttl applies.
///
/// `max` is the tenant limit, `requested` the device's own ttl (e.g. `hono-ttl`),
/// `device_default` and `tenant_default` the `defaults` values; all in seconds, -1 or `None`
/// meaning unset. A device's request can lower the tenant maximum but never raise it.
pub fn effective_ttl_millis(
    max: Option<i64>,
    requested: Option<i64>,
    device_default: Option<i64>,
    tenant_default: Option<i64>,
) -> Option<i64> {
    let mut effective = max.filter(|m| *m > -1).unwrap_or(-1);
    let candidate = requested
        .or(device_default)
        .or(tenant_default)
        .unwrap_or(-1);
    if candidate > -1 && (effective == -1 || candidate < effective) {
        effective = candidate;
    }
    (effective > -1).then(|| effective.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_configured_means_no_ttl() {
        assert_eq!(effective_ttl_millis(None, None, None, None), None);
        assert_eq!(effective_ttl_millis(Some(-1), Some(-1), None, None), None);
    }

    #[test]
    fn max_alone_applies() {
        assert_eq!(
            effective_ttl_millis(Some(30), None, None, None),
            Some(30_000)
        );
    }

    #[test]
    fn request_lowers_but_never_raises_the_max() {
        assert_eq!(
            effective_ttl_millis(Some(30), Some(10), None, None),
            Some(10_000)
        );
        assert_eq!(
            effective_ttl_millis(Some(30), Some(100), None, None),
            Some(30_000)
        );
        assert_eq!(
            effective_ttl_millis(None, Some(100), None, None),
            Some(100_000)
        );
        assert_eq!(effective_ttl_millis(Some(30), Some(0), None, None), Some(0));
    }

    #[test]
    fn request_beats_device_default_beats_tenant_default() {
        assert_eq!(
            effective_ttl_millis(None, Some(5), Some(6), Some(7)),
            Some(5_000)
        );
        assert_eq!(
            effective_ttl_millis(None, None, Some(6), Some(7)),
            Some(6_000)
        );
        assert_eq!(effective_ttl_millis(None, None, None, Some(7)), Some(7_000));
        assert_eq!(
            effective_ttl_millis(Some(3), None, None, Some(7)),
            Some(3_000)
        );
    }

    #[test]
    fn keys_match_hono() {
        assert_eq!(TtlKind::Event.max_key(), "max-ttl");
        assert_eq!(TtlKind::TelemetryQos1.default_key(), "ttl-telemetry-qos1");
        assert_eq!(
            TtlKind::CommandResponse.max_key(),
            "max-ttl-command-response"
        );
    }
}
