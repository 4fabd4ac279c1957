//! A trial: webrtc-dtls 0.12 as a CoAP-over-DTLS server with pre-shared keys (every identity
//! gets the key given on the command line). Each session answers a CON request with 2.04 and
//! stays open, so handshakes per second and memory per session can be measured from outside
//! (docs/gateways.md, "Why OpenSSL").
#![forbid(unsafe_code)]
use coap_lite::{MessageClass, MessageType, Packet, ResponseType};
use std::sync::Arc;
use webrtc_dtls::cipher_suite::CipherSuiteId;
use webrtc_dtls::config::{Config, ExtendedMasterSecretType};
use webrtc_dtls::listener::listen;
use webrtc_util::conn::Listener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:5699".into());
    let key = args.get(2).cloned().unwrap_or_else(|| "loadtest-psk".into()).into_bytes();
    let cfg = Config {
        psk: Some(Arc::new(move |_identity: &[u8]| Ok(key.clone()))),
        psk_identity_hint: Some(b"ferrule-trial".to_vec()),
        cipher_suites: vec![CipherSuiteId::Tls_Psk_With_Aes_128_Ccm_8],
        extended_master_secret: ExtendedMasterSecretType::Request,
        ..Default::default()
    };
    let sock: std::net::SocketAddr = addr.parse()?;
    let listener = listen(sock, cfg).await?;
    eprintln!("listening on {addr}");
    loop {
        let (conn, _peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok(n) = conn.recv(&mut buf).await else { return };
                let Ok(req) = Packet::from_bytes(&buf[..n]) else { continue };
                let mut resp = Packet::new();
                resp.header.set_type(MessageType::Acknowledgement);
                resp.header.message_id = req.header.message_id;
                resp.header.code = MessageClass::Response(ResponseType::Changed);
                resp.set_token(req.get_token().to_vec());
                if let Ok(bytes) = resp.to_bytes() {
                    let _ = conn.send(&bytes).await;
                }
            }
        });
    }
}
