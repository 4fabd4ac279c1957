//! `/v1/devices`.

use super::{
    Api, ApiResult, SearchParams, created, etag, if_match, json_body, no_content, repeated,
};
use crate::model::{check_device_id, check_tenant_id, device::Device};
use crate::search::SearchQuery;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route(
            "/v1/devices/{tenant}",
            post(create).get(search).delete(remove_all),
        )
        .route(
            "/v1/devices/{tenant}/{device}",
            post(create_with_id).get(read).put(update).delete(remove),
        )
}

async fn create(
    State(api): State<Api>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    check_tenant_id(&tenant)?;
    let device = Device::parse(&json_body(&headers, body)?)?;
    let (id, version) = api.store.create_device(&tenant, None, device).await?;
    Ok(created(format!("/v1/devices/{tenant}/{id}"), &version, &id))
}

async fn create_with_id(
    State(api): State<Api>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_device_id(&id)?;
    let device = Device::parse(&json_body(&headers, body)?)?;
    let (id, version) = api.store.create_device(&tenant, Some(id), device).await?;
    Ok(created(format!("/v1/devices/{tenant}/{id}"), &version, &id))
}

async fn read(State(api): State<Api>, Path((tenant, id)): Path<(String, String)>) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_device_id(&id)?;
    let (doc, version) = api.store.get_device(&tenant, &id).await?;
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
    let device = Device::parse(&json_body(&headers, body)?)?;
    let version = api
        .store
        .update_device(&tenant, &id, device, if_match(&headers).as_deref())
        .await?;
    Ok(no_content(Some(&version)))
}

async fn remove(
    State(api): State<Api>,
    Path((tenant, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_device_id(&id)?;
    api.store
        .delete_device(&tenant, &id, if_match(&headers).as_deref())
        .await?;
    Ok(no_content(None))
}

async fn remove_all(State(api): State<Api>, Path(tenant): Path<String>) -> ApiResult {
    check_tenant_id(&tenant)?;
    api.store.delete_all_devices(&tenant).await?;
    Ok(no_content(None))
}

async fn search(
    State(api): State<Api>,
    Path(tenant): Path<String>,
    Query(p): Query<SearchParams>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    check_tenant_id(&tenant)?;
    let q = SearchQuery::parse(
        p.page_size.as_deref(),
        p.page_offset.as_deref(),
        &repeated(raw.as_deref(), "filterJson"),
        &repeated(raw.as_deref(), "sortJson"),
        p.is_gateway.as_deref(),
    )?;
    let page = api.store.search_devices(&tenant, &q).await?;
    super::page_response(page)
}
