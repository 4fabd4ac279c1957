//! Raw MQTT clients for tests that watch what the gateway does to a connection: MQTT 3.1.1
//! (`RawClient`) and MQTT 5 (`V5Client`), packets encoded and decoded with rumqttc's codecs.

use super::random_id;
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn user(device: &str, tenant: &str) -> String {
    format!("{device}@{tenant}")
}

/// A raw MQTT 3.1.1 client, for watching what the gateway does to the connection.
pub struct RawClient {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl RawClient {
    /// Connects as `username` (password `pw`) with `keep_alive`; returns the CONNACK's code.
    pub async fn connect(
        port: u16,
        username: &str,
        keep_alive: u16,
    ) -> (RawClient, v4::ConnectReturnCode) {
        Self::connect_as(port, Some(username), keep_alive).await
    }

    /// Connects without user name and password (an unauthenticated device).
    pub async fn connect_anonymous(port: u16) -> (RawClient, v4::ConnectReturnCode) {
        Self::connect_as(port, None, 60).await
    }

    async fn connect_as(
        port: u16,
        username: Option<&str>,
        keep_alive: u16,
    ) -> (RawClient, v4::ConnectReturnCode) {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut c = RawClient {
            stream,
            buf: BytesMut::new(),
        };
        let mut connect = v4::Connect::new(random_id("raw"));
        connect.keep_alive = keep_alive;
        if let Some(username) = username {
            connect.set_login(username, "pw");
        }
        c.send(v4::Packet::Connect(connect)).await;
        let code = match c.next().await {
            Some(v4::Packet::ConnAck(a)) => a.code,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (c, code)
    }

    /// Sends `p`; a SUBSCRIBE or UNSUBSCRIBE built without a packet id gets 1, as a client's
    /// must be non-zero.
    pub async fn send(&mut self, mut p: v4::Packet) {
        match &mut p {
            v4::Packet::Subscribe(s) if s.pkid == 0 => s.pkid = 1,
            v4::Packet::Unsubscribe(u) if u.pkid == 0 => u.pkid = 1,
            _ => {}
        }
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 20).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, pkid: u16) {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(v4::Packet::Publish(p)).await;
    }

    /// The next packet, or `None` once the gateway closed the connection (within 5 s).
    pub async fn next(&mut self) -> Option<v4::Packet> {
        self.next_within(Duration::from_secs(5)).await
    }

    pub async fn next_within(&mut self, limit: Duration) -> Option<v4::Packet> {
        let deadline = Instant::now() + limit;
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the gateway: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => panic!("the gateway neither answered nor closed within {limit:?}"),
            }
        }
    }

    /// Asserts that the gateway closes the connection (sending nothing but PUBACKs first).
    pub async fn expect_closed(&mut self) {
        loop {
            match self.next().await {
                None => return,
                Some(v4::Packet::PubAck(_)) => {}
                Some(other) => panic!("expected the connection to close, got {other:?}"),
            }
        }
    }
}

/// A raw MQTT 5 client.
pub struct V5Client {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl V5Client {
    /// Connects with `client_id` (may be empty), a login if given, and CONNECT properties.
    pub async fn connect(
        port: u16,
        client_id: &str,
        login: Option<(&str, &str)>,
        properties: Option<v5::ConnectProperties>,
    ) -> (V5Client, v5::ConnAck) {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut c = V5Client {
            stream,
            buf: BytesMut::new(),
        };
        let connect = v5::Connect {
            keep_alive: 60,
            client_id: client_id.to_owned(),
            clean_start: true,
            properties,
        };
        let login = login.map(|(u, p)| v5::Login {
            username: u.to_owned(),
            password: p.to_owned(),
        });
        c.send(v5::Packet::Connect(connect, None, login)).await;
        match c.next().await {
            Some(v5::Packet::ConnAck(a)) => (c, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Sends `p`; a SUBSCRIBE or UNSUBSCRIBE without a packet id gets 1.
    pub async fn send(&mut self, mut p: v5::Packet) {
        match &mut p {
            v5::Packet::Subscribe(s) if s.pkid == 0 => s.pkid = 1,
            v5::Packet::Unsubscribe(u) if u.pkid == 0 => u.pkid = 1,
            _ => {}
        }
        let mut out = BytesMut::new();
        p.write(&mut out, None).unwrap();
        self.send_raw(&out).await;
    }

    /// Writes bytes as they are, for packets rumqttc would not encode.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next packet, or `None` once the gateway closed the connection (within 5 s).
    pub async fn next(&mut self) -> Option<v5::Packet> {
        self.next_within(Duration::from_secs(5)).await
    }

    pub async fn next_within(&mut self, limit: Duration) -> Option<v5::Packet> {
        let deadline = Instant::now() + limit;
        loop {
            match v5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the gateway: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => panic!("the gateway neither answered nor closed within {limit:?}"),
            }
        }
    }

    /// Asserts that the next packet is a DISCONNECT (nothing, not even a PUBACK, before it)
    /// and that the connection closes then; returns the DISCONNECT's reason code.
    pub async fn expect_disconnect(&mut self) -> v5::DisconnectReasonCode {
        match self.next().await {
            Some(v5::Packet::Disconnect(d)) => {
                assert_eq!(self.next().await, None, "closed after the DISCONNECT");
                d.reason_code
            }
            other => panic!("expected a DISCONNECT, got {other:?}"),
        }
    }
}
