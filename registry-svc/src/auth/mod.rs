//! The device-authentication library the gateways call: checks `authId@tenant` + password,
//! finds PSK keys and X.509 credentials, and honours every enabled flag and validity window.
//! Lookups are cached; PostgreSQL notifications drop cache entries as soon as registry data
//! changes, and the same notifications are offered to gateways to close live connections.

mod cache;
pub mod password;

use crate::db::Connector;
use crate::metrics;
use crate::model::credentials::{HASHED_PASSWORD, PSK, X509_CERT};
use crate::model::device::Device;
use crate::model::tenant::Tenant;
use cache::{Cache, CacheControl, CacheKey};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use ferrule_schemas::avro::PayloadSchema;
use password::PasswordHash;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, watch};

/// The channel the registry's triggers notify on.
pub const NOTIFY_CHANNEL: &str = "ferrule_registry";

/// Cache settings of the authenticator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthCacheConfig {
    /// How long a credential lookup is reused (seconds); changes drop entries sooner.
    pub ttl_secs: u64,
    /// Most lookups kept at once.
    pub capacity: usize,
}

impl Default for AuthCacheConfig {
    fn default() -> Self {
        AuthCacheConfig {
            ttl_secs: 60,
            capacity: 100_000,
        }
    }
}

/// A device whose credentials were verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedDevice {
    pub tenant_id: String,
    pub device_id: String,
    pub auth_id: String,
}

/// A business application whose password was verified; it may use its tenant's data only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedApplication {
    pub tenant_id: String,
    pub app_id: String,
}

/// Why a device was not authenticated; gateways map each to their protocol's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed user name: expected authId@tenant")]
    MalformedUsername,
    #[error("unknown tenant")]
    UnknownTenant,
    #[error("tenant is disabled")]
    TenantDisabled,
    /// Unknown auth-id, wrong secret, disabled credentials or no secret valid right now.
    #[error("bad credentials")]
    BadCredentials,
    #[error("device is disabled")]
    DeviceDisabled,
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// A stable label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            AuthError::MalformedUsername | AuthError::BadCredentials => "unauthorized",
            AuthError::UnknownTenant => "unknown-tenant",
            AuthError::TenantDisabled => "tenant-disabled",
            AuthError::DeviceDisabled => "device-disabled",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// A registry change, as announced by the database; gateways close connections with it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegistryChange {
    /// `tenant`, `device` or `credentials`.
    pub kind: String,
    /// `INSERT`, `UPDATE` or `DELETE`.
    pub op: String,
    pub tenant: String,
    #[serde(default)]
    pub device: Option<String>,
    /// For tenants and devices: whether the entity is enabled after the change.
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl RegistryChange {
    /// Whether connections of the affected tenant or device must be closed.
    pub fn revokes_access(&self) -> bool {
        matches!(self.kind.as_str(), "tenant" | "device")
            && (self.op == "DELETE" || self.enabled == Some(false))
    }
}

/// One secret, decoded for checking.
#[derive(Debug)]
struct Secret {
    enabled: bool,
    not_before: Option<DateTime<Utc>>,
    not_after: Option<DateTime<Utc>>,
    password: Option<PasswordHash>,
    key: Option<Vec<u8>>,
}

impl Secret {
    fn from_json(s: &serde_json::Map<String, serde_json::Value>) -> Secret {
        let instant = |k: &str| {
            s.get(k)
                .and_then(|v| v.as_str())
                .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        Secret {
            enabled: s.get("enabled").and_then(|v| v.as_bool()).unwrap_or(true),
            not_before: instant("not-before"),
            not_after: instant("not-after"),
            password: PasswordHash::from_secret(s),
            key: s.get("key").and_then(|v| v.as_str()).and_then(|k| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(k).ok()
            }),
        }
    }

    fn usable(&self, now: DateTime<Utc>) -> bool {
        self.enabled
            && self.not_before.is_none_or(|t| t <= now)
            && self.not_after.is_none_or(|t| now <= t)
    }
}

/// What the database said about (tenant, type, auth-id).
#[derive(Debug)]
enum Lookup {
    UnknownTenant,
    TenantDisabled,
    NoCredentials,
    Found(Found),
}

