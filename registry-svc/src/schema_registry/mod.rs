//! Tenants' payload schemas behind the subset of Confluent's Schema Registry REST API that
//! analytics clients use (docs/analytics.md): subjects and their versions, schemas by id,
//! compatibility checks and levels. Served at the root of the registry's listener, beside
//! Hono's `/v1`, so a client's `url` is the registry's address.
//!
//! A subject is a tenant's telemetry or event topic plus `-value` (Confluent's
//! TopicNameStrategy); no other subject is accepted. Writes need the management credentials;
//! reads take them or a tenant's application credentials (`appId@tenant`, as on the AMQP
//! bridge), which see that tenant's subjects only. Only Avro schemas without references.
//!
//! Errors are Confluent's: an HTTP status with `{"error_code": n, "message": …}`, n from its
//! documented table (40401 subject not found, 40402 version not found, 40403 schema not found,
//! 40408 no subject-level compatibility, 409 incompatible schema, 42201 invalid schema, 42202
//! invalid version, 42203 invalid compatibility level, 42208 invalid subject, 50001 store error).

mod compatibility;
pub mod store;

pub use compatibility::Level;

use crate::api::ManagementAuth;
use crate::auth::{AuthCacheConfig, DeviceAuthenticator};
use crate::metrics;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use ferrule_schemas::{TopicKind, TopicNames};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use store::Version;

/// The content type of Confluent's API.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Largest schema document accepted (bytes).
pub const MAX_SCHEMA_SIZE: usize = 256 * 1024;

/// The subject of a tenant's topic (TopicNameStrategy for record values).
pub fn subject_of(topic: &str) -> String {
    format!("{topic}-value")
}

/// An error in Confluent's shape.
#[derive(Debug)]
pub struct SrError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl SrError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        SrError {
            status,
            code,
            message: message.into(),
        }
    }
    fn subject_not_found(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        )
    }
    fn version_not_found(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version not found for subject '{subject}'."),
        )
    }
    fn schema_not_found(id: i32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {id} not found"),
        )
    }
    fn schema_not_found_in(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema not found under subject '{subject}'"),
        )
    }
    fn not_soft_deleted(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40405,
            format!("Subject '{subject}' was not deleted first before being permanently deleted"),
        )
    }
    fn incompatible(subject: &str, problems: &[String]) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            409,
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\": {}",
                problems.join("; ")
            ),
        )
    }
    fn invalid_schema(why: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {why}"),
        )
    }
    fn invalid_version(text: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
            format!(
                "The specified version '{text}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
            ),
        )
    }
    fn invalid_subject(why: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, 42208, why)
    }
    fn store(why: impl Into<String>) -> Self {
        let why = why.into();
        tracing::warn!(error = why, "schema registry store error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "Error in the backend data store",
        )
    }
    /// Whether this is a "not found" answer (40401–40499).
    pub fn is_not_found(&self) -> bool {
        self.status == StatusCode::NOT_FOUND
    }

    fn label(&self) -> &'static str {
        match self.code {
            40101 => "unauthorized",
            40301 => "forbidden",
            40401..=40499 => "not-found",
            409 => "incompatible-schema",
            42201 => "invalid-schema",
            42208 => "invalid-subject",
            42200..=42299 => "invalid",
            _ => "store-error",
        }
    }
}

impl std::fmt::Display for SrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl From<tokio_postgres::Error> for SrError {
    fn from(e: tokio_postgres::Error) -> Self {
        SrError::store(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for SrError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        SrError::store(e.to_string())
    }
}

impl IntoResponse for SrError {
    fn into_response(self) -> Response {
        metrics::rejected(self.label());
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            json!({ "error_code": self.code, "message": self.message }).to_string(),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ferrule-schema-registry\""),
            );
        }
        resp
    }
}

/// A JSON answer with Confluent's content type.
fn ok(value: impl serde::Serialize) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        serde_json::to_string(&value).unwrap_or_default(),
    )
        .into_response()
}

