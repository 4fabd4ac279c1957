//! The schema registry's PostgreSQL operations (tables of migration 0006).

use super::SrError;
use super::compatibility::{self, Level};
use deadpool_postgres::{GenericClient, Pool};
use sha2::{Digest, Sha256};

/// Which version of a subject a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Latest,
    Number(i32),
}

impl Version {
    /// `latest`, `-1` or 1..2^31-1 (Confluent's rule).
    pub fn parse(text: &str) -> Option<Version> {
        match text {
            "latest" | "-1" => Some(Version::Latest),
            _ => text
                .parse::<i32>()
                .ok()
                .filter(|n| *n > 0)
                .map(Version::Number),
        }
    }
}

/// One version of a subject.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: i32,
    pub id: i32,
    pub schema: String,
}

/// Who may see what: `Some(tenant)` restricts every read to that tenant's subjects.
pub type Scope<'a> = Option<&'a str>;

pub async fn subjects(
    pool: &Pool,
    scope: Scope<'_>,
    prefix: &str,
    deleted: bool,
) -> Result<Vec<String>, SrError> {
    let db = pool.get().await?;
    let rows = db
        .query(
            "SELECT DISTINCT subject FROM subject_versions
              WHERE ($1::text IS NULL OR tenant_id = $1) AND starts_with(subject, $2)
                AND ($3 OR NOT deleted)
              ORDER BY subject",
            &[&scope, &prefix, &deleted],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn versions(
    pool: &Pool,
    scope: Scope<'_>,
    subject: &str,
    deleted: bool,
) -> Result<Vec<i32>, SrError> {
    let db = pool.get().await?;
    let rows = db
        .query(
            "SELECT version FROM subject_versions
              WHERE subject = $1 AND ($2::text IS NULL OR tenant_id = $2) AND ($3 OR NOT deleted)
              ORDER BY version",
            &[&subject, &scope, &deleted],
        )
        .await?;
    if rows.is_empty() {
        return Err(SrError::subject_not_found(subject));
    }
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A version of a subject; soft-deleted ones only when `deleted`.
pub async fn version(
    pool: &Pool,
    scope: Scope<'_>,
    subject: &str,
    version: Version,
    deleted: bool,
) -> Result<SubjectVersion, SrError> {
    let db = pool.get().await?;
    let number = match version {
        Version::Latest => None,
        Version::Number(n) => Some(n),
    };
    let row = db
        .query_opt(
            "SELECT v.version, v.schema_id, s.schema FROM subject_versions v
               JOIN payload_schemas s ON s.id = v.schema_id
              WHERE v.subject = $1 AND ($2::text IS NULL OR v.tenant_id = $2)
                AND ($3 OR NOT v.deleted) AND ($4::int IS NULL OR v.version = $4)
              ORDER BY v.version DESC LIMIT 1",
            &[&subject, &scope, &deleted, &number],
        )
        .await?;
    match row {
        Some(r) => Ok(SubjectVersion {
            subject: subject.to_owned(),
            version: r.get(0),
            id: r.get(1),
            schema: r.get(2),
        }),
        None => {
            // Which is missing: the subject or only that version.
            versions(pool, scope, subject, deleted).await?;
            Err(SrError::version_not_found(subject))
        }
    }
}

/// The schema with this id, if `scope` may see it (a tenant sees the schemas its subjects
/// hold, soft-deleted versions included, as Confluent serves ids of deleted versions).
pub async fn schema_by_id(pool: &Pool, scope: Scope<'_>, id: i32) -> Result<String, SrError> {
    let db = pool.get().await?;
    let row = db
        .query_opt(
            "SELECT s.schema FROM payload_schemas s
              WHERE s.id = $1 AND ($2::text IS NULL OR EXISTS (
                    SELECT 1 FROM subject_versions v WHERE v.schema_id = s.id AND v.tenant_id = $2))",
            &[&id, &scope],
        )
        .await?;
    row.map(|r| r.get(0))
        .ok_or_else(|| SrError::schema_not_found(id))
}

/// The subjects and versions that hold schema `id`.
pub async fn id_versions(
    pool: &Pool,
    scope: Scope<'_>,
    id: i32,
    deleted: bool,
) -> Result<Vec<(String, i32)>, SrError> {
    let db = pool.get().await?;
    let rows = db
        .query(
            "SELECT subject, version FROM subject_versions
              WHERE schema_id = $1 AND ($2::text IS NULL OR tenant_id = $2) AND ($3 OR NOT deleted)
              ORDER BY subject, version",
            &[&id, &scope, &deleted],
        )
        .await?;
    if rows.is_empty() {
        return Err(SrError::schema_not_found(id));
    }
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The live version of `subject` that holds exactly `schema` (the registry's stored form).
pub async fn lookup(
    pool: &Pool,
    scope: Scope<'_>,
    subject: &str,
    schema: &str,
    deleted: bool,
) -> Result<SubjectVersion, SrError> {
    let db = pool.get().await?;
    let row = db
        .query_opt(
            "SELECT v.version, v.schema_id FROM subject_versions v
               JOIN payload_schemas s ON s.id = v.schema_id
              WHERE v.subject = $1 AND ($2::text IS NULL OR v.tenant_id = $2)
                AND s.fingerprint = $3 AND ($4 OR NOT v.deleted)
              ORDER BY v.version DESC LIMIT 1",
            &[&subject, &scope, &fingerprint(schema), &deleted],
        )
        .await?;
    match row {
        Some(r) => Ok(SubjectVersion {
            subject: subject.to_owned(),
            version: r.get(0),
            id: r.get(1),
            schema: schema.to_owned(),
        }),
        None => {
            versions(pool, scope, subject, deleted).await?;
            Err(SrError::schema_not_found_in(subject))
        }
    }
}

/// The compatibility level set for `subject` (`None`: the global one), if any.
pub async fn level(pool: &Pool, subject: Option<&str>) -> Result<Option<Level>, SrError> {
    let db = pool.get().await?;
    level_in(&db, subject).await
}

async fn level_in(
    db: &impl GenericClient,
    subject: Option<&str>,
) -> Result<Option<Level>, SrError> {
    let row = db
        .query_opt(
            "SELECT compatibility FROM subject_config WHERE subject = $1",
            &[&subject.unwrap_or("")],
        )
        .await?;
    Ok(row.and_then(|r| Level::parse(r.get(0))))
}

/// The level that applies to `subject`: its own, else the global one, else BACKWARD.
async fn effective_level(db: &impl GenericClient, subject: &str) -> Result<Level, SrError> {
    if let Some(l) = level_in(db, Some(subject)).await? {
        return Ok(l);
    }
    Ok(level_in(db, None).await?.unwrap_or(compatibility::DEFAULT))
}

/// Sets the global level (`subject` `None`) or a subject's; `false` when the subject's tenant
/// does not exist.
pub async fn set_level(
    pool: &Pool,
    subject: Option<(&str, &str)>,
    level: Level,
) -> Result<bool, SrError> {
    let db = pool.get().await?;
    let (subject, tenant) = match subject {
        Some((s, t)) => (s, Some(t)),
        None => ("", None),
    };
    let n = db
        .execute(
            "INSERT INTO subject_config (subject, tenant_id, compatibility)
             SELECT $1, $2, $3
              WHERE $2::text IS NULL OR EXISTS (SELECT 1 FROM tenants WHERE tenant_id = $2)
             ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
            &[&subject, &tenant, &level.name()],
        )
        .await?;
    Ok(n == 1)
}

/// Removes a level; returns the one removed.
pub async fn delete_level(pool: &Pool, subject: Option<&str>) -> Result<Option<Level>, SrError> {
    let db = pool.get().await?;
    let row = db
        .query_opt(
            "DELETE FROM subject_config WHERE subject = $1 RETURNING compatibility",
            &[&subject.unwrap_or("")],
        )
        .await?;
    Ok(row.and_then(|r| Level::parse(r.get(0))))
}

/// The live versions of `subject` and their schemas, oldest first.
async fn live_schemas(
    db: &impl GenericClient,
    subject: &str,
) -> Result<Vec<(i32, String)>, SrError> {
    let rows = db
        .query(
            "SELECT v.version, s.schema FROM subject_versions v
               JOIN payload_schemas s ON s.id = v.schema_id
              WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version",
            &[&subject],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Why `schema` may not join `subject` at the level that applies (or at `level`), against
/// its live versions; `None` when it may. `Err` on a stored schema that no longer parses.
pub async fn problems(
    pool: &Pool,
    subject: &str,
    schema: &apache_avro::Schema,
    against: Option<Version>,
) -> Result<Vec<String>, SrError> {
    let db = pool.get().await?;
    problems_in(&db, subject, schema, against).await
}

async fn problems_in(
    db: &impl GenericClient,
    subject: &str,
    schema: &apache_avro::Schema,
    against: Option<Version>,
) -> Result<Vec<String>, SrError> {
    let level = effective_level(db, subject).await?;
    let mut existing = Vec::new();
    for (version, text) in live_schemas(db, subject).await? {
        // A test against one named version compares with that version alone.
        if matches!(against, Some(Version::Number(n)) if n != version) {
            continue;
        }
        existing.push(apache_avro::Schema::parse_str(&text).map_err(|e| {
            SrError::store(format!(
                "a stored schema of `{subject}` does not parse: {e}"
            ))
        })?);
    }
    Ok(level.problems(schema, &existing))
}

/// Registers `schema` (stored form) under `subject` of `tenant`: the id of an identical live
/// version if there is one, else a new version after the compatibility check.
pub async fn register(
    pool: &Pool,
    subject: &str,
    tenant: &str,
    parsed: &apache_avro::Schema,
    schema: &str,
) -> Result<i32, SrError> {
    let mut db = pool.get().await?;
    let tx = db.transaction().await?;
    // One registration per subject at a time: version numbers and checks see each other.
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&subject])
        .await?;
    let print = fingerprint(schema);
    let same = tx
        .query_opt(
            "SELECT v.schema_id FROM subject_versions v JOIN payload_schemas s ON s.id = v.schema_id
              WHERE v.subject = $1 AND s.fingerprint = $2 AND NOT v.deleted LIMIT 1",
            &[&subject, &print],
        )
        .await?;
    if let Some(r) = same {
        return Ok(r.get(0));
    }
    let problems = problems_in(&tx, subject, parsed, None).await?;
    if !problems.is_empty() {
        return Err(SrError::incompatible(subject, &problems));
    }
    let tenant_exists = tx
        .query_opt("SELECT 1 FROM tenants WHERE tenant_id = $1", &[&tenant])
        .await?
        .is_some();
    if !tenant_exists {
        return Err(SrError::invalid_subject(format!(
            "subject `{subject}` names tenant `{tenant}`, which does not exist"
        )));
    }
    let id: i32 = tx
        .query_one(
            "INSERT INTO payload_schemas (schema, fingerprint) VALUES ($1, $2)
             ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = EXCLUDED.fingerprint
             RETURNING id",
            &[&schema, &print],
        )
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO subject_versions (subject, version, tenant_id, schema_id)
         SELECT $1, coalesce(max(version), 0) + 1, $2, $3 FROM subject_versions WHERE subject = $1",
        &[&subject, &tenant, &id],
    )
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Deletes every version of `subject`: soft (they stay readable with `deleted=true`) or, for
/// versions already soft-deleted, permanent. Returns the versions deleted.
pub async fn delete_subject(
    pool: &Pool,
    subject: &str,
    permanent: bool,
) -> Result<Vec<i32>, SrError> {
    let db = pool.get().await?;
    let rows = if permanent {
        let live = db
            .query_opt(
                "SELECT 1 FROM subject_versions WHERE subject = $1 AND NOT deleted LIMIT 1",
                &[&subject],
            )
            .await?;
        if live.is_some() {
            return Err(SrError::not_soft_deleted(subject));
        }
        db.query(
            "DELETE FROM subject_versions WHERE subject = $1 RETURNING version",
            &[&subject],
        )
        .await?
    } else {
        db.query(
            "UPDATE subject_versions SET deleted = true WHERE subject = $1 AND NOT deleted
             RETURNING version",
            &[&subject],
        )
        .await?
    };
    if rows.is_empty() {
        return Err(SrError::subject_not_found(subject));
    }
    let mut versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    versions.sort_unstable();
    if permanent {
        db.execute("DELETE FROM subject_config WHERE subject = $1", &[&subject])
            .await?;
    }
    Ok(versions)
}

/// Deletes one version (soft, or permanent once soft-deleted); returns its number.
pub async fn delete_version(
    pool: &Pool,
    subject: &str,
    version: Version,
    permanent: bool,
) -> Result<i32, SrError> {
    let current = self::version(pool, None, subject, version, permanent).await?;
    let db = pool.get().await?;
    if permanent {
        let deleted: bool = db
            .query_one(
                "SELECT deleted FROM subject_versions WHERE subject = $1 AND version = $2",
                &[&subject, &current.version],
            )
            .await?
            .get(0);
        if !deleted {
            return Err(SrError::not_soft_deleted(subject));
        }
        db.execute(
            "DELETE FROM subject_versions WHERE subject = $1 AND version = $2",
            &[&subject, &current.version],
        )
        .await?;
    } else {
        db.execute(
            "UPDATE subject_versions SET deleted = true WHERE subject = $1 AND version = $2",
            &[&subject, &current.version],
        )
        .await?;
    }
    Ok(current.version)
}

/// The live schemas of a tenant's subject, newest first, for gateways: (id, schema).
pub async fn topic_schemas(
    db: &impl GenericClient,
    subject: &str,
) -> Result<Vec<(i32, String)>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT v.schema_id, s.schema FROM subject_versions v
               JOIN payload_schemas s ON s.id = v.schema_id
              WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version DESC",
            &[&subject],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn fingerprint(schema: &str) -> Vec<u8> {
    Sha256::digest(schema.as_bytes()).to_vec()
}