#[derive(Debug)]
struct Found {
    device_id: String,
    device_enabled: bool,
    credentials_enabled: bool,
    /// Boxed to its length: a device usually has one secret, and a cached lookup per
    /// connected device should not carry room for four.
    secrets: Box<[Secret]>,
    /// Digest of the last password that verified, and the secret it matched, so that a
    /// reconnecting device does not pay for bcrypt again.
    verified: Mutex<Option<([u8; 32], usize)>>,
}

impl Found {
    fn check(&self) -> Result<(), AuthError> {
        if !self.credentials_enabled {
            return Err(AuthError::BadCredentials);
        }
        if !self.device_enabled {
            return Err(AuthError::DeviceDisabled);
        }
        Ok(())
    }
}

/// Verifies device credentials against the registry; cheap to clone and share.
#[derive(Clone)]
pub struct DeviceAuthenticator {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    cache: Cache<Lookup>,
    tenants: Cache<Option<Tenant>>,
    devices: Cache<Option<Device>>,
    /// The live payload schemas of a tenant topic's subject.
    topic_schemas: Cache<Option<TopicSchemas>>,
    /// Schemas by id, as a tenant's records name them.
    schema_ids: Cache<Option<Arc<PayloadSchema>>>,
    /// Random per process, so that the verification memo is useless outside this process.
    memo_key: [u8; 32],
    changes: broadcast::Sender<RegistryChange>,
}

impl DeviceAuthenticator {
    pub fn new(pool: Pool, cfg: &AuthCacheConfig) -> Self {
        let (changes, _) = broadcast::channel(1024);
        DeviceAuthenticator {
            inner: Arc::new(Inner {
                pool,
                cache: Cache::new(Duration::from_secs(cfg.ttl_secs), cfg.capacity),
                tenants: Cache::new(Duration::from_secs(cfg.ttl_secs), cfg.capacity),
                devices: Cache::new(Duration::from_secs(cfg.ttl_secs), cfg.capacity),
                topic_schemas: Cache::new(Duration::from_secs(cfg.ttl_secs), cfg.capacity),
                schema_ids: Cache::new(Duration::from_secs(cfg.ttl_secs), cfg.capacity),
                memo_key: rand::random(),
                changes,
            }),
        }
    }

