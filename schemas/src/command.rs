//! Commands on `hono.command.<tenant>`: the validity rules of Hono's Kafka command API, and the
//! request id devices echo back (`hono-cmd-req-id`, MQTT `${req-id}`), from which a gateway
//! rebuilds the response's correlation id without any lookup.

use crate::headers as h;
use base64::Engine;

/// A command record, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub device_id: String,
    pub subject: String,
    pub content_type: Option<String>,
    /// `Some` for request/response commands.
    pub correlation_id: Option<String>,
}

impl Command {
    pub fn is_one_way(&self) -> bool {
        self.correlation_id.is_none()
    }
}

/// Why a command is invalid; `correlation_id` is set when the application waits for an answer
/// and so must get a 400 response instead of silence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid command: {reason}")]
pub struct InvalidCommand {
    pub reason: String,
    pub correlation_id: Option<String>,
}

/// Checks a record of a command topic: key = `device_id` header, a `subject`, and a
/// `correlation-id` when `response-required` is true. `headers` are in record order; the
/// first of a repeated header wins.
pub fn parse_command<'a, I>(key: Option<&[u8]>, headers: I) -> Result<Command, InvalidCommand>
where
    I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)> + Clone,
{
    let text = |name: &str| {
        h::first(headers.clone(), name)
            .and_then(h::decode_str)
            .map(str::to_owned)
    };
    let response_required = h::first(headers.clone(), h::RESPONSE_REQUIRED)
        .and_then(h::decode_bool)
        .unwrap_or(false);
    let correlation_id = text(h::CORRELATION_ID).filter(|c| !c.is_empty());
    let invalid = |reason: &str| InvalidCommand {
        reason: reason.to_owned(),
        correlation_id: if response_required {
            correlation_id.clone()
        } else {
            None
        },
    };
    let device_id = text(h::DEVICE_ID)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| invalid("the device_id header is missing"))?;
    if key.and_then(|k| std::str::from_utf8(k).ok()) != Some(device_id.as_str()) {
        return Err(invalid("the record key differs from device_id"));
    }
    let subject = text(h::SUBJECT)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("the subject header is missing"))?;
    if response_required && correlation_id.is_none() {
        return Err(invalid("a request/response command needs a correlation-id"));
    }
    Ok(Command {
        device_id,
        subject,
        content_type: text(h::CONTENT_TYPE),
        correlation_id: if response_required {
            correlation_id
        } else {
            None
        },
    })
}

/// The id a device gets for a request/response command and sends back with its response.
/// It carries the correlation id (base64url) and the moment the application stops waiting,
/// so any gateway instance can rebuild the response, or refuse a late one, without a lookup.
/// It is a single safe segment in URL paths and MQTT topics (no `/`, `+`, `#`, `?` or `%`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    pub correlation_id: String,
    /// Unix time in milliseconds after which a response is no longer accepted.
    pub deadline_millis: i64,
}

/// Format marker, so that a later format can coexist: `2<deadline ms>.<base64url(cid)>`.
const REQUEST_ID_V2: char = '2';

impl RequestId {
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(16 + self.correlation_id.len() * 4 / 3 + 4);
        s.push(REQUEST_ID_V2);
        s.push_str(&self.deadline_millis.to_string());
        s.push('.');
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode_string(self.correlation_id.as_bytes(), &mut s);
        s
    }

    /// Reads a request id a device sent back; `None` for anything Ferrule did not issue.
    pub fn decode(id: &str) -> Option<RequestId> {
        let rest = id.strip_prefix(REQUEST_ID_V2)?;
        let (deadline, cid) = rest.split_once('.')?;
        if deadline.is_empty() || !deadline.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cid)
            .ok()?;
        Some(RequestId {
            correlation_id: String::from_utf8(bytes).ok()?,
            deadline_millis: deadline.parse().ok()?,
        })
    }

    /// Whether the application has stopped waiting for this response at `now_millis`.
    pub fn expired_at(&self, now_millis: i64) -> bool {
        now_millis > self.deadline_millis
    }
}

/// The headers of a record on `hono.command_response.<tenant>`, made now. `content_type` is
/// the device's, or the delivery-failure type for responses Ferrule makes itself.
pub fn response_headers(
    tenant: &str,
    device: &str,
    correlation_id: &str,
    status: u16,
    content_type: Option<&str>,
) -> Vec<(&'static str, Vec<u8>)> {
    let mut hs = vec![
        (h::CORRELATION_ID, correlation_id.as_bytes().to_vec()),
        (h::CREATION_TIME, h::encode_i64(h::now_millis())),
        (h::DEVICE_ID, device.as_bytes().to_vec()),
        (h::TENANT_ID, tenant.as_bytes().to_vec()),
        (h::STATUS, h::encode_i64(i64::from(status))),
    ];
    if let Some(ct) = content_type {
        hs.push((h::CONTENT_TYPE, ct.as_bytes().to_vec()));
    }
    hs
}

