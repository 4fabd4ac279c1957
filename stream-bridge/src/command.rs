//! Commands over AMQP (Hono's AMQP APIs) as Kafka commands and back: the checks of an application's
//! command message, the correlation id that carries the reply address through Kafka, and the
//! response message. Pure functions, tested without a connection.

use base64::Engine;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};

/// A command an application sent, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpCommand {
    pub device_id: String,
    pub subject: String,
    pub content_type: Option<String>,
    /// For request/response commands: where the response goes and how it is correlated.
    pub reply: Option<(String, MessageId)>,
    pub payload: Vec<u8>,
    /// The application's W3C trace context (application properties `traceparent`,
    /// `tracestate`), handed on in the Kafka record for the router to continue.
    pub trace: Option<ferrule_telemetry::TraceContext>,
}

/// Checks a message sent on `command/<tenant>`: `to` = `command/<tenant>/<device>`, a
/// `subject`, and for request/response a `reply-to` = `command_response/<tenant>/<replyId>`
/// plus a `correlation-id` or `message-id`. The error text goes into the rejection.
pub fn parse_command(tenant: &str, msg: &Message<Body<Value>>) -> Result<AmqpCommand, String> {
    let props = msg
        .properties
        .as_ref()
        .ok_or("the command has no properties")?;
    let to = props.to.as_deref().ok_or("`to` is required")?;
    let device = to
        .strip_prefix(&format!("command/{tenant}/"))
        .filter(|d| !d.is_empty() && !d.contains('/'))
        .ok_or_else(|| format!("`to` must be command/{tenant}/<device-id>"))?;
    let subject = props
        .subject
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or("`subject` is required")?;
    let reply = match props.reply_to.as_deref() {
        None => None,
        Some(r) => {
            let reply_id = r
                .strip_prefix(&format!("command_response/{tenant}/"))
                .filter(|id| !id.is_empty())
                .ok_or_else(|| {
                    format!("`reply-to` must be command_response/{tenant}/<reply-id>")
                })?;
            let correlation = props
                .correlation_id
                .clone()
                .or_else(|| props.message_id.clone())
                .ok_or("a request/response command needs a correlation-id or message-id")?;
            Some((reply_id.to_owned(), correlation))
        }
    };
    let payload = match &msg.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Empty => Vec::new(),
        _ => return Err("the body must be Data sections".into()),
    };
    let property = |name: &str| match msg.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(s) => Some(s.as_str()),
        _ => None,
    };
    Ok(AmqpCommand {
        device_id: device.to_owned(),
        subject,
        content_type: props.content_type.as_ref().map(|c| c.as_str().to_owned()),
        reply,
        payload,
        trace: ferrule_telemetry::TraceContext::of(property("traceparent"), property("tracestate")),
    })
}

