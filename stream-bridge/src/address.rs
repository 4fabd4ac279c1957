//! The AMQP addresses applications attach to (Hono's northbound API) and whose tenant they
//! name; the tenant check of every link happens on the parsed form.

/// What a link address points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Telemetry { tenant: String },
    Event { tenant: String },
    Command { tenant: String },
    CommandResponse { tenant: String, reply_id: String },
}

impl Address {
    /// Parses `telemetry/<tenant>`, `event/<tenant>`, `command/<tenant>` and
    /// `command_response/<tenant>/<replyId>`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Address> {
        let (kind, rest) = s.split_once('/')?;
        let (tenant, tail) = match rest.split_once('/') {
            Some((t, tail)) => (t, Some(tail)),
            None => (rest, None),
        };
        if tenant.is_empty() {
            return None;
        }
        let tenant = tenant.to_owned();
        match (kind, tail) {
            ("telemetry", None) => Some(Address::Telemetry { tenant }),
            ("event", None) => Some(Address::Event { tenant }),
            ("command", None) => Some(Address::Command { tenant }),
            ("command_response", Some(reply)) if !reply.is_empty() => {
                Some(Address::CommandResponse {
                    tenant,
                    reply_id: reply.to_owned(),
                })
            }
            _ => None,
        }
    }

    pub fn tenant(&self) -> &str {
        match self {
            Address::Telemetry { tenant }
            | Address::Event { tenant }
            | Address::Command { tenant }
            | Address::CommandResponse { tenant, .. } => tenant,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_the_northbound_api() {
        assert_eq!(
            Address::parse("telemetry/t1"),
            Some(Address::Telemetry {
                tenant: "t1".into()
            })
        );
        assert_eq!(
            Address::parse("event/t1"),
            Some(Address::Event {
                tenant: "t1".into()
            })
        );
        assert_eq!(
            Address::parse("command_response/t1/app-1/x"),
            Some(Address::CommandResponse {
                tenant: "t1".into(),
                reply_id: "app-1/x".into()
            })
        );
        assert_eq!(Address::parse("command/t1").unwrap().tenant(), "t1");
        for bad in [
            "telemetry",
            "telemetry/",
            "telemetry/t1/x",
            "command_response/t1",
            "foo/t1",
            "",
        ] {
            assert_eq!(Address::parse(bad), None, "{bad}");
        }
    }
}
