//! `/v1/tenants`.

use super::{
    Api, ApiResult, SearchParams, created, etag, if_match, json_body, no_content, repeated,
};
use crate::model::{check_tenant_id, tenant::Tenant};
use crate::search::SearchQuery;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/tenants", post(create).get(search))
        .route(
            "/v1/tenants/{tenant}",
            post(create_with_id).get(read).put(update).delete(remove),
        )
}

async fn create(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let tenant = Tenant::parse(&json_body(&headers, body)?)?;
    let (id, version) = api.store.create_tenant(None, tenant).await?;
    Ok(created(format!("/v1/tenants/{id}"), &version, &id))
}

async fn create_with_id(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    api.store.check_new_tenant_id(&id)?;
    let tenant = Tenant::parse(&json_body(&headers, body)?)?;
    let (id, version) = api.store.create_tenant(Some(id), tenant).await?;
    Ok(created(format!("/v1/tenants/{id}"), &version, &id))
}

async fn read(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    check_tenant_id(&id)?;
    let (doc, version) = api.store.get_tenant(&id).await?;
    Ok(([etag(&version)], Json(doc)).into_response())
}

async fn update(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    check_tenant_id(&id)?;
    let tenant = Tenant::parse(&json_body(&headers, body)?)?;
    let version = api
        .store
        .update_tenant(&id, tenant, if_match(&headers).as_deref())
        .await?;
    Ok(no_content(Some(&version)))
}

async fn remove(State(api): State<Api>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    check_tenant_id(&id)?;
    api.store
        .delete_tenant(&id, if_match(&headers).as_deref())
        .await?;
    Ok(no_content(None))
}

async fn search(
    State(api): State<Api>,
    Query(p): Query<SearchParams>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let q = SearchQuery::parse(
        p.page_size.as_deref(),
        p.page_offset.as_deref(),
        &repeated(raw.as_deref(), "filterJson"),
        &repeated(raw.as_deref(), "sortJson"),
        None,
    )?;
    let page = api.store.search_tenants(&q).await?;
    super::page_response(page)
}
