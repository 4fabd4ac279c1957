//! Benchmarks against the real PostgreSQL (`FERRULE_TEST_DATABASE_URL`, default the local one
//! `scripts/up` starts): device password verification with and without the cache, and the
//! management API's device create/get throughput over HTTP with 64 requests in flight.
//!
//! Run: `scripts/bench` (or `cargo bench -p ferrule-registry --bench registry`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferrule_registry::db::Connector;
use ferrule_registry::{DatabaseConfig, DeviceAuthenticator, RegistryConfig, Store};
use futures_util::future::join_all;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const IN_FLIGHT: usize = 64;

fn database() -> DatabaseConfig {
    DatabaseConfig {
        url: std::env::var("FERRULE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into()),
        pool_size: 16,
        ..Default::default()
    }
}

struct Fixture {
    rt: Runtime,
    store: Store,
    base: String,
    tenant: String,
    _shutdown: watch::Sender<bool>,
}

fn fixture() -> Fixture {
    let rt = Runtime::new().unwrap();
    let mut cfg = RegistryConfig::default();
    cfg.management.password = "bench".into();
    let (tx, rx) = watch::channel(false);
    let (store, base) = rt.block_on(async {
        let store = ferrule_registry::open_store(&database(), &cfg)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(ferrule_registry::serve(listener, store.clone(), cfg, rx));
        (store, base)
    });
    let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let http = reqwest::Client::new();
    rt.block_on(async {
        let put = |path: String, body: serde_json::Value, method: reqwest::Method| {
            http.request(method, format!("{base}{path}"))
                .basic_auth("admin", Some("bench"))
                .json(&body)
                .send()
        };
        put(
            format!("/v1/tenants/{tenant}"),
            json!({}),
            reqwest::Method::POST,
        )
        .await
        .unwrap();
        put(
            format!("/v1/devices/{tenant}/dev"),
            json!({}),
            reqwest::Method::POST,
        )
        .await
        .unwrap();
        let sha = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            <sha2::Sha256 as sha2::Digest>::digest(b"pw"),
        );
        let r = put(
            format!("/v1/credentials/{tenant}/dev"),
            json!([
                {"type": "hashed-password", "auth-id": "sha", "secrets": [{"pwd-hash": sha}]},
                {"type": "hashed-password", "auth-id": "bcrypt", "secrets": [{"pwd-plain": "pw"}]},
            ]),
            reqwest::Method::PUT,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 204);
    });
    Fixture {
        rt,
        store,
        base,
        tenant,
        _shutdown: tx,
    }
}

fn password_verification(c: &mut Criterion) {
    let f = fixture();
    let cached = DeviceAuthenticator::new(f.store.pool().clone(), &Default::default());
    let (_stop, rx) = watch::channel(false);
    f.rt.block_on(async {
        cached.spawn_listener(Connector::new(&database()).unwrap(), rx);
        let start = Instant::now();
        while !cached.cache_active() && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // No listener: every call reads PostgreSQL.
    let uncached = DeviceAuthenticator::new(f.store.pool().clone(), &Default::default());
    let mut g = c.benchmark_group("device_auth");
    g.throughput(Throughput::Elements(1));
    for (name, auth, user) in [
        ("cached/sha-256", &cached, "sha"),
        ("cached/bcrypt", &cached, "bcrypt"),
        ("uncached/sha-256", &uncached, "sha"),
    ] {
        let user = format!("{user}@{}", f.tenant);
        g.bench_function(name, |b| {
            b.to_async(&f.rt).iter(|| async {
                auth.verify_password(&user, b"pw").await.unwrap();
            })
        });
    }
    g.finish();
}

fn management_api(c: &mut Criterion) {
    let f = fixture();
    let http = reqwest::Client::new();
    let mut g = c.benchmark_group("registry_http");
    g.throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function("create_device", |b| {
        b.to_async(&f.rt).iter(|| async {
            let reqs = (0..IN_FLIGHT).map(|_| {
                http.post(format!("{}/v1/devices/{}", f.base, f.tenant))
                    .basic_auth("admin", Some("bench"))
                    .send()
            });
            for r in join_all(reqs).await {
                assert_eq!(r.unwrap().status(), 201);
            }
        })
    });
    g.bench_function("get_device", |b| {
        b.to_async(&f.rt).iter(|| async {
            let reqs = (0..IN_FLIGHT).map(|_| {
                http.get(format!("{}/v1/devices/{}/dev", f.base, f.tenant))
                    .basic_auth("admin", Some("bench"))
                    .send()
            });
            for r in join_all(reqs).await {
                assert_eq!(r.unwrap().status(), 200);
            }
        })
    });
    g.finish();
    f.rt.block_on(async {
        let db = f.store.pool().get().await.unwrap();
        db.execute("DELETE FROM tenants WHERE tenant_id = $1", &[&f.tenant])
            .await
            .unwrap();
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = password_verification, management_api
}
criterion_main!(benches);
