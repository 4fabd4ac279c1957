//! Command subscriptions as records of one compacted Kafka topic, and the table every process
//! builds from them. Pure: encoding, partitioning and the table are tested with plain values;
//! [`super::route_log`] moves the records.
//!
//! Records (key and value are JSON, so any Kafka tool can read them):
//!
//! - `["s", tenant, device, instance]` → `{"expires": <Unix ms> | null}`: `instance` holds a
//!   command subscription of `device` (a device, or a gateway for all its devices), until
//!   `expires` or until released. Released = a tombstone (no value) under the same key, so
//!   compaction keeps exactly the subscriptions that were never released.
//! - `["f", instance]` → `{}`, written to every partition: `instance` started again under the
//!   same id, and every subscription it held before this record (in this partition) is gone.
//!
//! All records of one device go to one partition ([`partition_of`]), so their offsets order
//! them: of the live subscriptions of a device, the one with the highest offset is the newest
//! and wins. Each instance writes and releases only its own keys, so no writer ever has to know
//! what another wrote, and compaction never changes what a replay of the topic yields.

use std::collections::HashMap;
use std::sync::Arc;

/// What one record of the route topic says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `instance` holds `device`'s subscription until `expires_ms` (Unix ms; `None` =
    /// until released).
    Subscribed {
        tenant: String,
        device: String,
        instance: String,
        expires_ms: Option<i64>,
    },
    /// `instance` released `device`'s subscription.
    Released {
        tenant: String,
        device: String,
        instance: String,
    },
    /// `instance` forgot everything it held before.
    Forgotten { instance: String },
    /// A forget record's tombstone: the instance itself is gone for good; nothing to do.
    Cleared,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("route record key is not a known JSON array")]
    Key,
    #[error("route record value is not the JSON its key calls for")]
    Value,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SubscribedValue {
    expires: Option<i64>,
}

/// The key of `device`'s subscription on `instance`.
pub fn subscription_key(tenant: &str, device: &str, instance: &str) -> Vec<u8> {
    serde_json::to_vec(&("s", tenant, device, instance)).expect("strings serialise")
}

/// The value of a subscription record.
pub fn subscription_value(expires_ms: Option<i64>) -> Vec<u8> {
    serde_json::to_vec(&SubscribedValue {
        expires: expires_ms,
    })
    .expect("numbers serialise")
}

/// The key of `instance`'s forget record.
pub fn forget_key(instance: &str) -> Vec<u8> {
    serde_json::to_vec(&("f", instance)).expect("strings serialise")
}

/// Reads one record; `value` is `None` for a tombstone.
pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<Record, RecordError> {
    let parts: Vec<String> = serde_json::from_slice(key).map_err(|_| RecordError::Key)?;
    match (parts.as_slice(), value) {
        ([kind, tenant, device, instance], Some(v)) if kind == "s" => {
            let v: SubscribedValue = serde_json::from_slice(v).map_err(|_| RecordError::Value)?;
            Ok(Record::Subscribed {
                tenant: tenant.clone(),
                device: device.clone(),
                instance: instance.clone(),
                expires_ms: v.expires,
            })
        }
        ([kind, tenant, device, instance], None) if kind == "s" => Ok(Record::Released {
            tenant: tenant.clone(),
            device: device.clone(),
            instance: instance.clone(),
        }),
        ([kind, instance], Some(_)) if kind == "f" => Ok(Record::Forgotten {
            instance: instance.clone(),
        }),
        ([kind, _], None) if kind == "f" => Ok(Record::Cleared),
        _ => Err(RecordError::Key),
    }
}

/// The partition of every record of `device` (FNV-1a over tenant and device), out of
/// `partitions`.
pub fn partition_of(tenant: &str, device: &str, partitions: i32) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(device.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % partitions.max(1) as u64) as i32
}

/// One subscription in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub instance: Arc<str>,
    /// Its record's offset: the newest of a device's entries has the highest.
    pub offset: i64,
    /// Its record's timestamp (Unix ms), which orders entries of different devices.
    pub at_ms: i64,
    pub expires_ms: Option<i64>,
}

impl Entry {
    fn live(&self, now_ms: i64) -> bool {
        self.expires_ms.is_none_or(|e| e > now_ms)
    }
}

#[derive(Debug, Default)]
struct DeviceRoutes {
    partition: i32,
    entries: Vec<Entry>,
}

/// Every subscription the route topic holds, as of the records applied so far.
#[derive(Debug, Default)]
pub struct Table {
    devices: HashMap<(String, String), DeviceRoutes>,
    /// Instance ids, shared by their entries.
    instances: HashMap<String, Arc<str>>,
}

