//! Device connection state — which gateway instance holds a device's command subscription,
//! which gateway last acted for it, which instances are alive — and Hono's target-selection
//! rule over it. Hono keeps the same facts behind its Device Connection API; here both the
//! gateways (which write them) and the command router (which reads them) use this module, so
//! neither depends on the other. The rule: the device's own subscription first, else its last
//! known gateway if that gateway is in `via` and subscribed, else any subscribed gateway in
//! `via`. Expired subscriptions and instances that stopped sending heartbeats never count, so
//! commands to them fail fast instead of waiting.
//!
//! Subscriptions change with every long poll, so they do not live in PostgreSQL: they are
//! records of a compacted Kafka topic ([`routes`], [`route_log`]) that every process reads
//! into memory. A change is one produce; a look-up reads memory, after making sure the table
//! holds every change written before the command arrived. Instances' heartbeats and the last
//! known gateways change seldom and stay in PostgreSQL.

use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod route_log;
pub mod routes;

pub use route_log::RouteLog;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The route topic could not be written or read.
    #[error("route topic: {0}")]
    Routes(String),
    #[error("the route topic reader has stopped")]
    WriterGone,
}

/// How long the instances' heartbeats read from PostgreSQL are trusted before they are read
/// again; an instance not found (or found dead) is always looked up afresh.
const INSTANCES_FRESH: Duration = Duration::from_secs(1);

/// Where a command for a device goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTarget {
    /// The gateway instance whose internal topic gets the command.
    pub instance_id: String,
    /// The gateway that acts for the device, when the command goes through one.
    pub gateway_id: Option<String>,
}

/// Handle on the routing state; cheap to clone.
#[derive(Clone)]
pub struct RoutingState {
    pool: Pool,
    /// An instance without a heartbeat for this long counts as dead.
    instance_timeout: Duration,
    /// The route topic, opened on first use (Kafka may be down when a gateway starts; its
    /// adapters serve meanwhile).
    routes: Arc<tokio::sync::OnceCell<RouteLog>>,
    kafka: Option<Arc<ferrule_kafka::KafkaConfig>>,
    /// Seconds since each instance's last heartbeat, as read at the instant beside them.
    instances: Arc<Mutex<(Instant, HashMap<String, f64>)>>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl RoutingState {
    /// The state on `pool` and on the route topic of `kafka`'s cluster (read through the
    /// process's shared [`RouteLog`]).
    pub fn new(pool: Pool, instance_timeout: Duration, kafka: &ferrule_kafka::KafkaConfig) -> Self {
        let mut state = Self::with_routes(pool, instance_timeout, None);
        state.kafka = Some(Arc::new(kafka.clone()));
        state
    }

    /// The state on `pool` and on a route log opened already (`None`: none, every change and
    /// look-up fails).
    pub fn with_routes(pool: Pool, instance_timeout: Duration, routes: Option<RouteLog>) -> Self {
        RoutingState {
            pool,
            instance_timeout,
            routes: Arc::new(tokio::sync::OnceCell::new_with(routes)),
            kafka: None,
            instances: Arc::new(Mutex::new((
                Instant::now() - INSTANCES_FRESH * 2,
                HashMap::new(),
            ))),
        }
    }

    /// How long an instance may go without a heartbeat before it counts as dead.
    pub fn instance_timeout(&self) -> Duration {
        self.instance_timeout
    }

    /// The route topic this state reads and writes, opened now if it was not yet.
    pub async fn routes(&self) -> Result<&RouteLog, RoutingError> {
        self.routes
            .get_or_try_init(|| async {
                match &self.kafka {
                    Some(kafka) => RouteLog::shared(kafka).await,
                    None => Err(RoutingError::Routes("no route topic".into())),
                }
            })
            .await
    }

    /// The instances that count as alive now: a heartbeat within the instance timeout.
    /// `fresh` reads the heartbeats from PostgreSQL even when the last read is recent.
    async fn alive_instances(
        &self,
        fresh: bool,
    ) -> Result<std::collections::HashSet<String>, RoutingError> {
        let timeout = secs(self.instance_timeout);
        let cached = {
            let cache = self.instances.lock().unwrap_or_else(|p| p.into_inner());
            (!fresh && cache.0.elapsed() < INSTANCES_FRESH).then(|| {
                let since = cache.0.elapsed().as_secs_f64();
                cache
                    .1
                    .iter()
                    .filter(|(_, age)| **age + since < timeout)
                    .map(|(i, _)| i.clone())
                    .collect()
            })
        };
        if let Some(alive) = cached {
            return Ok(alive);
        }
        let db = self.pool.get().await?;
        let read_at = Instant::now();
        let rows = db
            .query(
                &db.prepare_cached(
                    "SELECT instance_id, extract(epoch FROM now() - last_seen)::float8
                       FROM adapter_instances",
                )
                .await?,
                &[],
            )
            .await?;
        let ages: HashMap<String, f64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let alive = ages
            .iter()
            .filter(|(_, age)| **age < timeout)
            .map(|(i, _)| i.clone())
            .collect();
        *self.instances.lock().unwrap_or_else(|p| p.into_inner()) = (read_at, ages);
        Ok(alive)
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
        self.register_queued(tenant, device, instance, lifespan)
            .await
    }

    /// [`Self::register`], queued before this returns: changes of one process reach the topic
    /// in the order they were queued (once the route topic is open; before that, in the order
    /// their futures are first polled).
    pub fn register_queued(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
        lifespan: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), RoutingError>> {
        let expires = lifespan.map(|l| now_ms().saturating_add(l.as_millis() as i64));
        self.queued(tenant, device, instance, move |log, t, d, i| {
            log.subscribe(t, d, i, expires)
        })
    }

    /// Runs `change` on the route log now when it is open, so the change is queued before this
    /// returns; otherwise once the future first polled has opened it.
    fn queued<T, F>(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
        change: impl FnOnce(&RouteLog, &str, &str, &str) -> F + Send + 'static,
    ) -> BoxFuture<'static, Result<T, RoutingError>>
    where
        F: Future<Output = Result<T, RoutingError>> + Send + 'static,
    {
        if let Some(log) = self.routes.get() {
            return Box::pin(change(log, tenant, device, instance));
        }
        let this = self.clone();
        let (t, d, i) = (tenant.to_owned(), device.to_owned(), instance.to_owned());
        Box::pin(async move { change(this.routes().await?, &t, &d, &i).await })
    }

    /// Ends `instance`'s registration of `device`; `false` when another instance had taken
    /// over or the entry was gone already (Hono answers 412 then).
    pub async fn unregister(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
    ) -> Result<bool, RoutingError> {
        self.unregister_queued(tenant, device, instance).await
    }

    /// [`Self::unregister`], queued before this returns (see [`Self::register_queued`]).
    pub fn unregister_queued(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
    ) -> BoxFuture<'static, Result<bool, RoutingError>> {
        self.queued(tenant, device, instance, |log, t, d, i| {
            log.release(t, d, i)
        })
    }

