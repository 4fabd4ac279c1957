//! Block-wise transfer (RFC 7959), both ways, bounded: only the newest `capacity` bodies are
//! kept, each for the exchange lifetime.
//!
//! - Uploads (Block1, atomic): a payload larger than one datagram arrives in numbered blocks,
//!   each acknowledged with 2.31 Continue, and is handled as one request once the last block
//!   is there. A body never grows past `max_payload_size`.
//! - Responses (Block2): a command larger than one block goes to the device in blocks. The
//!   first rides in the response to the device's request; the device asks for each further
//!   block by repeating that request with a Block2 option, and gets it from here, never
//!   handled as a new request.

use super::exchanges::Endpoint;
use bytes::Bytes;
use coap_lite::{CoapOption, Packet};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A Block1 or Block2 option value (RFC 7959 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    /// The size exponent: blocks of 2^(szx+4) bytes, 16 to 1024.
    pub szx: u8,
}

impl Block {
    /// Decodes an option value; `None` for a reserved size (SZX 7) or a value over 3 bytes.
    pub fn decode(bytes: &[u8]) -> Option<Block> {
        if bytes.len() > 3 {
            return None;
        }
        let v = bytes.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b));
        let szx = (v & 7) as u8;
        (szx < 7).then_some(Block {
            num: v >> 4,
            more: v & 8 != 0,
            szx,
        })
    }

    pub fn encode(self) -> Vec<u8> {
        let v = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx);
        super::resource::uint_option(u64::from(v))
    }

    pub fn size(self) -> usize {
        1 << (usize::from(self.szx) + 4)
    }
}

/// The largest block a response is cut into, as a size exponent: 1 024 bytes (RFC 7959 §2.2's
/// largest; with a CoAP and DTLS header it stays within an IPv6 minimum MTU of 1 280).
pub const MAX_SZX: u8 = 6;

/// A Block1 or Block2 option value [`Block::decode`] cannot read (4.02).
#[derive(Debug)]
pub struct MalformedBlock;

/// A message's Block2 option, if it has one.
pub fn block2_of(packet: &Packet) -> Result<Option<Block>, MalformedBlock> {
    match packet.get_first_option(CoapOption::Block2) {
        None => Ok(None),
        Some(v) => Block::decode(v).map(Some).ok_or(MalformedBlock),
    }
}

/// What one block brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More blocks are to come: answer 2.31 Continue with this Block1.
    Continue(Block),
    /// The last block: the whole body, and the Block1 the final response carries.
    Complete(Vec<u8>, Block),
    /// A block out of order or of a body not seen: 4.08 Request Entity Incomplete.
    Incomplete,
    /// The body would grow past the limit: 4.13.
    TooLarge,
}

/// A body being received, by sender and request URI: since when, and what came so far.
type Bodies = LruCache<(Endpoint, String), (Instant, Vec<u8>)>;

/// Bodies being received, by sender and request URI.
pub struct Assemblies {
    max_body: usize,
    lifetime: Duration,
    bodies: Mutex<Bodies>,
}

