//! CoAP over DTLS 1.2 with pre-shared keys (Hono's CoAP adapter guide): the PSK identity is `authId@tenant`
//! and the key the device's `psk` credentials. Why OpenSSL, and how: docs/coap-dtls.md.
//!
//! One UDP socket; datagrams go to a session per sender, in a bounded map. No session exists
//! before the sender proved it receives at its address: a ClientHello without our cookie is
//! answered with a HelloVerifyRequest built here, statelessly (an HMAC of the address and the
//! hello, `dtls_wire`). With a valid cookie, a session task drives OpenSSL over in-memory
//! datagram queues, and the CoAP messages it decrypts go to the same [`Server`] as plain
//! CoAP, as from the authenticated device. The key callback of OpenSSL is synchronous: the
//! session asks the registry for the identity's key (cached) before it hands OpenSSL the
//! ClientKeyExchange that names it.

use super::{ADAPTER, CoapConfig, Peer, Server, dtls_wire};
use crate::metrics;
use crate::pipeline::{IngestPipeline, Origin};
use aws_lc_rs::hmac;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions,
    SslStream, SslVerifyMode, SslVersion,
};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// PSK cipher suites libcoap's OpenSSL and GnuTLS clients offer (CCM_8 is CoAP's mandatory
/// one, RFC 7252 §9.1.3.1).
const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256:PSK-AES128-CCM:PSK-AES128-CBC-SHA256";
/// With a server certificate: ECDHE with ECDSA (CoAP's certificate suite is
/// ECDHE-ECDSA-AES128-CCM8, RFC 7252 §9.1.3.3) or RSA keys.
const CERTIFICATE_CIPHERS: &str = "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:\
                                   ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256";
/// Datagrams waiting for one session.
const SESSION_QUEUE: usize = 32;
/// How often a handshake in progress lets OpenSSL retransmit its last flight.
const HANDSHAKE_TICK: Duration = Duration::from_millis(500);

/// The sessions by peer address: an id (so a replaced session does not remove its successor)
/// and where its datagrams go.
type Sessions = Arc<Mutex<HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)>>>;

/// Serves CoAP over DTLS on `socket` until `shutdown` turns true.
pub async fn serve(
    socket: UdpSocket,
    pipeline: IngestPipeline,
    hub: Option<crate::commands::CommandHub>,
    cfg: CoapConfig,
    tls: crate::tls::TlsConfig,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tracing::info!(
        addr = %socket.local_addr()?,
        certificates = tls.enabled(),
        "CoAP adapter (DTLS) listening"
    );
    let server = Server::new(pipeline.clone(), hub, cfg.clone());
    let ctx = Arc::new(context(pipeline.clone(), &tls)?);
    let socket = Arc::new(socket);
    let mut secret = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| anyhow::anyhow!("no random numbers"))?;
    let cookies = hmac::Key::new(hmac::HMAC_SHA256, &secret);
    let sessions: Sessions = Arc::default();
    // Sessions of this listener, by its address (a process may serve several).
    let sessions_gauge = metrics::coap_dtls_sessions(&socket.local_addr()?.to_string());
    let handshaking = Arc::new(AtomicUsize::new(0));
    let mut next_id: u64 = 0;
    let mut buf = vec![0u8; super::MAX_DATAGRAM];
    while let Some((n, addr)) = super::receive(&socket, &mut buf, &server, &mut shutdown).await {
        let datagram = &buf[..n];
        let Some(hello) = dtls_wire::client_hello(datagram) else {
            // Anything but a ClientHello belongs to a session.
            let known = sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&addr)
                .map(|(_, tx)| tx.clone());
            match known {
                // A session that cannot keep up loses the datagram; DTLS and CoAP retransmit.
                Some(session) => drop(session.try_send(datagram.to_vec())),
                None => metrics::rejected(ADAPTER.name(), "dtls-no-session"),
            }
            continue;
        };
        let tag = hmac::sign(&cookies, &hello.cookie_input(addr));
        let cookie = &tag.as_ref()[..dtls_wire::COOKIE_LEN];
        if aws_lc_rs::constant_time::verify_slices_are_equal(hello.cookie, cookie).is_err() {
            let _ = socket.try_send_to(&dtls_wire::hello_verify_request(&hello, cookie), addr);
            continue;
        }
        // A hello with a valid cookie starts a session, replacing any of the same address: a
        // device that restarted from the same port begins anew (RFC 6347 §4.2.8), and the old
        // session ends as its queue closes.
        // Shutting down: the sessions there are finish their exchanges, no new one starts.
        if server.exchanges_running.is_closed() {
            metrics::rejected(ADAPTER.name(), "shutting-down");
            continue;
        }
        if handshaking.load(Ordering::Relaxed) >= cfg.max_dtls_handshakes {
            metrics::rejected(ADAPTER.name(), "dtls-handshakes-exceeded");
            continue;
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        next_id += 1;
        let id = next_id;
        {
            let mut map = sessions.lock().unwrap_or_else(|p| p.into_inner());
            if !map.contains_key(&addr) && map.len() >= cfg.max_dtls_sessions {
                drop(map);
                metrics::rejected(ADAPTER.name(), "dtls-sessions-exceeded");
                continue;
            }
            map.insert(addr, (id, tx));
            sessions_gauge.set(i64::try_from(map.len()).unwrap_or(i64::MAX));
        }
        let session = Session {
            addr,
            socket: socket.clone(),
            server: server.clone(),
            pipeline: pipeline.clone(),
            idle: Duration::from_secs(cfg.dtls_idle_timeout_secs),
            handshake_timeout: Duration::from_secs(cfg.dtls_handshake_timeout_secs),
            handshaking: handshaking.clone(),
        };
        let first = datagram.to_vec();
        let synthetic = hello.without_cookie();
        let cookie = cookie.to_vec();
        let (ctx, sessions, gauge) = (ctx.clone(), sessions.clone(), sessions_gauge.clone());
        tokio::spawn(async move {
            session.run(&ctx, cookie, synthetic, first, rx).await;
            let mut map = sessions.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&addr).is_some_and(|(current, _)| *current == id) {
                map.remove(&addr);
            }
            gauge.set(i64::try_from(map.len()).unwrap_or(i64::MAX));
        });
    }
    // Shutting down: every session's queue closes, so each ends (with a close_notify).
    sessions.lock().unwrap_or_else(|p| p.into_inner()).clear();
    Ok(())
}

