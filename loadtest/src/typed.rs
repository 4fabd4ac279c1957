//! The payload and schema of the typed-telemetry benchmark (docs/analytics.md): a sensor
//! reading of the size devices commonly send, and its Avro schema with a union and a default
//! so the gateway's mapping does the work real schemas ask of it.

/// What each device sends, as JSON (117 bytes).
pub const READING: &str = r#"{"seq": 123456, "temp": 21.5, "humidity": 48.25, "pressure": 1013.2, "battery": 87, "status": "ok", "label": "north"}"#;

/// The schema of [`READING`]: every field of its JSON, `label` optional.
pub const SCHEMA: &str = r#"{"type": "record", "name": "Reading", "namespace": "org.example.load",
 "fields": [
  {"name": "seq", "type": "long"},
  {"name": "temp", "type": "double"},
  {"name": "humidity", "type": "double"},
  {"name": "pressure", "type": "float"},
  {"name": "battery", "type": "int"},
  {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["ok", "low", "fault"]}},
  {"name": "label", "type": ["null", "string"], "default": null}]}"#;
