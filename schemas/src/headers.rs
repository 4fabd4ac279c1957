//! Kafka record header names of Hono's Kafka APIs and their value encoding: strings travel as
//! their UTF-8 bytes, every other type as its JSON text; when a header repeats, the first wins.

pub const CONTENT_TYPE: &str = "content-type";
pub const CONTENT_ENCODING: &str = "content-encoding";
pub const CREATION_TIME: &str = "creation-time";
pub const DEVICE_ID: &str = "device_id";
pub const TENANT_ID: &str = "tenant_id";
pub const QOS: &str = "qos";
pub const TTD: &str = "ttd";
pub const TTL: &str = "ttl";
pub const ORIG_ADAPTER: &str = "orig_adapter";
pub const ORIG_ADDRESS: &str = "orig_address";
pub const RETAIN: &str = "x-opt-retain";
pub const SUBJECT: &str = "subject";
pub const CORRELATION_ID: &str = "correlation-id";
pub const RESPONSE_REQUIRED: &str = "response-required";
pub const STATUS: &str = "status";
pub const VIA: &str = "via";
pub const ORIG_PARTITION: &str = "orig-partition";
pub const ORIG_OFFSET: &str = "orig-offset";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// On a record the gateway encoded with its topic's Avro schema: the content type of the JSON
/// the device sent (docs/analytics.md). The AMQP bridge decodes such records back to it.
pub const SOURCE_CONTENT_TYPE: &str = "ferrule-source-content-type";
/// Headers with this prefix are copied from a command into a Hono-generated error response.
pub const DELIVERY_FAILURE_METADATA_PREFIX: &str = "delivery-failure-notification-metadata";

/// Keys of tenant/device `defaults` that feed the ttl rule and are never emitted as headers.
pub const TTL_DEFAULT_KEYS: [&str; 3] = [
    "ttl-telemetry-qos0",
    "ttl-telemetry-qos1",
    "ttl-command-response",
];

/// Encodes a header value the way Hono writes it: strings raw, everything else as JSON text.
pub fn encode(value: &serde_json::Value) -> Vec<u8> {
    match value {
        serde_json::Value::String(s) => s.as_bytes().to_vec(),
        other => other.to_string().into_bytes(),
    }
}

/// Encodes an integer header (`qos`, `ttd`, `ttl`, `creation-time`, `status`).
pub fn encode_i64(value: i64) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// Encodes a boolean header (`response-required`, `x-opt-retain`).
pub fn encode_bool(value: bool) -> &'static [u8] {
    if value { b"true" } else { b"false" }
}

/// `creation-time` for a record made now: milliseconds since the epoch.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The first value of `name` among `headers`; later duplicates are ignored as Hono does.
pub fn first<'a, I>(headers: I, name: &str) -> Option<&'a [u8]>
where
    I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
{
    headers
        .into_iter()
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v)
}

/// A header read as a string; invalid UTF-8 counts as absent.
pub fn decode_str(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok()
}

/// A header read as an integer (JSON number); anything else counts as absent.
pub fn decode_i64(value: &[u8]) -> Option<i64> {
    match serde_json::from_slice::<serde_json::Value>(value).ok()? {
        serde_json::Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// A header read as a boolean (JSON `true`/`false`); anything else counts as absent.
pub fn decode_bool(value: &[u8]) -> Option<bool> {
    match value {
        b"true" => Some(true),
        b"false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_are_raw_and_other_types_json() {
        assert_eq!(encode(&json!("text/plain")), b"text/plain");
        assert_eq!(encode(&json!(1)), b"1");
        assert_eq!(encode(&json!(true)), b"true");
        assert_eq!(encode(&json!(1700000000000_i64)), b"1700000000000");
        assert_eq!(encode(&json!({"a": 1})), br#"{"a":1}"#);
        assert_eq!(encode_i64(-1), b"-1");
        assert_eq!(encode_bool(false), b"false");
    }

    #[test]
    fn decodes_or_treats_as_absent() {
        assert_eq!(decode_i64(b"60"), Some(60));
        assert_eq!(decode_i64(b"-1"), Some(-1));
        assert_eq!(decode_i64(b"\"60\""), None);
        assert_eq!(decode_i64(b"6x"), None);
        assert_eq!(decode_bool(b"true"), Some(true));
        assert_eq!(decode_bool(b"1"), None);
        assert_eq!(decode_str(b"dev-1"), Some("dev-1"));
        assert_eq!(decode_str(&[0xff, 0xfe]), None);
    }

    #[test]
    fn first_header_wins() {
        let headers: Vec<(&str, Option<&[u8]>)> = vec![
            ("qos", Some(b"1")),
            ("device_id", Some(b"d1")),
            ("qos", Some(b"0")),
            ("empty", None),
        ];
        assert_eq!(first(headers.clone(), QOS), Some(&b"1"[..]));
        assert_eq!(first(headers.clone(), DEVICE_ID), Some(&b"d1"[..]));
        assert_eq!(first(headers.clone(), "empty"), None);
        assert_eq!(first(headers, TTL), None);
    }
}
