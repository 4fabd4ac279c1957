//! MQTT 3.1.1 and 5 on the wire, on top of `rumqttc`'s packet codecs: pure functions from
//! bytes to the few packets a gateway handles and back, so that the connection loop never
//! sees a protocol version.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5;

/// The protocol version a client chose in its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// A packet from a device, as the gateway needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Connect(ConnectRequest),
    Publish(PublishRequest),
    PubAck(u16),
    /// Topic filters with their requested QoS.
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// QoS 2 flows and AUTH: not supported by Hono's adapter either.
    Unsupported(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub version: Version,
    pub client_id: String,
    pub keep_alive_secs: u16,
    pub username: Option<String>,
    /// Binary data in both versions (3.1.1 §3.1.3.5, 5.0 §3.1.3.6), not a UTF-8 string.
    pub password: Option<Vec<u8>>,
    /// MQTT 5's Maximum Packet Size: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5's Receive Maximum: QoS 1 publishes the client takes before it acknowledged them.
    pub receive_maximum: Option<u16>,
    /// MQTT 3.1.1's Clean Session (MQTT 5's Clean Start).
    pub clean_session: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub pkid: u16,
    pub payload: Bytes,
    /// MQTT 5's content-type property.
    pub content_type: Option<String>,
    /// MQTT 5's user properties `traceparent` and `tracestate` (W3C trace context).
    pub trace: Option<ferrule_telemetry::TraceContext>,
}

/// Why a CONNECT was refused, or that it was not; encoded per version as Hono's table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    Accepted,
    BadCredentials,
    NotAuthorized,
    ServerUnavailable,
    UseAnotherServer,
    /// MQTT 3.1.1: an empty client id without a clean session [MQTT-3.1.3-8].
    IdentifierRejected,
}

/// What the server announces in an MQTT 5 CONNACK that accepts a connection (MQTT 5 §3.2.2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// The client id the server chose for a client that sent an empty one [MQTT-3.2.2-16].
    pub assigned_client_id: Option<String>,
    /// Receive Maximum: QoS 1 publishes the server takes before it stops reading.
    pub receive_maximum: u16,
    /// Maximum Packet Size the server accepts.
    pub maximum_packet_size: u32,
    /// Only what the client must be told (Assigned Client Identifier, Maximum QoS), for a
    /// client whose Maximum Packet Size leaves no room for the rest.
    pub essential_only: bool,
}

/// Why a subscription was refused. MQTT 3.1.1 has one failure code (0x80) for every reason;
/// MQTT 5 clients get the reason code (MQTT 5 §3.9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubAckFailure {
    /// 0x80: the server cannot say more (e.g. the registry is unavailable).
    Unspecified,
    /// 0x83: a refusal the SUBACK has no other code for.
    ImplementationSpecific,
    /// 0x87: the client may not subscribe to this.
    NotAuthorized,
    /// 0x8F: the filter names nothing the adapter offers, or is malformed.
    TopicFilterInvalid,
}

/// Why the server ends a connection. MQTT 5 clients are told in a DISCONNECT first
/// (MQTT 5 §3.14.2.1); MQTT 3.1.1 has no server DISCONNECT, the connection is just closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Unspecified,
    MalformedPacket,
    ProtocolError,
    ImplementationSpecific,
    NotAuthorized,
    ServerBusy,
    ServerShuttingDown,
    KeepAliveTimeout,
    TopicAliasInvalid,
    PacketTooLarge,
    PayloadFormatInvalid,
    QosNotSupported,
    SharedSubscriptionsNotSupported,
    SubscriptionIdentifiersNotSupported,
}

impl CloseReason {
    /// The MQTT 5 reason code.
    pub const fn code(self) -> u8 {
        match self {
            CloseReason::Unspecified => 0x80,
            CloseReason::MalformedPacket => 0x81,
            CloseReason::ProtocolError => 0x82,
            CloseReason::ImplementationSpecific => 0x83,
            CloseReason::NotAuthorized => 0x87,
            CloseReason::ServerBusy => 0x89,
            CloseReason::ServerShuttingDown => 0x8B,
            CloseReason::KeepAliveTimeout => 0x8D,
            CloseReason::TopicAliasInvalid => 0x94,
            CloseReason::PacketTooLarge => 0x95,
            CloseReason::PayloadFormatInvalid => 0x99,
            CloseReason::QosNotSupported => 0x9B,
            CloseReason::SharedSubscriptionsNotSupported => 0x9E,
            CloseReason::SubscriptionIdentifiersNotSupported => 0xA1,
        }
    }
}

/// A packet to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// `announce` is sent (MQTT 5 only) with an accepting CONNACK.
    ConnAck {
        outcome: ConnectOutcome,
        announce: Option<Box<Announce>>,
    },
    PubAck(u16),
    /// Per filter the granted QoS, or why it was refused.
    SubAck {
        pkid: u16,
        granted: Vec<Result<u8, SubAckFailure>>,
    },
    /// A message to the device: error messages at QoS 0, commands at the granted QoS
    /// (`pkid` is used for QoS 1 only). MQTT 5 devices get the content type as the Content
    /// Type property.
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos1: bool,
        pkid: u16,
        content_type: Option<String>,
    },
    /// Per filter whether it ended a subscription (MQTT 5: 0x00, else 0x11).
    UnsubAck {
        pkid: u16,
        ended: Vec<bool>,
    },
    PingResp,
    /// MQTT 5 only: encodes to nothing for 3.1.1.
    Disconnect(CloseReason),
}

