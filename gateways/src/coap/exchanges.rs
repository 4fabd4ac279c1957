//! Deduplication of CoAP requests (RFC 7252 §4.5): a request is known by its sender and
//! message id for EXCHANGE_LIFETIME. A retransmission of one still being handled is dropped
//! (the client sends it again); one already answered gets the same response again and is
//! never a second record. Bounded: past `capacity` exchanges, the oldest are forgotten.

use bytes::Bytes;
use lru::LruCache;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Who sent a message: its address and, over DTLS, its session (0 over plain UDP). RFC 7252
/// (§4.5, §9.1) ties a message id to its endpoint, which over DTLS is the security association:
/// a new session from an address an earlier one used starts afresh and is never answered from
/// the earlier session's exchanges.
pub type Endpoint = (SocketAddr, u64);

pub type Key = (Endpoint, u16);

enum State {
    InProgress,
    Answered(Bytes),
}

/// What is known of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not seen within the exchange lifetime: handle it.
    New,
    /// Being handled.
    InProgress,
    /// Answered with these bytes.
    Answered(Bytes),
}

pub struct Exchanges {
    lifetime: Duration,
    recent: Mutex<LruCache<Key, (Instant, State)>>,
}

impl Exchanges {
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        Exchanges {
            lifetime,
            recent: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, LruCache<Key, (Instant, State)>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `key` up and, if it is new, marks it as being handled.
    pub fn begin(&self, key: Key) -> Seen {
        let now = Instant::now();
        let mut recent = self.recent();
        if let Some((since, state)) = recent.get(&key)
            && now.duration_since(*since) < self.lifetime
        {
            return match state {
                State::InProgress => Seen::InProgress,
                State::Answered(bytes) => Seen::Answered(bytes.clone()),
            };
        }
        recent.put(key, (now, State::InProgress));
        Seen::New
    }

    /// Keeps the response to `key` for its retransmissions.
    pub fn answered(&self, key: Key, response: Bytes) {
        let mut recent = self.recent();
        let since = recent.peek(&key).map_or_else(Instant::now, |(s, _)| *s);
        recent.put(key, (since, State::Answered(response)));
    }

    /// Forgets `key`: its next transmission is handled as new.
    pub fn forget(&self, key: Key) {
        self.recent().pop(&key);
    }

    pub fn len(&self) -> usize {
        self.recent().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, id: u16) -> Key {
        ((SocketAddr::from(([127, 0, 0, 1], port)), 0), id)
    }

    #[test]
    fn a_retransmission_gets_the_first_answer_and_is_not_handled_again() {
        let x = Exchanges::new(10, Duration::from_secs(247));
        assert_eq!(x.begin(key(1, 7)), Seen::New);
        assert_eq!(x.begin(key(1, 7)), Seen::InProgress);
        x.answered(key(1, 7), Bytes::from_static(b"ack"));
        assert_eq!(
            x.begin(key(1, 7)),
            Seen::Answered(Bytes::from_static(b"ack"))
        );
        // Another sender may use the same message id.
        assert_eq!(x.begin(key(2, 7)), Seen::New);
    }

    #[test]
    fn exchanges_expire_and_stay_bounded() {
        let x = Exchanges::new(2, Duration::ZERO);
        assert_eq!(x.begin(key(1, 1)), Seen::New);
        assert_eq!(
            x.begin(key(1, 1)),
            Seen::New,
            "past the lifetime a message id is new"
        );
        let x = Exchanges::new(2, Duration::from_secs(247));
        for id in 0..100 {
            x.begin(key(1, id));
        }
        assert_eq!(x.len(), 2);
        assert_eq!(x.begin(key(1, 99)), Seen::InProgress, "the newest are kept");
    }
}
