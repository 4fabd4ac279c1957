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
    let (path, bag) = match topic.find("/?") {
        Some(i) => (&topic[..i], Some(&topic[i + 2..])),
        None => (topic, None),
    };
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
    let properties = bag
        .map(|b| {
            b.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (decode(k), decode(v))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(PublishAddress {
        endpoint,
        target,
        properties,
    })
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
