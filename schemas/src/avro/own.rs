//! The JSON bodies Ferrule itself writes whose shape consumers rely on, described as Avro
//! schemas in `schemas/avro/*.avsc` (JSON keys that are not legal Avro names, such as
//! `remote-id`, are named by a field's `json-name` attribute). Tests hold the bodies the
//! code writes to these files with [`check`].

use super::{Mismatch, PayloadSchema};

/// The connection event of the MQTT adapter (`connected` / `disconnected`).
pub const CONNECTION_EVENT: &str = include_str!("../../avro/connection-event.avsc");
/// The command response written when a command could not be delivered.
pub const DELIVERY_FAILURE: &str = include_str!("../../avro/delivery-failure.avsc");
/// The message on a device's MQTT error topic.
pub const MQTT_ERROR: &str = include_str!("../../avro/mqtt-error.avsc");

/// Checks that `json` is exactly a value of `avsc`: it encodes (every field there, of its
/// type, none unknown) and decodes back to the same JSON.
pub fn check(avsc: &str, json: &[u8]) -> Result<(), Mismatch> {
    let schema = PayloadSchema::parse(0, avsc).map_err(|e| Mismatch {
        path: "$".into(),
        problem: format!("the schema does not parse: {e}"),
    })?;
    let mut wire = Vec::new();
    schema.encode_json(json, &mut wire)?;
    let back = schema.decode(&wire[super::WIRE_HEADER_LEN..])?;
    let sent: serde_json::Value = serde_json::from_slice(json).map_err(|e| Mismatch {
        path: "$".into(),
        problem: e.to_string(),
    })?;
    if back != sent {
        return Err(Mismatch {
            path: "$".into(),
            problem: format!("{sent} reads back as {back}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_failure_body_fits_its_schema() {
        check(
            DELIVERY_FAILURE,
            &crate::command::delivery_failure_body("gone"),
        )
        .unwrap();
        assert!(check(DELIVERY_FAILURE, br#"{"error": "x", "extra": 1}"#).is_err());
    }

    #[test]
    fn hyphenated_keys_map_through_json_name() {
        check(
            CONNECTION_EVENT,
            br#"{"cause": "connected", "remote-id": "c1", "source": "hono-mqtt"}"#,
        )
        .unwrap();
        let e = check(
            CONNECTION_EVENT,
            br#"{"cause": "connected", "remote_id": "c1", "source": "s"}"#,
        )
        .unwrap_err();
        assert!(e.problem.contains("`remote_id` is not a field"), "{e}");
        let e = check(
            CONNECTION_EVENT,
            br#"{"cause": "left", "remote-id": "c1", "source": "s"}"#,
        )
        .unwrap_err();
        assert!(e.problem.contains("not a symbol"), "{e}");
        check(
            MQTT_ERROR,
            br#"{"code": 400, "message": "m", "timestamp": "2026-12-01T00:00:00.000Z", "correlation-id": "-1"}"#,
        )
        .unwrap();
    }
}