impl Outbound {
    /// A CONNACK without properties: refusals, and acceptances of 3.1.1 clients.
    pub fn connack(outcome: ConnectOutcome) -> Self {
        Outbound::ConnAck {
            outcome,
            announce: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("packet larger than {0} bytes")]
    TooLarge(usize),
    /// Not a well-formed packet: bad lengths, ill-formed UTF-8, U+0000 in a string.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A well-formed packet the protocol forbids here: a wildcard in a topic name, an empty
    /// SUBSCRIBE, a filter with a misplaced wildcard.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("QoS 2 is not supported")]
    QosNotSupported,
    /// The server announces Topic Alias Maximum 0: any Topic Alias is invalid.
    #[error("topic aliases are not supported")]
    TopicAlias,
    #[error("the first packet must be CONNECT")]
    NotConnect,
    /// The server announces Shared Subscription Available 0.
    #[error("shared subscriptions are not supported")]
    SharedSubscriptions,
    /// The server announces Subscription Identifiers Available 0.
    #[error("subscription identifiers are not supported")]
    SubscriptionIdentifiers,
}

/// The MQTT 5 CONNACK reason for a CONNECT the codec refused (MQTT 5 §3.2.2.2 lists which
/// codes a CONNACK may carry).
pub fn connack_reason_for(e: &CodecError) -> u8 {
    match e.close_reason() {
        reason @ (CloseReason::MalformedPacket
        | CloseReason::ProtocolError
        | CloseReason::PacketTooLarge
        | CloseReason::QosNotSupported) => reason.code(),
        _ => CloseReason::Unspecified.code(),
    }
}

impl CodecError {
    /// What an MQTT 5 client is told before the connection closes.
    pub fn close_reason(&self) -> CloseReason {
        match self {
            CodecError::TooLarge(_) => CloseReason::PacketTooLarge,
            CodecError::Malformed(_) => CloseReason::MalformedPacket,
            CodecError::Protocol(_) | CodecError::NotConnect => CloseReason::ProtocolError,
            CodecError::QosNotSupported => CloseReason::QosNotSupported,
            CodecError::TopicAlias => CloseReason::TopicAliasInvalid,
            CodecError::SharedSubscriptions => CloseReason::SharedSubscriptionsNotSupported,
            CodecError::SubscriptionIdentifiers => CloseReason::SubscriptionIdentifiersNotSupported,
        }
    }
}

/// The specifications' rule for every UTF-8 encoded string of a packet (3.1.1 §1.5.3,
/// 5.0 §1.5.4): well-formed UTF-8 (the decoder turns bytes into `str` only if they are) and
/// no U+0000 [MQTT-1.5.3-2], [MQTT-1.5.4-2]; either breach makes the packet malformed.
/// Code points the specifications only advise against (other control characters,
/// non-characters) are accepted.
pub fn check_string(what: &str, s: &str) -> Result<(), CodecError> {
    if s.contains('\0') {
        return Err(CodecError::Malformed(format!("{what} contains U+0000")));
    }
    Ok(())
}

/// [`check_string`] for raw bytes.
fn string_from_bytes(what: &str, b: &[u8]) -> Result<String, CodecError> {
    let s = std::str::from_utf8(b)
        .map_err(|_| CodecError::Malformed(format!("{what} is not well-formed UTF-8")))?;
    check_string(what, s)?;
    Ok(s.to_owned())
}

/// A topic name of a PUBLISH or a will: a valid string, at least one character, and no
/// wildcard [MQTT-4.7.3-1], [MQTT-3.3.2-2].
pub fn check_topic_name(topic: &str) -> Result<(), CodecError> {
    check_string("topic name", topic)?;
    if topic.is_empty() {
        return Err(CodecError::Protocol("empty topic name".into()));
    }
    if topic.contains(['+', '#']) {
        return Err(CodecError::Protocol(format!(
            "topic name `{topic}` contains a wildcard"
        )));
    }
    Ok(())
}

/// A topic filter of a SUBSCRIBE or UNSUBSCRIBE: a valid string, at least one character,
/// `#` only as the whole last level and `+` only as a whole level [MQTT-4.7.1-2],
/// [MQTT-4.7.1-3], [MQTT-4.7.3-1].
pub fn check_topic_filter(filter: &str) -> Result<(), CodecError> {
    check_string("topic filter", filter)?;
    if filter.is_empty() {
        return Err(CodecError::Protocol("empty topic filter".into()));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let misplaced = match *level {
            "#" => i + 1 != levels.len(),
            "+" => false,
            other => other.contains(['+', '#']),
        };
        if misplaced {
            return Err(CodecError::Protocol(format!(
                "topic filter `{filter}` has a misplaced wildcard"
            )));
        }
    }
    Ok(())
}

/// Every string of a list of user properties.
fn check_user_properties(props: &[(String, String)]) -> Result<(), CodecError> {
    props.iter().try_for_each(|(k, v)| {
        check_string("user property", k)?;
        check_string("user property", v)
    })
}

/// Reads the protocol level of a CONNECT at the start of `buf`; `None` until enough bytes
/// arrived.
pub fn detect_version(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(CodecError::NotConnect);
    }
    // Remaining length: 1 to 4 bytes of 7 bits each.
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(CodecError::Malformed("remaining length".into()));
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(i), buf.get(i + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(hi) << 8 | usize::from(lo);
    let Some(&level) = buf.get(i + 2 + name_len) else {
        return Ok(None);
    };
    let version = match level {
        4 => Version::V311,
        5 => Version::V5,
        other => return Err(CodecError::Malformed(format!("protocol level {other}"))),
    };
    // The reserved bit of the Connect Flags must be 0 [MQTT-3.1.2-3].
    match buf.get(i + 3 + name_len) {
        None => Ok(None),
        Some(flags) if flags & 1 != 0 => {
            Err(CodecError::Malformed("reserved CONNECT flag set".into()))
        }
        Some(_) => Ok(Some(version)),
    }
}

/// Takes one packet off `buf`; `None` until a whole packet arrived. Every string of the
/// packet has been checked by the rules above.
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<Inbound>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_fixed_header(first)?;
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    // The whole packet counts against the limit, fixed header included (MQTT 5 §3.1.2.11.4).
    if total > max_packet {
        return Err(CodecError::TooLarge(max_packet));
    }
    if buf.len() < total {
        return Ok(None);
    }
    // The packet is all here: a field that runs past its end makes it malformed, not
    // something to wait for.
    let mut frame = buf.split_to(total);
    // The password is binary data, which the parser below reads as a string: a password that
    // is not UTF-8 is handed over as placeholder bytes of the same length and put back after.
    let binary_password = match first >> 4 {
        1 => password_field(&frame, version)
            .filter(|(start, len)| std::str::from_utf8(&frame[*start..start + len]).is_err())
            .map(|(start, len)| {
                let original = frame[start..start + len].to_vec();
                frame[start..start + len].fill(b'x');
                original
            }),
        _ => None,
    };
    let short = || CodecError::Malformed("a field runs past the end of the packet".into());
    let inbound = match version {
        Version::V311 => match v4::Packet::read(&mut frame, usize::MAX) {
            Ok(p) => from_v4(p)?,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Err(short()),
            Err(e) => return Err(CodecError::Malformed(e.to_string())),
        },
        Version::V5 => match v5::Packet::read(&mut frame, None) {
            Ok(p) => from_v5(p)?,
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Err(short()),
            Err(e) => return Err(CodecError::Malformed(e.to_string())),
        },
    };
    Ok(Some(match (inbound, binary_password) {
        (Inbound::Connect(mut c), Some(original)) => {
            c.password = Some(original);
            Inbound::Connect(c)
        }
        (inbound, _) => inbound,
    }))
}