impl Table {
    /// Applies the record at `offset` of `partition` (timestamp `at_ms`).
    pub fn apply(&mut self, partition: i32, offset: i64, at_ms: i64, record: Record) {
        match record {
            Record::Subscribed {
                tenant,
                device,
                instance,
                expires_ms,
            } => {
                let instance = self.intern(instance);
                let routes = self.devices.entry((tenant, device)).or_default();
                routes.partition = partition;
                routes.entries.retain(|e| e.instance != instance);
                routes.entries.push(Entry {
                    instance,
                    offset,
                    at_ms,
                    expires_ms,
                });
            }
            Record::Released {
                tenant,
                device,
                instance,
            } => {
                let key = (tenant, device);
                if let Some(routes) = self.devices.get_mut(&key) {
                    routes.entries.retain(|e| *e.instance != *instance);
                    if routes.entries.is_empty() {
                        self.devices.remove(&key);
                    }
                }
            }
            Record::Forgotten { instance } => {
                self.devices.retain(|_, routes| {
                    if routes.partition == partition {
                        routes.entries.retain(|e| *e.instance != *instance);
                    }
                    !routes.entries.is_empty()
                });
            }
            Record::Cleared => {}
        }
    }

    fn intern(&mut self, instance: String) -> Arc<str> {
        if let Some(i) = self.instances.get(&instance) {
            return i.clone();
        }
        let shared: Arc<str> = Arc::from(instance.as_str());
        self.instances.insert(instance, shared.clone());
        shared
    }

    /// The newest live subscription of `device` whose instance `alive` accepts.
    pub fn newest(
        &self,
        tenant: &str,
        device: &str,
        now_ms: i64,
        alive: &mut impl FnMut(&str) -> bool,
    ) -> Option<&Entry> {
        self.devices
            .get(&(tenant.to_owned(), device.to_owned()))?
            .entries
            .iter()
            .filter(|e| e.live(now_ms) && alive(&e.instance))
            .max_by_key(|e| e.offset)
    }

    /// Whether `instance`'s subscription of `device` is the newest live one (any instance
    /// counts as alive here: the question is whether another one replaced it).
    pub fn holds(&self, tenant: &str, device: &str, instance: &str, now_ms: i64) -> bool {
        self.newest(tenant, device, now_ms, &mut |_| true)
            .is_some_and(|e| *e.instance == *instance)
    }

    /// Every entry of `instance`, as (tenant, device).
    pub fn held_by(&self, instance: &str) -> Vec<(String, String)> {
        self.devices
            .iter()
            .filter(|(_, r)| r.entries.iter().any(|e| *e.instance == *instance))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every live entry of `tenant`, as (device, instance), by device, newest last per device.
    pub fn of_tenant(&self, tenant: &str, now_ms: i64) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for ((t, d), routes) in &self.devices {
            if t != tenant {
                continue;
            }
            let mut live: Vec<&Entry> = routes.entries.iter().filter(|e| e.live(now_ms)).collect();
            live.sort_by_key(|e| e.offset);
            out.extend(
                live.into_iter()
                    .map(|e| (d.clone(), e.instance.to_string())),
            );
        }
        // By device; a device's entries keep their order (newest last).
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Drops entries that expired and whose instance `alive` accepts; returns how many went.
    /// (A live instance releases its own in the topic; a dead one's stay until it is forgotten,
    /// so that they can be released then.)
    pub fn purge(&mut self, now_ms: i64, alive: &mut impl FnMut(&str) -> bool) -> usize {
        let mut gone = 0;
        self.devices.retain(|_, routes| {
            let before = routes.entries.len();
            routes
                .entries
                .retain(|e| e.live(now_ms) || !alive(&e.instance));
            gone += before - routes.entries.len();
            !routes.entries.is_empty()
        });
        let used: std::collections::HashSet<&str> = self
            .devices
            .values()
            .flat_map(|r| r.entries.iter().map(|e| &*e.instance))
            .collect();
        let unused: Vec<String> = self
            .instances
            .keys()
            .filter(|i| !used.contains(i.as_str()))
            .cloned()
            .collect();
        for i in unused {
            self.instances.remove(&i);
        }
        gone
    }

    /// How many devices have entries.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(d: &str, i: &str, expires_ms: Option<i64>) -> Record {
        decode(
            &subscription_key("t", d, i),
            Some(&subscription_value(expires_ms)),
        )
        .unwrap()
    }

    fn rel(d: &str, i: &str) -> Record {
        decode(&subscription_key("t", d, i), None).unwrap()
    }

    fn newest(t: &Table, d: &str) -> Option<String> {
        t.newest("t", d, 1_000, &mut |_| true)
            .map(|e| e.instance.to_string())
    }

