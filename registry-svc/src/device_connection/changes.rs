//! Group commit of subscription changes. [`plan`] folds a batch of changes into at most three
//! statements with the same outcome as applying them one by one; [`run`] is the task that
//! takes whatever queued up while the previous batch was written and writes it.

use super::RoutingError;
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Changes waiting for the writer at most; callers wait for room beyond that.
const QUEUE: usize = 8192;
/// Changes written in one batch at most.
const MAX_BATCH: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Op {
    /// A command consumer, for this long or until unregistered.
    Register(Option<Duration>),
    /// The end of the consumer, if the instance still holds it.
    Unregister,
}

/// One queued change and where its answer goes: for [`Op::Unregister`] whether the instance
/// still held the entry, for [`Op::Register`] always `true`.
pub(super) struct Change {
    pub tenant: String,
    pub device: String,
    pub instance: String,
    pub op: Op,
    pub done: oneshot::Sender<Result<bool, RoutingError>>,
}

/// Starts the writer task; it ends when every sender is gone.
pub(super) fn start(pool: Pool) -> mpsc::Sender<Change> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(pool, rx));
    tx
}

async fn run(pool: Pool, mut queue: mpsc::Receiver<Change>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let plan = plan(batch.iter().map(|c| {
            (
                c.tenant.as_str(),
                c.device.as_str(),
                c.instance.as_str(),
                c.op,
            )
        }));
        let answers = match write(&pool, &plan).await {
            Ok(removed) => plan.answers(&removed).map(Ok).collect::<Vec<_>>(),
            Err(e) => {
                let e = Arc::new(e);
                (0..batch.len())
                    .map(|_| Err(RoutingError::Batch(e.clone())))
                    .collect()
            }
        };
        for (change, answer) in batch.drain(..).zip(answers) {
            let _ = change.done.send(answer);
        }
    }
}

/// Writes a plan; returns, per conditional release, whether it ended a live entry. A released
/// entry stays as a row marked `expires = '-infinity'` (never live) that the next registration
/// of the device updates in place (migration 0005 says why); `purge` drops it later.
async fn write(pool: &Pool, plan: &Plan<'_>) -> Result<Vec<bool>, RoutingError> {
    let db = pool.get().await?;
    let mut removed = vec![false; plan.release.len()];
    if !plan.release.is_empty() {
        let (t, d, i, n) = columns(&plan.release);
        let rows = db
            .query(
                &db.prepare_cached(
                    "UPDATE command_consumers c SET expires = '-infinity', registered = now()
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[]) AS u(t, d, i, n)
                  WHERE c.tenant_id = u.t AND c.device_id = u.d AND c.instance_id = u.i
                    AND c.expires IS DISTINCT FROM '-infinity'
                 RETURNING u.n",
                )
                .await?,
                &[&t, &d, &i, &n],
            )
            .await?;
        for row in rows {
            removed[row.get::<_, i32>(0) as usize] = true;
        }
    }
    if !plan.remove.is_empty() {
        let t: Vec<&str> = plan.remove.iter().map(|k| k.0).collect();
        let d: Vec<&str> = plan.remove.iter().map(|k| k.1).collect();
        db.execute(
            &db.prepare_cached(
                "UPDATE command_consumers c SET expires = '-infinity', registered = now()
               FROM unnest($1::text[], $2::text[]) AS u(t, d)
              WHERE c.tenant_id = u.t AND c.device_id = u.d
                AND c.expires IS DISTINCT FROM '-infinity'",
            )
            .await?,
            &[&t, &d],
        )
        .await?;
    }
    if !plan.upsert.is_empty() {
        let t: Vec<&str> = plan.upsert.iter().map(|u| u.0).collect();
        let d: Vec<&str> = plan.upsert.iter().map(|u| u.1).collect();
        let i: Vec<&str> = plan.upsert.iter().map(|u| u.2).collect();
        let l: Vec<Option<f64>> = plan
            .upsert
            .iter()
            .map(|u| u.3.map(|l| l.as_secs_f64()))
            .collect();
        db.execute(
            &db.prepare_cached(
                "INSERT INTO command_consumers (tenant_id, device_id, instance_id, expires)
             SELECT t, d, i, now() + make_interval(secs => l)
               FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS u(t, d, i, l)
             ON CONFLICT (tenant_id, device_id) DO UPDATE
               SET instance_id = EXCLUDED.instance_id, expires = EXCLUDED.expires,
                   registered = now()",
            )
            .await?,
            &[&t, &d, &i, &l],
        )
        .await?;
    }
    Ok(removed)
}