/// Where the password of the CONNECT `frame` (fixed header included) lies: its start and
/// length; `None` without one, or when the packet ends before it (the parser then says why).
fn password_field(frame: &[u8], version: Version) -> Option<(usize, usize)> {
    let mut at = 1;
    // Remaining length.
    while *frame.get(at)? & 0x80 != 0 {
        at += 1;
    }
    at += 1;
    let u16_at =
        |i: usize| Some(usize::from(*frame.get(i)?) << 8 | usize::from(*frame.get(i + 1)?));
    let varint_at = |mut i: usize| {
        let (mut value, mut shift) = (0usize, 0);
        loop {
            let b = *frame.get(i)?;
            value |= usize::from(b & 0x7f) << shift;
            i += 1;
            if b & 0x80 == 0 || shift >= 21 {
                return Some((value, i));
            }
            shift += 7;
        }
    };
    // Protocol name, level, flags, keep alive.
    at += 2 + u16_at(at)?;
    let flags = *frame.get(at + 1)?;
    at += 4;
    if flags & 0x40 == 0 {
        return None;
    }
    if version == Version::V5 {
        let (len, next) = varint_at(at)?;
        at = next + len;
    }
    // Client id.
    at += 2 + u16_at(at)?;
    if flags & 0x04 != 0 {
        if version == Version::V5 {
            let (len, next) = varint_at(at)?;
            at = next + len;
        }
        // Will topic and will payload.
        at += 2 + u16_at(at)?;
        at += 2 + u16_at(at)?;
    }
    if flags & 0x80 != 0 {
        at += 2 + u16_at(at)?;
    }
    let len = u16_at(at)?;
    (at + 2 + len <= frame.len()).then_some((at + 2, len))
}

/// The length of the packet at the start of `buf` (fixed header and remaining length), once
/// its fixed header is there; a remaining length of more than four bytes is malformed.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let mut remaining = 0usize;
    for i in 1..=4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Ok(Some(1 + i + remaining));
        }
    }
    Err(CodecError::Malformed("remaining length".into()))
}

/// The flags of a fixed header: SUBSCRIBE, UNSUBSCRIBE and PUBREL must have 0b0010, every
/// other packet but PUBLISH 0 [MQTT-2.2.2-1], [MQTT-2.2.2-2]; a PUBLISH at QoS 0 must not
/// have DUP set [MQTT-3.3.1-2] and QoS 3 is malformed [MQTT-3.3.1-4].
fn check_fixed_header(first: u8) -> Result<(), CodecError> {
    let (kind, flags) = (first >> 4, first & 0x0f);
    let well_formed = match kind {
        3 => {
            let qos = (flags >> 1) & 0b11;
            qos != 3 && !(qos == 0 && flags & 0b1000 != 0)
        }
        6 | 8 | 10 => flags == 0b0010,
        _ => flags == 0,
    };
    if well_formed {
        Ok(())
    } else {
        Err(CodecError::Malformed(format!(
            "fixed header {first:#04x} has reserved flags set"
        )))
    }
}

/// The QoS of a PUBLISH; QoS 2 is refused here, before anything else of the packet counts.
fn publish_qos(qos: u8) -> Result<u8, CodecError> {
    match qos {
        0 | 1 => Ok(qos),
        _ => Err(CodecError::QosNotSupported),
    }
}

/// A SUBSCRIBE of either version: at least one filter, each a valid one [MQTT-3.8.3-3].
fn subscribe(pkid: u16, filters: Vec<(String, u8)>) -> Result<Inbound, CodecError> {
    if pkid == 0 {
        return Err(CodecError::Malformed("packet id 0".into()));
    }
    if filters.is_empty() {
        return Err(CodecError::Protocol("SUBSCRIBE without a filter".into()));
    }
    filters
        .iter()
        .try_for_each(|(f, _)| check_topic_filter(f))?;
    Ok(Inbound::Subscribe { pkid, filters })
}

/// An UNSUBSCRIBE of either version: at least one filter, each a valid one [MQTT-3.10.3-2].
fn unsubscribe(pkid: u16, filters: Vec<String>) -> Result<Inbound, CodecError> {
    if pkid == 0 {
        return Err(CodecError::Malformed("packet id 0".into()));
    }
    if filters.is_empty() {
        return Err(CodecError::Protocol("UNSUBSCRIBE without a filter".into()));
    }
    filters.iter().try_for_each(|f| check_topic_filter(f))?;
    Ok(Inbound::Unsubscribe { pkid, filters })
}

