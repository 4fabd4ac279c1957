//! Hono's MQTT publish topics for telemetry and events: `telemetry` / `t`, `event` / `e`, the
//! `{endpoint}/{tenant}/{device}` forms (tenant may be empty for gateways) and the property bag
//! `/?key=value&…` at the end.

use crate::pipeline::Endpoint;

/// A parsed publish topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAddress {
    pub endpoint: Endpoint,
    /// `(tenant, device)` from the long forms; the tenant may be empty.
    pub target: Option<(String, String)>,
    /// The property bag, URL-decoded, in order.
    pub properties: Vec<(String, String)>,
}

impl PublishAddress {
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a topic cannot be published to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported topic `{0}`")]
pub struct TopicError(pub String);

pub fn parse(topic: &str) -> Result<PublishAddress, TopicError> {
    let bad = || TopicError(topic.to_owned());
    let (path, properties) = split_property_bag(topic);
    let mut segments = path.split('/');
    let endpoint = match segments.next() {
        Some("telemetry" | "t") => Endpoint::Telemetry,
        Some("event" | "e") => Endpoint::Event,
        _ => return Err(bad()),
    };
    let rest: Vec<&str> = segments.collect();
    let target = match rest.as_slice() {
        [] | [""] | ["", ""] => None,
        [tenant, device] if !device.is_empty() => {
            Some(((*tenant).to_owned(), (*device).to_owned()))
        }
        _ => return Err(bad()),
    };
    Ok(PublishAddress {
        endpoint,
        target,
        properties,
    })
}

/// Splits `path/?k=v&k2=v2` into the path and the URL-decoded properties, in order.
fn split_property_bag(topic: &str) -> (&str, Vec<(String, String)>) {
    let Some(i) = topic.find("/?") else {
        return (topic, Vec::new());
    };
    let properties = topic[i + 2..]
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    (&topic[..i], properties)
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_forms() {
        for t in ["telemetry", "t", "telemetry/", "t//"] {
            let a = parse(t).unwrap();
            assert_eq!((a.endpoint, a.target), (Endpoint::Telemetry, None), "{t}");
        }
        let a = parse("e/DEFAULT_TENANT/4711").unwrap();
        assert_eq!(a.endpoint, Endpoint::Event);
        assert_eq!(a.target, Some(("DEFAULT_TENANT".into(), "4711".into())));
        let a = parse("t//4712").unwrap();
        assert_eq!(a.target, Some((String::new(), "4712".into())));
    }

    #[test]
    fn property_bag() {
        let a = parse("event/?content-type=text%2Fplain&hono-ttl=30&on-error=ignore").unwrap();
        assert_eq!(a.target, None);
        assert_eq!(a.property("content-type"), Some("text/plain"));
        assert_eq!(a.property("hono-ttl"), Some("30"));
        assert_eq!(a.property("on-error"), Some("ignore"));
        let a = parse("t/tenant/dev/?content-type=application/json").unwrap();
        assert_eq!(a.target, Some(("tenant".into(), "dev".into())));
        assert_eq!(a.property("content-type"), Some("application/json"));
    }

    #[test]
    fn refuses_other_topics() {
        for t in [
            "",
            "foo",
            "telemetry/a",
            "telemetry/a/b/c",
            "t/tenant/",
            "command///res/1/200",
        ] {
            assert!(parse(t).is_err(), "{t}");
        }
    }
}

/// A command response published by a device: `command/[tenant]/[device]/res/{reqId}/{status}`
/// or `c/…/s/…`, optionally with a property bag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseAddress {
    pub tenant: String,
    pub device: String,
    pub request_id: String,
    pub status: u16,
    pub properties: Vec<(String, String)>,
}

/// `None` when `topic` is not a command topic at all.
pub fn parse_response(topic: &str) -> Option<Result<ResponseAddress, TopicError>> {
    // Every PUBLISH passes here first: telemetry and events leave before any allocation.
    if !matches!(topic.split('/').next(), Some("command" | "c")) {
        return None;
    }
    let (path, properties) = split_property_bag(topic);
    let parts: Vec<&str> = path.split('/').collect();
    let bad = || TopicError(topic.to_owned());
    let [_, tenant, device, "res" | "s", req, status] = parts.as_slice() else {
        return Some(Err(bad()));
    };
    let Ok(status) = status.parse::<u16>() else {
        return Some(Err(bad()));
    };
    Some(Ok(ResponseAddress {
        tenant: (*tenant).to_owned(),
        device: (*device).to_owned(),
        request_id: (*req).to_owned(),
        status,
        properties,
    }))
}

/// A command subscription: `command/[tenant]/[device]/req/#` or `c/…/q/#`; the device segment
/// is empty (the device itself), `+` (a gateway, for all its devices) or one device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandFilter {
    pub prefix: String,
    pub tenant: String,
    pub device: String,
    pub req: String,
}

pub fn parse_command_filter(filter: &str) -> Option<CommandFilter> {
    let parts: Vec<&str> = filter.split('/').collect();
    let [
        prefix @ ("command" | "c"),
        tenant,
        device,
        req @ ("req" | "q"),
        "#",
    ] = parts.as_slice()
    else {
        return None;
    };
    Some(CommandFilter {
        prefix: (*prefix).to_owned(),
        tenant: (*tenant).to_owned(),
        device: (*device).to_owned(),
        req: (*req).to_owned(),
    })
}

#[cfg(test)]
mod command_tests {
    use super::*;

    #[test]
    fn response_topics() {
        let r = parse_response("command///res/1abc/200").unwrap().unwrap();
        assert_eq!(
            (
                r.tenant.as_str(),
                r.device.as_str(),
                r.request_id.as_str(),
                r.status
            ),
            ("", "", "1abc", 200)
        );
        let r = parse_response("c//dev/s/1x/503/?content-type=text%2Fplain")
            .unwrap()
            .unwrap();
        assert_eq!(r.device, "dev");
        assert_eq!(
            r.properties,
            vec![("content-type".to_owned(), "text/plain".to_owned())]
        );
        assert!(parse_response("command///res/1abc/ok").unwrap().is_err());
        assert!(parse_response("command///req/1abc/200").unwrap().is_err());
        assert!(parse_response("telemetry").is_none());
    }

    #[test]
    fn command_filters() {
        let f = parse_command_filter("command///req/#").unwrap();
        assert_eq!(
            (f.prefix.as_str(), f.device.as_str(), f.req.as_str()),
            ("command", "", "req")
        );
        assert_eq!(parse_command_filter("c//+/q/#").unwrap().device, "+");
        assert_eq!(
            parse_command_filter("command/t/d/req/#").unwrap().tenant,
            "t"
        );
        assert!(parse_command_filter("command///req/+").is_none());
        assert!(parse_command_filter("error///#").is_none());
    }
}