/// What a session fetched for the PSK identity its client named: the identity, the device and
/// the key. OpenSSL's callback takes the key from here, so a handshake does not depend on the
/// registry cache holding it. Shared: the session fills it while OpenSSL holds the `Ssl`.
type Prefetched = Arc<Mutex<Option<(String, ferrule_registry::AuthenticatedDevice, Vec<u8>)>>>;

fn prefetched_index() -> openssl::ex_data::Index<Ssl, Prefetched> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, Prefetched>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an OpenSSL ex_data index"))
}

fn prefetched_key(ssl: &openssl::ssl::SslRef, identity: &str) -> Option<Vec<u8>> {
    let cell = ssl.ex_data(prefetched_index())?;
    let held = cell.lock().unwrap_or_else(|p| p.into_inner());
    held.as_ref()
        .filter(|(id, _, _)| id == identity)
        .map(|(_, _, key)| key.clone())
}

/// The index under which a session's `Ssl` keeps the cookie its peer proved.
fn cookie_index() -> openssl::ex_data::Index<Ssl, Vec<u8>> {
    static INDEX: OnceLock<openssl::ex_data::Index<Ssl, Vec<u8>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an OpenSSL ex_data index"))
}

/// The DTLS context: PSK always; with `gateway.tls` configured also X.509 (as Hono's CoAP adapter:
/// ECDHE-ECDSA, the server certificate of `gateway.tls`), where a client certificate is asked
/// for and any is taken by OpenSSL: whether it is trusted is the pipeline's decision once the
/// handshake is done, as for HTTPS and MQTTS.
fn context(pipeline: IngestPipeline, tls: &crate::tls::TlsConfig) -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    if tls.enabled() {
        b.set_certificate_chain_file(&tls.cert_file)?;
        b.set_private_key_file(&tls.key_file, SslFiletype::PEM)?;
        b.check_private_key()?;
        b.set_cipher_list(&format!("{CIPHERS}:{CERTIFICATE_CIPHERS}"))?;
        b.set_verify_callback(SslVerifyMode::PEER, |_, _| true);
    } else {
        b.set_cipher_list(CIPHERS)?;
    }
    b.set_options(SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU);
    // An idle session gives its record buffers back.
    b.set_mode(SslMode::RELEASE_BUFFERS);
    // The cookie was checked before the session existed: OpenSSL hands out and accepts
    // exactly that one.
    b.set_cookie_generate_cb(|ssl, out| {
        let cookie = ssl
            .ex_data(cookie_index())
            .ok_or_else(openssl::error::ErrorStack::get)?;
        let n = cookie.len().min(out.len());
        out[..n].copy_from_slice(&cookie[..n]);
        Ok(n)
    });
    b.set_cookie_verify_cb(|ssl, cookie| {
        ssl.ex_data(cookie_index())
            .is_some_and(|c| c.as_slice() == cookie)
    });
    // 0: an unknown identity or no usable key, and OpenSSL refuses the handshake.
    b.set_psk_server_callback(move |ssl, identity, out| {
        let Some(identity) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
            return Ok(0);
        };
        let key = prefetched_key(ssl, identity).or_else(|| match pipeline.cached_psk(identity) {
            Some(Ok((_, key))) => Some(key),
            _ => None,
        });
        match key {
            Some(key) if key.len() <= out.len() => {
                out[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            }
            _ => Ok(0),
        }
    });
    Ok(b.build())
}

