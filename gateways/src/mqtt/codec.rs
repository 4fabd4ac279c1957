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
    pub password: Option<String>,
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
    /// MQTT 5's user property `traceparent` (W3C trace context).
    pub traceparent: Option<String>,
}

/// Why a CONNECT was refused, or that it was not; encoded per version as Hono's table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    Accepted,
    BadCredentials,
    NotAuthorized,
    ServerUnavailable,
    UseAnotherServer,
}

/// A packet to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    ConnAck(ConnectOutcome),
    PubAck(u16),
    /// Per filter the granted QoS, or `None` for a refused one (0x80).
    SubAck {
        pkid: u16,
        granted: Vec<Option<u8>>,
    },
    /// A message to the device: error messages at QoS 0, commands at the granted QoS
    /// (`pkid` is used for QoS 1 only).
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos1: bool,
        pkid: u16,
    },
    UnsubAck {
        pkid: u16,
        filters: usize,
    },
    PingResp,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("packet larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet must be CONNECT")]
    NotConnect,
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
    match level {
        4 => Ok(Some(Version::V311)),
        5 => Ok(Some(Version::V5)),
        other => Err(CodecError::Malformed(format!("protocol level {other}"))),
    }
}

/// Takes one packet off `buf`; `None` until a whole packet arrived.
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<Inbound>, CodecError> {
    if buf.is_empty() {
        return Ok(None);
    }
    match version {
        Version::V311 => match v4::Packet::read(buf, max_packet) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => {
                Err(CodecError::TooLarge(max_packet))
            }
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
        Version::V5 => match v5::Packet::read(buf, Some(max_packet as u32)) {
            Ok(p) => Ok(Some(from_v5(p))),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { .. }) => {
                Err(CodecError::TooLarge(max_packet))
            }
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
    }
}

