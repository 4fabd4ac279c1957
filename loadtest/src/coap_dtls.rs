//! Simulated CoAP devices over DTLS 1.2 with pre-shared keys: each opens a session from a UDP
//! socket of its own (OpenSSL as the client, over the socket), sends one CON `POST /telemetry`
//! and keeps the session, so the server's memory per session can be read; then, if asked,
//! the sessions upload telemetry (CON or NON), one request in flight each.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use ferrule_gateways::coap::dtls::Datagrams;
use futures_util::StreamExt;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslStream, SslVersion,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::UdpSocket;

/// A device's identity and key, kept on its `Ssl` for the PSK callback.
type Credentials = (String, Vec<u8>);

fn credentials_index() -> openssl::ex_data::Index<Ssl, Credentials> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, Credentials>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an OpenSSL ex_data index"))
}

fn context() -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list("PSK-AES128-CCM8")?;
    b.set_psk_client_callback(|ssl, _hint, identity, psk| {
        let (id, key) = ssl
            .ex_data(credentials_index())
            .ok_or_else(openssl::error::ErrorStack::get)?;
        // NUL-terminated identity.
        if id.len() >= identity.len() || key.len() > psk.len() {
            return Ok(0);
        }
        identity[..id.len()].copy_from_slice(id.as_bytes());
        identity[id.len()] = 0;
        psk[..key.len()].copy_from_slice(key);
        Ok(key.len())
    });
    Ok(b.build())
}

/// One open session: its socket and OpenSSL state, held until dropped.
pub struct Session {
    socket: UdpSocket,
    stream: SslStream<Datagrams>,
    /// The message id (and token) of the session's next request: the server treats a
    /// message id it saw from the same endpoint recently as a retransmission.
    next_mid: u16,
}

impl Session {
    /// Sends one CoAP message over the session.
    pub async fn send(&mut self, message: &[u8]) -> anyhow::Result<()> {
        self.stream.ssl_write(message)?;
        flush(&self.socket, &mut self.stream).await
    }

    /// The next CoAP message's bytes into `buf`, or `None` at `until`.
    pub async fn receive(
        &mut self,
        buf: &mut [u8],
        until: tokio::time::Instant,
    ) -> anyhow::Result<Option<usize>> {
        let mut datagram = vec![0u8; 2048];
        loop {
            let Ok(n) = tokio::time::timeout_at(until, self.socket.recv(&mut datagram)).await
            else {
                return Ok(None);
            };
            self.stream
                .get_mut()
                .inbox
                .push_back(datagram[..n?].to_vec());
            match self.stream.ssl_read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => anyhow::bail!("DTLS read failed: {e}"),
            }
        }
    }

    /// Sends `request` (retransmitted up to four times, 2 s apart) and returns the answer
    /// that carries its token.
    async fn exchange(&mut self, request: &Packet) -> anyhow::Result<Packet> {
        let bytes = request.to_bytes()?;
        let mut plain = vec![0u8; 2048];
        for _ in 0..5 {
            self.send(&bytes).await?;
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            while let Some(n) = self.receive(&mut plain, until).await? {
                let r = Packet::from_bytes(&plain[..n])?;
                // A late answer to an earlier request is not this one's.
                if r.get_token() == request.get_token() {
                    return Ok(r);
                }
            }
        }
        anyhow::bail!("no answer over DTLS")
    }
}

/// A `POST /telemetry` with message id and token `mid`.
fn telemetry(mid: u16, confirmable: bool, payload: Vec<u8>) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(if confirmable {
        MessageType::Confirmable
    } else {
        MessageType::NonConfirmable
    });
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    p.add_option(CoapOption::UriPath, b"telemetry".to_vec());
    // application/octet-stream
    p.add_option(CoapOption::ContentFormat, vec![42]);
    p.payload = payload;
    p
}

fn expect_changed(answer: &Packet) -> anyhow::Result<()> {
    anyhow::ensure!(
        answer.header.code == MessageClass::Response(ResponseType::Changed),
        "CoAP {}",
        answer.header.get_code()
    );
    Ok(())
}

/// Sends `requests` telemetry uploads of `size` bytes over the open `sessions`, each session
/// with one request in flight, and waits for every answer (2.04, CON or NON as asked).
pub async fn upload(
    sessions: Vec<Session>,
    requests: usize,
    confirmable: bool,
    size: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers = sessions.into_iter().map(|mut session| {
        let next = next.clone();
        tokio::spawn(async move {
            loop {
                if next.fetch_add(1, Ordering::Relaxed) >= requests {
                    return anyhow::Ok(());
                }
                let mid = session.next_mid;
                session.next_mid = mid.wrapping_add(1);
                let answer = session
                    .exchange(&telemetry(mid, confirmable, vec![b'x'; size]))
                    .await?;
                expect_changed(&answer)?;
            }
        })
    });
    for r in futures_util::future::join_all(workers).await {
        r??;
    }
    Ok(())
}

/// What opening sessions took.
pub struct Opened {
    pub sessions: Vec<Session>,
    /// Handshake and first request, for all sessions.
    pub seconds: f64,
}

/// Opens `sessions` sessions to `addr` (devices taken in turn), `concurrency` at a time; each
/// sends one CON `POST /telemetry` and waits for its 2.04.
pub async fn open_sessions(
    addr: SocketAddr,
    devices: Vec<Credentials>,
    sessions: usize,
    concurrency: usize,
) -> anyhow::Result<Opened> {
    let ctx = Arc::new(context()?);
    let devices = Arc::new(devices);
    let started = std::time::Instant::now();
    let progress = crate::progress::bar("dtls sessions", sessions as u64, "sessions");
    let results: Vec<anyhow::Result<Session>> = futures_util::stream::iter(0..sessions)
        .map(|i| {
            let (ctx, devices, progress) = (ctx.clone(), devices.clone(), progress.clone());
            async move {
                let creds = devices[i % devices.len()].clone();
                let s = open(&ctx, addr, creds, i as u16).await?;
                progress.inc(1);
                Ok(s)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    Ok(Opened {
        sessions: results.into_iter().collect::<anyhow::Result<_>>()?,
        seconds,
    })
}

async fn open(
    ctx: &SslContext,
    addr: SocketAddr,
    creds: Credentials,
    mid: u16,
) -> anyhow::Result<Session> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(addr).await?;
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_ex_data(credentials_index(), creds);
    ssl.set_mtu(1280)?;
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Datagrams::default())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 4096];
    loop {
        match stream.do_handshake() {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ => {}
            Err(e) => anyhow::bail!("DTLS handshake failed: {e}"),
        }
        flush(&socket, &mut stream).await?;
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "DTLS handshake timed out"
        );
        // A tick lets OpenSSL retransmit a lost flight.
        if let Ok(n) = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
        {
            stream.get_mut().inbox.push_back(buf[..n?].to_vec());
        }
    }
    flush(&socket, &mut stream).await?;
    let mut session = Session {
        socket,
        stream,
        next_mid: mid.wrapping_add(1),
    };
    let answer = session
        .exchange(&telemetry(mid, true, b"dtls".to_vec()))
        .await?;
    expect_changed(&answer)?;
    Ok(session)
}

async fn flush(socket: &UdpSocket, stream: &mut SslStream<Datagrams>) -> anyhow::Result<()> {
    for d in stream.get_mut().outbox.drain(..) {
        socket.send(&d).await?;
    }
    Ok(())
}