/// `message` with the trace context a response record carried, as application properties
/// (`traceparent`, `tracestate`), where the application continues its trace.
pub fn with_trace(
    mut message: Message<Data>,
    trace: Option<&ferrule_telemetry::TraceContext>,
) -> Message<Data> {
    if let (Some(t), Some(app)) = (trace, message.application_properties.as_mut()) {
        app.0.insert(
            "traceparent".into(),
            SimpleValue::String(t.traceparent.clone()),
        );
        if let Some(state) = &t.tracestate {
            app.0
                .insert("tracestate".into(), SimpleValue::String(state.clone()));
        }
    }
    message
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

/// The `correlation-id` of the Kafka command: the reply id and the application's id with its
/// AMQP type, so the response finds its link and carries the same id back, with no table.
pub fn kafka_correlation(reply_id: &str, id: &MessageId) -> String {
    let (tag, bytes) = match id {
        MessageId::String(s) => ('s', s.as_bytes().to_vec()),
        MessageId::Ulong(n) => ('u', n.to_string().into_bytes()),
        MessageId::Uuid(u) => ('x', u.as_inner().to_vec()),
        MessageId::Binary(b) => ('b', b.to_vec()),
    };
    format!("amqp.{}.{tag}{}", b64(reply_id.as_bytes()), b64(&bytes))
}

/// The reply id and application correlation id of a response, if the bridge made the command.
pub fn parse_kafka_correlation(s: &str) -> Option<(String, MessageId)> {
    let rest = s.strip_prefix("amqp.")?;
    let (reply, id) = rest.split_once('.')?;
    let reply = String::from_utf8(unb64(reply)?).ok()?;
    let mut chars = id.chars();
    let tag = chars.next()?;
    let bytes = unb64(chars.as_str())?;
    let id = match tag {
        's' => MessageId::String(String::from_utf8(bytes).ok()?),
        'u' => MessageId::Ulong(String::from_utf8(bytes).ok()?.parse().ok()?),
        'x' => MessageId::Uuid(<[u8; 16]>::try_from(bytes).ok()?.into()),
        'b' => MessageId::Binary(Binary::from(bytes)),
        _ => return None,
    };
    Some((reply, id))
}

/// The response as the application receives it on `command_response/<tenant>/<replyId>`.
pub fn response_message(
    tenant: &str,
    device: &str,
    status: i32,
    correlation: MessageId,
    content_type: Option<&str>,
    creation_millis: i64,
    payload: &[u8],
) -> Message<Data> {
    let properties = Properties {
        correlation_id: Some(correlation),
        creation_time: Some(Timestamp::from_milliseconds(creation_millis)),
        content_type: content_type.map(Symbol::from),
        ..Default::default()
    };
    let app = ApplicationProperties::builder()
        .insert("device_id", SimpleValue::String(device.to_owned()))
        .insert("tenant_id", SimpleValue::String(tenant.to_owned()))
        .insert("status", SimpleValue::Int(status))
        .build();
    Message::builder()
        .properties(properties)
        .application_properties(app)
        .data(Binary::from(payload.to_vec()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(props: Properties, body: Body<Value>) -> Message<Body<Value>> {
        Message::builder().properties(props).body(body).build()
    }

    fn data(b: &[u8]) -> Body<Value> {
        Body::Data(vec![Data(Binary::from(b.to_vec()))].into())
    }

    #[test]
    fn commands_are_checked_as_section_2_4_says() {
        let ok = Properties {
            to: Some("command/t1/dev".into()),
            subject: Some("setVolume".into()),
            reply_to: Some("command_response/t1/app-1".into()),
            message_id: Some(MessageId::Ulong(7)),
            content_type: Some(Symbol::from("text/plain")),
            ..Default::default()
        };
        let c = parse_command("t1", &command(ok.clone(), data(b"5"))).unwrap();
        assert_eq!(c.device_id, "dev");
        assert_eq!(c.subject, "setVolume");
        assert_eq!(c.content_type.as_deref(), Some("text/plain"));
        assert_eq!(c.reply, Some(("app-1".into(), MessageId::Ulong(7))));
        assert_eq!(c.payload, b"5");
        let one_way = Properties {
            reply_to: None,
            message_id: None,
            ..ok.clone()
        };
        assert_eq!(
            parse_command("t1", &command(one_way, data(b"")))
                .unwrap()
                .reply,
            None
        );
        for bad in [
            Properties {
                to: Some("command/t2/dev".into()),
                ..ok.clone()
            },
            Properties {
                to: None,
                ..ok.clone()
            },
            Properties {
                subject: None,
                ..ok.clone()
            },
            Properties {
                reply_to: Some("command_response/t2/x".into()),
                ..ok.clone()
            },
            Properties {
                message_id: None,
                correlation_id: None,
                ..ok.clone()
            },
        ] {
            assert!(
                parse_command("t1", &command(bad.clone(), data(b""))).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn correlation_ids_keep_their_type_through_kafka() {
        for id in [
            MessageId::String("c/1 ü".into()),
            MessageId::Ulong(42),
            MessageId::Uuid([7u8; 16].into()),
            MessageId::Binary(Binary::from(vec![0, 1, 255])),
        ] {
            let s = kafka_correlation("app/1", &id);
            assert_eq!(parse_kafka_correlation(&s), Some(("app/1".into(), id)));
        }
        assert_eq!(parse_kafka_correlation("c-1"), None);
        assert_eq!(parse_kafka_correlation("amqp.YQ.zYQ"), None);
    }
}
