//! What an application receives of a record the gateway encoded with its topic's Avro schema
//! (docs/analytics.md): by default what the device sent — the record decoded back to JSON and
//! the device's content type — or, when its link asks for it, the record as stored.
//!
//! An application asks on its receiving link: the attach's `properties` map carries the
//! symbol `ferrule-payload-format` with the string or symbol `avro` (the record as stored:
//! the Confluent wire format, content type `avro/binary`) or `as-sent` (the default).

use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use ferrule_registry::DeviceAuthenticator;
use ferrule_schemas::avro;
use ferrule_schemas::headers as h;

/// The link property that chooses the form.
pub const LINK_PROPERTY: &str = "ferrule-payload-format";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadFormat {
    /// What the device sent: converted records decoded back to JSON.
    #[default]
    AsSent,
    /// Records as stored in Kafka.
    Avro,
}

impl PayloadFormat {
    /// The form a link asked for; `Err` names a value the bridge does not know.
    pub fn of(attach: &Attach) -> Result<Self, String> {
        let Some(value) = attach
            .properties
            .as_ref()
            .and_then(|p| p.get(&Symbol::from(LINK_PROPERTY)))
        else {
            return Ok(PayloadFormat::default());
        };
        let text = match value {
            Value::String(s) => s.as_str(),
            Value::Symbol(s) => s.as_str(),
            _ => "",
        };
        match text {
            "as-sent" => Ok(PayloadFormat::AsSent),
            "avro" => Ok(PayloadFormat::Avro),
            _ => Err(format!(
                "link property `{LINK_PROPERTY}` must be \"as-sent\" or \"avro\""
            )),
        }
    }
}

/// A converted record as the device sent it: its JSON and the device's content type. `None`
/// when the record is not one the gateway converted; `Err` when it cannot be decoded (its
/// schema is gone or does not fit), and the record is then delivered as stored.
pub async fn as_sent<'a>(
    registry: &DeviceAuthenticator,
    tenant: &str,
    headers: &[(&'a str, Option<&'a [u8]>)],
    payload: &[u8],
) -> Result<Option<(Vec<u8>, &'a [u8])>, String> {
    let Some(source_ct) = headers
        .iter()
        .find(|(k, _)| *k == h::SOURCE_CONTENT_TYPE)
        .and_then(|(_, v)| *v)
    else {
        return Ok(None);
    };
    let (id, datum) = avro::split_wire(payload).ok_or("not in the Avro wire format")?;
    let schema = registry
        .schema_by_id(tenant, id)
        .await
        .map_err(|e| e.to_string())?;
    let schema = schema
        .as_ref()
        .as_ref()
        .ok_or_else(|| format!("schema {id} is not one of the tenant's"))?;
    let json = schema.decode(datum).map_err(|e| e.to_string())?;
    Ok(Some((json.to_string().into_bytes(), source_ct)))
}

/// `headers` as the application sees a record decoded back: the device's content type, and
/// no trace of the conversion.
pub fn restore_headers<'a>(headers: &mut Vec<(&'a str, Option<&'a [u8]>)>, source_ct: &'a [u8]) {
    headers.retain(|(k, _)| *k != h::SOURCE_CONTENT_TYPE);
    for (k, v) in headers.iter_mut() {
        if *k == h::CONTENT_TYPE {
            *v = Some(source_ct);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_headers_carry_the_devices_content_type_only() {
        let mut hs: Vec<(&str, Option<&[u8]>)> = vec![
            (h::CONTENT_TYPE, Some(b"avro/binary")),
            (h::DEVICE_ID, Some(b"d1")),
            (h::SOURCE_CONTENT_TYPE, Some(b"application/json")),
        ];
        restore_headers(&mut hs, b"application/json");
        assert_eq!(
            hs,
            vec![
                (h::CONTENT_TYPE, Some(&b"application/json"[..])),
                (h::DEVICE_ID, Some(&b"d1"[..])),
            ]
        );
    }
}
