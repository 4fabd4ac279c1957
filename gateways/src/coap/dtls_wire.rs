//! The few DTLS 1.2 handshake bytes the CoAP adapter reads itself (RFC 6347, RFC 5246, RFC
//! 4279), before any per-peer state exists: pure functions over datagrams.
//!
//! - A ClientHello is answered with a HelloVerifyRequest carrying a cookie that is an HMAC of
//!   the sender's address and the hello's parameters (§4.2.1): a spoofed sender never sees it,
//!   so only a sender that can receive at its address gets a session.
//! - The PSK identity of a ClientKeyExchange is read so that its key can be fetched from the
//!   registry before the TLS library asks for it.

use std::net::SocketAddr;

const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const HELLO_VERIFY_REQUEST: u8 = 3;
const CLIENT_KEY_EXCHANGE: u8 = 16;
/// DTLS 1.0, the version a HelloVerifyRequest carries whatever is negotiated (§4.2.1).
const DTLS_1_0: [u8; 2] = [0xfe, 0xff];
/// The cookie length: GnuTLS clients take at most 32 bytes.
pub const COOKIE_LEN: usize = 32;

/// A ClientHello in the first record of a datagram, unfragmented, at epoch 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The record's sequence number (the HelloVerifyRequest repeats it).
    pub record_seq: [u8; 6],
    pub message_seq: u16,
    pub client_version: [u8; 2],
    /// The body before the cookie: version, random and session id.
    before_cookie: &'a [u8],
    pub cookie: &'a [u8],
    /// The body after the cookie: cipher suites, compression methods, extensions.
    after_cookie: &'a [u8],
}

/// Reads the ClientHello that starts `datagram`, if it does.
pub fn client_hello(datagram: &[u8]) -> Option<ClientHello<'_>> {
    let header = datagram.get(..RECORD_HEADER)?;
    if header[0] != HANDSHAKE || header[3..5] != [0, 0] {
        return None;
    }
    let record_len = usize::from(u16::from_be_bytes([header[11], header[12]]));
    let record = datagram.get(RECORD_HEADER..RECORD_HEADER + record_len)?;
    let hs = record.get(..HANDSHAKE_HEADER)?;
    let length = u24(&hs[1..4]);
    let (offset, fragment) = (u24(&hs[6..9]), u24(&hs[9..12]));
    if hs[0] != CLIENT_HELLO || offset != 0 || fragment != length {
        return None;
    }
    let body = record.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + length)?;
    // version (2), random (32), session id (1 + n), cookie (1 + n)
    let session_len = usize::from(*body.get(34)?);
    let cookie_at = 35 + session_len;
    let cookie_len = usize::from(*body.get(cookie_at)?);
    let cookie = body.get(cookie_at + 1..cookie_at + 1 + cookie_len)?;
    let after_cookie = &body[cookie_at + 1 + cookie_len..];
    // Cipher suites and compression methods must follow.
    if after_cookie.len() < 4 {
        return None;
    }
    Some(ClientHello {
        record_seq: header[5..11].try_into().ok()?,
        message_seq: u16::from_be_bytes([hs[4], hs[5]]),
        client_version: [body[0], body[1]],
        before_cookie: &body[..cookie_at],
        cookie,
        after_cookie,
    })
}

impl ClientHello<'_> {
    /// What the cookie vouches for: the sender's address and the hello's parameters, which
    /// stay the same when the client sends the hello again with the cookie.
    pub fn cookie_input(&self, peer: SocketAddr) -> Vec<u8> {
        let mut input = Vec::with_capacity(64 + self.before_cookie.len() + self.after_cookie.len());
        match peer.ip() {
            std::net::IpAddr::V4(ip) => input.extend_from_slice(&ip.octets()),
            std::net::IpAddr::V6(ip) => input.extend_from_slice(&ip.octets()),
        }
        input.extend_from_slice(&peer.port().to_be_bytes());
        input.extend_from_slice(self.before_cookie);
        input.extend_from_slice(self.after_cookie);
        input
    }

    /// The same hello as the client's first one: message sequence 0 and no cookie.
    ///
    /// Its record sequence number is the one before this hello's: a TLS library drops a
    /// record whose number it has seen, as a replay.
    pub fn without_cookie(&self) -> Vec<u8> {
        let mut seq = [0u8; 8];
        seq[2..].copy_from_slice(&self.record_seq);
        let before = u64::from_be_bytes(seq).saturating_sub(1).to_be_bytes();
        let mut record_seq = [0u8; 6];
        record_seq.copy_from_slice(&before[2..]);
        self.encode(record_seq, 0, &[])
    }

    fn encode(&self, record_seq: [u8; 6], message_seq: u16, cookie: &[u8]) -> Vec<u8> {
        let body_len = self.before_cookie.len() + 1 + cookie.len() + self.after_cookie.len();
        let mut out = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
        record_header(
            &mut out,
            self.client_version,
            record_seq,
            HANDSHAKE_HEADER + body_len,
        );
        handshake_header(&mut out, CLIENT_HELLO, body_len, message_seq);
        out.extend_from_slice(self.before_cookie);
        out.push(cookie.len() as u8);
        out.extend_from_slice(cookie);
        out.extend_from_slice(self.after_cookie);
        out
    }
}

/// The HelloVerifyRequest answering `hello` with `cookie` (§4.2.1).
pub fn hello_verify_request(hello: &ClientHello<'_>, cookie: &[u8]) -> Vec<u8> {
    let body_len = 2 + 1 + cookie.len();
    let mut out = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
    record_header(
        &mut out,
        DTLS_1_0,
        hello.record_seq,
        HANDSHAKE_HEADER + body_len,
    );
    handshake_header(&mut out, HELLO_VERIFY_REQUEST, body_len, 0);
    out.extend_from_slice(&DTLS_1_0);
    out.push(cookie.len() as u8);
    out.extend_from_slice(cookie);
    out
}

