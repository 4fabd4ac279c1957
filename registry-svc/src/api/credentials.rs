//! `/v1/credentials`.

use super::{Api, ApiResult, etag, if_match, json_body, no_content};
use crate::model::{check_device_id, check_tenant_id, credentials};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

pub(super) fn routes() -> Router<Api> {
    Router::new().route("/v1/credentials/{tenant}/{device}", get(read).put(update))
}

async fn read(State(api): State<Api>, Path((tenant, id)): Path<(String, String)>) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_device_id(&id)?;
    let (doc, version) = api.store.get_credentials(&tenant, &id).await?;
    Ok(([etag(&version)], Json(doc)).into_response())
}

async fn update(
    State(api): State<Api>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_device_id(&id)?;
    let list = credentials::parse_list(&json_body(&headers, body)?)?;
    let version = api
        .store
        .set_credentials(&tenant, &id, list, if_match(&headers).as_deref())
        .await?;
    Ok(no_content(Some(&version)))
}