    /// Ends `instance`'s registration of `device` without asking whether another instance had
    /// taken over (one produce; a long poll's end, or an instance stopping); queued before
    /// this returns (see [`Self::register_queued`]).
    pub fn release(
        &self,
        tenant: &str,
        device: &str,
        instance: &str,
    ) -> BoxFuture<'static, Result<(), RoutingError>> {
        self.queued(tenant, device, instance, |log, t, d, i| {
            log.release_now(t, d, i)
        })
    }

    /// Removes every registration `instance` holds: an instance that starts again under the
    /// same id (`gateway.instance_id`) has none of its earlier connections, and commands must
    /// not go to it for them. Returns how many were removed.
    pub async fn forget_instance(&self, instance: &str) -> Result<u64, RoutingError> {
        self.routes().await?.forget(instance).await
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
    /// `None` when nothing can reach it now. Every subscription change written before this
    /// call counts.
    pub async fn resolve(
        &self,
        tenant: &str,
        device: &str,
        via: &[String],
        via_groups: &[String],
    ) -> Result<Option<CommandTarget>, RoutingError> {
        let mut via = via.to_vec();
        if !via_groups.is_empty() {
            let db = self.pool.get().await?;
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
        via.retain(|g| g != device);
        let routes = self.routes().await?;
        // The table must hold every change written before now, in each partition involved.
        let mut partitions: Vec<i32> = std::iter::once(device)
            .chain(via.iter().map(String::as_str))
            .map(|d| routes.partition_of(tenant, d))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        for p in partitions {
            routes.caught_up(p).await?;
        }
        // Live candidates: (device or gateway, instance, record time), the device first.
        let candidates = |alive: &std::collections::HashSet<String>| {
            let table = routes.table();
            let now = now_ms();
            let mut is_alive = |i: &str| alive.contains(i);
            std::iter::once(device)
                .chain(via.iter().map(String::as_str))
                .filter_map(|d| {
                    table
                        .newest(tenant, d, now, &mut is_alive)
                        .map(|e| (d.to_owned(), e.instance.to_string(), e.at_ms))
                })
                .collect::<Vec<_>>()
        };
        let mut live = candidates(&self.alive_instances(false).await?);
        // A subscribed instance the cached heartbeats do not show alive may have just started:
        // read the heartbeats again before counting it dead.
        let subscribed = {
            let table = routes.table();
            let now = now_ms();
            std::iter::once(device)
                .chain(via.iter().map(String::as_str))
                .filter(|d| table.newest(tenant, d, now, &mut |_| true).is_some())
                .count()
        };
        if subscribed > live.len() {
            live = candidates(&self.alive_instances(true).await?);
        }
        // 1. The device's own subscription.
        if let Some((_, instance, _)) = live.iter().find(|(d, _, _)| d == device) {
            return Ok(Some(CommandTarget {
                instance_id: instance.clone(),
                gateway_id: None,
            }));
        }
        let mut gateways: Vec<(String, String, i64)> = live;
        if gateways.is_empty() {
            return Ok(None);
        }
        // 2. The last known gateway, if it is in `via` and subscribed.
        let db = self.pool.get().await?;
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
        if let Some(gw) = last
            && let Some((_, instance, _)) = gateways.iter().find(|(d, _, _)| *d == gw)
        {
            return Ok(Some(CommandTarget {
                instance_id: instance.clone(),
                gateway_id: Some(gw),
            }));
        }
        // 3. Any subscribed gateway in `via` (the most recently subscribed).
        gateways.sort_by_key(|(_, _, at)| std::cmp::Reverse(*at));
        Ok(gateways
            .into_iter()
            .next()
            .map(|(gw, instance, _)| CommandTarget {
                instance_id: instance,
                gateway_id: Some(gw),
            }))
    }

    /// Drops expired subscriptions of live instances from the table, so it never grows without
    /// bound; returns how many went. Those of dead instances stay (they never count) until the
    /// instance is forgotten: [`Self::forget_silent_instance`] releases them in the topic.
    pub async fn purge(&self) -> Result<u64, RoutingError> {
        let alive = self.alive_instances(true).await?;
        Ok(self.routes().await?.purge(&mut |i| alive.contains(i)) as u64)
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
        if n > 0 {
            self.routes().await?.release_all(instance).await?;
        }
        Ok(n > 0)
    }
}