    /// The registry's connection pool, for services that keep their own state beside it.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Registry changes as they happen; a lagging receiver should re-check all it holds.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryChange> {
        self.inner.changes.subscribe()
    }

    /// Whether the cache is in use (it is only while change notifications arrive).
    pub fn cache_active(&self) -> bool {
        self.inner.cache.is_active()
    }

    /// Listens for registry changes until `shutdown` turns true, reconnecting on failure.
    /// Without a live listener the cache is bypassed, so stale data is never served. `db`
    /// connects as the pool does (same server, same TLS).
    pub fn spawn_listener(
        &self,
        db: Connector,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(listen(inner, db, shutdown))
    }

    /// Checks `authId@tenant` and a password (the form devices use for Basic auth and MQTT).
    pub async fn verify_password(
        &self,
        username: &str,
        password: &[u8],
    ) -> Result<AuthenticatedDevice, AuthError> {
        let result = self.verify_password_inner(username, password).await;
        metrics::auth_attempt(
            result
                .as_ref()
                .map(|_| "succeeded")
                .unwrap_or_else(|e| e.outcome()),
            HASHED_PASSWORD,
        );
        result
    }

    async fn verify_password_inner(
        &self,
        username: &str,
        password: &[u8],
    ) -> Result<AuthenticatedDevice, AuthError> {
        let (auth_id, tenant) = split_username(username)?;
        let lookup = self.lookup(tenant, HASHED_PASSWORD, auth_id).await?;
        let found = found(&lookup)?;
        let now = Utc::now();
        let digest = self.memo_digest(tenant, auth_id, password);
        let memo = *found.verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((d, idx)) = memo
            && bool::from(d.ct_eq(&digest))
            && found.secrets.get(idx).is_some_and(|s| s.usable(now))
        {
            return Ok(device(tenant, found, auth_id));
        }
        for (idx, secret) in found.secrets.iter().enumerate() {
            if !secret.usable(now) {
                continue;
            }
            let Some(hash) = &secret.password else {
                continue;
            };
            let ok = if hash.is_expensive() {
                let (hash, pw) = (hash.clone(), password.to_vec());
                tokio::task::spawn_blocking(move || hash.verify(&pw))
                    .await
                    .map_err(|e| AuthError::Unavailable(e.to_string()))?
            } else {
                hash.verify(password)
            };
            if ok {
                *found.verified.lock().unwrap_or_else(|p| p.into_inner()) = Some((digest, idx));
                return Ok(device(tenant, found, auth_id));
            }
        }
        Err(AuthError::BadCredentials)
    }

    /// Checks an application's `appId@tenant` and password (the AMQP bridge's SASL PLAIN).
    /// Applications sign in rarely, so this always asks PostgreSQL.
    pub async fn verify_application(
        &self,
        username: &str,
        password: &[u8],
    ) -> Result<AuthenticatedApplication, AuthError> {
        let (app_id, tenant) = split_username(username)?;
        let db = self.inner.pool.get().await.map_err(unavailable)?;
        let row = db
            .query_opt(
                "SELECT t.data->'enabled', a.data
                   FROM tenants t LEFT JOIN applications a
                     ON a.tenant_id = t.tenant_id AND a.app_id = $2
                  WHERE t.tenant_id = $1",
                &[&tenant, &app_id],
            )
            .await
            .map_err(unavailable)?
            .ok_or(AuthError::UnknownTenant)?;
        let tenant_enabled: Option<serde_json::Value> = row.get(0);
        if tenant_enabled.and_then(|v| v.as_bool()) == Some(false) {
            return Err(AuthError::TenantDisabled);
        }
        let data: serde_json::Value = row
            .get::<_, Option<serde_json::Value>>(1)
            .ok_or(AuthError::BadCredentials)?;
        if data.get("enabled").and_then(|e| e.as_bool()) == Some(false) {
            return Err(AuthError::BadCredentials);
        }
        let now = Utc::now();
        for secret in secrets_of(&data).iter().filter(|s| s.usable(now)) {
            let Some(hash) = secret.password.clone() else {
                continue;
            };
            let pw = password.to_vec();
            let ok = tokio::task::spawn_blocking(move || hash.verify(&pw))
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
            if ok {
                return Ok(AuthenticatedApplication {
                    tenant_id: tenant.to_owned(),
                    app_id: app_id.to_owned(),
                });
            }
        }
        Err(AuthError::BadCredentials)
    }

    /// The PSK for a DTLS identity `authId@tenant`, with the device it authenticates.
    pub async fn psk_key(
        &self,
        identity: &str,
    ) -> Result<(AuthenticatedDevice, Vec<u8>), AuthError> {
        let (auth_id, tenant) = split_username(identity)?;
        let lookup = self.lookup(tenant, PSK, auth_id).await?;
        psk_of(&lookup, tenant, auth_id)
    }

    /// [`Self::psk_key`] from the cache alone, for a TLS library's synchronous key callback:
    /// `None` when the cache does not hold the identity (ask [`Self::psk_key`] first).
    pub fn cached_psk_key(
        &self,
        identity: &str,
    ) -> Option<Result<(AuthenticatedDevice, Vec<u8>), AuthError>> {
        let (auth_id, tenant) = match split_username(identity) {
            Ok(parts) => parts,
            Err(e) => return Some(Err(e)),
        };
        let lookup = self.inner.cache.get(tenant, PSK, auth_id)?;
        Some(psk_of(&lookup, tenant, auth_id))
    }

    /// The device of a client certificate, by its subject DN (RFC 2253) within a tenant.
    pub async fn x509(
        &self,
        tenant: &str,
        subject_dn: &str,
    ) -> Result<AuthenticatedDevice, AuthError> {
        let lookup = self.lookup(tenant, X509_CERT, subject_dn).await?;
        let found = found(&lookup)?;
        let now = Utc::now();
        if found.secrets.iter().any(|s| s.usable(now)) {
            Ok(device(tenant, found, subject_dn))
        } else {
            Err(AuthError::BadCredentials)
        }
    }

    /// The tenant whose trust anchor has this subject DN (a client certificate's issuer).
    pub async fn tenant_by_trust_anchor(
        &self,
        issuer_dn: &str,
    ) -> Result<Option<String>, AuthError> {
        let db = self.inner.pool.get().await.map_err(unavailable)?;
        let row = db
            .query_opt(
                "SELECT t.tenant_id FROM tenants t,
                        jsonb_array_elements(coalesce(t.data->'trusted-ca', '[]'::jsonb)) ca
                  WHERE ca->>'subject-dn' = $1 ORDER BY t.tenant_id LIMIT 1",
                &[&issuer_dn],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The tenant document (cached like credentials), `None` when the tenant does not exist.
    pub async fn tenant(&self, tenant: &str) -> Result<Arc<Option<Tenant>>, AuthError> {
        cached_document(
            &self.inner.pool,
            &self.inner.tenants,
            DocumentQuery {
                key: (tenant, "tenant", ""),
                sql: "SELECT data FROM tenants WHERE tenant_id = $1",
                params: &[&tenant],
            },
        )
        .await
    }

    /// The tenant document if the cache holds it; lets a gateway handle a message without
    /// waiting when nothing needs asking.
    pub fn cached_tenant(&self, tenant: &str) -> Option<Arc<Option<Tenant>>> {
        self.inner.tenants.get(tenant, "tenant", "")
    }

    /// The device document if the cache holds it.
    pub fn cached_device(&self, tenant: &str, device: &str) -> Option<Arc<Option<Device>>> {
        self.inner.devices.get(tenant, "device", device)
    }

    /// The device document (cached like credentials), `None` when the device does not exist.
    pub async fn device(
        &self,
        tenant: &str,
        device: &str,
    ) -> Result<Arc<Option<Device>>, AuthError> {
        cached_document(
            &self.inner.pool,
            &self.inner.devices,
            DocumentQuery {
                key: (tenant, "device", device),
                sql: "SELECT data FROM devices WHERE tenant_id = $1 AND device_id = $2",
                params: &[&tenant, &device],
            },
        )
        .await
    }

    /// The live payload schemas of `topic` (a tenant's telemetry or event topic), cached like
    /// devices; `None` inside when the topic's subject has no schema.
    pub async fn topic_schemas(
        &self,
        tenant: &str,
        topic: &str,
    ) -> Result<Arc<Option<TopicSchemas>>, AuthError> {
        if let Some(hit) = self.cached_topic_schemas(tenant, topic) {
            return Ok(hit);
        }
        let cache = &self.inner.topic_schemas;
        let generation = cache.generation();
        let db = self.inner.pool.get().await.map_err(unavailable)?;
        let subject = crate::schema_registry::subject_of(topic);
        let rows = crate::schema_registry::store::topic_schemas(&db, &subject)
            .await
            .map_err(unavailable)?;
        let mut all = Vec::with_capacity(rows.len());
        for (id, text) in rows {
            all.push(Arc::new(parse_schema(id, &text)?));
        }
        let found = Arc::new((!all.is_empty()).then_some(TopicSchemas { all }));
        cache.insert(
            CacheKey::new(tenant, "schema", topic),
            found.clone(),
            generation,
        );
        Ok(found)
    }

    /// [`Self::topic_schemas`] if the cache holds them.
    pub fn cached_topic_schemas(
        &self,
        tenant: &str,
        topic: &str,
    ) -> Option<Arc<Option<TopicSchemas>>> {
        self.inner.topic_schemas.get(tenant, "schema", topic)
    }

    /// The schema with registry id `id` if one of `tenant`'s subjects holds it (deleted
    /// versions too: records written with them stay readable).
    pub async fn schema_by_id(
        &self,
        tenant: &str,
        id: u32,
    ) -> Result<Arc<Option<Arc<PayloadSchema>>>, AuthError> {
        let key = id.to_string();
        let cache = &self.inner.schema_ids;
        if let Some(hit) = cache.get(tenant, "schema-id", &key) {
            return Ok(hit);
        }
        let generation = cache.generation();
        let found = match i32::try_from(id) {
            Ok(id) => {
                let text =
                    crate::schema_registry::store::schema_by_id(&self.inner.pool, Some(tenant), id)
                        .await;
                match text {
                    Ok(text) => Some(Arc::new(parse_schema(id, &text)?)),
                    Err(e) if e.is_not_found() => None,
                    Err(e) => return Err(AuthError::Unavailable(e.to_string())),
                }
            }
            Err(_) => None,
        };
        let found = Arc::new(found);
        cache.insert(
            CacheKey::new(tenant, "schema-id", &key),
            found.clone(),
            generation,
        );
        Ok(found)
    }

    fn memo_digest(&self, tenant: &str, auth_id: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.inner.memo_key);
        h.update(tenant.as_bytes());
        h.update([0]);
        h.update(auth_id.as_bytes());
        h.update([0]);
        h.update(password);
        h.finalize().into()
    }

    async fn lookup(
        &self,
        tenant: &str,
        kind: &str,
        auth_id: &str,
    ) -> Result<Arc<Lookup>, AuthError> {
        if let Some(hit) = self.inner.cache.get(tenant, kind, auth_id) {
            metrics::auth_cache(true);
            return Ok(hit);
        }
        metrics::auth_cache(false);
        let generation = self.inner.cache.generation();
        // Boxed: kept out of the future of every cache hit.
        let lookup = Arc::new(Box::pin(self.query(tenant, kind, auth_id)).await?);
        let key = CacheKey::new(tenant, kind, auth_id);
        self.inner.cache.insert(key, lookup.clone(), generation);
        Ok(lookup)
    }

    async fn query(&self, tenant: &str, kind: &str, auth_id: &str) -> Result<Lookup, AuthError> {
        let db = self.inner.pool.get().await.map_err(unavailable)?;
        // Prepared once per connection (deadpool's statement cache): as an unnamed statement
        // PostgreSQL planned this join on every connect, about 1.3 ms of planning for a 0.2 ms
        // look-up (`EXPLAIN ANALYZE`), and a burst of new MQTT connections kept it at 1.4 cores.
        let statement = db
            .prepare_cached(
                "SELECT coalesce((t.data->>'enabled')::boolean, true),
                        c.device_id, coalesce((d.data->>'enabled')::boolean, true), c.data
                   FROM tenants t
                   LEFT JOIN credentials c
                          ON c.tenant_id = t.tenant_id AND c.type = $2 AND c.auth_id = $3
                   LEFT JOIN devices d
                          ON d.tenant_id = c.tenant_id AND d.device_id = c.device_id
                  WHERE t.tenant_id = $1",
            )
            .await
            .map_err(unavailable)?;
        let row = db
            .query_opt(&statement, &[&tenant, &kind, &auth_id])
            .await
            .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(Lookup::UnknownTenant);
        };
        if !row.get::<_, bool>(0) {
            return Ok(Lookup::TenantDisabled);
        }
        let Some(device_id) = row.get::<_, Option<String>>(1) else {
            return Ok(Lookup::NoCredentials);
        };
        let data: serde_json::Value = row.get(3);
        let secrets = secrets_of(&data);
        Ok(Lookup::Found(Found {
            device_id,
            device_enabled: row.get(2),
            credentials_enabled: data
                .get("enabled")
                .and_then(|e| e.as_bool())
                .unwrap_or(true),
            secrets,
            verified: Mutex::new(None),
        }))
    }
}