type SrResult = Result<Response, SrError>;

#[derive(Clone)]
struct Registry {
    pool: deadpool_postgres::Pool,
    names: TopicNames,
    management: Arc<ManagementAuth>,
    applications: DeviceAuthenticator,
}

/// Who called: the operator (management credentials, everything) or a tenant's application
/// (reads of that tenant's subjects).
enum Caller {
    Management,
    Application { tenant: String },
}

impl Caller {
    fn scope(&self) -> Option<&str> {
        match self {
            Caller::Management => None,
            Caller::Application { tenant } => Some(tenant),
        }
    }

    fn may_write(&self) -> Result<(), SrError> {
        match self {
            Caller::Management => Ok(()),
            Caller::Application { .. } => Err(SrError::new(
                StatusCode::FORBIDDEN,
                40301,
                "application credentials may only read; writes need the management credentials",
            )),
        }
    }

    /// [`Self::subject_tenant`] for a request that reads or deletes: a subject that can never
    /// exist here is simply not found (40401), as in Confluent's registry.
    fn subject_to_read(&self, names: &TopicNames, subject: &str) -> Result<String, SrError> {
        self.subject_tenant(names, subject)
            .map_err(|e| match e.code {
                42208 => SrError::subject_not_found(subject),
                _ => e,
            })
    }

    /// The tenant of `subject`, checked: a tenant topic's subject that this caller may see.
    fn subject_tenant(&self, names: &TopicNames, subject: &str) -> Result<String, SrError> {
        let tenant = tenant_of(names, subject).ok_or_else(|| {
            SrError::invalid_subject(format!(
                "subject `{subject}` is not a tenant's telemetry or event topic followed by `-value`"
            ))
        })?;
        match self.scope() {
            Some(own) if own != tenant => Err(SrError::subject_not_found(subject)),
            _ => Ok(tenant),
        }
    }
}

/// The tenant whose telemetry or event topic `subject` names.
pub fn tenant_of(names: &TopicNames, subject: &str) -> Option<String> {
    let topic = names.parse(subject.strip_suffix("-value")?).ok()?;
    matches!(topic.kind, TopicKind::Telemetry | TopicKind::Event).then_some(topic.suffix)
}

impl FromRequestParts<Registry> for Caller {
    type Rejection = SrError;

    async fn from_request_parts(parts: &mut Parts, reg: &Registry) -> Result<Self, SrError> {
        if reg.management.allows(&parts.headers) {
            return Ok(Caller::Management);
        }
        let unauthorized = || SrError::new(StatusCode::UNAUTHORIZED, 40101, "Unauthorized");
        let basic = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .and_then(|(_, b64)| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
            })
            .ok_or_else(unauthorized)?;
        let text = String::from_utf8(basic).map_err(|_| unauthorized())?;
        let (user, password) = text.split_once(':').ok_or_else(unauthorized)?;
        match reg
            .applications
            .verify_application(user, password.as_bytes())
            .await
        {
            Ok(app) => Ok(Caller::Application {
                tenant: app.tenant_id,
            }),
            Err(crate::AuthError::Unavailable(e)) => Err(SrError::store(e)),
            Err(_) => Err(unauthorized()),
        }
    }
}

