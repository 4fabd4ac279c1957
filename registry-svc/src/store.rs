//! The registry's PostgreSQL operations: one function per management operation, each in one
//! transaction, returning the resource version that becomes the ETag.

use crate::error::{RegistryError, Result};
use crate::model::application::{self, Application};
use crate::model::check_new_tenant_id;
use crate::model::credentials::{self, CredentialRules, Credentials};
use crate::model::device::Device;
use crate::model::tenant::Tenant;
use crate::search::{self, SearchQuery};
use deadpool_postgres::{GenericClient, Pool};
use ferrule_schemas::topic::tenant_collision_key;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

/// Handle on the registry's tables; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    rules: CredentialRules,
    /// How Kafka topics are named: a new tenant's id must make legal ones.
    topics: ferrule_schemas::TopicNames,
}

/// One page of a search: the total number of matches and the documents of this page.
#[derive(Debug, serde::Serialize)]
pub struct Page {
    pub total: i64,
    pub result: Vec<Value>,
}

fn new_version() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn check_version(stored: &str, expected: Option<&str>) -> Result<()> {
    match expected {
        Some(e) if e != stored => Err(RegistryError::PreconditionFailed),
        _ => Ok(()),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| RegistryError::Internal(e.to_string()))
}

fn is(e: &tokio_postgres::Error, state: &SqlState) -> bool {
    e.code() == Some(state)
}

fn constraint(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().and_then(|d| d.constraint())
}