fn from_v4(p: v4::Packet) -> Result<Inbound, CodecError> {
    Ok(match p {
        v4::Packet::Connect(c) => {
            check_string("client id", &c.client_id)?;
            if let Some(will) = &c.last_will {
                publish_qos(will.qos as u8)?;
                check_topic_name(&will.topic)?;
            }
            if let Some(login) = &c.login {
                check_string("user name", &login.username)?;
            }
            Inbound::Connect(ConnectRequest {
                version: Version::V311,
                client_id: c.client_id,
                keep_alive_secs: c.keep_alive,
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.map(|l| l.password.into_bytes()),
                max_packet_size: None,
                receive_maximum: None,
                clean_session: c.clean_session,
            })
        }
        v4::Packet::Publish(p) => {
            let qos = publish_qos(p.qos as u8)?;
            check_topic_name(&p.topic)?;
            Inbound::Publish(PublishRequest {
                topic: p.topic,
                qos,
                retain: p.retain,
                pkid: p.pkid,
                payload: p.payload,
                content_type: None,
                trace: None,
            })
        }
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::Subscribe(s) => subscribe(
            s.pkid,
            s.filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        )?,
        v4::Packet::Unsubscribe(u) => unsubscribe(u.pkid, u.topics)?,
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect,
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => {
            Inbound::Unsupported("QoS 2")
        }
        _ => Inbound::Unsupported("server-side packet"),
    })
}

fn from_v5(p: v5::Packet) -> Result<Inbound, CodecError> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => {
            check_string("client id", &c.client_id)?;
            if let Some(will) = &will {
                publish_qos(will.qos as u8)?;
                check_topic_name(&string_from_bytes("will topic", &will.topic)?)?;
                if let Some(props) = &will.properties {
                    check_user_properties(&props.user_properties)?;
                    if let Some(ct) = &props.content_type {
                        check_string("will property", ct)?;
                    }
                    if let Some(rt) = &props.response_topic {
                        check_topic_name(rt)?;
                    }
                }
            }
            if let Some(login) = &login {
                check_string("user name", &login.username)?;
            }
            if let Some(props) = &c.properties {
                check_user_properties(&props.user_properties)?;
                // No enhanced authentication is offered (MQTT 5 §4.12).
                if props.authentication_method.is_some() || props.authentication_data.is_some() {
                    return Err(CodecError::Protocol(
                        "enhanced authentication is not supported".into(),
                    ));
                }
                // Both must be positive (MQTT 5 §3.1.2.11.3, §3.1.2.11.4).
                if props.max_packet_size == Some(0) || props.receive_maximum == Some(0) {
                    return Err(CodecError::Protocol(
                        "Maximum Packet Size or Receive Maximum of 0".into(),
                    ));
                }
            }
            Inbound::Connect(ConnectRequest {
                version: Version::V5,
                max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
                receive_maximum: c.properties.as_ref().and_then(|p| p.receive_maximum),
                clean_session: c.clean_start,
                client_id: c.client_id,
                keep_alive_secs: c.keep_alive,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password.into_bytes()),
            })
        }
        v5::Packet::Publish(p) => {
            let qos = publish_qos(p.qos as u8)?;
            if let Some(props) = &p.properties {
                if props.topic_alias.is_some() {
                    return Err(CodecError::TopicAlias);
                }
                if !props.subscription_identifiers.is_empty() {
                    return Err(CodecError::Protocol(
                        "a client's PUBLISH carries a Subscription Identifier".into(),
                    ));
                }
                check_user_properties(&props.user_properties)?;
                if let Some(ct) = &props.content_type {
                    check_string("content type", ct)?;
                }
                if let Some(rt) = &props.response_topic {
                    check_topic_name(rt)?;
                }
            }
            let topic = string_from_bytes("topic name", &p.topic)?;
            check_topic_name(&topic)?;
            Inbound::Publish(PublishRequest {
                topic,
                qos,
                retain: p.retain,
                pkid: p.pkid,
                payload: p.payload,
                trace: p.properties.as_ref().and_then(|pr| {
                    let user = |name: &str| {
                        pr.user_properties
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| v.as_str())
                    };
                    ferrule_telemetry::TraceContext::of(user("traceparent"), user("tracestate"))
                }),
                content_type: p.properties.and_then(|pr| pr.content_type),
            })
        }
        v5::Packet::PubAck(a) => {
            if let Some(props) = &a.properties {
                check_user_properties(&props.user_properties)?;
                if let Some(r) = &props.reason_string {
                    check_string("reason string", r)?;
                }
            }
            Inbound::PubAck(a.pkid)
        }
        v5::Packet::Subscribe(s) => {
            if let Some(props) = &s.properties {
                check_user_properties(&props.user_properties)?;
                if props.id.is_some() {
                    return Err(CodecError::SubscriptionIdentifiers);
                }
            }
            if s.filters.iter().any(|f| f.path.starts_with("$share/")) {
                return Err(CodecError::SharedSubscriptions);
            }
            subscribe(
                s.pkid,
                s.filters
                    .into_iter()
                    .map(|f| (f.path, f.qos as u8))
                    .collect(),
            )?
        }
        v5::Packet::Unsubscribe(u) => {
            if let Some(props) = &u.properties {
                check_user_properties(&props.user_properties)?;
            }
            unsubscribe(u.pkid, u.filters)?
        }
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => {
            if let Some(props) = &d.properties {
                check_user_properties(&props.user_properties)?;
                for r in [&props.reason_string, &props.server_reference]
                    .into_iter()
                    .flatten()
                {
                    check_string("reason string", r)?;
                }
            }
            Inbound::Disconnect
        }
        v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => {
            Inbound::Unsupported("QoS 2")
        }
        v5::Packet::Auth(_) => Inbound::Unsupported("AUTH"),
        _ => Inbound::Unsupported("server-side packet"),
    })
}

