//! The health port: `/liveness`, `/readiness` (every backing service answered its latest
//! probe) and Prometheus `/metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The latest result of each readiness probe, by name.
#[derive(Clone, Default)]
pub struct Readiness {
    probes: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
}

impl Readiness {
    /// Declares a probe, not ready until it reports.
    pub fn register(&self, name: &'static str) {
        self.lock().insert(name, Err("not probed yet".into()));
    }

    pub fn report(&self, name: &'static str, result: Result<(), String>) {
        let mut probes = self.lock();
        let changed = probes
            .get(name)
            .is_none_or(|old| old.is_ok() != result.is_ok());
        if changed {
            match &result {
                Ok(()) => tracing::info!(probe = name, "ready"),
                Err(e) => tracing::warn!(probe = name, error = %e, "not ready"),
            }
        }
        probes.insert(name, result);
    }

    pub fn is_ready(&self) -> bool {
        self.lock().values().all(Result::is_ok)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Result<(), String>>> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn describe(&self) -> serde_json::Value {
        let probes = self.lock();
        let checks: serde_json::Map<_, _> = probes
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Ok(()) => serde_json::json!({"status": "UP"}),
                    Err(e) => serde_json::json!({"status": "DOWN", "error": e}),
                };
                ((*k).to_owned(), s)
            })
            .collect();
        serde_json::json!({
            "status": if probes.values().all(Result::is_ok) { "UP" } else { "DOWN" },
            "checks": checks,
        })
    }
}

pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/liveness",
            get(|| async { axum::Json(serde_json::json!({"status": "UP"})) }),
        )
        .route("/readiness", get(ready))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn ready(State(r): State<Readiness>) -> impl IntoResponse {
    let status = if r.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(r.describe()))
}

async fn metrics() -> impl IntoResponse {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode(&prometheus::gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            buf,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    axum::serve(listener, router(readiness))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}