/// A DTLS session's datagrams as OpenSSL reads and writes them: one `read` is one datagram
/// (`WouldBlock` when none is there), one `write` one datagram to send. The load generator's
/// DTLS devices use it too.
#[derive(Default)]
pub struct Datagrams {
    pub inbox: VecDeque<Vec<u8>>,
    pub outbox: Vec<Vec<u8>>,
}

impl Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inbox.pop_front() {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.outbox.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Session {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    server: Arc<Server>,
    pipeline: IngestPipeline,
    idle: Duration,
    handshake_timeout: Duration,
    /// Handshakes in progress on this listener (bounded by `max_dtls_handshakes`).
    handshaking: Arc<AtomicUsize>,
}

impl Session {
    async fn run(
        &self,
        ctx: &SslContext,
        cookie: Vec<u8>,
        synthetic: Vec<u8>,
        first: Vec<u8>,
        mut inbound: mpsc::Receiver<Vec<u8>>,
    ) {
        let prefetched = Prefetched::default();
        let Some(mut stream) = self.open(ctx, cookie, synthetic, first, prefetched.clone()) else {
            return;
        };
        self.handshaking.fetch_add(1, Ordering::Relaxed);
        let since = std::time::SystemTime::now();
        let done = self.handshake(&mut stream, &mut inbound, &prefetched).await;
        self.handshaking.fetch_sub(1, Ordering::Relaxed);
        if !done {
            return;
        }
        let Some(device) = self.device(&stream, &prefetched, since).await else {
            let _ = stream.shutdown();
            self.flush(&mut stream);
            return;
        };
        let cipher = cipher_suite(&stream);
        metrics::connection_attempt(ADAPTER.name(), &device.tenant_id, "succeeded", &cipher);
        let _gauge = metrics::ConnectionGuard::new(ADAPTER.name(), &device.tenant_id);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(SESSION_QUEUE);
        let peer = Peer::dtls(self.addr, out_tx, Origin::Device(Arc::new(device)));
        let mut deadline = Instant::now() + self.idle;
        loop {
            tokio::select! {
                d = inbound.recv() => {
                    let Some(d) = d else { break };
                    deadline = Instant::now() + self.idle;
                    // Plaintext is never longer than its record: no buffer is kept between
                    // datagrams, so an idle session holds none.
                    let mut buf = vec![0u8; d.len()];
                    stream.get_mut().inbox.push_back(d);
                    let mut closed = false;
                    loop {
                        match stream.ssl_read(&mut buf) {
                            Ok(n) if n > 0 => self.server.clone().datagram(&buf[..n], peer.clone()),
                            Ok(_) => break,
                            Err(e) if e.code() == ErrorCode::WANT_READ => break,
                            Err(_) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    self.flush(&mut stream);
                    if closed {
                        return;
                    }
                }
                Some(plain) = out_rx.recv() => {
                    let _ = stream.ssl_write(&plain);
                    self.flush(&mut stream);
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let _ = stream.shutdown();
        self.flush(&mut stream);
    }

    /// The device a finished handshake authenticated: by its client certificate, checked by
    /// the pipeline against the tenants' trust anchors, else by its PSK identity.
    /// The device is then authorised to hold a connection (tenant and adapter enabled,
    /// device enabled), as an MQTT connection is.
    async fn device(
        &self,
        stream: &SslStream<Datagrams>,
        prefetched: &Prefetched,
        since: std::time::SystemTime,
    ) -> Option<ferrule_registry::AuthenticatedDevice> {
        let device = if let Some(cert) = stream.ssl().peer_certificate() {
            let der = cert.to_der().ok()?;
            self.pipeline.authenticate_certificate(&der).await
        } else {
            let identity = stream
                .ssl()
                .psk_identity()
                .and_then(|i| std::str::from_utf8(i).ok())?;
            let held = prefetched.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match held {
                Some((id, device, _)) if id == identity => Ok(device),
                _ => self.pipeline.psk(identity).await.map(|(d, _)| d),
            }
        };
        let checked = self
            .pipeline
            .admit_connection(ADAPTER, "DTLS handshake", since, device)
            .await;
        match checked {
            Ok(device) => Some(device),
            Err(e) => {
                tracing::debug!(peer = %self.addr, error = %e, "DTLS session refused");
                metrics::rejected(ADAPTER.name(), e.label());
                let tenant = device_tenant(stream);
                let (attempt, cipher) = (e.codes().attempt, cipher_suite(stream));
                metrics::connection_attempt(ADAPTER.name(), &tenant, attempt, &cipher);
                None
            }
        }
    }

    /// An OpenSSL session that has seen the peer's first ClientHello (rebuilt without
    /// cookie) and thrown away its own HelloVerifyRequest: ours went out already, and the
    /// hello with the cookie comes next, as OpenSSL then expects.
    fn open(
        &self,
        ctx: &SslContext,
        cookie: Vec<u8>,
        synthetic: Vec<u8>,
        first: Vec<u8>,
        prefetched: Prefetched,
    ) -> Option<SslStream<Datagrams>> {
        let mut ssl = Ssl::new(ctx).ok()?;
        ssl.set_ex_data(cookie_index(), cookie);
        ssl.set_ex_data(prefetched_index(), prefetched);
        ssl.set_mtu(1280).ok()?;
        ssl.set_accept_state();
        let mut stream = SslStream::new(ssl, Datagrams::default()).ok()?;
        stream.get_mut().inbox.push_back(synthetic);
        let _ = stream.do_handshake();
        stream.get_mut().outbox.clear();
        stream.get_mut().inbox.push_back(first);
        Some(stream)
    }

    /// Drives the handshake to its end; whether it succeeded.
    async fn handshake(
        &self,
        stream: &mut SslStream<Datagrams>,
        inbound: &mut mpsc::Receiver<Vec<u8>>,
        prefetched: &Prefetched,
    ) -> bool {
        let deadline = Instant::now() + self.handshake_timeout;
        loop {
            match stream.do_handshake() {
                Ok(()) => {
                    self.flush(stream);
                    return true;
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => self.flush(stream),
                Err(e) => {
                    self.flush(stream);
                    tracing::debug!(peer = %self.addr, error = %e, "DTLS handshake failed");
                    metrics::rejected(ADAPTER.name(), "dtls-handshake-failed");
                    return false;
                }
            }
            let wake = deadline.min(Instant::now() + HANDSHAKE_TICK);
            match tokio::time::timeout_at(wake, inbound.recv()).await {
                Ok(Some(d)) => {
                    // OpenSSL's key callback cannot wait: the key is fetched now, once per
                    // handshake, and kept with the session.
                    if let Some(identity) =
                        dtls_wire::psk_identity(&d).and_then(|i| std::str::from_utf8(i).ok())
                        && prefetched
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .is_none()
                        && let Ok((device, key)) = self.pipeline.psk(identity).await
                    {
                        *prefetched.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((identity.to_owned(), device, key));
                    }
                    stream.get_mut().inbox.push_back(d);
                }
                Ok(None) => return false,
                Err(_) if Instant::now() >= deadline => {
                    metrics::rejected(ADAPTER.name(), "dtls-handshake-timeout");
                    return false;
                }
                // Time for OpenSSL to retransmit its last flight.
                Err(_) => {}
            }
        }
    }

    fn flush(&self, stream: &mut SslStream<Datagrams>) {
        for d in stream.get_mut().outbox.drain(..) {
            let _ = self.socket.try_send_to(&d, self.addr);
        }
    }
}

/// The tenant a session's PSK identity names (`authId@tenant`), for the metrics of a refusal.
/// The session's cipher suite by its IANA name (OpenSSL's "standard name").
fn cipher_suite(stream: &SslStream<Datagrams>) -> String {
    stream
        .ssl()
        .current_cipher()
        .and_then(|c| c.standard_name())
        .unwrap_or(metrics::NO_CIPHER_SUITE)
        .to_owned()
}

fn device_tenant(stream: &SslStream<Datagrams>) -> String {
    stream
        .ssl()
        .psk_identity()
        .and_then(|i| std::str::from_utf8(i).ok())
        .and_then(|i| ferrule_registry::auth::split_username(i).ok())
        .map(|(_, t)| t.to_owned())
        .unwrap_or_default()
}