/// Whether a PUBLISH to a device keeps the rules the codec holds devices to: a topic name
/// without wildcards and strings without U+0000 (a command's subject or content type may
/// break them).
pub fn check_outbound(packet: &Outbound) -> Result<(), CodecError> {
    if let Outbound::Publish {
        topic,
        content_type,
        ..
    } = packet
    {
        check_topic_name(topic)?;
        if let Some(ct) = content_type {
            check_string("content type", ct)?;
        }
    }
    Ok(())
}

/// [`encode`] for a client that takes packets of at most `limit` bytes: a larger one is not
/// appended (`false`) [MQTT-3.1.2-24].
pub fn encode_within(
    version: Version,
    packet: &Outbound,
    buf: &mut BytesMut,
    limit: Option<usize>,
) -> Result<bool, CodecError> {
    let before = buf.len();
    encode(version, packet, buf)?;
    if limit.is_some_and(|max| buf.len() - before > max) {
        buf.truncate(before);
        return Ok(false);
    }
    Ok(true)
}

/// Appends `packet` to `buf` in the connection's protocol version.
pub fn encode(version: Version, packet: &Outbound, buf: &mut BytesMut) -> Result<(), CodecError> {
    let err = |e: String| CodecError::Malformed(e);
    match version {
        Version::V311 => {
            let p = match packet {
                Outbound::ConnAck { outcome, .. } => {
                    use v4::ConnectReturnCode as C;
                    let code = match outcome {
                        ConnectOutcome::Accepted => C::Success,
                        ConnectOutcome::BadCredentials => C::BadUserNamePassword,
                        ConnectOutcome::NotAuthorized => C::NotAuthorized,
                        ConnectOutcome::ServerUnavailable | ConnectOutcome::UseAnotherServer => {
                            C::ServiceUnavailable
                        }
                        ConnectOutcome::IdentifierRejected => C::BadClientId,
                    };
                    v4::Packet::ConnAck(v4::ConnAck::new(code, false))
                }
                Outbound::PubAck(pkid) => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Outbound::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    granted
                        .iter()
                        .map(|g| match g {
                            Ok(1) => v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                            Ok(_) => v4::SubscribeReasonCode::Success(QoS::AtMostOnce),
                            Err(_) => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Outbound::Publish {
                    topic,
                    payload,
                    qos1,
                    pkid,
                    ..
                } => {
                    let qos = if *qos1 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    };
                    let mut p = v4::Publish::new(topic.as_str(), qos, payload.clone());
                    if *qos1 {
                        p.pkid = *pkid;
                    }
                    v4::Packet::Publish(p)
                }
                Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
                Outbound::PingResp => v4::Packet::PingResp,
                // 3.1.1 servers close without a word.
                Outbound::Disconnect(_) => return Ok(()),
            };
            p.write(buf, usize::MAX).map_err(|e| err(e.to_string()))?;
        }
        Version::V5 => {
            let p = match packet {
                Outbound::ConnAck { outcome, announce } => {
                    use v5::ConnectReturnCode as C;
                    let code = match outcome {
                        ConnectOutcome::Accepted => C::Success,
                        ConnectOutcome::BadCredentials => C::BadUserNamePassword,
                        ConnectOutcome::NotAuthorized => C::NotAuthorized,
                        ConnectOutcome::ServerUnavailable => C::ServerUnavailable,
                        ConnectOutcome::UseAnotherServer => C::UseAnotherServer,
                        ConnectOutcome::IdentifierRejected => C::ClientIdentifierNotValid,
                    };
                    v5::Packet::ConnAck(v5::ConnAck {
                        session_present: false,
                        code,
                        properties: announce.as_deref().map(connack_properties),
                    })
                }
                Outbound::PubAck(pkid) => v5::Packet::PubAck(v5::PubAck {
                    pkid: *pkid,
                    reason: v5::PubAckReason::Success,
                    properties: None,
                }),
                Outbound::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
                    pkid: *pkid,
                    return_codes: granted
                        .iter()
                        .map(|g| match g {
                            Ok(1) => v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce),
                            Ok(_) => v5::SubscribeReasonCode::Success(QoS5::AtMostOnce),
                            Err(SubAckFailure::Unspecified) => v5::SubscribeReasonCode::Unspecified,
                            Err(SubAckFailure::ImplementationSpecific) => {
                                v5::SubscribeReasonCode::ImplementationSpecific
                            }
                            Err(SubAckFailure::NotAuthorized) => {
                                v5::SubscribeReasonCode::NotAuthorized
                            }
                            Err(SubAckFailure::TopicFilterInvalid) => {
                                v5::SubscribeReasonCode::TopicFilterInvalid
                            }
                        })
                        .collect(),
                    properties: None,
                }),
                Outbound::Publish {
                    topic,
                    payload,
                    qos1,
                    pkid,
                    content_type,
                } => {
                    let qos = if *qos1 {
                        QoS5::AtLeastOnce
                    } else {
                        QoS5::AtMostOnce
                    };
                    let properties = content_type.as_ref().map(|ct| v5::PublishProperties {
                        content_type: Some(ct.clone()),
                        ..Default::default()
                    });
                    let mut p = v5::Publish::new(topic.as_str(), qos, payload.clone(), properties);
                    if *qos1 {
                        p.pkid = *pkid;
                    }
                    v5::Packet::Publish(p)
                }
                Outbound::UnsubAck { pkid, ended } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: ended
                        .iter()
                        .map(|e| match e {
                            true => v5::UnsubAckReason::Success,
                            false => v5::UnsubAckReason::NoSubscriptionExisted,
                        })
                        .collect(),
                    properties: None,
                }),
                Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outbound::Disconnect(reason) => {
                    // Written here: rumqttc 0.25 announces one byte and writes two. The
                    // reason code and an empty property length.
                    buf.extend_from_slice(&[0xe0, 2, reason.code(), 0]);
                    return Ok(());
                }
            };
            p.write(buf, None).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(())
}