/// The body of a response Ferrule makes when a command could not be delivered.
pub fn delivery_failure_body(reason: &str) -> Vec<u8> {
    serde_json::json!({ "error": reason })
        .to_string()
        .into_bytes()
}

/// Whether a status a device reports for a command is acceptable (200–299 and 400–599).
pub fn is_valid_response_status(status: u16) -> bool {
    (200..300).contains(&status) || (400..600).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs<'a>(pairs: &'a [(&'a str, &'a [u8])]) -> Vec<(&'a str, Option<&'a [u8]>)> {
        pairs.iter().map(|(k, v)| (*k, Some(*v))).collect()
    }

    #[test]
    fn one_way_and_request_response_commands() {
        let c = parse_command(
            Some(b"d1"),
            hs(&[("device_id", b"d1"), ("subject", b"setVolume")]),
        )
        .unwrap();
        assert!(c.is_one_way());
        assert_eq!(c.subject, "setVolume");
        let c = parse_command(
            Some(b"d1"),
            hs(&[
                ("device_id", b"d1"),
                ("subject", b"getState"),
                ("response-required", b"true"),
                ("correlation-id", b"c-1"),
                ("content-type", b"application/json"),
            ]),
        )
        .unwrap();
        assert_eq!(c.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(c.content_type.as_deref(), Some("application/json"));
        // A correlation id without response-required is a one-way command.
        let c = parse_command(
            Some(b"d1"),
            hs(&[
                ("device_id", b"d1"),
                ("subject", b"x"),
                ("correlation-id", b"c"),
            ]),
        )
        .unwrap();
        assert!(c.is_one_way());
    }

    #[test]
    fn invalid_commands_say_whom_to_answer() {
        // Missing subject, response wanted: answered with the correlation id (→ 400 response).
        let e = parse_command(
            Some(b"d1"),
            hs(&[
                ("device_id", b"d1"),
                ("response-required", b"true"),
                ("correlation-id", b"c-9"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.correlation_id.as_deref(), Some("c-9"));
        // Missing subject, one-way: dropped silently.
        let e = parse_command(Some(b"d1"), hs(&[("device_id", b"d1")])).unwrap_err();
        assert_eq!(e.correlation_id, None);
        // Response wanted but no correlation id.
        let e = parse_command(
            Some(b"d1"),
            hs(&[
                ("device_id", b"d1"),
                ("subject", b"s"),
                ("response-required", b"true"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.correlation_id, None);
        // Key and device_id disagree.
        assert!(
            parse_command(Some(b"d2"), hs(&[("device_id", b"d1"), ("subject", b"s")])).is_err()
        );
        assert!(parse_command(None, hs(&[("device_id", b"d1"), ("subject", b"s")])).is_err());
    }

    #[test]
    fn request_ids_round_trip_and_are_one_safe_segment() {
        for c in ["c-1", "a/b+c#d?e%f g", "ünï", ""] {
            let id = RequestId {
                correlation_id: c.to_owned(),
                deadline_millis: 1_764_000_000_123,
            };
            let text = id.encode();
            assert!(!text.contains(['/', '+', '#', '?', '%', ' ']), "{text}");
            assert_eq!(RequestId::decode(&text).unwrap(), id);
        }
        assert!(RequestId::decode("2abc").is_none());
        assert!(RequestId::decode("2.YQ").is_none());
        assert!(RequestId::decode("2x1.YQ").is_none());
        assert!(RequestId::decode("212.!!").is_none());
        assert!(RequestId::decode("1YQ").is_none());
        let id = RequestId::decode("2100.YQ").unwrap();
        assert_eq!(id.correlation_id, "a");
        assert!(!id.expired_at(100));
        assert!(id.expired_at(101));
    }

    #[test]
    fn response_headers_carry_the_correlation() {
        let hs = response_headers("t", "d", "c-1", 503, Some("x/y"));
        let get = |k: &str| hs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("correlation-id").unwrap(), b"c-1");
        assert_eq!(get("status").unwrap(), b"503");
        assert_eq!(get("tenant_id").unwrap(), b"t");
        assert_eq!(get("device_id").unwrap(), b"d");
        assert_eq!(get("content-type").unwrap(), b"x/y");
        assert!(get("creation-time").is_some());
        assert!(
            response_headers("t", "d", "c", 200, None)
                .iter()
                .all(|(k, _)| *k != "content-type")
        );
        assert_eq!(delivery_failure_body("gone"), br#"{"error":"gone"}"#);
    }

    #[test]
    fn response_statuses() {
        for ok in [200, 204, 299, 400, 404, 503, 599] {
            assert!(is_valid_response_status(ok), "{ok}");
        }
        for bad in [100, 199, 300, 302, 399, 600, 999] {
            assert!(!is_valid_response_status(bad), "{bad}");
        }
    }
}