fn timestamp(t: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

impl Store {
    pub fn new(pool: Pool, rules: CredentialRules) -> Self {
        Store {
            pool,
            rules,
            topics: Default::default(),
        }
    }

    /// Checks new tenant ids against topic names behind this prefix (`kafka.topic_prefix`)
    /// rather than Hono's plain names.
    pub fn with_topic_names(mut self, topics: ferrule_schemas::TopicNames) -> Self {
        self.topics = topics;
        self
    }

    /// How this deployment names its topics.
    pub fn topic_names(&self) -> &ferrule_schemas::TopicNames {
        &self.topics
    }

    /// Whether `id` may name a new tenant (see [`check_new_tenant_id`]).
    pub fn check_new_tenant_id(&self, id: &str) -> Result<()> {
        Ok(check_new_tenant_id(&self.topics, id)?)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    // ---- tenants -------------------------------------------------------------------------

    /// Fails with 409 when a trust anchor's subject DN belongs to another tenant outside the
    /// same trust-anchor group.
    async fn check_trust_anchors(
        db: &impl GenericClient,
        tenant_id: &str,
        t: &Tenant,
    ) -> Result<()> {
        let dns: Vec<String> = t.trust_anchor_dns().map(str::to_owned).collect();
        if dns.is_empty() {
            return Ok(());
        }
        let clash = db
            .query_opt(
                "SELECT t.tenant_id FROM tenants t,
                        jsonb_array_elements(coalesce(t.data->'trusted-ca', '[]'::jsonb)) ca
                  WHERE t.tenant_id <> $1 AND ca->>'subject-dn' = ANY($2)
                    AND NOT coalesce(t.data->>'trust-anchor-group' = $3::text, false)
                  LIMIT 1",
                &[&tenant_id, &dns, &t.trust_anchor_group],
            )
            .await?;
        match clash {
            Some(_) => Err(RegistryError::Conflict(
                "a trust anchor with this subject DN belongs to another tenant".into(),
            )),
            None => Ok(()),
        }
    }

    /// The tenant, other than `id`, whose topics Kafka would take for those of `id` (same
    /// [`tenant_collision_key`]). `replace(tenant_id, '.', '_')` is the expression of the
    /// unique index `tenants_topic_key_idx` (migration 4) and must stay what
    /// `tenant_collision_key` computes.
    async fn topic_clash(db: &impl GenericClient, id: &str) -> Result<Option<String>> {
        let key = tenant_collision_key(id);
        let row = db
            .query_opt(
                "SELECT tenant_id FROM tenants
                  WHERE replace(tenant_id, '.', '_') = $1 AND tenant_id <> $2
                  LIMIT 1",
                &[&key, &id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    fn topic_conflict(id: &str, other: &str) -> RegistryError {
        RegistryError::Conflict(format!(
            "tenant id `{id}` clashes with existing tenant `{other}`: Kafka treats `.` and `_` \
             in topic names alike, so both would use the same topics"
        ))
    }

    pub async fn create_tenant(&self, id: Option<String>, t: Tenant) -> Result<(String, String)> {
        let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Generated ids pass as well; checked here so that no way of creating a tenant makes
        // one whose topics Kafka would refuse.
        self.check_new_tenant_id(&id)?;
        let version = new_version();
        let data = to_json(&t)?;
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        Self::check_trust_anchors(&tx, &id, &t).await?;
        // Answers with the other tenant's id; the unique index below is what makes the rule
        // hold under concurrent creates.
        if let Some(other) = Self::topic_clash(&tx, &id).await? {
            return Err(Self::topic_conflict(&id, &other));
        }
        let inserted = tx
            .execute(
                "INSERT INTO tenants (tenant_id, version, data) VALUES ($1, $2, $3)",
                &[&id, &version, &data],
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) => {
                return Err(match constraint(&e) {
                    Some("tenants_alias_idx") => {
                        RegistryError::Conflict("a tenant with this alias exists".into())
                    }
                    Some("tenants_topic_key_idx") => {
                        // A concurrent create of a clashing id committed first; it is visible
                        // once this transaction is gone.
                        drop(tx);
                        match Self::topic_clash(&db, &id).await? {
                            Some(other) => Self::topic_conflict(&id, &other),
                            None => RegistryError::Conflict("a tenant with this id exists".into()),
                        }
                    }
                    _ => RegistryError::Conflict("a tenant with this id exists".into()),
                });
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok((id, version))
    }

    pub async fn get_tenant(&self, id: &str) -> Result<(Value, String)> {
        let db = self.pool.get().await?;
        let row = db
            .query_opt(
                "SELECT data, version FROM tenants WHERE tenant_id = $1",
                &[&id],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("tenant `{id}` not found")))?;
        Ok((row.get(0), row.get(1)))
    }

    pub async fn update_tenant(
        &self,
        id: &str,
        t: Tenant,
        if_match: Option<&str>,
    ) -> Result<String> {
        let data = to_json(&t)?;
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT version FROM tenants WHERE tenant_id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("tenant `{id}` not found")))?;
        check_version(row.get(0), if_match)?;
        Self::check_trust_anchors(&tx, id, &t).await?;
        let version = new_version();
        let updated = tx
            .execute(
                "UPDATE tenants SET data = $2, version = $3, updated = now() WHERE tenant_id = $1",
                &[&id, &data, &version],
            )
            .await;
        match updated {
            Ok(_) => {}
            Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) => {
                return Err(RegistryError::Conflict(
                    "a tenant with this alias exists".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(version)
    }

    pub async fn delete_tenant(&self, id: &str, if_match: Option<&str>) -> Result<()> {
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT version FROM tenants WHERE tenant_id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("tenant `{id}` not found")))?;
        check_version(row.get(0), if_match)?;
        tx.execute("DELETE FROM tenants WHERE tenant_id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn search_tenants(&self, q: &SearchQuery) -> Result<Page> {
        let s = search::build(
            q,
            "tenant_id, data",
            "tenants",
            "tenant_id",
            "true",
            vec![],
            None,
        );
        self.page(&s, |row| {
            let mut doc: Value = row.get(2);
            let id: String = row.get(1);
            if let Value::Object(m) = &mut doc {
                m.insert("id".into(), Value::String(id));
            }
            doc
        })
        .await
    }

    async fn page(
        &self,
        s: &search::SqlSearch,
        doc: impl Fn(&tokio_postgres::Row) -> Value,
    ) -> Result<Page> {
        let db = self.pool.get().await?;
        let rows = db.query(&s.sql, &s.params()).await?;
        let total = rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0);
        Ok(Page {
            total,
            result: rows.iter().map(doc).collect(),
        })
    }

    // ---- devices -------------------------------------------------------------------------

    pub async fn create_device(
        &self,
        tenant: &str,
        id: Option<String>,
        d: Device,
    ) -> Result<(String, String)> {
        let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let version = new_version();
        let data = to_json(&d)?;
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        let limit: Option<String> = tx
            .query_opt(
                "SELECT data->'registration-limits'->>'max-devices' FROM tenants
                  WHERE tenant_id = $1 FOR SHARE",
                &[&tenant],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("tenant `{tenant}` not found")))?
            .get(0);
        if let Some(max) = limit
            .and_then(|l| l.parse::<i64>().ok())
            .filter(|m| *m >= 0)
        {
            let n: i64 = tx
                .query_one(
                    "SELECT count(*) FROM devices WHERE tenant_id = $1",
                    &[&tenant],
                )
                .await?
                .get(0);
            if n >= max {
                return Err(RegistryError::Forbidden(format!(
                    "tenant `{tenant}` may register at most {max} devices"
                )));
            }
        }
        let inserted = tx
            .execute(
                "INSERT INTO devices (tenant_id, device_id, version, credentials_version, data)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&tenant, &id, &version, &new_version(), &data],
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) => {
                return Err(RegistryError::Conflict(format!("device `{id}` exists")));
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok((id, version))
    }

    fn device_doc(data: Value, created: Value, updated: Value) -> Value {
        let mut doc = data;
        if let Value::Object(m) = &mut doc {
            let mut status = serde_json::Map::new();
            status.insert("created".into(), created);
            if !updated.is_null() {
                status.insert("updated".into(), updated);
            }
            m.insert("status".into(), Value::Object(status));
        }
        doc
    }

    pub async fn get_device(&self, tenant: &str, id: &str) -> Result<(Value, String)> {
        let db = self.pool.get().await?;
        let row = db
            .query_opt(
                "SELECT data, version, created, updated FROM devices
                  WHERE tenant_id = $1 AND device_id = $2",
                &[&tenant, &id],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device `{id}` not found")))?;
        let doc = Self::device_doc(row.get(0), timestamp(row.get(2)), timestamp(row.get(3)));
        Ok((doc, row.get(1)))
    }

    pub async fn update_device(
        &self,
        tenant: &str,
        id: &str,
        d: Device,
        if_match: Option<&str>,
    ) -> Result<String> {
        let data = to_json(&d)?;
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT version FROM devices WHERE tenant_id = $1 AND device_id = $2 FOR UPDATE",
                &[&tenant, &id],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device `{id}` not found")))?;
        check_version(row.get(0), if_match)?;
        let version = new_version();
        tx.execute(
            "UPDATE devices SET data = $3, version = $4, updated = now()
              WHERE tenant_id = $1 AND device_id = $2",
            &[&tenant, &id, &data, &version],
        )
        .await?;
        tx.commit().await?;
        Ok(version)
    }

    pub async fn delete_device(
        &self,
        tenant: &str,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT version FROM devices WHERE tenant_id = $1 AND device_id = $2 FOR UPDATE",
                &[&tenant, &id],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device `{id}` not found")))?;
        check_version(row.get(0), if_match)?;
        tx.execute(
            "DELETE FROM devices WHERE tenant_id = $1 AND device_id = $2",
            &[&tenant, &id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_all_devices(&self, tenant: &str) -> Result<u64> {
        let db = self.pool.get().await?;
        Ok(db
            .execute("DELETE FROM devices WHERE tenant_id = $1", &[&tenant])
            .await?)
    }

    pub async fn search_devices(&self, tenant: &str, q: &SearchQuery) -> Result<Page> {
        // A gateway is a device that another device names in `via`, or a member of a group.
        let gateway = "(EXISTS (SELECT 1 FROM devices o WHERE o.tenant_id = devices.tenant_id
                                  AND o.data->'via' ? devices.device_id)
                        OR jsonb_array_length(coalesce(data->'memberOf', '[]'::jsonb)) > 0)";
        let base: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(tenant.to_owned())];
        let s = search::build(
            q,
            "device_id, data, created, updated",
            "devices",
            "device_id",
            "tenant_id = $1",
            base,
            Some(gateway),
        );
        self.page(&s, |row| {
            let mut doc =
                Self::device_doc(row.get(2), timestamp(row.get(3)), timestamp(row.get(4)));
            let id: String = row.get(1);
            if let Value::Object(m) = &mut doc {
                m.insert("id".into(), Value::String(id));
            }
            doc
        })
        .await
    }

    // ---- credentials ---------------------------------------------------------------------

    pub async fn get_credentials(&self, tenant: &str, device: &str) -> Result<(Value, String)> {
        let db = self.pool.get().await?;
        let row = db
            .query_opt(
                "SELECT credentials_version FROM devices WHERE tenant_id = $1 AND device_id = $2",
                &[&tenant, &device],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device `{device}` not found")))?;
        let version: String = row.get(0);
        let stored = Self::stored_credentials(&db, tenant, device).await?;
        Ok((to_json(&credentials::public_view(&stored))?, version))
    }

    async fn stored_credentials(
        db: &impl GenericClient,
        tenant: &str,
        device: &str,
    ) -> Result<Vec<Credentials>> {
        db.query(
            "SELECT data FROM credentials WHERE tenant_id = $1 AND device_id = $2
              ORDER BY type, auth_id",
            &[&tenant, &device],
        )
        .await?
        .into_iter()
        .map(|r| {
            serde_json::from_value(r.get(0))
                .map_err(|e| RegistryError::Internal(format!("stored credentials: {e}")))
        })
        .collect()
    }

    pub async fn set_credentials(
        &self,
        tenant: &str,
        device: &str,
        requested: Vec<Credentials>,
        if_match: Option<&str>,
    ) -> Result<String> {
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT d.credentials_version,
                        t.data->'registration-limits'->>'max-credentials-per-device'
                   FROM devices d JOIN tenants t USING (tenant_id)
                  WHERE d.tenant_id = $1 AND d.device_id = $2 FOR UPDATE OF d",
                &[&tenant, &device],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device `{device}` not found")))?;
        check_version(row.get(0), if_match)?;
        let limit: Option<String> = row.get(1);
        if let Some(max) = limit.and_then(|l| l.parse::<usize>().ok())
            && requested.len() > max
        {
            return Err(RegistryError::Forbidden(format!(
                "a device of tenant `{tenant}` may have at most {max} credentials"
            )));
        }
        let existing = Self::stored_credentials(&tx, tenant, device).await?;
        let rules = self.rules;
        let prepared =
            tokio::task::spawn_blocking(move || credentials::prepare(requested, &existing, rules))
                .await
                .map_err(|e| RegistryError::Internal(e.to_string()))??;
        tx.execute(
            "DELETE FROM credentials WHERE tenant_id = $1 AND device_id = $2",
            &[&tenant, &device],
        )
        .await?;
        for c in &prepared {
            let data = to_json(c)?;
            let r = tx
                .execute(
                    "INSERT INTO credentials (tenant_id, device_id, type, auth_id, data)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&tenant, &device, &c.cred_type, &c.auth_id, &data],
                )
                .await;
            match r {
                Ok(_) => {}
                Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) => {
                    return Err(RegistryError::Conflict(format!(
                        "credentials `{}`/`{}` belong to another device",
                        c.cred_type, c.auth_id
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let version = new_version();
        tx.execute(
            "UPDATE devices SET credentials_version = $3 WHERE tenant_id = $1 AND device_id = $2",
            &[&tenant, &device, &version],
        )
        .await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Creates or replaces an application of `tenant`; returns the new version.
    pub async fn set_application(
        &self,
        tenant: &str,
        app_id: &str,
        requested: Application,
        if_match: Option<&str>,
    ) -> Result<String> {
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        let known = tx
            .query_opt("SELECT 1 FROM tenants WHERE tenant_id = $1", &[&tenant])
            .await?;
        if known.is_none() {
            return Err(RegistryError::NotFound(format!(
                "tenant `{tenant}` not found"
            )));
        }
        let row = tx
            .query_opt(
                "SELECT version, data FROM applications
                  WHERE tenant_id = $1 AND app_id = $2 FOR UPDATE",
                &[&tenant, &app_id],
            )
            .await?;
        let existing = match &row {
            Some(r) => {
                check_version(r.get(0), if_match)?;
                Some(
                    serde_json::from_value::<Application>(r.get(1))
                        .map_err(|e| RegistryError::Internal(e.to_string()))?,
                )
            }
            None if if_match.is_some() => return Err(RegistryError::PreconditionFailed),
            None => None,
        };
        let (rules, id) = (self.rules, app_id.to_owned());
        let prepared = tokio::task::spawn_blocking(move || {
            application::prepare(&id, requested, existing, rules)
        })
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))??;
        let version = new_version();
        tx.execute(
            "INSERT INTO applications (tenant_id, app_id, version, data) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, app_id) DO UPDATE
               SET version = EXCLUDED.version, data = EXCLUDED.data, updated = now()",
            &[&tenant, &app_id, &version, &to_json(&prepared)?],
        )
        .await?;
        tx.commit().await?;
        Ok(version)
    }

    /// An application as stored (secrets hashed) and its version.
    pub async fn stored_application(
        &self,
        tenant: &str,
        app_id: &str,
    ) -> Result<(Application, String)> {
        let db = self.pool.get().await?;
        let row = db
            .query_opt(
                "SELECT data, version FROM applications WHERE tenant_id = $1 AND app_id = $2",
                &[&tenant, &app_id],
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("application `{app_id}` not found")))?;
        let app = serde_json::from_value(row.get(0))
            .map_err(|e| RegistryError::Internal(e.to_string()))?;
        Ok((app, row.get(1)))
    }

    /// Removes an application; 404 when there is none.
    pub async fn delete_application(
        &self,
        tenant: &str,
        app_id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let db = self.pool.get().await?;
        let row = db
            .query_opt(
                "DELETE FROM applications WHERE tenant_id = $1 AND app_id = $2
                  AND ($3::text IS NULL OR version = $3) RETURNING 1",
                &[&tenant, &app_id, &if_match],
            )
            .await?;
        if row.is_some() {
            return Ok(());
        }
        // Either it does not exist or the version did not match.
        self.stored_application(tenant, app_id).await?;
        Err(RegistryError::PreconditionFailed)
    }

    /// Whether the database answers; used by readiness.
    pub async fn ping(&self) -> Result<()> {
        let db = self.pool.get().await?;
        db.query_one("SELECT 1", &[]).await?;
        Ok(())
    }
}