type Columns<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, Vec<i32>);

fn columns<'a>(keys: &[(&'a str, &'a str, &'a str)]) -> Columns<'a> {
    let mut c: Columns<'a> = Default::default();
    for (n, (t, d, i)) in keys.iter().enumerate() {
        c.0.push(t);
        c.1.push(d);
        c.2.push(i);
        c.3.push(n as i32);
    }
    c
}

/// What a batch writes, in this order: `release` (end an entry if the instance holds it: an
/// unregister before any register of the batch for that device, once per instance), `remove`
/// (end the entry whoever holds it: the batch registered and unregistered it), `upsert` (the
/// device's last change is a register). A device is in `remove` or `upsert` at most once, so
/// no statement touches a row twice.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan<'a> {
    pub release: Vec<(&'a str, &'a str, &'a str)>,
    pub remove: Vec<(&'a str, &'a str)>,
    pub upsert: Vec<(&'a str, &'a str, &'a str, Option<Duration>)>,
    /// Per change, in order.
    pub answers: Vec<Answer>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Answer {
    Known(bool),
    /// Whether the `release` with this index removed a row.
    Released(usize),
}

impl Plan<'_> {
    fn answers<'s>(&'s self, removed: &'s [bool]) -> impl Iterator<Item = bool> + 's {
        self.answers.iter().map(|a| match *a {
            Answer::Known(b) => b,
            Answer::Released(n) => removed[n],
        })
    }
}

/// A device's entry as the batch so far leaves it.
#[derive(Clone)]
enum Entry<'a> {
    /// Unregisters of these instances were written as `release`s: the entry is gone or held
    /// by another instance, which a later `release` of its own may still remove.
    Released(Vec<&'a str>),
    /// Registered by this batch.
    Held(&'a str, Option<Duration>),
    /// Registered and unregistered by this batch.
    Removed,
}

/// Folds changes `(tenant, device, instance, op)` into statements equivalent to applying them
/// in order.
pub(super) fn plan<'a>(changes: impl Iterator<Item = (&'a str, &'a str, &'a str, Op)>) -> Plan<'a> {
    let mut plan = Plan::default();
    let mut entries: HashMap<(&str, &str), Entry<'a>> = HashMap::new();
    let mut order = Vec::new();
    for (tenant, device, instance, op) in changes {
        let key = (tenant, device);
        let entry = entries.remove(&key);
        if entry.is_none() {
            order.push(key);
        }
        let (next, answer) = match (op, entry) {
            (Op::Register(lifespan), _) => (Entry::Held(instance, lifespan), Answer::Known(true)),
            // What PostgreSQL holds decides: release it if this instance holds it. After
            // another instance's release the entry may still be this one's.
            (Op::Unregister, None) => {
                plan.release.push((tenant, device, instance));
                let answer = Answer::Released(plan.release.len() - 1);
                (Entry::Released(vec![instance]), answer)
            }
            (Op::Unregister, Some(Entry::Released(mut released)))
                if !released.contains(&instance) =>
            {
                plan.release.push((tenant, device, instance));
                released.push(instance);
                let answer = Answer::Released(plan.release.len() - 1);
                (Entry::Released(released), answer)
            }
            (Op::Unregister, Some(Entry::Held(holder, _))) if holder == instance => {
                (Entry::Removed, Answer::Known(true))
            }
            (Op::Unregister, Some(kept)) => (kept, Answer::Known(false)),
        };
        entries.insert(key, next);
        plan.answers.push(answer);
    }
    for key in order {
        match &entries[&key] {
            Entry::Held(instance, lifespan) => {
                plan.upsert.push((key.0, key.1, *instance, *lifespan))
            }
            Entry::Removed => plan.remove.push(key),
            Entry::Released(_) => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Option<Duration> = Some(Duration::from_secs(5));

    fn of<'a>(changes: &[(&'a str, &'a str, Op)]) -> Plan<'a> {
        plan(changes.iter().map(|(d, i, op)| ("t", *d, *i, *op)))
    }

    #[test]
    fn distinct_devices_make_one_statement_per_kind() {
        let p = of(&[
            ("a", "gw1", Op::Register(L)),
            ("b", "gw1", Op::Unregister),
            ("c", "gw1", Op::Register(None)),
        ]);
        assert_eq!(
            p.upsert,
            vec![("t", "a", "gw1", L), ("t", "c", "gw1", None)]
        );
        assert_eq!(p.release, vec![("t", "b", "gw1")]);
        assert!(p.remove.is_empty());
        assert_eq!(
            p.answers,
            vec![
                Answer::Known(true),
                Answer::Released(0),
                Answer::Known(true)
            ]
        );
    }

    #[test]
    fn a_poll_that_ends_and_starts_again_in_one_batch_stays_registered() {
        // The end of the earlier poll is a release (did this instance hold it?); the new
        // poll's register is written after it.
        let p = of(&[("a", "gw1", Op::Unregister), ("a", "gw1", Op::Register(L))]);
        assert_eq!(p.release, vec![("t", "a", "gw1")]);
        assert_eq!(p.upsert, vec![("t", "a", "gw1", L)]);
        assert_eq!(p.answers, vec![Answer::Released(0), Answer::Known(true)]);
    }

    #[test]
    fn a_register_undone_in_the_same_batch_removes_the_entry_whoever_held_it() {
        let p = of(&[("a", "gw1", Op::Register(L)), ("a", "gw1", Op::Unregister)]);
        assert!(p.upsert.is_empty() && p.release.is_empty());
        assert_eq!(p.remove, vec![("t", "a")]);
        assert_eq!(p.answers, vec![Answer::Known(true), Answer::Known(true)]);
    }

    #[test]
    fn an_unregister_of_an_instance_that_lost_the_entry_changes_nothing() {
        let p = of(&[
            ("a", "gw2", Op::Register(L)),
            ("a", "gw1", Op::Unregister),
            ("a", "gw2", Op::Unregister),
            ("a", "gw2", Op::Unregister),
        ]);
        assert_eq!(p.remove, vec![("t", "a")]);
        assert_eq!(
            p.answers,
            vec![
                Answer::Known(true),
                Answer::Known(false),
                Answer::Known(true),
                Answer::Known(false)
            ]
        );
    }

    #[test]
    fn the_last_register_of_a_device_wins() {
        let p = of(&[
            ("a", "gw1", Op::Register(L)),
            ("a", "gw2", Op::Register(None)),
        ]);
        assert_eq!(p.upsert, vec![("t", "a", "gw2", None)]);
    }

    #[test]
    fn unregisters_of_two_instances_both_ask_postgresql() {
        // Applied one by one, whichever instance holds the entry removes it.
        let p = of(&[("a", "gw1", Op::Unregister), ("a", "gw2", Op::Unregister)]);
        assert_eq!(p.release, vec![("t", "a", "gw1"), ("t", "a", "gw2")]);
        assert_eq!(p.answers, vec![Answer::Released(0), Answer::Released(1)]);
        assert_eq!(
            p.answers(&[false, true]).collect::<Vec<_>>(),
            vec![false, true]
        );
    }

    #[test]
    fn a_second_unregister_after_a_release_is_answered_false() {
        let p = of(&[("a", "gw1", Op::Unregister), ("a", "gw1", Op::Unregister)]);
        assert_eq!(p.release.len(), 1);
        assert_eq!(p.answers, vec![Answer::Released(0), Answer::Known(false)]);
        assert_eq!(p.answers(&[true]).collect::<Vec<_>>(), vec![true, false]);
    }
}