impl Inner {
    /// Every cache; they all follow the same change notifications.
    fn caches(&self) -> [&dyn CacheControl; 5] {
        [
            &self.cache,
            &self.tenants,
            &self.devices,
            &self.topic_schemas,
            &self.schema_ids,
        ]
    }
}

/// Where a registry document is cached and how PostgreSQL finds it.
struct DocumentQuery<'a> {
    /// Tenant, kind and id: the cache key.
    key: (&'a str, &'a str, &'a str),
    sql: &'a str,
    params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
}

/// A registry document by key, from the cache or else from PostgreSQL.
async fn cached_document<T: serde::de::DeserializeOwned>(
    pool: &Pool,
    cache: &Cache<Option<T>>,
    q: DocumentQuery<'_>,
) -> Result<Arc<Option<T>>, AuthError> {
    let (tenant, kind, id) = q.key;
    if let Some(hit) = cache.get(tenant, kind, id) {
        return Ok(hit);
    }
    // Boxed: the query's future is large, and every message's future would carry it inline
    // although nearly every lookup is a cache hit.
    Box::pin(fetch_document(pool, cache, q)).await
}

/// A registry document from PostgreSQL, stored in the cache unless the registry changed.
async fn fetch_document<T: serde::de::DeserializeOwned>(
    pool: &Pool,
    cache: &Cache<Option<T>>,
    DocumentQuery { key, sql, params }: DocumentQuery<'_>,
) -> Result<Arc<Option<T>>, AuthError> {
    let (tenant, kind, id) = key;
    let generation = cache.generation();
    let db = pool.get().await.map_err(unavailable)?;
    // Prepared once per connection: PostgreSQL plans an unnamed statement on every execution,
    // which cost more than the look-up itself (see `DeviceAuthenticator::query`).
    let statement = db.prepare_cached(sql).await.map_err(unavailable)?;
    let row = db
        .query_opt(&statement, params)
        .await
        .map_err(unavailable)?;
    let doc = match row {
        Some(r) => Some(serde_json::from_value::<T>(r.get(0)).map_err(unavailable)?),
        None => None,
    };
    let doc = Arc::new(doc);
    cache.insert(CacheKey::new(tenant, kind, id), doc.clone(), generation);
    Ok(doc)
}