/// The PSK identity of a plaintext ClientKeyExchange in any record of `datagram` (RFC 4279
/// §2: a 2-byte length and the identity).
pub fn psk_identity(datagram: &[u8]) -> Option<&[u8]> {
    let mut rest = datagram;
    while rest.len() >= RECORD_HEADER {
        let len = usize::from(u16::from_be_bytes([rest[11], rest[12]]));
        let record = rest.get(RECORD_HEADER..RECORD_HEADER + len)?;
        // Epoch 0: not yet encrypted.
        if rest[0] == HANDSHAKE
            && rest[3..5] == [0, 0]
            && record.first() == Some(&CLIENT_KEY_EXCHANGE)
            && record.len() >= HANDSHAKE_HEADER + 2
            && u24(&record[6..9]) == 0
        {
            let body = &record[HANDSHAKE_HEADER..];
            let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
            return body.get(2..2 + n);
        }
        rest = &rest[RECORD_HEADER + len..];
    }
    None
}

fn record_header(out: &mut Vec<u8>, version: [u8; 2], seq: [u8; 6], len: usize) {
    out.push(HANDSHAKE);
    out.extend_from_slice(&version);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&seq);
    out.extend_from_slice(&(len as u16).to_be_bytes());
}

fn handshake_header(out: &mut Vec<u8>, kind: u8, len: usize, message_seq: u16) {
    out.push(kind);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&message_seq.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DTLS 1.2 ClientHello as a client sends it first: session id empty, no cookie, two
    /// PSK suites, no compression, no extensions.
    fn hello(message_seq: u16, cookie: &[u8]) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 4, 0xc0, 0xa8, 0x00, 0xa8, 1, 0]);
        let mut out = Vec::new();
        record_header(
            &mut out,
            [0xfe, 0xfd],
            [0, 0, 0, 0, 0, 5],
            HANDSHAKE_HEADER + body.len(),
        );
        handshake_header(&mut out, CLIENT_HELLO, body.len(), message_seq);
        out.extend_from_slice(&body);
        out
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40000))
    }

    #[test]
    fn a_client_hello_is_read_and_its_cookie_input_ignores_the_cookie() {
        let first = hello(0, &[]);
        let h = client_hello(&first).unwrap();
        assert_eq!((h.message_seq, h.cookie), (0, &[][..]));
        assert_eq!(h.record_seq, [0, 0, 0, 0, 0, 5]);
        let second_bytes = hello(1, &[9; 32]);
        let second = client_hello(&second_bytes).unwrap();
        assert_eq!(second.cookie, &[9; 32]);
        assert_eq!(h.cookie_input(peer()), second.cookie_input(peer()));
        let other = SocketAddr::from(([127, 0, 0, 1], 40001));
        assert_ne!(h.cookie_input(peer()), h.cookie_input(other));
        let rebuilt = second.without_cookie();
        assert_eq!(&rebuilt[5..11], &[0, 0, 0, 0, 0, 4], "the record before");
        assert_eq!(rebuilt[..5], first[..5]);
        assert_eq!(rebuilt[11..], first[11..], "the first hello, rebuilt");
    }

    #[test]
    fn the_hello_verify_request_carries_the_cookie_and_the_records_sequence() {
        let first = hello(0, &[]);
        let h = client_hello(&first).unwrap();
        let hvr = hello_verify_request(&h, &[1; COOKIE_LEN]);
        assert_eq!(&hvr[..3], &[HANDSHAKE, 0xfe, 0xff]);
        assert_eq!(&hvr[5..11], &[0, 0, 0, 0, 0, 5]);
        assert_eq!(
            usize::from(u16::from_be_bytes([hvr[11], hvr[12]])),
            hvr.len() - 13
        );
        assert_eq!(hvr[13], HELLO_VERIFY_REQUEST);
        assert_eq!(&hvr[25..27], &[0xfe, 0xff]);
        assert_eq!(usize::from(hvr[27]), COOKIE_LEN);
        assert_eq!(&hvr[28..], &[1; COOKIE_LEN]);
    }

    #[test]
    fn anything_else_is_no_client_hello() {
        let good = hello(0, &[]);
        for n in 0..good.len() {
            assert!(client_hello(&good[..n]).is_none(), "cut at {n}");
        }
        let mut encrypted = good.clone();
        encrypted[4] = 1; // epoch 1
        assert!(client_hello(&encrypted).is_none());
        let mut fragment = good.clone();
        fragment[24] = 1; // fragment length ≠ length
        assert!(client_hello(&fragment).is_none());
        assert!(client_hello(&[0x16; 200]).is_none());
    }

    #[test]
    fn the_psk_identity_is_found_in_a_flight_of_records() {
        let mut flight = Vec::new();
        let body = [&[0u8, 12][..], b"dev@tenant-1"].concat();
        record_header(
            &mut flight,
            [0xfe, 0xfd],
            [0, 0, 0, 0, 0, 2],
            HANDSHAKE_HEADER + body.len(),
        );
        handshake_header(&mut flight, CLIENT_KEY_EXCHANGE, body.len(), 2);
        flight.extend_from_slice(&body);
        // A ChangeCipherSpec after it.
        flight.extend_from_slice(&[20, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 3, 0, 1, 1]);
        assert_eq!(psk_identity(&flight), Some(&b"dev@tenant-1"[..]));
        assert_eq!(psk_identity(&hello(0, &[])), None);
        assert_eq!(psk_identity(&flight[..20]), None);
    }
}
