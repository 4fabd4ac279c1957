//! PostgreSQL access: the connection pool, creating the database when it is missing, and the
//! schema migrations embedded in the binary and applied once at start-up.

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::{Deserialize, Serialize};
use tokio_postgres::{NoTls, error::SqlState};

/// Where the registry keeps its data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// libpq-style URL, e.g. `postgres://postgres@127.0.0.1:5432/ferrule`.
    pub url: String,
    /// Connections kept in the pool.
    pub pool_size: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/ferrule".into(),
            pool_size: 16,
        }
    }
}

/// The migrations in order; each runs in its own transaction exactly once per database.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_registry.sql")),
    (2, include_str!("../migrations/0002_command_routing.sql")),
    (3, include_str!("../migrations/0003_applications.sql")),
    (4, include_str!("../migrations/0004_tenant_topic_key.sql")),
];

/// An arbitrary constant that serialises concurrent migrators (tests, several instances).
const MIGRATION_LOCK: i64 = 0x4645_5252_554c_4531;

/// Opens a pool to the configured database, creating the database if it does not exist yet,
/// and brings its schema up to date.
pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<Pool> {
    let pg: tokio_postgres::Config = cfg.url.parse().context("database.url is not valid")?;
    if let Err(e) = pg.connect(NoTls).await {
        if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) {
            create_database(&pg).await?;
        } else {
            return Err(e)
                .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(&cfg.url)));
        }
    }
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(mgr)
        .max_size(cfg.pool_size.max(1))
        .build()
        .context("building the PostgreSQL pool")?;
    migrate(&pool).await?;
    warn_about_clashing_tenants(&pool).await?;
    Ok(pool)
}

/// Tenants whose ids differ only in `.` versus `_` predate the rule against them and were left
/// out of its index by migration 4 (see there); they are named at every start-up until the
/// operator has resolved them. Costs one catalog lookup when there are none.
async fn warn_about_clashing_tenants(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.get().await.context("getting a connection")?;
    let partial = client
        .query_one(
            "SELECT indpred IS NOT NULL FROM pg_index
              WHERE indexrelid = 'tenants_topic_key_idx'::regclass",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    if partial {
        let clashing: Vec<String> = client
            .query(
                "SELECT tenant_id FROM tenants
                  WHERE replace(tenant_id, '.', '_') IN (
                        SELECT replace(tenant_id, '.', '_') FROM tenants
                         GROUP BY 1 HAVING count(*) > 1)
                  ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !clashing.is_empty() {
            tracing::warn!(
                ?clashing,
                "tenants whose ids differ only in `.` versus `_` share their Kafka topics' \
                 names for Kafka, which creates only one of each; rename or delete all but \
                 one of each group"
            );
        }
    }
    Ok(())
}

async fn create_database(pg: &tokio_postgres::Config) -> anyhow::Result<()> {
    let name = pg.get_dbname().unwrap_or("ferrule").to_owned();
    let mut admin = pg.clone();
    admin.dbname("postgres");
    let (client, conn) = admin
        .connect(NoTls)
        .await
        .context("connecting to database postgres")?;
    let task = tokio::spawn(conn);
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match client.batch_execute(&sql).await {
        Ok(()) => tracing::info!(database = %name, "created database"),
        // Another instance created it in the meantime; when both were at it at once,
        // PostgreSQL reports the catalog's unique index instead.
        Err(e)
            if e.code() == Some(&SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
        Err(e) => return Err(e).context("creating the database"),
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .context("getting a connection for migrations")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS ferrule_migrations (
                    version integer PRIMARY KEY,
                    applied timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        for (version, sql) in MIGRATIONS {
            let done = client
                .query_opt(
                    "SELECT 1 FROM ferrule_migrations WHERE version = $1",
                    &[version],
                )
                .await?
                .is_some();
            if done {
                continue;
            }
            let tx = client.transaction().await?;
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {version}"))?;
            tx.execute(
                "INSERT INTO ferrule_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(version, "applied migration");
        }
        anyhow::Ok(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

/// The URL without its password, for log and error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("host=h"), "host=h");
    }
}
