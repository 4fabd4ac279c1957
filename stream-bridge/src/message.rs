//! A telemetry or event record of `hono.<kind>.<tenant>` as the AMQP message Hono's
//! applications expect (Hono's AMQP APIs): properties, header, application-properties,
//! message-annotations and one Data section. Pure: tested with plain header lists.

use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Header, Message, MessageAnnotations, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use ferrule_schemas::headers as h;

/// Record headers that become AMQP properties, header fields or annotations, not
/// application-properties. The trace context (`traceparent`, `tracestate`) stays an
/// application property, where an application continues the trace.
const MAPPED: [&str; 6] = [
    h::CONTENT_TYPE,
    h::CONTENT_ENCODING,
    h::CREATION_TIME,
    h::TTL,
    h::TENANT_ID,
    h::RETAIN,
];

/// Application properties carried as integers.
const NUMERIC: [&str; 2] = [h::QOS, h::TTD];

/// Builds the message for one record of `kind` (`telemetry` or `event`) of `tenant`. One pass
/// over the headers; the first of repeated headers counts.
pub fn downstream<'a>(
    kind: &str,
    tenant: &str,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    payload: &[u8],
) -> Message<Data> {
    // Per mapped header: its first occurrence's value, once seen.
    let mut mapped: [Option<Option<&[u8]>>; MAPPED.len()] = [None; MAPPED.len()];
    let mut device: Option<&str> = None;
    let mut app_keys: Vec<&str> = Vec::with_capacity(8);
    let mut app = ApplicationProperties::builder();
    for (k, v) in headers {
        if let Some(i) = MAPPED.iter().position(|m| *m == k) {
            mapped[i].get_or_insert(v);
            continue;
        }
        if app_keys.contains(&k) {
            continue;
        }
        app_keys.push(k);
        let Some(v) = v.and_then(h::decode_str) else {
            continue;
        };
        if k == h::DEVICE_ID && device.is_none() {
            device = Some(v);
        }
        let value = match (NUMERIC.contains(&k), v.parse::<i32>()) {
            (true, Ok(n)) => SimpleValue::Int(n),
            _ => SimpleValue::String(v.to_owned()),
        };
        app = app.insert(k, value);
    }
    let at = |name: &str| {
        MAPPED
            .iter()
            .position(|m| *m == name)
            .and_then(|i| mapped[i].flatten())
    };
    let text = |name: &str| at(name).and_then(h::decode_str);
    let num = |name: &str| at(name).and_then(h::decode_i64);
    let device = device.unwrap_or_default();
    let properties = Properties {
        to: Some(format!("{kind}/{tenant}")),
        content_type: text(h::CONTENT_TYPE).map(Symbol::from),
        content_encoding: text(h::CONTENT_ENCODING).map(Symbol::from),
        creation_time: num(h::CREATION_TIME).map(Timestamp::from_milliseconds),
        ..Default::default()
    };
    let header = Header {
        durable: kind == "event",
        ttl: num(h::TTL).and_then(|t| u32::try_from(t).ok()),
        ..Default::default()
    };
    let mut annotations = MessageAnnotations::builder()
        .insert(h::TENANT_ID, Value::String(tenant.to_owned()))
        .insert(h::DEVICE_ID, Value::String(device.to_owned()))
        .insert(
            "resource",
            Value::String(format!("{kind}/{tenant}/{device}")),
        );
    if at(h::RETAIN).and_then(h::decode_bool) == Some(true) {
        annotations = annotations.insert(h::RETAIN, Value::Bool(true));
    }
    Message::builder()
        .header(header)
        .properties(properties)
        .application_properties(app.build())
        .message_annotations(annotations.build())
        .data(Binary::from(payload.to_vec()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_telemetry_record_becomes_honos_message_layout() {
        let hs: Vec<(&str, Option<&[u8]>)> = vec![
            ("content-type", Some(b"text/plain")),
            ("creation-time", Some(b"1764000000123")),
            ("device_id", Some(b"dev-1")),
            ("qos", Some(b"1")),
            ("ttd", Some(b"30")),
            ("ttl", Some(b"60000")),
            ("orig_adapter", Some(b"hono-http")),
            ("orig_address", Some(b"/telemetry")),
            ("x-opt-retain", Some(b"true")),
            ("custom", Some(b"from-defaults")),
        ];
        let m = downstream("telemetry", "t1", hs.iter().copied(), b"21.5");
        let p = m.properties.as_ref().unwrap();
        assert_eq!(p.to.as_deref(), Some("telemetry/t1"));
        assert_eq!(
            p.content_type.as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(
            p.creation_time.as_ref().map(|t| t.milliseconds()),
            Some(1_764_000_000_123)
        );
        let header = m.header.as_ref().unwrap();
        assert_eq!(header.ttl, Some(60_000));
        assert!(!header.durable);
        let app = &m.application_properties.as_ref().unwrap().0;
        assert_eq!(
            app.get("device_id"),
            Some(&SimpleValue::String("dev-1".into()))
        );
        assert_eq!(app.get("qos"), Some(&SimpleValue::Int(1)));
        assert_eq!(app.get("ttd"), Some(&SimpleValue::Int(30)));
        assert_eq!(
            app.get("orig_adapter"),
            Some(&SimpleValue::String("hono-http".into()))
        );
        assert_eq!(
            app.get("custom"),
            Some(&SimpleValue::String("from-defaults".into()))
        );
        assert!(app.get("content-type").is_none() && app.get("ttl").is_none());
        let ann = &m.message_annotations.as_ref().unwrap().0;
        let get = |k: &str| {
            ann.iter()
                .find(|(key, _)| format!("{key:?}").contains(k))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("tenant_id"), Some(Value::String("t1".into())));
        assert_eq!(
            get("resource"),
            Some(Value::String("telemetry/t1/dev-1".into()))
        );
        assert_eq!(get("x-opt-retain"), Some(Value::Bool(true)));
        assert_eq!(&m.body.0[..], b"21.5");
        let e = downstream("event", "t1", hs.iter().copied(), b"");
        assert!(e.header.unwrap().durable);
    }

    #[test]
    fn the_trace_context_is_an_application_property_and_the_first_wins() {
        let record = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let bridge = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01";
        let hs: Vec<(&str, Option<&[u8]>)> = vec![
            ("traceparent", Some(bridge.as_bytes())),
            ("device_id", Some(b"dev-1")),
            ("traceparent", Some(record.as_bytes())),
            ("tracestate", Some(b"vendor=x")),
        ];
        let m = downstream("telemetry", "t1", hs.iter().copied(), b"");
        let app = &m.application_properties.as_ref().unwrap().0;
        assert_eq!(
            app.get("traceparent"),
            Some(&SimpleValue::String(bridge.into()))
        );
        assert_eq!(
            app.get("tracestate"),
            Some(&SimpleValue::String("vendor=x".into()))
        );
    }
}
