//! Hono's Device Registry Management API v1 over axum: request plumbing (authentication of the
//! caller, body and content-type rules, ETags) and the mapping of errors to status codes.

mod applications;
mod credentials;
mod devices;
mod tenants;

use crate::error::RegistryError;
use crate::metrics;
use crate::store::Store;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Who may call the management API; anonymous callers are always refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagementAuth {
    /// Basic-auth user name accepted by the management API.
    pub username: String,
    /// Basic-auth password; empty disables Basic auth.
    pub password: String,
    /// Bearer token; empty disables bearer auth.
    pub bearer_token: String,
}

impl Default for ManagementAuth {
    fn default() -> Self {
        ManagementAuth {
            username: "admin".into(),
            password: "admin-secret".into(),
            bearer_token: String::new(),
        }
    }
}

impl ManagementAuth {
    pub(crate) fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return !self.bearer_token.is_empty()
                && bool::from(rest.as_bytes().ct_eq(self.bearer_token.as_bytes()));
        }
        if scheme.eq_ignore_ascii_case("basic") && !self.password.is_empty() {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return false;
            };
            let expected = format!("{}:{}", self.username, self.password);
            return bool::from(decoded.ct_eq(expected.as_bytes()));
        }
        false
    }
}

/// Shared state of the API handlers.
#[derive(Clone)]
pub(crate) struct Api {
    pub store: Store,
    pub auth: Arc<ManagementAuth>,
}

/// Builds the `/v1` router.
pub(crate) fn router(store: Store, auth: Arc<ManagementAuth>, max_payload: usize) -> Router {
    let api = Api { store, auth };
    Router::new()
        .merge(tenants::routes())
        .merge(devices::routes())
        .merge(credentials::routes())
        .merge(applications::routes())
        .layer(middleware::from_fn_with_state(api.clone(), require_auth))
        .layer(DefaultBodyLimit::max(max_payload))
        .with_state(api)
}

async fn require_auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    if api.auth.allows(req.headers()) {
        next.run(req).await
    } else {
        metrics::rejected("unauthorized");
        let mut resp =
            ApiError::new(StatusCode::UNAUTHORIZED, "authentication required").into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"ferrule-registry\""),
        );
        resp
    }
}

/// An error answer: a status and Hono's `{"error": "..."}` body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Conflict(_) => StatusCode::CONFLICT,
            RegistryError::Forbidden(_) => StatusCode::FORBIDDEN,
            RegistryError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            RegistryError::Database(_) | RegistryError::Pool(_) => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::warn!(error = ?e, "registry request failed");
        }
        metrics::rejected(e.kind());
        ApiError::new(status, e.to_string())
    }
}

impl From<crate::model::Invalid> for ApiError {
    fn from(e: crate::model::Invalid) -> Self {
        RegistryError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// The request body, after the size limit (413) and the content-type rule (400) were applied:
/// a non-empty body must be `application/json`.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            metrics::rejected("payload-too-large");
        } else {
            metrics::rejected("bad-body");
        }
        ApiError::new(status, rejection.body_text())
    })?;
    if body.is_empty() {
        return Ok(body);
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(body)
    } else {
        metrics::rejected("bad-content-type");
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must have content-type application/json",
        ))
    }
}

/// The version the client expects (`If-Match`), quotes and weak marker removed; `*` matches any.
fn if_match(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::IF_MATCH)?.to_str().ok()?.trim();
    let v = v.strip_prefix("W/").unwrap_or(v).trim_matches('"');
    (v != "*" && !v.is_empty()).then(|| v.to_owned())
}

fn etag(version: &str) -> (header::HeaderName, String) {
    (header::ETAG, version.to_owned())
}

fn created(location: String, version: &str, id: &str) -> Response {
    (
        StatusCode::CREATED,
        [(header::LOCATION, location), etag(version)],
        axum::Json(serde_json::json!({ "id": id })),
    )
        .into_response()
}

fn no_content(version: Option<&str>) -> Response {
    match version {
        Some(v) => (StatusCode::NO_CONTENT, [etag(v)]).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// Query parameters of the search operations.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SearchParams {
    page_size: Option<String>,
    page_offset: Option<String>,
    is_gateway: Option<String>,
}

/// Reads `filterJson`/`sortJson`, which may repeat and so cannot go through serde's map.
fn repeated(query: Option<&str>, name: &str) -> Vec<String> {
    let Some(q) = query else { return vec![] };
    q.split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| {
                percent_encoding::percent_decode_str(&v.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
        .collect()
}

/// A search answer; Hono answers 404 when nothing matches at all.
fn page_response(page: crate::store::Page) -> ApiResult {
    if page.total == 0 {
        return Err(RegistryError::NotFound("no resources match the search".into()).into());
    }
    Ok(axum::Json(page).into_response())
}
