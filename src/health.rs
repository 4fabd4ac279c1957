//! The health port (Hono's): `/started` (the services were set up), `/readiness` (every
//! backing service answered its latest probe), `/liveness` (the services' runtime still runs
//! tasks) and Prometheus `/metrics`. It runs on a thread and runtime of its own, so that it
//! answers — and says DOWN — while the services' runtime is stuck.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Whether a runtime still runs tasks: a task on it beats every [`Heartbeat::BEAT`], and the
/// runtime counts as stalled once no beat came for the limit.
#[derive(Clone)]
pub struct Heartbeat {
    since: Instant,
    /// Milliseconds after `since` of the latest beat.
    last: Arc<AtomicU64>,
    limit: Duration,
}

impl Heartbeat {
    const BEAT: Duration = Duration::from_millis(500);

    pub fn new(limit: Duration) -> Self {
        Heartbeat {
            since: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
            limit,
        }
    }

    /// Beats on the runtime it is spawned on until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        loop {
            self.beat();
            tokio::select! {
                _ = tokio::time::sleep(Self::BEAT) => {}
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
        }
    }

    fn beat(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// How long since the latest beat.
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }

    pub fn is_alive(&self) -> bool {
        self.silence() < self.limit
    }
}

/// The latest result of each readiness probe, by name, and whether the services started.
#[derive(Clone, Default)]
pub struct Readiness {
    probes: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
    started: Arc<AtomicBool>,
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

    /// Every service is set up and serving (Hono's startup probe).
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
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

#[derive(Clone)]
struct Probes {
    readiness: Readiness,
    heartbeat: Heartbeat,
}

pub fn router(readiness: Readiness, heartbeat: Heartbeat) -> Router {
    Router::new()
        .route("/started", get(started))
        .route("/liveness", get(live))
        .route("/readiness", get(ready))
        .route("/metrics", get(metrics))
        // Hono's name for the same (its health server's Prometheus endpoint).
        .route("/prometheus", get(metrics))
        .with_state(Probes {
            readiness,
            heartbeat,
        })
}

fn up_or_down(up: bool, detail: serde_json::Value) -> (StatusCode, axum::Json<serde_json::Value>) {
    let (status, word) = match up {
        true => (StatusCode::OK, "UP"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "DOWN"),
    };
    let mut body = serde_json::json!({"status": word});
    if let (Some(b), Some(d)) = (body.as_object_mut(), detail.as_object()) {
        b.extend(d.clone());
    }
    (status, axum::Json(body))
}

async fn started(State(p): State<Probes>) -> impl IntoResponse {
    up_or_down(p.readiness.is_started(), serde_json::json!({}))
}

async fn live(State(p): State<Probes>) -> impl IntoResponse {
    let silence = p.heartbeat.silence();
    up_or_down(
        p.heartbeat.is_alive(),
        serde_json::json!({"checks": {"runtime": {"last_task_ms_ago": silence.as_millis() as u64}}}),
    )
}

async fn ready(State(p): State<Probes>) -> impl IntoResponse {
    let r = p.readiness;
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

/// Serves the health port on a thread with a runtime of its own until `shutdown` turns true;
/// the returned handle ends with it.
pub fn spawn(
    listener: std::net::TcpListener,
    readiness: Readiness,
    heartbeat: Heartbeat,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, router(readiness, heartbeat))
                    .with_graceful_shutdown(async move {
                        let _ = shutdown.wait_for(|s| *s).await;
                    })
                    .await?;
                Ok(())
            })
        })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_whose_workers_are_all_blocked_is_not_alive() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let heartbeat = Heartbeat::new(Duration::from_millis(1500));
        let (_stop, shutdown) = watch::channel(false);
        runtime.spawn(heartbeat.clone().run(shutdown));
        std::thread::sleep(Duration::from_millis(600));
        assert!(heartbeat.is_alive());
        // Both workers block (as a task that blocks in a lock or a synchronous call would).
        for _ in 0..2 {
            runtime.spawn(async { std::thread::sleep(Duration::from_secs(3)) });
        }
        std::thread::sleep(Duration::from_millis(2200));
        assert!(
            !heartbeat.is_alive(),
            "silent for {:?}",
            heartbeat.silence()
        );
        std::thread::sleep(Duration::from_millis(1800));
        assert!(
            heartbeat.is_alive(),
            "beats again once the workers are free"
        );
    }
}