impl Assemblies {
    pub fn new(capacity: usize, max_body: usize, lifetime: Duration) -> Self {
        Assemblies {
            max_body,
            lifetime,
            bodies: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Adds `payload`, block `block` of the body `uri` of `peer` is sending.
    pub fn add(&self, peer: Endpoint, uri: &str, block: Block, payload: &[u8]) -> Step {
        let key = (peer, uri.to_owned());
        let mut bodies = self.bodies.lock().unwrap_or_else(|p| p.into_inner());
        let offset = usize::try_from(block.num)
            .unwrap_or(usize::MAX)
            .saturating_mul(block.size());
        if offset.saturating_add(payload.len()) > self.max_body {
            bodies.pop(&key);
            return Step::TooLarge;
        }
        // Every block but the last fills its size exactly (RFC 7959 §2.3).
        if block.more && payload.len() != block.size() {
            bodies.pop(&key);
            return Step::Incomplete;
        }
        let now = Instant::now();
        let mut body = match bodies.pop(&key) {
            Some((since, body)) if now.duration_since(since) < self.lifetime => body,
            _ => Vec::new(),
        };
        if body.len() != offset {
            let retransmitted = offset + payload.len() == body.len();
            match (retransmitted, block.num) {
                // The last block taken came again: take it again.
                (true, _) => body.truncate(offset),
                // A new body from the start.
                (false, 0) => body.clear(),
                (false, _) => return Step::Incomplete,
            }
        }
        body.extend_from_slice(payload);
        if block.more {
            bodies.put(key, (now, body));
            Step::Continue(block)
        } else {
            Step::Complete(body, block)
        }
    }
}

/// A response whose body goes in blocks: the response without its body (code and options),
/// the body, the block size chosen, and who is told once the last block was asked for.
struct Download {
    since: Instant,
    head: Packet,
    body: Bytes,
    szx: u8,
    fetched: Option<oneshot::Sender<()>>,
}

/// Responses being fetched block by block, by requester and request URI.
pub struct Downloads {
    lifetime: Duration,
    next_etag: AtomicU32,
    bodies: Mutex<LruCache<(Endpoint, String), Download>>,
}

/// What a request for a further block gets.
#[derive(Debug)]
pub enum Fetch {
    /// The block, as a response to the request (code, options, Block2, payload).
    Block(Packet),
    /// No response of that requester and URI is being fetched (or it expired): 4.08.
    Unknown,
    /// The block starts past the body's end: 4.02 (RFC 7959 §2.2).
    OutOfRange,
}

impl Downloads {
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        Downloads {
            lifetime,
            next_etag: AtomicU32::new(u32::from_be_bytes(
                uuid::Uuid::new_v4().as_bytes()[..4]
                    .try_into()
                    .unwrap_or_default(),
            )),
            bodies: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn bodies(&self) -> std::sync::MutexGuard<'_, LruCache<(Endpoint, String), Download>> {
        self.bodies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts `response` into blocks if its payload is larger than one block of at most
    /// 2^(`szx`+4) bytes (the device's preference, else [`MAX_SZX`]); `response` becomes the
    /// first block, carrying Block2, Size2 (the whole size) and an ETag that every block
    /// repeats. The receiver fires once the device asked for the last block; it is dropped
    /// if the device does not within the lifetime, or starts another transfer of that URI.
    /// `None`, and `response` unchanged, when it fits in one block.
    pub fn start(
        &self,
        peer: Endpoint,
        uri: &str,
        response: &mut Packet,
        szx: Option<u8>,
    ) -> Option<oneshot::Receiver<()>> {
        let szx = szx.unwrap_or(MAX_SZX).min(MAX_SZX);
        let first = Block {
            num: 0,
            more: true,
            szx,
        };
        if response.payload.len() <= first.size() {
            return None;
        }
        let body = Bytes::from(std::mem::take(&mut response.payload));
        let etag = self.next_etag.fetch_add(1, Ordering::Relaxed);
        response.add_option(CoapOption::ETag, etag.to_be_bytes().to_vec());
        let size = u64::try_from(body.len()).unwrap_or(u64::MAX);
        response.add_option(CoapOption::Size2, super::resource::uint_option(size));
        let head = response.clone();
        block_into(response, &body, first);
        let (tx, rx) = oneshot::channel();
        let download = Download {
            since: Instant::now(),
            head,
            body,
            szx,
            fetched: Some(tx),
        };
        self.bodies().put((peer, uri.to_owned()), download);
        Some(rx)
    }

    /// Forgets every response being fetched; their waiters learn the device did not get it.
    pub fn clear(&self) {
        self.bodies().clear();
    }

    /// Block `asked` of the response `peer` is fetching for `uri`: its code and options, with
    /// the message type, id and token still to be set by the caller. A block of a size smaller
    /// than the one chosen is served at the offset it names (RFC 7959 §2.4); a larger one is
    /// served at the chosen size.
    pub fn fetch(&self, peer: Endpoint, uri: &str, asked: Block) -> Fetch {
        let key = (peer, uri.to_owned());
        let mut bodies = self.bodies();
        let Some(download) = bodies.get_mut(&key) else {
            return Fetch::Unknown;
        };
        if download.since.elapsed() >= self.lifetime {
            bodies.pop(&key);
            return Fetch::Unknown;
        }
        let offset = usize::try_from(asked.num)
            .unwrap_or(usize::MAX)
            .saturating_mul(asked.size());
        if offset >= download.body.len() {
            return Fetch::OutOfRange;
        }
        let szx = asked.szx.min(download.szx);
        let size = 1usize << (usize::from(szx) + 4);
        let block = Block {
            num: u32::try_from(offset / size).unwrap_or(u32::MAX),
            more: offset + size < download.body.len(),
            szx,
        };
        let mut response = download.head.clone();
        block_into(&mut response, &download.body, block);
        if !block.more {
            // The last block: the device has the whole body. Kept for a retransmitted request
            // of a block the device did not get; the exchange cache answers those too.
            if let Some(tx) = download.fetched.take() {
                let _ = tx.send(());
            }
        }
        Fetch::Block(response)
    }
}

/// Sets `response`'s Block2 option and payload to block `block` of `body`.
fn block_into(response: &mut Packet, body: &[u8], block: Block) {
    let start = usize::try_from(block.num).unwrap_or(usize::MAX) * block.size();
    let end = (start + block.size()).min(body.len());
    response.clear_option(CoapOption::Block2);
    response.add_option(CoapOption::Block2, block.encode());
    response.payload = body[start..end].to_vec();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(num: u32, more: bool) -> Block {
        Block { num, more, szx: 0 } // 16-byte blocks
    }

    fn peer() -> Endpoint {
        (std::net::SocketAddr::from(([127, 0, 0, 1], 5000)), 0)
    }

    #[test]
    fn option_values_round_trip() {
        for b in [block(0, true), asked(1000, 6)] {
            assert_eq!(Block::decode(&b.encode()), Some(b));
        }
        assert_eq!(Block::decode(&[0x0f]), None, "SZX 7 is reserved");
        assert_eq!(Block::decode(&[]), Some(block(0, false)));
    }

    #[test]
    fn blocks_in_order_make_one_body() {
        let a = Assemblies::new(10, 100, Duration::from_secs(247));
        assert_eq!(
            a.add(peer(), "/t", block(0, true), &[1; 16]),
            Step::Continue(block(0, true))
        );
        // A retransmission of the same block changes nothing.
        assert_eq!(
            a.add(peer(), "/t", block(0, true), &[1; 16]),
            Step::Continue(block(0, true))
        );
        assert_eq!(
            a.add(peer(), "/t", block(1, true), &[2; 16]),
            Step::Continue(block(1, true))
        );
        let Step::Complete(body, last) = a.add(peer(), "/t", block(2, false), &[3; 4]) else {
            panic!("complete");
        };
        assert_eq!(body.len(), 36);
        assert_eq!(&body[16..32], &[2; 16]);
        assert_eq!(last, block(2, false));
    }

    #[test]
    fn gaps_short_blocks_and_oversized_bodies_are_refused() {
        let a = Assemblies::new(10, 40, Duration::from_secs(247));
        assert_eq!(
            a.add(peer(), "/t", block(1, true), &[0; 16]),
            Step::Incomplete
        );
        assert_eq!(
            a.add(peer(), "/t", block(0, true), &[0; 15]),
            Step::Incomplete
        );
        a.add(peer(), "/t", block(0, true), &[0; 16]);
        a.add(peer(), "/t", block(1, true), &[0; 16]);
        assert_eq!(
            a.add(peer(), "/t", block(2, false), &[0; 16]),
            Step::TooLarge
        );
        assert_eq!(
            a.add(peer(), "/t", block(900_000, true), &[0; 16]),
            Step::TooLarge,
            "no allocation for a block far out"
        );
    }

    #[test]
    fn bodies_stay_bounded() {
        let a = Assemblies::new(2, 100, Duration::from_secs(247));
        for port in 0..50u16 {
            let p = (std::net::SocketAddr::from(([127, 0, 0, 1], port)), 0);
            a.add(p, "/t", block(0, true), &[0; 16]);
        }
        assert_eq!(a.bodies.lock().unwrap().len(), 2);
    }

    /// A request's Block2: block `num` of 2^(`szx`+4) bytes.
    fn asked(num: u32, szx: u8) -> Block {
        Block {
            num,
            more: false,
            szx,
        }
    }

    fn download(payload: usize) -> Packet {
        let mut r = Packet::new();
        r.header.code = coap_lite::MessageClass::Response(coap_lite::ResponseType::Changed);
        r.add_option(CoapOption::LocationQuery, b"hono-command=x".to_vec());
        r.payload = (0..payload).map(|i| (i % 251) as u8).collect();
        r
    }

    fn block2(p: &Packet) -> Block {
        Block::decode(p.get_first_option(CoapOption::Block2).unwrap()).unwrap()
    }

    #[test]
    fn a_response_of_one_block_is_sent_as_it_is() {
        let d = Downloads::new(10, Duration::from_secs(247));
        let mut r = download(1024);
        assert!(d.start(peer(), "/t", &mut r, None).is_none());
        assert_eq!(r.payload.len(), 1024);
        assert!(r.get_first_option(CoapOption::Block2).is_none());
    }

    #[test]
    fn a_large_response_is_fetched_block_by_block() {
        let d = Downloads::new(10, Duration::from_secs(247));
        let whole = download(2500);
        let mut r = whole.clone();
        let mut fetched = d.start(peer(), "/t", &mut r, None).expect("blocks");
        assert_eq!(
            block2(&r),
            Block {
                num: 0,
                more: true,
                szx: 6
            }
        );
        assert_eq!(r.payload, whole.payload[..1024]);
        assert_eq!(
            r.get_first_option(CoapOption::Size2),
            Some(&super::super::resource::uint_option(2500))
        );
        let etag = r.get_first_option(CoapOption::ETag).cloned().expect("ETag");
        let mut body = r.payload.clone();
        for num in 1..3 {
            assert!(fetched.try_recv().is_err(), "not all fetched yet");
            let Fetch::Block(b) = d.fetch(
                peer(),
                "/t",
                Block {
                    num,
                    more: false,
                    szx: 6,
                },
            ) else {
                panic!("block {num}");
            };
            assert_eq!(
                block2(&b),
                Block {
                    num,
                    more: num < 2,
                    szx: 6
                }
            );
            assert_eq!(b.get_first_option(CoapOption::ETag), Some(&etag));
            assert_eq!(
                b.get_first_option(CoapOption::LocationQuery),
                Some(&b"hono-command=x".to_vec())
            );
            body.extend_from_slice(&b.payload);
        }
        assert_eq!(body, whole.payload);
        assert!(fetched.try_recv().is_ok(), "the last block was asked for");
        assert!(matches!(
            d.fetch(peer(), "/t", asked(3, 6)),
            Fetch::OutOfRange
        ));
        let other = (std::net::SocketAddr::from(([127, 0, 0, 1], 5000)), 9);
        assert!(
            matches!(d.fetch(other, "/t", asked(1, 6)), Fetch::Unknown),
            "another session's request is not served"
        );
    }

    #[test]
    fn the_device_chooses_smaller_blocks() {
        let d = Downloads::new(10, Duration::from_secs(247));
        let whole = download(200);
        let mut r = whole.clone();
        d.start(peer(), "/t", &mut r, Some(2))
            .expect("64-byte blocks");
        assert_eq!(
            block2(&r),
            Block {
                num: 0,
                more: true,
                szx: 2
            }
        );
        // Late: down to 32 bytes from the second 64-byte block on (offset 64 = block 2).
        let Fetch::Block(b) = d.fetch(peer(), "/t", asked(2, 1)) else {
            panic!("block");
        };
        assert_eq!(
            block2(&b),
            Block {
                num: 2,
                more: true,
                szx: 1
            }
        );
        assert_eq!(b.payload, whole.payload[64..96]);
        // A larger size than chosen is served at the chosen one.
        let Fetch::Block(b) = d.fetch(peer(), "/t", asked(1, 3)) else {
            panic!("block");
        };
        assert_eq!(
            block2(&b),
            Block {
                num: 2,
                more: true,
                szx: 2
            }
        );
        assert_eq!(b.payload, whole.payload[128..192]);
    }

    #[test]
    fn downloads_expire_and_stay_bounded() {
        let d = Downloads::new(10, Duration::ZERO);
        let mut r = download(2000);
        let mut fetched = d.start(peer(), "/t", &mut r, None).unwrap();
        assert!(matches!(d.fetch(peer(), "/t", asked(1, 6)), Fetch::Unknown));
        assert!(
            matches!(
                fetched.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            ),
            "an expired transfer tells its waiter"
        );
        let d = Downloads::new(2, Duration::from_secs(247));
        for port in 0..50u16 {
            let p = (std::net::SocketAddr::from(([127, 0, 0, 1], port)), 0);
            d.start(p, "/t", &mut download(2000), None);
        }
        assert_eq!(d.bodies().len(), 2);
    }
}