fn qos_u8_v4(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn from_v4(p: v4::Packet) -> Inbound {
    match p {
        v4::Packet::Connect(c) => Inbound::Connect(ConnectRequest {
            version: Version::V311,
            client_id: c.client_id,
            keep_alive_secs: c.keep_alive,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
        }),
        v4::Packet::Publish(p) => Inbound::Publish(PublishRequest {
            topic: p.topic,
            qos: qos_u8_v4(p.qos),
            retain: p.retain,
            pkid: p.pkid,
            payload: p.payload,
            content_type: None,
            traceparent: None,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect,
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => {
            Inbound::Unsupported("QoS 2")
        }
        _ => Inbound::Unsupported("server-side packet"),
    }
}

fn from_v5(p: v5::Packet) -> Inbound {
    match p {
        v5::Packet::Connect(c, _will, login) => Inbound::Connect(ConnectRequest {
            version: Version::V5,
            client_id: c.client_id,
            keep_alive_secs: c.keep_alive,
            username: login.as_ref().map(|l| l.username.clone()),
            password: login.map(|l| l.password),
        }),
        v5::Packet::Publish(p) => Inbound::Publish(PublishRequest {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            qos: p.qos as u8,
            retain: p.retain,
            pkid: p.pkid,
            payload: p.payload,
            traceparent: p.properties.as_ref().and_then(|pr| {
                pr.user_properties
                    .iter()
                    .find(|(k, _)| k == "traceparent")
                    .map(|(_, v)| v.clone())
            }),
            content_type: p.properties.and_then(|pr| pr.content_type),
        }),
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(_) => Inbound::Disconnect,
        v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => {
            Inbound::Unsupported("QoS 2")
        }
        v5::Packet::Auth(_) => Inbound::Unsupported("AUTH"),
        _ => Inbound::Unsupported("server-side packet"),
    }
}

/// Appends `packet` to `buf` in the connection's protocol version.
pub fn encode(version: Version, packet: &Outbound, buf: &mut BytesMut) -> Result<(), CodecError> {
    let err = |e: String| CodecError::Malformed(e);
    match version {
        Version::V311 => {
            let p = match packet {
                Outbound::ConnAck(o) => {
                    use v4::ConnectReturnCode as C;
                    let code = match o {
                        ConnectOutcome::Accepted => C::Success,
                        ConnectOutcome::BadCredentials => C::BadUserNamePassword,
                        ConnectOutcome::NotAuthorized => C::NotAuthorized,
                        ConnectOutcome::ServerUnavailable | ConnectOutcome::UseAnotherServer => {
                            C::ServiceUnavailable
                        }
                    };
                    v4::Packet::ConnAck(v4::ConnAck::new(code, false))
                }
                Outbound::PubAck(pkid) => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Outbound::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    granted
                        .iter()
                        .map(|g| match g {
                            Some(1) => v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                            Some(_) => v4::SubscribeReasonCode::Success(QoS::AtMostOnce),
                            None => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Outbound::Publish {
                    topic,
                    payload,
                    qos1,
                    pkid,
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
            };
            p.write(buf, usize::MAX).map_err(|e| err(e.to_string()))?;
        }
        Version::V5 => {
            let p = match packet {
                Outbound::ConnAck(o) => {
                    use v5::ConnectReturnCode as C;
                    let code = match o {
                        ConnectOutcome::Accepted => C::Success,
                        ConnectOutcome::BadCredentials => C::BadUserNamePassword,
                        ConnectOutcome::NotAuthorized => C::NotAuthorized,
                        ConnectOutcome::ServerUnavailable => C::ServerUnavailable,
                        ConnectOutcome::UseAnotherServer => C::UseAnotherServer,
                    };
                    v5::Packet::ConnAck(v5::ConnAck {
                        session_present: false,
                        code,
                        properties: None,
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
                            Some(1) => v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce),
                            Some(_) => v5::SubscribeReasonCode::Success(QoS5::AtMostOnce),
                            None => v5::SubscribeReasonCode::Unspecified,
                        })
                        .collect(),
                    properties: None,
                }),
                Outbound::Publish {
                    topic,
                    payload,
                    qos1,
                    pkid,
                } => {
                    let qos = if *qos1 {
                        QoS5::AtLeastOnce
                    } else {
                        QoS5::AtMostOnce
                    };
                    let mut p = v5::Publish::new(topic.as_str(), qos, payload.clone(), None);
                    if *qos1 {
                        p.pkid = *pkid;
                    }
                    v5::Packet::Publish(p)
                }
                Outbound::UnsubAck { pkid, filters } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: vec![v5::UnsubAckReason::NoSubscriptionExisted; *filters],
                    properties: None,
                }),
                Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
            };
            p.write(buf, None).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(())
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
            encode(Version::V311, &Outbound::ConnAck(outcome), &mut buf).unwrap();
            assert_eq!(&buf[..], &[0x20, 2, 0, v311], "{outcome:?}");
            let mut buf = BytesMut::new();
            encode(Version::V5, &Outbound::ConnAck(outcome), &mut buf).unwrap();
            assert_eq!(&buf[..4], &[0x20, 3, 0, v5], "{outcome:?}");
        }
    }

    #[test]
    fn acks_and_failures() {
        let mut buf = BytesMut::new();
        encode(Version::V311, &Outbound::PubAck(0x0102), &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x40, 2, 1, 2]);
        let mut buf = BytesMut::new();
        let granted = vec![None, Some(0)];
        encode(
            Version::V311,
            &Outbound::SubAck { pkid: 1, granted },
            &mut buf,
        )
        .unwrap();
        assert_eq!(&buf[..], &[0x90, 4, 0, 1, 0x80, 0x00]);
        let mut buf = BytesMut::new();
        let p = Outbound::Publish {
            topic: "e".into(),
            payload: b"x".to_vec(),
            qos1: false,
            pkid: 0,
        };
        encode(Version::V311, &p, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x30, 4, 0, 1, b'e', b'x']);
        let mut buf = BytesMut::new();
        encode(Version::V311, &Outbound::PingResp, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0xd0, 0]);
    }
}