/// The routes, at the root of the registry's listener.
pub(crate) fn router(
    pool: deadpool_postgres::Pool,
    names: TopicNames,
    management: Arc<ManagementAuth>,
) -> Router {
    let applications = DeviceAuthenticator::new(
        pool.clone(),
        &AuthCacheConfig {
            capacity: 0,
            ..Default::default()
        },
    );
    let reg = Registry {
        pool,
        names,
        management,
        applications,
    };
    Router::new()
        .route("/", get(root))
        .route("/schemas/types", get(types))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route("/schemas/ids/{id}/subjects", get(id_subjects))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route(
            "/subjects/{subject}/versions/{version}",
            get(version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(raw_schema),
        )
        .route("/config", get(global_config).put(set_global_config))
        .route(
            "/config/{subject}",
            get(subject_config)
                .put(set_subject_config)
                .delete(delete_subject_config),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(test_one),
        )
        .route("/compatibility/subjects/{subject}/versions", post(test_all))
        .route("/mode", get(mode))
        .layer(DefaultBodyLimit::max(MAX_SCHEMA_SIZE))
        .with_state(reg)
}

type Params = Query<HashMap<String, String>>;

fn flag(q: &Params, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn parse_version(text: &str) -> Result<Version, SrError> {
    Version::parse(text).ok_or_else(|| SrError::invalid_version(text))
}

fn parse_id(text: &str) -> Result<i32, SrError> {
    text.parse::<i32>()
        .map_err(|_| SrError::schema_not_found(-1))
}

/// A schema in a request body (`{"schema": "...", "schemaType": "AVRO"}`): parsed, and in
/// the form the registry stores and serves.
struct Candidate {
    parsed: apache_avro::Schema,
    stored: String,
}

fn candidate(body: &Bytes) -> Result<Candidate, SrError> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| SrError::invalid_schema(format!("the body is not JSON: {e}")))?;
    if let Some(t) = doc.get("schemaType").and_then(Value::as_str)
        && !t.eq_ignore_ascii_case("AVRO")
    {
        return Err(SrError::invalid_schema(format!(
            "schema type {t} is not supported; only AVRO"
        )));
    }
    if doc
        .get("references")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
    {
        return Err(SrError::invalid_schema(
            "schema references are not supported",
        ));
    }
    let text = doc
        .get("schema")
        .and_then(Value::as_str)
        .ok_or_else(|| SrError::invalid_schema("the body has no `schema` string"))?;
    let parsed = apache_avro::Schema::parse_str(text).map_err(SrError::invalid_schema)?;
    let stored = serde_json::to_string(&parsed).map_err(SrError::invalid_schema)?;
    // What is stored must read back as the same schema, or gateways would use another.
    match apache_avro::Schema::parse_str(&stored) {
        Ok(again) if again == parsed => Ok(Candidate { parsed, stored }),
        _ => Err(SrError::invalid_schema(
            "the schema does not survive a round trip through its JSON form",
        )),
    }
}

async fn root() -> Response {
    ok(json!({}))
}

async fn types(_caller: Caller) -> Response {
    ok(["AVRO"])
}

async fn mode(_caller: Caller) -> Response {
    ok(json!({"mode": "READWRITE"}))
}

async fn schema_by_id(
    State(reg): State<Registry>,
    caller: Caller,
    Path(id): Path<String>,
) -> SrResult {
    let id = parse_id(&id)?;
    let schema = store::schema_by_id(&reg.pool, caller.scope(), id).await?;
    Ok(ok(json!({ "schema": schema })))
}

async fn raw_schema_by_id(
    State(reg): State<Registry>,
    caller: Caller,
    Path(id): Path<String>,
) -> SrResult {
    let id = parse_id(&id)?;
    let schema = store::schema_by_id(&reg.pool, caller.scope(), id).await?;
    Ok(ok(
        serde_json::from_str::<Value>(&schema).unwrap_or(Value::String(schema))
    ))
}

async fn id_versions(
    State(reg): State<Registry>,
    caller: Caller,
    Path(id): Path<String>,
    q: Params,
) -> SrResult {
    let id = parse_id(&id)?;
    let list = store::id_versions(&reg.pool, caller.scope(), id, flag(&q, "deleted")).await?;
    Ok(ok(list
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect::<Vec<_>>()))
}