/// The secrets of a stored credentials (or application) document.
fn secrets_of(data: &serde_json::Value) -> Box<[Secret]> {
    data.get("secrets")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_object().map(Secret::from_json))
                .collect::<Vec<_>>()
                .into_boxed_slice()
        })
        .unwrap_or_default()
}

/// A stored schema parsed for use; one that no longer parses makes the registry unusable for
/// that topic rather than silently unchecked.
fn parse_schema(id: i32, text: &str) -> Result<PayloadSchema, AuthError> {
    let id = u32::try_from(id).map_err(unavailable)?;
    PayloadSchema::parse(id, text)
        .map_err(|e| AuthError::Unavailable(format!("stored schema {id} does not parse: {e}")))
}

/// The live schemas of a topic's subject, newest first (never empty).
#[derive(Debug)]
pub struct TopicSchemas {
    all: Vec<Arc<PayloadSchema>>,
}

impl TopicSchemas {
    /// The latest version's schema: what JSON payloads are encoded with.
    pub fn latest(&self) -> &PayloadSchema {
        &self.all[0]
    }

    /// A live version's schema by its id: what an Avro payload may name.
    pub fn by_id(&self, id: u32) -> Option<&PayloadSchema> {
        self.all.iter().find(|s| s.id() == id).map(|s| &**s)
    }
}

