//! Ferrule's device registry: tenants, devices and credentials in PostgreSQL behind Hono's
//! Device Registry Management API v1, plus the device-authentication library gateways use.
#![forbid(unsafe_code)]

mod api;
pub mod auth;
pub mod db;
pub mod device_connection;
pub mod error;
pub mod metrics;
pub mod model;
pub mod schema_registry;
pub mod search;
pub mod store;

pub use api::ManagementAuth;
pub use auth::{
    AuthCacheConfig, AuthError, AuthenticatedApplication, AuthenticatedDevice, DeviceAuthenticator,
    TopicSchemas,
};
pub use db::{DatabaseConfig, DatabaseTls};
pub use store::Store;

use anyhow::Context;
use model::credentials::CredentialRules;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tokio::sync::watch;

/// Settings of the registry service (`[registry]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Where the management API listens.
    pub bind: SocketAddr,
    /// Largest request body accepted (bytes); larger ones get 413.
    pub max_payload_size: usize,
    /// Highest bcrypt cost accepted in stored password hashes.
    pub max_bcrypt_cost: u32,
    /// bcrypt cost used when the registry hashes a `pwd-plain` itself.
    pub plain_password_cost: u32,
    /// Credentials that callers of the management API must present.
    pub management: ManagementAuth,
    /// Cache of the device-authentication library.
    pub auth_cache: AuthCacheConfig,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 28080)),
            max_payload_size: 16_000,
            max_bcrypt_cost: 10,
            plain_password_cost: 10,
            management: ManagementAuth::default(),
            auth_cache: AuthCacheConfig::default(),
        }
    }
}

impl RegistryConfig {
    fn rules(&self) -> CredentialRules {
        CredentialRules {
            max_bcrypt_cost: self.max_bcrypt_cost,
            plain_password_cost: self.plain_password_cost,
        }
    }
}

/// Connects to PostgreSQL (creating the database and applying migrations as needed).
pub async fn open_store(db: &DatabaseConfig, cfg: &RegistryConfig) -> anyhow::Result<Store> {
    let pool = db::connect(db).await?;
    Ok(Store::new(pool, cfg.rules()))
}

/// Serves the management API on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Store,
    cfg: RegistryConfig,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    metrics::init();
    let management = std::sync::Arc::new(cfg.management);
    let schemas = schema_registry::router(
        store.pool().clone(),
        store.topic_names().clone(),
        management.clone(),
    );
    let app = api::router(store, management, cfg.max_payload_size).merge(schemas);
    tracing::info!(addr = %listener.local_addr()?, "registry management API listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
        .context("registry server failed")
}

/// Binds the configured address and serves the management API until shutdown.
pub async fn run(
    cfg: RegistryConfig,
    store: Store,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.bind)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.bind))?;
    serve(listener, store, cfg, shutdown).await
}
