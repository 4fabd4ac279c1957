//! An OTLP/HTTP trace receiver that decodes and counts what it gets and keeps nothing: the
//! tracing-cost scenarios export Ferrule's spans to it (docs/observability.md). `GET /spans`
//! tells how many spans and export requests arrived.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
struct Counts {
    spans: AtomicU64,
    requests: AtomicU64,
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/v1/traces", post(export))
        .route("/spans", get(counts))
        .with_state(Arc::new(Counts::default()));
    axum::serve(listener, app).await?;
    Ok(())
}

async fn export(State(c): State<Arc<Counts>>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let spans: usize = request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    c.spans.fetch_add(spans as u64, Ordering::Relaxed);
    c.requests.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

async fn counts(State(c): State<Arc<Counts>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "spans": c.spans.load(Ordering::Relaxed),
        "requests": c.requests.load(Ordering::Relaxed),
    }))
}
