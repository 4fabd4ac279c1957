//! A bounded map of lookups with a time-to-live, dropped by tenant when the registry changes.
//! A generation counter keeps a lookup that raced with a change from being cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A cached lookup's key: tenant, kind and auth id in one string — the tenant length-prefixed,
/// the kind (a fixed word) ended by NUL — so that a lookup can build it in a reused buffer
/// and find the entry without allocating. Every message a gateway forwards looks up its tenant
/// and device here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CacheKey(String);

impl CacheKey {
    pub(super) fn new(tenant: &str, kind: &str, auth_id: &str) -> Self {
        let mut key = String::new();
        write_key(&mut key, tenant, kind, auth_id);
        CacheKey(key)
    }

    fn tenant(&self) -> &str {
        let (len, rest) = self.0.split_once(':').unwrap_or_default();
        rest.get(..len.parse().unwrap_or(0)).unwrap_or_default()
    }
}

impl std::borrow::Borrow<str> for CacheKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

fn write_key(buf: &mut String, tenant: &str, kind: &str, auth_id: &str) {
    use std::fmt::Write;
    buf.clear();
    let _ = write!(buf, "{}:", tenant.len());
    buf.push_str(tenant);
    buf.push_str(kind);
    buf.push('\0');
    buf.push_str(auth_id);
}

thread_local! {
    /// The buffer lookups build their key in.
    static LOOKUP_KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

pub(super) struct Cache<V> {
    map: Mutex<HashMap<CacheKey, (Instant, Arc<V>)>>,
    ttl: Duration,
    capacity: usize,
    generation: AtomicU64,
    /// Entries are only served while change notifications are known to arrive.
    active: AtomicBool,
}

impl<V> Cache<V> {
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        Cache {
            map: Mutex::new(HashMap::new()),
            ttl,
            capacity,
            generation: AtomicU64::new(0),
            active: AtomicBool::new(false),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<CacheKey, (Instant, Arc<V>)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(super) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub(super) fn get(&self, tenant: &str, kind: &str, auth_id: &str) -> Option<Arc<V>> {
        if !self.is_active() {
            return None;
        }
        LOOKUP_KEY.with_borrow_mut(|key| {
            write_key(key, tenant, kind, auth_id);
            let map = self.map();
            let (at, v) = map.get(key.as_str())?;
            (at.elapsed() < self.ttl).then(|| v.clone())
        })
    }

    /// Stores `value` unless the registry changed since `generation` was read.
    pub(super) fn insert(&self, key: CacheKey, value: Arc<V>, generation: u64) {
        if !self.is_active() || self.capacity == 0 {
            return;
        }
        let mut map = self.map();
        if self.generation() != generation {
            return;
        }
        if map.len() >= self.capacity {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            if map.len() >= self.capacity
                && let Some(k) = map.keys().next().cloned()
            {
                map.remove(&k);
            }
        }
        map.insert(key, (Instant::now(), value));
    }
}

/// The operations change notifications apply to every cache, whatever it holds.
pub(super) trait CacheControl {
    fn invalidate_tenant(&self, tenant: &str);
    fn clear(&self);
    fn activate(&self);
    fn deactivate(&self);
}

impl<V> CacheControl for Cache<V> {
    fn invalidate_tenant(&self, tenant: &str) {
        let mut map = self.map();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.retain(|k, _| k.tenant() != tenant);
    }

    fn clear(&self) {
        let mut map = self.map();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.clear();
    }

    fn activate(&self) {
        self.clear();
        self.active.store(true, Ordering::Release);
    }

    fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(t: &str, a: &str) -> CacheKey {
        CacheKey::new(t, "psk", a)
    }

    #[test]
    fn serves_only_while_active_and_fresh() {
        let c = Cache::new(Duration::from_secs(60), 10);
        c.insert(k("t", "a"), Arc::new(1), c.generation());
        assert!(
            c.get("t", "psk", "a").is_none(),
            "inactive cache stores nothing"
        );
        c.activate();
        c.insert(k("t", "a"), Arc::new(1), c.generation());
        assert_eq!(c.get("t", "psk", "a").as_deref(), Some(&1));
        let expired = Cache::new(Duration::ZERO, 10);
        expired.activate();
        expired.insert(k("t", "a"), Arc::new(1), expired.generation());
        assert!(expired.get("t", "psk", "a").is_none());
    }

    #[test]
    fn invalidation_is_per_tenant_and_beats_racing_lookups() {
        let c = Cache::new(Duration::from_secs(60), 10);
        c.activate();
        c.insert(k("t1", "a"), Arc::new(1), c.generation());
        c.insert(k("t2", "a"), Arc::new(2), c.generation());
        let before = c.generation();
        c.invalidate_tenant("t1");
        assert!(c.get("t1", "psk", "a").is_none());
        assert_eq!(c.get("t2", "psk", "a").as_deref(), Some(&2));
        c.insert(k("t1", "b"), Arc::new(3), before);
        assert!(
            c.get("t1", "psk", "b").is_none(),
            "a lookup older than the change is dropped"
        );
    }

    #[test]
    fn keys_keep_their_tenant_apart_from_the_rest() {
        assert_eq!(CacheKey::new("t1", "device", "d").tenant(), "t1");
        assert_eq!(CacheKey::new("t:1", "psk", "a:b").tenant(), "t:1");
        assert_ne!(
            CacheKey::new("ab", "device", "c"),
            CacheKey::new("a", "device", "bc")
        );
    }

    #[test]
    fn stays_bounded() {
        let c = Cache::new(Duration::from_secs(60), 3);
        c.activate();
        for i in 0..10 {
            c.insert(k("t", &i.to_string()), Arc::new(i), c.generation());
        }
        assert!(c.map().len() <= 3);
    }
}