fn unavailable(e: impl std::fmt::Display) -> AuthError {
    AuthError::Unavailable(e.to_string())
}

fn found(lookup: &Lookup) -> Result<&Found, AuthError> {
    match lookup {
        Lookup::UnknownTenant => Err(AuthError::UnknownTenant),
        Lookup::TenantDisabled => Err(AuthError::TenantDisabled),
        Lookup::NoCredentials => Err(AuthError::BadCredentials),
        Lookup::Found(f) => f.check().map(|()| f),
    }
}

fn device(tenant: &str, found: &Found, auth_id: &str) -> AuthenticatedDevice {
    AuthenticatedDevice {
        tenant_id: tenant.to_owned(),
        device_id: found.device_id.clone(),
        auth_id: auth_id.to_owned(),
    }
}

/// Splits `authId@tenant` at the first `@`, as Hono does.
fn psk_of(
    lookup: &Lookup,
    tenant: &str,
    auth_id: &str,
) -> Result<(AuthenticatedDevice, Vec<u8>), AuthError> {
    let found = found(lookup)?;
    let now = Utc::now();
    let key = found
        .secrets
        .iter()
        .filter(|s| s.usable(now))
        .find_map(|s| s.key.clone())
        .ok_or(AuthError::BadCredentials)?;
    Ok((device(tenant, found, auth_id), key))
}

