//! MQTT 5 for the device simulator: scenarios speak 3.1.1 packets, and a device connected with
//! version 5 translates each one to and from its MQTT 5 form on the wire. Only what the
//! simulator sends or expects is translated; anything else is dropped on reading.

use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5;

fn qos5(q: QoS) -> QoS5 {
    match q {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn qos4(q: QoS5) -> QoS {
    match q {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The MQTT 5 form of a packet the simulator sends.
pub fn outgoing(p: &v4::Packet) -> Option<v5::Packet> {
    Some(match p {
        v4::Packet::Connect(c) => v5::Packet::Connect(
            v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                clean_start: c.clean_session,
                properties: None,
            },
            None,
            c.login
                .as_ref()
                .map(|l| v5::Login::new(l.username.clone(), l.password.clone())),
        ),
        v4::Packet::Publish(p) => v5::Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos5(p.qos),
            retain: p.retain,
            topic: bytes::Bytes::copy_from_slice(p.topic.as_bytes()),
            pkid: p.pkid,
            payload: p.payload.clone(),
            properties: None,
        }),
        v4::Packet::PubAck(a) => v5::Packet::PubAck(v5::PubAck {
            pkid: a.pkid,
            reason: v5::PubAckReason::Success,
            properties: None,
        }),
        v4::Packet::Subscribe(s) => v5::Packet::Subscribe(v5::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|f| v5::Filter {
                    path: f.path.clone(),
                    qos: qos5(f.qos),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: v5::RetainForwardRule::OnEverySubscribe,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
        v4::Packet::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
        _ => return None,
    })
}

/// The 3.1.1 form of a packet the simulator receives.
pub fn incoming(p: v5::Packet) -> Option<v4::Packet> {
    Some(match p {
        v5::Packet::ConnAck(a) => v4::Packet::ConnAck(v4::ConnAck {
            session_present: a.session_present,
            code: match a.code {
                v5::ConnectReturnCode::Success => v4::ConnectReturnCode::Success,
                v5::ConnectReturnCode::BadUserNamePassword => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                v5::ConnectReturnCode::ServerUnavailable => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
                _ => v4::ConnectReturnCode::NotAuthorized,
            },
        }),
        v5::Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos4(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload,
        }),
        v5::Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck { pkid: a.pkid }),
        v5::Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck {
            pkid: s.pkid,
            return_codes: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(qos4(q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        }),
        v5::Packet::PingResp(_) => v4::Packet::PingResp,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    /// Encodes as MQTT 5, decodes the bytes again: what a version-5 server would read.
    fn wire(p: &v4::Packet) -> v5::Packet {
        let mut buf = BytesMut::new();
        outgoing(p).unwrap().write(&mut buf, None).unwrap();
        v5::Packet::read(&mut buf, None).unwrap()
    }

    #[test]
    fn a_connect_goes_out_as_mqtt_5_with_its_credentials() {
        let mut c = v4::Connect::new("dev-1");
        c.keep_alive = 600;
        c.set_login("dev-1@t", "pw");
        let v5::Packet::Connect(c5, None, Some(login)) = wire(&v4::Packet::Connect(c)) else {
            panic!("not a connect");
        };
        assert_eq!((c5.client_id.as_str(), c5.keep_alive), ("dev-1", 600));
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("dev-1@t", "pw")
        );
    }

    #[test]
    fn publishes_and_acks_keep_topic_qos_packet_id_and_payload() {
        let mut p = v4::Publish::new("telemetry", QoS::AtLeastOnce, b"hi".to_vec());
        p.pkid = 7;
        let v5::Packet::Publish(p5) = wire(&v4::Packet::Publish(p.clone())) else {
            panic!("not a publish");
        };
        assert_eq!(
            (&p5.topic[..], p5.qos, p5.pkid),
            (&b"telemetry"[..], QoS5::AtLeastOnce, 7)
        );
        assert_eq!(
            incoming(v5::Packet::Publish(p5)),
            Some(v4::Packet::Publish(p))
        );
        let ack = v5::PubAck {
            pkid: 7,
            reason: v5::PubAckReason::Success,
            properties: None,
        };
        assert_eq!(
            incoming(v5::Packet::PubAck(ack)),
            Some(v4::Packet::PubAck(v4::PubAck { pkid: 7 }))
        );
    }

    #[test]
    fn refusals_stay_refusals() {
        let refused = v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::NotAuthorized,
            properties: None,
        };
        let Some(v4::Packet::ConnAck(a)) = incoming(v5::Packet::ConnAck(refused)) else {
            panic!("not a connack");
        };
        assert_ne!(a.code, v4::ConnectReturnCode::Success);
    }
}
