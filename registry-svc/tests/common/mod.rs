//! A registry served over real HTTP on an ephemeral port, backed by the real PostgreSQL the
//! test scripts start. Each test makes its own tenants with random ids.
#![allow(dead_code)]

use ferrule_registry::{DatabaseConfig, RegistryConfig, Store};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;

pub const USER: &str = "admin";
pub const PASSWORD: &str = "test-admin-secret";
pub const TOKEN: &str = "test-bearer-token";

pub fn database() -> DatabaseConfig {
    DatabaseConfig {
        url: std::env::var("FERRULE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into()),
        pool_size: 4,
        ..Default::default()
    }
}

pub fn config() -> RegistryConfig {
    let mut cfg = RegistryConfig::default();
    cfg.management.username = USER.into();
    cfg.management.password = PASSWORD.into();
    cfg.management.bearer_token = TOKEN.into();
    cfg.plain_password_cost = 4;
    cfg
}

pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub struct TestRegistry {
    pub base: String,
    pub http: reqwest::Client,
    pub store: Store,
    shutdown: watch::Sender<bool>,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl TestRegistry {
    pub async fn start() -> Self {
        Self::start_with(config()).await
    }

    pub async fn start_with(cfg: RegistryConfig) -> Self {
        Self::start_on(&database(), cfg).await
    }

    /// A registry on another database than the tests' shared one.
    pub async fn start_on(db: &DatabaseConfig, cfg: RegistryConfig) -> Self {
        let store = ferrule_registry::open_store(db, &cfg)
            .await
            .expect("PostgreSQL must be running (scripts/test starts it)");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(ferrule_registry::serve(listener, store.clone(), cfg, rx));
        TestRegistry {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            store,
            shutdown: tx,
        }
    }

    /// A request with the management credentials.
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.anonymous(method, path)
            .basic_auth(USER, Some(PASSWORD))
    }

    pub fn anonymous(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    pub async fn post_json(&self, path: &str, body: Value) -> Response {
        self.req(Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn put_json(&self, path: &str, body: Value) -> Response {
        self.req(Method::PUT, path)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> Response {
        self.req(Method::GET, path).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.req(Method::DELETE, path).send().await.unwrap()
    }

    /// Creates a tenant with a random id and returns the id.
    pub async fn tenant(&self, body: Value) -> String {
        let id = random_id("t");
        let r = self.post_json(&format!("/v1/tenants/{id}"), body).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        id
    }

    pub async fn device(&self, tenant: &str, id: &str, body: Value) {
        let r = self
            .post_json(&format!("/v1/devices/{tenant}/{id}"), body)
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
    }

    pub async fn credentials(&self, tenant: &str, device: &str, body: Value) {
        let r = self
            .put_json(&format!("/v1/credentials/{tenant}/{device}"), body)
            .await;
        assert_eq!(
            r.status(),
            StatusCode::NO_CONTENT,
            "{}",
            r.text().await.unwrap()
        );
    }

    /// A tenant with one device that has a `pwd-plain` password credential.
    pub async fn device_with_password(&self, auth_id: &str, password: &str) -> (String, String) {
        let tenant = self.tenant(json!({})).await;
        let device = random_id("d");
        self.device(&tenant, &device, json!({})).await;
        self.credentials(
            &tenant,
            &device,
            json!([{"type": "hashed-password", "auth-id": auth_id,
                    "secrets": [{"pwd-plain": password}]}]),
        )
        .await;
        (tenant, device)
    }
}

pub async fn body(r: Response) -> Value {
    r.json().await.unwrap()
}

pub fn etag(r: &Response) -> String {
    r.headers()
        .get("etag")
        .expect("response has an ETag")
        .to_str()
        .unwrap()
        .to_owned()
}

/// `?filterJson=...` for a query string.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