pub fn split_username(username: &str) -> Result<(&str, &str), AuthError> {
    match username.split_once('@') {
        Some((a, t)) if !a.is_empty() && !t.is_empty() => Ok((a, t)),
        _ => Err(AuthError::MalformedUsername),
    }
}

async fn listen(inner: Arc<Inner>, db: Connector, mut shutdown: watch::Receiver<bool>) {
    loop {
        match listen_once(&inner, &db, &mut shutdown).await {
            Ok(()) => break,
            Err(e) => tracing::warn!(error = %e, "registry change listener lost; cache bypassed"),
        }
        inner.caches().iter().for_each(|c| c.deactivate());
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    inner.caches().iter().for_each(|c| c.deactivate());
}

/// Returns `Ok` on shutdown and an error when the connection ends.
async fn listen_once(
    inner: &Inner,
    db: &Connector,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (client, mut conn) = db.connect().await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let driver = tokio::spawn(async move {
        while let Some(msg) = futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await?;
    inner.caches().iter().for_each(|c| c.activate());
    tracing::debug!("listening for registry changes");
    let result = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(payload) => on_change(inner, &payload),
                None => break Err(anyhow::anyhow!("notification connection closed")),
            },
            _ = shutdown.wait_for(|s| *s) => break Ok(()),
        }
    };
    driver.abort();
    result
}

fn on_change(inner: &Inner, payload: &str) {
    match serde_json::from_str::<RegistryChange>(payload) {
        Ok(change) => {
            for c in inner.caches() {
                c.invalidate_tenant(&change.tenant);
            }
            // No receiver is fine: nobody holds connections in this process.
            let _ = inner.changes.send(change);
        }
        Err(e) => {
            tracing::warn!(error = %e, payload, "unreadable registry notification; cache cleared");
            inner.caches().iter().for_each(|c| c.clear());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_split_at_the_first_at() {
        assert_eq!(
            split_username("sensor1@DEFAULT_TENANT"),
            Ok(("sensor1", "DEFAULT_TENANT"))
        );
        assert_eq!(split_username("a@b@c"), Ok(("a", "b@c")));
        assert_eq!(split_username("a"), Err(AuthError::MalformedUsername));
        assert_eq!(split_username("@t"), Err(AuthError::MalformedUsername));
        assert_eq!(split_username("a@"), Err(AuthError::MalformedUsername));
    }

    #[test]
    fn validity_windows() {
        let now = Utc::now();
        let s = |v: serde_json::Value| Secret::from_json(v.as_object().unwrap());
        assert!(s(serde_json::json!({})).usable(now));
        assert!(!s(serde_json::json!({"enabled": false})).usable(now));
        assert!(!s(serde_json::json!({"not-after": "2000-01-01T00:00:00Z"})).usable(now));
        assert!(!s(serde_json::json!({"not-before": "2999-01-01T00:00:00Z"})).usable(now));
        assert!(
            s(serde_json::json!({"not-before": "2000-01-01T00:00:00Z",
                                     "not-after": "2999-01-01T00:00:00Z"}))
            .usable(now)
        );
    }

    #[test]
    fn which_changes_revoke_access() {
        let c = |kind: &str, op: &str, enabled: Option<bool>| RegistryChange {
            kind: kind.into(),
            op: op.into(),
            tenant: "t".into(),
            device: None,
            enabled,
        };
        assert!(c("device", "DELETE", None).revokes_access());
        assert!(c("tenant", "UPDATE", Some(false)).revokes_access());
        assert!(!c("device", "UPDATE", Some(true)).revokes_access());
        assert!(!c("credentials", "DELETE", None).revokes_access());
        assert!(
            !c("schema", "DELETE", None).revokes_access(),
            "a schema change closes no connection"
        );
    }
}
