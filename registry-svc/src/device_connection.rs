//! Device connection state — which gateway instance holds a device's command subscription,
//! which gateway last acted for it, which instances are alive — in PostgreSQL, and Hono's
//! target-selection rule over it. Hono keeps the same facts behind its Device Connection
//! API; here both the gateways (which write them) and the command router (which reads them)
//! use this module, so neither depends on the other. The rule: the device's own
//! subscription first, else its last known gateway if that gateway is in `via` and subscribed,
//! else any subscribed gateway in `via`. Expired subscriptions and instances that stopped
//! sending heartbeats never count, so commands to them fail fast instead of waiting.
//!
//! Subscriptions come and go with every long poll, so their writes are group-committed
//! ([`changes`]): one task per process applies whatever changes queued up while the previous
//! batch was written, in at most three statements, and each caller still waits for its own
//! change to be in PostgreSQL — an application that reacts to a `ttd` notification finds the
//! route, as before, but a thousand polls a second cost a few statements, not a thousand.

use deadpool_postgres::Pool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

mod changes;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A batch of subscription changes failed; every change in it gets the same cause.
    #[error("{0}")]
    Batch(#[source] Arc<RoutingError>),
    #[error("the routing writer has stopped")]
    WriterGone,
}

/// How long a released command consumer's row is kept for the device's next registration to
/// update in place (a long-polling device comes back within seconds; migration 0005).
const KEEP_RELEASED: Duration = Duration::from_secs(600);

/// Where a command for a device goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTarget {
    /// The gateway instance whose internal topic gets the command.
    pub instance_id: String,
    /// The gateway that acts for the device, when the command goes through one.
    pub gateway_id: Option<String>,
}