async fn id_subjects(
    State(reg): State<Registry>,
    caller: Caller,
    Path(id): Path<String>,
    q: Params,
) -> SrResult {
    let id = parse_id(&id)?;
    let mut subjects: Vec<String> =
        store::id_versions(&reg.pool, caller.scope(), id, flag(&q, "deleted"))
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
    subjects.dedup();
    Ok(ok(subjects))
}

async fn subjects(State(reg): State<Registry>, caller: Caller, q: Params) -> SrResult {
    let prefix = q.get("subjectPrefix").map(String::as_str).unwrap_or("");
    let list = store::subjects(&reg.pool, caller.scope(), prefix, flag(&q, "deleted")).await?;
    Ok(ok(list))
}

async fn versions(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
    q: Params,
) -> SrResult {
    caller.subject_to_read(&reg.names, &subject)?;
    let list = store::versions(&reg.pool, caller.scope(), &subject, flag(&q, "deleted")).await?;
    Ok(ok(list))
}

async fn version(
    State(reg): State<Registry>,
    caller: Caller,
    Path((subject, version)): Path<(String, String)>,
    q: Params,
) -> SrResult {
    caller.subject_to_read(&reg.names, &subject)?;
    let v = parse_version(&version)?;
    let found = store::version(&reg.pool, caller.scope(), &subject, v, flag(&q, "deleted")).await?;
    Ok(ok(found))
}

async fn raw_schema(
    State(reg): State<Registry>,
    caller: Caller,
    Path((subject, version)): Path<(String, String)>,
    q: Params,
) -> SrResult {
    caller.subject_to_read(&reg.names, &subject)?;
    let v = parse_version(&version)?;
    let found = store::version(&reg.pool, caller.scope(), &subject, v, flag(&q, "deleted")).await?;
    Ok(ok(
        serde_json::from_str::<Value>(&found.schema).unwrap_or(Value::String(found.schema))
    ))
}

async fn lookup(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
    q: Params,
    body: Bytes,
) -> SrResult {
    caller.subject_to_read(&reg.names, &subject)?;
    let c = candidate(&body)?;
    let found = store::lookup(
        &reg.pool,
        caller.scope(),
        &subject,
        &c.stored,
        flag(&q, "deleted"),
    )
    .await?;
    Ok(ok(found))
}

async fn register(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
    body: Bytes,
) -> SrResult {
    caller.may_write()?;
    let tenant = caller.subject_tenant(&reg.names, &subject)?;
    let c = candidate(&body)?;
    let id = store::register(&reg.pool, &subject, &tenant, &c.parsed, &c.stored).await?;
    tracing::info!(subject, id, "schema registered");
    Ok(ok(json!({ "id": id })))
}

async fn delete_subject(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
    q: Params,
) -> SrResult {
    caller.may_write()?;
    caller.subject_to_read(&reg.names, &subject)?;
    Ok(ok(store::delete_subject(
        &reg.pool,
        &subject,
        flag(&q, "permanent"),
    )
    .await?))
}

async fn delete_version(
    State(reg): State<Registry>,
    caller: Caller,
    Path((subject, version)): Path<(String, String)>,
    q: Params,
) -> SrResult {
    caller.may_write()?;
    caller.subject_to_read(&reg.names, &subject)?;
    let v = parse_version(&version)?;
    Ok(ok(store::delete_version(
        &reg.pool,
        &subject,
        v,
        flag(&q, "permanent"),
    )
    .await?))
}

fn level_body(body: &Bytes) -> Result<Level, SrError> {
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let name = doc
        .get("compatibility")
        .and_then(Value::as_str)
        .unwrap_or("");
    Level::parse(name).ok_or_else(|| {
        SrError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            format!("Invalid compatibility level `{name}`. Valid values are NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE"),
        )
    })
}

async fn global_config(State(reg): State<Registry>, _caller: Caller) -> SrResult {
    let level = store::level(&reg.pool, None)
        .await?
        .unwrap_or(compatibility::DEFAULT);
    Ok(ok(json!({ "compatibilityLevel": level.name() })))
}

