//! Block-wise uploads (RFC 7959 Block1, atomic): a payload larger than one datagram arrives in
//! numbered blocks, each acknowledged with 2.31 Continue, and is handled as one request once
//! the last block is there. Bounded: a body never grows past `max_payload_size`, and only the
//! newest `capacity` bodies are kept, each for the exchange lifetime.

use super::exchanges::Endpoint;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
        for b in [
            block(0, true),
            Block {
                num: 1000,
                more: false,
                szx: 6,
            },
        ] {
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
}