/// Handle on the routing tables; cheap to clone.
#[derive(Clone)]
pub struct RoutingState {
    pool: Pool,
    /// An instance without a heartbeat for this long counts as dead.
    instance_timeout: Duration,
    /// The queue of the task that writes subscription changes, started on the first change.
    changes: Arc<OnceLock<mpsc::Sender<changes::Change>>>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl RoutingState {
    pub fn new(pool: Pool, instance_timeout: Duration) -> Self {
        RoutingState {
            pool,
            instance_timeout,
            changes: Arc::default(),
        }
    }

    /// How long an instance may go without a heartbeat before it counts as dead.
    pub fn instance_timeout(&self) -> Duration {
        self.instance_timeout
    }

    /// Queues `op` for the writer task and waits until it is written.
    async fn change(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
        op: changes::Op,
    ) -> Result<bool, RoutingError> {
        let queue = self
            .changes
            .get_or_init(|| changes::start(self.pool.clone()));
        let (done, answer) = tokio::sync::oneshot::channel();
        let change = changes::Change {
            tenant: tenant.to_owned(),
            device: device.to_owned(),
            instance: instance.to_owned(),
            op,
            done,
        };
        queue
            .send(change)
            .await
            .map_err(|_| RoutingError::WriterGone)?;
        answer.await.map_err(|_| RoutingError::WriterGone)?
    }

    /// Records that `instance` is alive; whether it was known. An instance that was not — a
    /// router forgot it, having counted it dead — has lost its routing entries and its
    /// internal topic, unless this is its first heartbeat.
    pub async fn heartbeat(&self, instance: &str) -> Result<bool, RoutingError> {
        let db = self.pool.get().await?;
        // A row the upsert updated carries this transaction's id in `xmax`; an inserted one 0.
        let row = db
            .query_one(
                &db.prepare_cached(
                    "INSERT INTO adapter_instances (instance_id, last_seen) VALUES ($1, now())
                 ON CONFLICT (instance_id) DO UPDATE SET last_seen = now()
                 RETURNING xmax <> 0",
                )
                .await?,
                &[&instance],
            )
            .await?;
        Ok(row.get(0))
    }

    /// `device` (a device, or a gateway for all its devices) has a command consumer on
    /// `instance`, for `lifespan` or until unregistered; the newest registration wins.
    pub async fn register(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
        lifespan: Option<Duration>,
    ) -> Result<(), RoutingError> {
        self.change(tenant, device, instance, changes::Op::Register(lifespan))
            .await
            .map(drop)
    }

    /// Removes the registration if `instance` still holds it; `false` when another instance
    /// took over or the entry is gone (Hono answers 412 then).
    pub async fn unregister(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
    ) -> Result<bool, RoutingError> {
        self.change(tenant, device, instance, changes::Op::Unregister)
            .await
    }

    /// Removes every registration `instance` holds: an instance that starts again under the
    /// same id (`gateway.instance_id`) has none of its earlier connections, and commands must
    /// not go to it for them. Returns how many were removed.
    pub async fn forget_instance(&self, instance: &str) -> Result<u64, RoutingError> {
        let db = self.pool.get().await?;
        Ok(db
            .execute(
                &db.prepare_cached(
                    "UPDATE command_consumers SET expires = '-infinity', registered = now()
                      WHERE instance_id = $1 AND expires IS DISTINCT FROM '-infinity'",
                )
                .await?,
                &[&instance],
            )
            .await?)
    }

    /// The gateway `device` last used (the device itself for direct connections).
    pub async fn set_last_gateway(
        &self,
        tenant: &str,
        device: &str,
        gateway: &str,
    ) -> Result<(), RoutingError> {
        let db = self.pool.get().await?;
        db.execute(
            &db.prepare_cached(
                "INSERT INTO last_known_gateways (tenant_id, device_id, gateway_id) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, device_id) DO UPDATE
               SET gateway_id = EXCLUDED.gateway_id, updated = now()",
            )
            .await?,
            &[&tenant, &device, &gateway],
        )
        .await?;
        Ok(())
    }

    /// Where a command for `device` goes, given the gateways in its `via` and the groups in
    /// its `viaGroups` (every gateway whose `memberOf` names one of them counts as in `via`);
    /// `None` when nothing can reach it now.
    pub async fn resolve(
        &self,
        tenant: &str,
        device: &str,
        via: &[String],
        via_groups: &[String],
    ) -> Result<Option<CommandTarget>, RoutingError> {
        let timeout = secs(self.instance_timeout);
        let db = self.pool.get().await?;
        let mut via = via.to_vec();
        if !via_groups.is_empty() {
            let rows = db
                .query(
                    &db.prepare_cached(
                        "SELECT device_id FROM devices
                      WHERE tenant_id = $1 AND data->'memberOf' ?| $2::text[]",
                    )
                    .await?,
                    &[&tenant, &via_groups],
                )
                .await?;
            via.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        // Live subscriptions of the device and of its gateways, in one query.
        let mut ids = vec![device.to_owned()];
        ids.extend(via.iter().filter(|g| *g != device).cloned());
        // A device without gateways (the common case) has its own statement: PostgreSQL plans
        // `= $2` once per connection, while `= ANY($2)` it plans again on every execution
        // (its generic plan looks dearer), which cost more than running the query.
        let rows = if ids.len() == 1 {
            db.query(
                &db.prepare_cached(
                    "SELECT c.device_id, c.instance_id
                   FROM command_consumers c
                   JOIN adapter_instances i ON i.instance_id = c.instance_id
                  WHERE c.tenant_id = $1 AND c.device_id = $2
                    AND (c.expires IS NULL OR c.expires > now())
                    AND i.last_seen > now() - make_interval(secs => $3::float8)",
                )
                .await?,
                &[&tenant, &device, &timeout],
            )
            .await?
        } else {
            db.query(
                &db.prepare_cached(
                    "SELECT c.device_id, c.instance_id
                   FROM command_consumers c
                   JOIN adapter_instances i ON i.instance_id = c.instance_id
                  WHERE c.tenant_id = $1 AND c.device_id = ANY($2)
                    AND (c.expires IS NULL OR c.expires > now())
                    AND i.last_seen > now() - make_interval(secs => $3::float8)
                  ORDER BY c.registered DESC",
                )
                .await?,
                &[&tenant, &ids, &timeout],
            )
            .await?
        };
        let live: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        // 1. The device's own subscription.
        if let Some((_, instance)) = live.iter().find(|(d, _)| d == device) {
            return Ok(Some(CommandTarget {
                instance_id: instance.clone(),
                gateway_id: None,
            }));
        }
        // 2. The last known gateway, if it is in `via` and subscribed.
        let last: Option<String> = db
            .query_opt(
                &db.prepare_cached(
                    "SELECT gateway_id FROM last_known_gateways WHERE tenant_id = $1 AND device_id = $2",
                )
                .await?,
                &[&tenant, &device],
            )
            .await?
            .map(|r| r.get(0));
        if let Some(gw) = last.filter(|g| via.contains(g))
            && let Some((_, instance)) = live.iter().find(|(d, _)| *d == gw)
        {
            return Ok(Some(CommandTarget {
                instance_id: instance.clone(),
                gateway_id: Some(gw),
            }));
        }
        // 3. Any subscribed gateway in `via` (the most recently subscribed).
        Ok(live.into_iter().next().map(|(gw, instance)| CommandTarget {
            instance_id: instance,
            gateway_id: Some(gw),
        }))
    }

    /// Drops expired subscriptions and the subscriptions of dead instances, so the table never
    /// grows without bound; returns how many rows went. Silent instances themselves go with
    /// [`Self::forget_silent_instance`].
    pub async fn purge(&self) -> Result<u64, RoutingError> {
        let timeout = secs(self.instance_timeout);
        let db = self.pool.get().await?;
        let expired = db
            .execute(
                &db.prepare_cached(
                    "DELETE FROM command_consumers
                      WHERE expires <= now()
                        AND (expires <> '-infinity'
                             OR registered <= now() - make_interval(secs => $1::float8))",
                )
                .await?,
                &[&KEEP_RELEASED.as_secs_f64()],
            )
            .await?;
        let dead = db
            .execute(
                &db.prepare_cached(
                    "DELETE FROM command_consumers c USING adapter_instances i
                  WHERE c.instance_id = i.instance_id
                    AND i.last_seen <= now() - make_interval(secs => $1::float8)",
                )
                .await?,
                &[&timeout],
            )
            .await?;
        Ok(expired + dead)
    }

    /// Instances without a heartbeat for `after` (at least the instance timeout): the router
    /// deletes their internal command topics, then [`Self::forget_silent_instance`]s them.
    pub async fn silent_instances(&self, after: Duration) -> Result<Vec<String>, RoutingError> {
        let after = secs(after.max(self.instance_timeout));
        let db = self.pool.get().await?;
        let rows = db
            .query(
                &db.prepare_cached(
                    "SELECT instance_id FROM adapter_instances
                  WHERE last_seen <= now() - make_interval(secs => $1::float8)",
                )
                .await?,
                &[&after],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Forgets an instance that is still silent for `after`; whether it was. An instance that
    /// came back meanwhile (a heartbeat) is kept.
    pub async fn forget_silent_instance(
        &self,
        instance: &str,
        after: Duration,
    ) -> Result<bool, RoutingError> {
        let after = secs(after.max(self.instance_timeout));
        let db = self.pool.get().await?;
        let n = db
            .execute(
                &db.prepare_cached(
                    "DELETE FROM adapter_instances
                  WHERE instance_id = $1 AND last_seen <= now() - make_interval(secs => $2::float8)",
                )
                .await?,
                &[&instance, &after],
            )
            .await?;
        Ok(n > 0)
    }
}