async fn set_global_config(State(reg): State<Registry>, caller: Caller, body: Bytes) -> SrResult {
    caller.may_write()?;
    let level = level_body(&body)?;
    store::set_level(&reg.pool, None, level).await?;
    Ok(ok(json!({ "compatibility": level.name() })))
}

async fn subject_config(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
    q: Params,
) -> SrResult {
    caller.subject_to_read(&reg.names, &subject)?;
    let own = store::level(&reg.pool, Some(&subject)).await?;
    let level = match own {
        Some(l) => l,
        None if flag(&q, "defaultToGlobal") => store::level(&reg.pool, None)
            .await?
            .unwrap_or(compatibility::DEFAULT),
        None => {
            return Err(SrError::new(
                StatusCode::NOT_FOUND,
                40408,
                format!("Subject '{subject}' does not have subject-level compatibility configured"),
            ));
        }
    };
    Ok(ok(json!({ "compatibilityLevel": level.name() })))
}

async fn set_subject_config(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
    body: Bytes,
) -> SrResult {
    caller.may_write()?;
    let tenant = caller.subject_tenant(&reg.names, &subject)?;
    let level = level_body(&body)?;
    if !store::set_level(&reg.pool, Some((&subject, &tenant)), level).await? {
        return Err(SrError::invalid_subject(format!(
            "subject `{subject}` names tenant `{tenant}`, which does not exist"
        )));
    }
    Ok(ok(json!({ "compatibility": level.name() })))
}

async fn delete_subject_config(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
) -> SrResult {
    caller.may_write()?;
    caller.subject_to_read(&reg.names, &subject)?;
    match store::delete_level(&reg.pool, Some(&subject)).await? {
        Some(l) => Ok(ok(json!({ "compatibilityLevel": l.name() }))),
        // Nothing of its own to remove: the level that applies stays, if the subject exists.
        None => {
            store::versions(&reg.pool, None, &subject, true).await?;
            let level = store::level(&reg.pool, None)
                .await?
                .unwrap_or(compatibility::DEFAULT);
            Ok(ok(json!({ "compatibilityLevel": level.name() })))
        }
    }
}

async fn test_one(
    State(reg): State<Registry>,
    caller: Caller,
    Path((subject, version)): Path<(String, String)>,
    q: Params,
    body: Bytes,
) -> SrResult {
    caller.subject_to_read(&reg.names, &subject)?;
    let v = parse_version(&version)?;
    let c = candidate(&body)?;
    // The named version must exist (40402 otherwise); `latest` of a subject without versions
    // is compatible, as in Confluent's registry (a schema may be tested before it is first
    // registered).
    let found = match store::version(&reg.pool, caller.scope(), &subject, v, false).await {
        Ok(found) => found,
        Err(e) if v == Version::Latest && e.code == 40401 => {
            return Ok(ok(compatibility_answer(&[], flag(&q, "verbose"))));
        }
        Err(e) => return Err(e),
    };
    let problems = store::problems(
        &reg.pool,
        &subject,
        &c.parsed,
        Some(Version::Number(found.version)),
    )
    .await?;
    Ok(ok(compatibility_answer(&problems, flag(&q, "verbose"))))
}

async fn test_all(
    State(reg): State<Registry>,
    caller: Caller,
    Path(subject): Path<String>,
    q: Params,
    body: Bytes,
) -> SrResult {
    caller.subject_to_read(&reg.names, &subject)?;
    let c = candidate(&body)?;
    let problems = store::problems(&reg.pool, &subject, &c.parsed, None).await?;
    Ok(ok(compatibility_answer(&problems, flag(&q, "verbose"))))
}

fn compatibility_answer(problems: &[String], verbose: bool) -> Value {
    if verbose {
        json!({ "is_compatible": problems.is_empty(), "messages": problems })
    } else {
        json!({ "is_compatible": problems.is_empty() })
    }
}