/// The CONNACK properties of an accepted MQTT 5 connection, as implemented: QoS 0 and 1,
/// retained publishes accepted (forwarded with `x-opt-retain`, never stored), wildcard
/// filters (a gateway's `command//+/req/#`), no shared subscriptions, no subscription
/// identifiers, no topic aliases.
fn connack_properties(a: &Announce) -> v5::ConnAckProperties {
    let all = v5::ConnAckProperties {
        // No session outlives its connection, whatever the client asked for.
        session_expiry_interval: Some(0),
        receive_max: Some(a.receive_maximum),
        max_qos: Some(1),
        retain_available: Some(1),
        max_packet_size: Some(a.maximum_packet_size),
        assigned_client_identifier: a.assigned_client_id.clone(),
        topic_alias_max: Some(0),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    if !a.essential_only {
        return all;
    }
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        retain_available: None,
        max_packet_size: None,
        topic_alias_max: None,
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        ..all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CONNECT, MQTT 3.1.1, client id "c", user "u@t", password "pw", keep-alive 30.
    const CONNECT_311: &[u8] = &[
        0x10,
        22,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0b1100_0010,
        0,
        30,
        0,
        1,
        b'c',
        0,
        3,
        b'u',
        b'@',
        b't',
        0,
        2,
        b'p',
        b'w',
    ];

    #[test]
    fn a_password_is_binary_data_in_both_versions() {
        // 3.1.1 with a will, MQTT 5 with (empty) properties: the password as it came.
        #[rustfmt::skip]
        let v4 = [0x10, 28, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0110, 0, 30, 0, 1, b'c',
            0, 1, b'w', 0, 1, b'x', 0, 3, b'u', b'@', b't', 0, 2, 0xff, 0xfe];
        #[rustfmt::skip]
        let v5 = [0x10, 23, 0, 4, b'M', b'Q', b'T', b'T', 5, 0b1100_0010, 0, 30, 0, 0, 1, b'c',
            0, 3, b'u', b'@', b't', 0, 2, 0xff, 0xfe];
        for (version, bytes) in [(Version::V311, &v4[..]), (Version::V5, &v5[..])] {
            let mut buf = BytesMut::from(bytes);
            match decode(version, &mut buf, 1 << 20) {
                Ok(Some(Inbound::Connect(c))) => {
                    assert_eq!(c.password.as_deref(), Some(&[0xff, 0xfe][..]));
                    assert_eq!(c.username.as_deref(), Some("u@t"));
                }
                other => panic!("{version:?}: {other:?}"),
            }
            assert!(buf.is_empty());
        }
        // A user name is a UTF-8 string all the same.
        let mut bad_user = v4;
        bad_user[24] = 0xff;
        let mut buf = BytesMut::from(&bad_user[..]);
        assert!(matches!(
            decode(Version::V311, &mut buf, 1 << 20),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn detects_versions_from_raw_connect_bytes() {
        assert_eq!(detect_version(CONNECT_311).unwrap(), Some(Version::V311));
        let mut v5 = CONNECT_311.to_vec();
        v5[8] = 5;
        assert_eq!(detect_version(&v5).unwrap(), Some(Version::V5));
        assert_eq!(
            detect_version(&CONNECT_311[..5]).unwrap(),
            None,
            "needs more bytes"
        );
        assert_eq!(detect_version(&[0x30, 0]), Err(CodecError::NotConnect));
        let mut v3 = CONNECT_311.to_vec();
        v3[8] = 3;
        assert!(detect_version(&v3).is_err());
    }

    #[test]
    fn decodes_connect_and_publish_311() {
        let mut buf = BytesMut::from(CONNECT_311);
        let c = decode(Version::V311, &mut buf, 1024).unwrap().unwrap();
        assert_eq!(
            c,
            Inbound::Connect(ConnectRequest {
                version: Version::V311,
                client_id: "c".into(),
                keep_alive_secs: 30,
                username: Some("u@t".into()),
                password: Some("pw".into()),
                max_packet_size: None,
                receive_maximum: None,
                clean_session: true,
            })
        );
        assert!(buf.is_empty());
        // PUBLISH QoS 1, topic "t", packet id 7, payload "hi", split over two reads.
        let publish = [0x32, 7, 0, 1, b't', 0, 7, b'h', b'i'];
        let mut buf = BytesMut::from(&publish[..4]);
        assert_eq!(decode(Version::V311, &mut buf, 1024).unwrap(), None);
        buf.extend_from_slice(&publish[4..]);
        let p = decode(Version::V311, &mut buf, 1024).unwrap().unwrap();
        let Inbound::Publish(p) = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            (p.topic.as_str(), p.qos, p.pkid, &p.payload[..]),
            ("t", 1, 7, &b"hi"[..])
        );
    }

    #[test]
    fn refuses_oversized_and_garbage() {
        let publish = [0x30, 7, 0, 1, b't', b'a', b'b', b'c', b'd'];
        let mut buf = BytesMut::from(&publish[..]);
        assert_eq!(
            decode(Version::V311, &mut buf, 5),
            Err(CodecError::TooLarge(5))
        );
        let mut buf = BytesMut::from(&[0xf0u8, 0][..]);
        assert!(matches!(
            decode(Version::V311, &mut buf, 100),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn connack_codes_per_version() {
        let cases = [
            (ConnectOutcome::Accepted, 0x00, 0x00),
            (ConnectOutcome::BadCredentials, 0x04, 0x86),
            (ConnectOutcome::NotAuthorized, 0x05, 0x87),
            (ConnectOutcome::ServerUnavailable, 0x03, 0x88),
            (ConnectOutcome::UseAnotherServer, 0x03, 0x9c),
        ];
        for (outcome, v311, v5) in cases {
            let mut buf = BytesMut::new();
            encode(Version::V311, &Outbound::connack(outcome), &mut buf).unwrap();
            assert_eq!(&buf[..], &[0x20, 2, 0, v311], "{outcome:?}");
            let mut buf = BytesMut::new();
            encode(Version::V5, &Outbound::connack(outcome), &mut buf).unwrap();
            assert_eq!(&buf[..4], &[0x20, 3, 0, v5], "{outcome:?}");
        }
    }

    #[test]
    fn acks_and_failures() {
        let mut buf = BytesMut::new();
        encode(Version::V311, &Outbound::PubAck(0x0102), &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x40, 2, 1, 2]);
        let mut buf = BytesMut::new();
        let granted = vec![Err(SubAckFailure::NotAuthorized), Ok(0)];
        encode(
            Version::V311,
            &Outbound::SubAck {
                pkid: 1,
                granted: granted.clone(),
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            &buf[..],
            &[0x90, 4, 0, 1, 0x80, 0x00],
            "3.1.1: one failure code"
        );
        let mut buf = BytesMut::new();
        let granted = vec![
            Err(SubAckFailure::NotAuthorized),
            Err(SubAckFailure::TopicFilterInvalid),
            Err(SubAckFailure::Unspecified),
            Ok(1),
        ];
        encode(
            Version::V5,
            &Outbound::SubAck { pkid: 1, granted },
            &mut buf,
        )
        .unwrap();
        // Fixed header, packet id, no properties, then one reason code per filter.
        assert_eq!(
            &buf[..],
            &[0x90, 7, 0, 1, 0, 0x87, 0x8F, 0x80, 0x01],
            "5: the reason"
        );
        let mut buf = BytesMut::new();
        let p = Outbound::Publish {
            topic: "e".into(),
            payload: b"x".to_vec(),
            qos1: false,
            pkid: 0,
            content_type: None,
        };
        encode(Version::V311, &p, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x30, 4, 0, 1, b'e', b'x']);
        let mut buf = BytesMut::new();
        encode(Version::V311, &Outbound::PingResp, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0xd0, 0]);
    }

    fn decode_all(version: Version, bytes: &[u8]) -> Result<Option<Inbound>, CodecError> {
        decode(version, &mut BytesMut::from(bytes), 1024)
    }

    #[test]
    fn ill_formed_utf8_and_nul_make_a_packet_malformed() {
        // MQTT 5 PUBLISH QoS 1, topic 0xff (not UTF-8), packet id 1, no properties, "x".
        let v5 = [0x32, 7, 0, 1, 0xff, 0, 1, 0, b'x'];
        let e = decode_all(Version::V5, &v5).unwrap_err();
        assert!(matches!(e, CodecError::Malformed(_)), "{e:?}");
        assert_eq!(e.close_reason(), CloseReason::MalformedPacket);
        // MQTT 3.1.1: the same topic, and a topic with U+0000.
        let v311 = [0x30, 3, 0, 1, 0xff];
        assert!(matches!(
            decode_all(Version::V311, &v311),
            Err(CodecError::Malformed(_))
        ));
        let nul = [0x30, 4, 0, 2, b'a', 0];
        assert!(matches!(
            decode_all(Version::V311, &nul),
            Err(CodecError::Malformed(_))
        ));
        // A client id with U+0000 in a CONNECT.
        let mut connect = CONNECT_311.to_vec();
        connect[14] = 0;
        assert!(matches!(
            decode_all(Version::V311, &connect),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn wildcards_in_topic_names_are_protocol_errors() {
        for topic in [&b"t/+"[..], b"t/#", b"telemetry/?on-error=#"] {
            let mut v311 = vec![0x30, 2 + topic.len() as u8, 0, topic.len() as u8];
            v311.extend_from_slice(topic);
            let e = decode_all(Version::V311, &v311).unwrap_err();
            assert!(matches!(e, CodecError::Protocol(_)), "{e:?}");
            let mut v5 = vec![0x30, 3 + topic.len() as u8, 0, topic.len() as u8];
            v5.extend_from_slice(topic);
            v5.push(0);
            let e = decode_all(Version::V5, &v5).unwrap_err();
            assert_eq!(e.close_reason(), CloseReason::ProtocolError, "{e:?}");
        }
    }

    #[test]
    fn topic_filters_follow_the_wildcard_rules() {
        for good in ["command//+/req/#", "#", "+", "a/+/b", "error///#"] {
            assert_eq!(check_topic_filter(good), Ok(()), "{good}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "+a/b", "a/\0"] {
            assert!(check_topic_filter(bad).is_err(), "{bad:?}");
        }
        // SUBSCRIBE, 3.1.1, packet id 1, filter "a/#/b" QoS 0.
        let sub = [0x82, 10, 0, 1, 0, 5, b'a', b'/', b'#', b'/', b'b', 0];
        assert!(matches!(
            decode_all(Version::V311, &sub),
            Err(CodecError::Protocol(_))
        ));
    }

    #[test]
    fn qos2_and_topic_aliases_are_refused_with_their_codes() {
        let qos2 = [0x34, 6, 0, 1, b't', 0, 1, b'x'];
        let e = decode_all(Version::V311, &qos2).unwrap_err();
        assert_eq!(e, CodecError::QosNotSupported);
        // MQTT 5 PUBLISH QoS 0, topic "t", properties: Topic Alias (0x23) = 1.
        let alias = [0x30, 7, 0, 1, b't', 3, 0x23, 0, 1];
        let e = decode_all(Version::V5, &alias).unwrap_err();
        assert_eq!(e.close_reason(), CloseReason::TopicAliasInvalid);
    }

    #[test]
    fn mqtt5_connack_announces_what_the_server_implements() {
        let mut buf = BytesMut::new();
        let announce = Announce {
            assigned_client_id: Some("ferrule-1".into()),
            receive_maximum: 100,
            maximum_packet_size: 3072,
            essential_only: false,
        };
        let packet = Outbound::ConnAck {
            outcome: ConnectOutcome::Accepted,
            announce: Some(Box::new(announce)),
        };
        encode(Version::V5, &packet, &mut buf).unwrap();
        let Ok(v5::Packet::ConnAck(ack)) = v5::Packet::read(&mut buf, None) else {
            panic!("not a CONNACK")
        };
        let p = ack.properties.expect("properties");
        assert_eq!(p.assigned_client_identifier.as_deref(), Some("ferrule-1"));
        assert_eq!(p.max_qos, Some(1));
        assert_eq!(p.receive_max, Some(100));
        assert_eq!(p.max_packet_size, Some(3072));
        assert_eq!(p.topic_alias_max, Some(0));
        assert_eq!(p.shared_subscription_available, Some(0));
        assert_eq!(p.wildcard_subscription_available, Some(1));
    }

    #[test]
    fn disconnect_unsuback_and_content_type_per_version() {
        let mut buf = BytesMut::new();
        let bye = Outbound::Disconnect(CloseReason::PacketTooLarge);
        encode(Version::V311, &bye, &mut buf).unwrap();
        assert!(buf.is_empty(), "3.1.1 servers send no DISCONNECT");
        encode(Version::V5, &bye, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0xe0, 2, 0x95, 0]);
        let Ok(v5::Packet::Disconnect(d)) = v5::Packet::read(&mut buf, None) else {
            panic!("not a DISCONNECT")
        };
        assert_eq!(d.reason_code, v5::DisconnectReasonCode::PacketTooLarge);
        let mut buf = BytesMut::new();
        let unsuback = Outbound::UnsubAck {
            pkid: 3,
            ended: vec![true, false],
        };
        encode(Version::V5, &unsuback, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0xb0, 5, 0, 3, 0, 0x00, 0x11]);
        let mut buf = BytesMut::new();
        let publish = Outbound::Publish {
            topic: "command///req//x".into(),
            payload: b"1".to_vec(),
            qos1: false,
            pkid: 0,
            content_type: Some("text/plain".into()),
        };
        encode(Version::V5, &publish, &mut buf).unwrap();
        let Ok(v5::Packet::Publish(p)) = v5::Packet::read(&mut buf, None) else {
            panic!("not a PUBLISH")
        };
        assert_eq!(
            p.properties.and_then(|p| p.content_type).as_deref(),
            Some("text/plain")
        );
    }

    #[test]
    fn reserved_header_flags_and_unsupported_features_are_refused() {
        // SUBSCRIBE with flags 0b0000 instead of 0b0010, filter "a".
        let sub = [0x80, 6, 0, 1, 0, 1, b'a', 0];
        assert!(matches!(
            decode_all(Version::V311, &sub),
            Err(CodecError::Malformed(_))
        ));
        // PINGREQ with a flag; PUBLISH QoS 0 with DUP.
        for bytes in [&[0xc1u8, 0][..], &[0x38, 3, 0, 1, b't'][..]] {
            assert!(matches!(
                decode_all(Version::V311, bytes),
                Err(CodecError::Malformed(_))
            ));
        }
        // CONNECT with the reserved flag set.
        let mut connect = CONNECT_311.to_vec();
        connect[9] |= 1;
        assert!(matches!(
            detect_version(&connect),
            Err(CodecError::Malformed(_))
        ));
        // MQTT 5 SUBSCRIBE, packet id 1, properties: Subscription Identifier (0x0b) 5, filter
        // "a" QoS 0.
        let sub_id = [0x82, 9, 0, 1, 2, 0x0b, 5, 0, 1, b'a', 0];
        let e = decode_all(Version::V5, &sub_id).unwrap_err();
        assert_eq!(
            e.close_reason(),
            CloseReason::SubscriptionIdentifiersNotSupported
        );
        // MQTT 5 SUBSCRIBE, packet id 1, no properties, filter "$share/g/a" QoS 0.
        let mut shared = vec![0x82, 16, 0, 1, 0, 0, 10];
        shared.extend_from_slice(b"$share/g/a");
        shared.push(0);
        let e = decode_all(Version::V5, &shared).unwrap_err();
        assert_eq!(
            e.close_reason(),
            CloseReason::SharedSubscriptionsNotSupported
        );
        // A client's PUBLISH with a Subscription Identifier (0x0b) 1.
        let publish = [0x30, 6, 0, 1, b't', 2, 0x0b, 1];
        let e = decode_all(Version::V5, &publish).unwrap_err();
        assert_eq!(e.close_reason(), CloseReason::ProtocolError);
    }

    #[test]
    fn strings_of_acknowledgements_are_checked_too() {
        // MQTT 5 PUBACK, packet id 1, reason 0, properties: Reason String (0x1f) "a\0".
        let puback = [0x40, 8, 0, 1, 0, 5, 0x1f, 0, 2, b'a', 0];
        assert!(matches!(
            decode_all(Version::V5, &puback),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn whole_packets_count_and_truncated_fields_are_malformed() {
        // 10 bytes in all: PUBLISH QoS 0, topic "t", payload "abcde".
        let publish = [0x30, 8, 0, 1, b't', b'a', b'b', b'c', b'd', b'e'];
        assert!(decode_all_within(Version::V311, &publish, 10).is_ok());
        assert_eq!(
            decode_all_within(Version::V311, &publish, 9),
            Err(CodecError::TooLarge(9))
        );
        // A SUBSCRIBE that holds nothing but its packet id is not waited for.
        for version in [Version::V311, Version::V5] {
            assert!(matches!(
                decode_all(version, &[0x82, 2, 0, 1]),
                Err(CodecError::Malformed(_))
            ));
        }
        // Packet id 0.
        let sub = [0x82, 6, 0, 0, 0, 1, b'a', 0];
        assert!(matches!(
            decode_all(Version::V311, &sub),
            Err(CodecError::Malformed(_))
        ));
        // A command subject MQTT cannot carry.
        let publish = Outbound::Publish {
            topic: "command///req//a#b".into(),
            payload: Vec::new(),
            qos1: false,
            pkid: 0,
            content_type: None,
        };
        assert!(check_outbound(&publish).is_err());
    }

    fn decode_all_within(
        version: Version,
        bytes: &[u8],
        max: usize,
    ) -> Result<Option<Inbound>, CodecError> {
        decode(version, &mut BytesMut::from(bytes), max)
    }
}
