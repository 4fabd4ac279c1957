//! `/v1/applications/{tenant}/{app}`: business applications of a tenant and their passwords,
//! for the AMQP bridge (not part of Hono's API; shaped like its credentials resources).

use super::{Api, ApiResult, etag, if_match, json_body, no_content};
use crate::model::application::{self, Application};
use crate::model::{check_auth_id, check_tenant_id};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

pub(super) fn routes() -> Router<Api> {
    Router::new().route(
        "/v1/applications/{tenant}/{app}",
        get(read).put(update).delete(remove),
    )
}

async fn read(State(api): State<Api>, Path((tenant, app)): Path<(String, String)>) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_auth_id(&app)?;
    let (stored, version) = api.store.stored_application(&tenant, &app).await?;
    let shown = application::public_view(&app, stored);
    Ok(([etag(&version)], Json(shown)).into_response())
}

async fn update(
    State(api): State<Api>,
    Path((tenant, app)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_auth_id(&app)?;
    let requested = Application::parse(&json_body(&headers, body)?)?;
    let version = api
        .store
        .set_application(&tenant, &app, requested, if_match(&headers).as_deref())
        .await?;
    Ok(no_content(Some(&version)))
}

async fn remove(
    State(api): State<Api>,
    Path((tenant, app)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    check_tenant_id(&tenant)?;
    check_auth_id(&app)?;
    api.store
        .delete_application(&tenant, &app, if_match(&headers).as_deref())
        .await?;
    Ok(no_content(None))
}