    #[test]
    fn records_read_back_as_written() {
        assert_eq!(
            decode(br#"["s","t","d","i"]"#, Some(br#"{"expires":5}"#)),
            Ok(Record::Subscribed {
                tenant: "t".into(),
                device: "d".into(),
                instance: "i".into(),
                expires_ms: Some(5)
            })
        );
        assert_eq!(
            decode(&forget_key("i"), Some(b"{}")),
            Ok(Record::Forgotten {
                instance: "i".into()
            })
        );
        assert_eq!(decode(b"garbage", None), Err(RecordError::Key));
        assert_eq!(decode(br#"["x","i"]"#, Some(b"{}")), Err(RecordError::Key));
        assert_eq!(
            decode(br#"["s","t","d","i"]"#, Some(b"[")),
            Err(RecordError::Value)
        );
    }

    #[test]
    fn a_device_keeps_its_partition() {
        let p = partition_of("tenant", "device", 8);
        assert!((0..8).contains(&p));
        assert_eq!(p, partition_of("tenant", "device", 8));
        // Tenant and device are separated: moving a character across changes the key.
        let spread: std::collections::HashSet<i32> = (0..64)
            .map(|n| partition_of("t", &format!("d{n}"), 8))
            .collect();
        assert!(spread.len() > 4, "{spread:?}");
        assert_eq!(partition_of("t", "d", 0), 0);
    }

    #[test]
    fn the_newest_live_subscription_wins_and_each_instance_releases_its_own() {
        let mut t = Table::default();
        t.apply(0, 1, 10, sub("d", "a", None));
        t.apply(0, 2, 11, sub("d", "b", None));
        assert_eq!(newest(&t, "d").as_deref(), Some("b"));
        assert!(t.holds("t", "d", "b", 1_000));
        assert!(!t.holds("t", "d", "a", 1_000));
        // a registers again: newest again.
        t.apply(0, 3, 12, sub("d", "a", None));
        assert_eq!(newest(&t, "d").as_deref(), Some("a"));
        // b's release leaves a; a's leaves nothing.
        t.apply(0, 4, 13, rel("d", "b"));
        assert_eq!(newest(&t, "d").as_deref(), Some("a"));
        t.apply(0, 5, 14, rel("d", "a"));
        assert_eq!(newest(&t, "d"), None);
        assert!(t.is_empty());
    }

    #[test]
    fn expired_and_dead_entries_do_not_count_and_are_purged() {
        let mut t = Table::default();
        t.apply(0, 1, 10, sub("d", "a", Some(500)));
        t.apply(0, 2, 11, sub("d", "b", Some(2_000)));
        t.apply(0, 3, 11, sub("e", "b", None));
        // At 1 000 ms b is newest and live.
        assert_eq!(newest(&t, "d").as_deref(), Some("b"));
        // b dead: a expired, so nothing.
        assert!(t.newest("t", "d", 1_000, &mut |i| i != "b").is_none());
        // At 400 ms with b dead, a is still live.
        assert_eq!(
            t.newest("t", "d", 400, &mut |i| i != "b").map(|e| e.offset),
            Some(1)
        );
        // Only a's expired entry goes: b is dead, and its entries wait to be released.
        assert_eq!(t.purge(1_000, &mut |i| i != "b"), 1);
        assert_eq!(t.held_by("b").len(), 2);
        assert_eq!(
            t.purge(3_000, &mut |_| true),
            1,
            "b's expired entry, once b is alive"
        );
    }

    #[test]
    fn a_forget_record_drops_what_came_before_it_in_its_partition() {
        let mut t = Table::default();
        t.apply(0, 1, 10, sub("d", "a", None));
        t.apply(1, 1, 10, sub("e", "a", None));
        t.apply(0, 2, 11, decode(&forget_key("a"), Some(b"{}")).unwrap());
        assert_eq!(newest(&t, "d"), None);
        // Partition 1 has not seen its forget record yet.
        assert_eq!(newest(&t, "e").as_deref(), Some("a"));
        // A subscription after the forget record counts.
        t.apply(0, 3, 12, sub("d", "a", None));
        assert_eq!(newest(&t, "d").as_deref(), Some("a"));
        assert_eq!(t.held_by("a").len(), 2);
    }

    #[test]
    fn a_replay_of_the_compacted_topic_yields_the_same_table() {
        // The log as written, then as compaction leaves it (the last record per key, at its
        // offset; released keys keep only their tombstone).
        let log = [
            (1, sub("d", "a", None)),
            (2, sub("d", "b", None)),
            (3, rel("d", "b")),
            (4, sub("d", "a", Some(9_999))),
            (5, sub("e", "b", None)),
        ];
        let mut full = Table::default();
        for (o, r) in log.clone() {
            full.apply(0, o, o, r);
        }
        let mut compacted = Table::default();
        for (o, r) in [log[2].clone(), log[3].clone(), log[4].clone()] {
            compacted.apply(0, o, o, r);
        }
        for d in ["d", "e"] {
            assert_eq!(newest(&full, d), newest(&compacted, d));
        }
        assert_eq!(full.of_tenant("t", 1_000), compacted.of_tenant("t", 1_000));
    }
}
