//! PostgreSQL access: the connection pool, creating the database when it is missing, the
//! schema migrations embedded in the binary and applied once at start-up, and TLS for every
//! connection (the pool's and the registry change listener's) after libpq's `sslmode`.

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore};

/// Where the registry keeps its data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// libpq-style URL, e.g. `postgres://postgres@127.0.0.1:5432/ferrule`. TLS is set with
    /// `tls` and `ca_file`, not with an `sslmode` parameter here (which is refused).
    pub url: String,
    /// Connections kept in the pool.
    pub pool_size: usize,
    /// TLS to PostgreSQL, as libpq's `sslmode`: `disable` (never), `prefer` (the default, as in
    /// libpq: encrypted when the server offers TLS, plain when it declines; the certificate is
    /// not checked), `require` (encrypted or no connection; the certificate is not checked, so
    /// this keeps out eavesdroppers but not an impostor), `verify-full` (encrypted, the
    /// certificate must chain to `ca_file` and name the host of `url`, by DNS name or IP
    /// address). Over a Unix socket PostgreSQL declines TLS: use `disable` or `prefer` there.
    pub tls: DatabaseTls,
    /// PEM file with the CA certificates `verify-full` trusts; empty: the system's trust store.
    /// Only `verify-full` reads it, so setting it with another `tls` mode is refused.
    pub ca_file: PathBuf,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/ferrule".into(),
            pool_size: 16,
            tls: DatabaseTls::default(),
            ca_file: PathBuf::new(),
        }
    }
}

/// The `database.tls` modes; their names and meaning are libpq's `sslmode` values (libpq's
/// `allow` and `verify-ca` are not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatabaseTls {
    /// Plain TCP; no TLS is asked for.
    Disable,
    /// TLS when the server offers it, plain TCP when it declines; the certificate is not
    /// checked. A server that accepts TLS but fails the handshake is not retried in plain.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with the certificate checked: it chains to a trusted CA and names the host.
    VerifyFull,
}

impl std::fmt::Display for DatabaseTls {
    /// The name in the configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatabaseTls::Disable => "disable",
            DatabaseTls::Prefer => "prefer",
            DatabaseTls::Require => "require",
            DatabaseTls::VerifyFull => "verify-full",
        })
    }
}

/// The server end of a connection [`Connector::connect`] opened; it has to be polled (spawned)
/// for the [`Client`] to work.
pub type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Opens connections to the configured database with the configured TLS: the pool uses one, and
/// so does everything else that connects (the change listener of
/// [`DeviceAuthenticator`](crate::DeviceAuthenticator)).
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("host", &self.config.get_hosts())
            .field("port", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("ssl_mode", &self.config.get_ssl_mode())
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Parses the URL and prepares the TLS client (reading `ca_file` or the system's trust store
    /// for `verify-full`).
    pub fn new(cfg: &DatabaseConfig) -> anyhow::Result<Connector> {
        if has_parameter(&cfg.url, "sslmode") {
            anyhow::bail!(
                "database.url sets sslmode; set database.tls (and database.ca_file) instead"
            );
        }
        let mut config: tokio_postgres::Config =
            cfg.url.parse().context("database.url is not valid")?;
        if cfg.tls != DatabaseTls::VerifyFull && !cfg.ca_file.as_os_str().is_empty() {
            anyhow::bail!(
                "database.ca_file is only read with database.tls = \"verify-full\" (tls is \"{}\")",
                cfg.tls
            );
        }
        config.ssl_mode(match cfg.tls {
            DatabaseTls::Disable => SslMode::Disable,
            DatabaseTls::Prefer => SslMode::Prefer,
            DatabaseTls::Require | DatabaseTls::VerifyFull => SslMode::Require,
        });
        let provider = Arc::new(aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("the TLS protocol versions")?;
        let client = match cfg.tls {
            DatabaseTls::VerifyFull => builder.with_root_certificates(trust_anchors(cfg)?),
            // Never used with `disable`: tokio-postgres does not ask for TLS then.
            DatabaseTls::Disable | DatabaseTls::Prefer | DatabaseTls::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(UncheckedCertificate { provider })),
        }
        .with_no_client_auth();
        Ok(Connector {
            config,
            tls: MakeRustlsConnect::new(client),
        })
    }

    /// One connection, outside the pool.
    pub async fn connect(&self) -> Result<(Client, Connection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }

    /// The same server and TLS, another database.
    fn with_dbname(&self, dbname: &str) -> Connector {
        let mut other = self.clone();
        other.config.dbname(dbname);
        other
    }
}

/// Whether a libpq URL or key/value string names the parameter `name`.
fn has_parameter(url: &str, name: &str) -> bool {
    url.match_indices(name).any(|(at, _)| {
        let before = url[..at].chars().next_back();
        let starts = before.is_none_or(|c| c.is_whitespace() || c == '?' || c == '&');
        starts && url[at + name.len()..].trim_start().starts_with('=')
    })
}

/// The CAs `verify-full` trusts: those of `ca_file`, or the system's.
fn trust_anchors(cfg: &DatabaseConfig) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let path = &cfg.ca_file;
    if path.as_os_str().is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system's trusted certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            anyhow::bail!(
                "database.tls = \"verify-full\" without database.ca_file uses the system's \
                 trusted certificates, but none were found ({ignored} unusable)"
            );
        }
        return Ok(roots);
    }
    let shown = path.display();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading database.ca_file {shown}"))?
    {
        let cert = cert.with_context(|| format!("parsing database.ca_file {shown}"))?;
        roots
            .add(cert)
            .with_context(|| format!("a certificate in database.ca_file {shown}"))?;
    }
    if roots.is_empty() {
        anyhow::bail!("database.ca_file {shown} holds no certificate");
    }
    Ok(roots)
}

/// The verifier of `prefer` and `require`, which encrypt but, like libpq's modes of the same
/// names, accept whatever certificate the server presents: no issuer, name or validity check.
/// Only the handshake signature is checked against the certificate's key, as TLS requires; that
/// proves the server holds the key of the certificate it sent, not who it is.
#[derive(Debug)]
struct UncheckedCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for UncheckedCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The migrations in order; each runs in its own transaction exactly once per database.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_registry.sql")),
    (2, include_str!("../migrations/0002_command_routing.sql")),
    (3, include_str!("../migrations/0003_applications.sql")),
    (4, include_str!("../migrations/0004_tenant_topic_key.sql")),
    (
        5,
        include_str!("../migrations/0005_command_consumers_hot.sql"),
    ),
    (6, include_str!("../migrations/0006_schema_registry.sql")),
];

/// An arbitrary constant that serialises concurrent migrators (tests, several instances).
const MIGRATION_LOCK: i64 = 0x4645_5252_554c_4531;

/// Opens a pool to the configured database, creating the database if it does not exist yet,
/// and brings its schema up to date.
pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<Pool> {
    let connector = Connector::new(cfg)?;
    if let Err(e) = connector.connect().await {
        if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) {
            create_database(&connector).await?;
        } else {
            return Err(e)
                .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(&cfg.url)));
        }
    }
    let mgr = Manager::from_config(
        connector.config,
        connector.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(mgr)
        .max_size(cfg.pool_size.max(1))
        .build()
        .context("building the PostgreSQL pool")?;
    migrate(&pool).await?;
    warn_about_clashing_tenants(&pool).await?;
    Ok(pool)
}

/// Tenants whose ids differ only in `.` versus `_` predate the rule against them and were left
/// out of its index by migration 4 (see there); they are named at every start-up until the
/// operator has resolved them. Costs one catalog lookup when there are none.
async fn warn_about_clashing_tenants(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.get().await.context("getting a connection")?;
    let partial = client
        .query_one(
            "SELECT indpred IS NOT NULL FROM pg_index
              WHERE indexrelid = 'tenants_topic_key_idx'::regclass",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    if partial {
        let clashing: Vec<String> = client
            .query(
                "SELECT tenant_id FROM tenants
                  WHERE replace(tenant_id, '.', '_') IN (
                        SELECT replace(tenant_id, '.', '_') FROM tenants
                         GROUP BY 1 HAVING count(*) > 1)
                  ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !clashing.is_empty() {
            tracing::warn!(
                ?clashing,
                "tenants whose ids differ only in `.` versus `_` share their Kafka topics' \
                 names for Kafka, which creates only one of each; rename or delete all but \
                 one of each group"
            );
        }
    }
    Ok(())
}

async fn create_database(connector: &Connector) -> anyhow::Result<()> {
    let name = connector
        .config
        .get_dbname()
        .unwrap_or("ferrule")
        .to_owned();
    let (client, conn) = connector
        .with_dbname("postgres")
        .connect()
        .await
        .context("connecting to database postgres")?;
    let task = tokio::spawn(conn);
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match client.batch_execute(&sql).await {
        Ok(()) => tracing::info!(database = %name, "created database"),
        // Another instance created it in the meantime; when both were at it at once,
        // PostgreSQL reports the catalog's unique index instead.
        Err(e)
            if e.code() == Some(&SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
        Err(e) => return Err(e).context("creating the database"),
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .context("getting a connection for migrations")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS ferrule_migrations (
                    version integer PRIMARY KEY,
                    applied timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        for (version, sql) in MIGRATIONS {
            let done = client
                .query_opt(
                    "SELECT 1 FROM ferrule_migrations WHERE version = $1",
                    &[version],
                )
                .await?
                .is_some();
            if done {
                continue;
            }
            let tx = client.transaction().await?;
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {version}"))?;
            tx.execute(
                "INSERT INTO ferrule_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(version, "applied migration");
        }
        anyhow::Ok(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

/// The URL without its password, for log and error messages.
pub fn redact(url: &str) -> String {
    let without_userinfo = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    };
    // `password=…` as a key/value pair or a URL query parameter.
    let mut out = String::with_capacity(without_userinfo.len());
    let mut rest = without_userinfo.as_str();
    while let Some(at) = rest.find("password=") {
        let value = at + "password=".len();
        out.push_str(&rest[..value]);
        out.push_str("***");
        let end = rest[value..]
            .find(|c: char| c == '&' || c.is_whitespace())
            .map_or(rest.len(), |n| value + n);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_modes_are_named_as_in_libpq() {
        let parse = |v: serde_json::Value| serde_json::from_value::<DatabaseConfig>(v);
        let cfg = parse(serde_json::json!({"tls": "verify-full", "ca_file": "/ca.pem"})).unwrap();
        assert_eq!(cfg.tls, DatabaseTls::VerifyFull);
        assert_eq!(cfg.ca_file, PathBuf::from("/ca.pem"));
        for (name, mode) in [
            ("disable", DatabaseTls::Disable),
            ("prefer", DatabaseTls::Prefer),
            ("require", DatabaseTls::Require),
        ] {
            assert_eq!(parse(serde_json::json!({"tls": name})).unwrap().tls, mode);
        }
        assert!(parse(serde_json::json!({"tls": "verify-ca"})).is_err());
        for mode in [
            DatabaseTls::Disable,
            DatabaseTls::Prefer,
            DatabaseTls::Require,
            DatabaseTls::VerifyFull,
        ] {
            assert_eq!(serde_json::to_value(mode).unwrap(), mode.to_string());
        }
        assert_eq!(DatabaseConfig::default().tls, DatabaseTls::Prefer);
    }

    #[test]
    fn refuses_settings_that_would_be_ignored() {
        let refused = |cfg: DatabaseConfig| format!("{:#}", Connector::new(&cfg).unwrap_err());
        let url = |url: &str| DatabaseConfig {
            url: url.into(),
            ..Default::default()
        };
        let e = refused(url("postgres://u@h/db?sslmode=require"));
        assert!(e.contains("set database.tls"), "{e}");
        let e = refused(url("host=h sslmode = disable"));
        assert!(e.contains("set database.tls"), "{e}");
        let e = refused(DatabaseConfig {
            tls: DatabaseTls::Require,
            ca_file: "/ca.pem".into(),
            ..Default::default()
        });
        assert!(
            e.contains("only read with database.tls = \"verify-full\""),
            "{e}"
        );
        assert!(e.contains("(tls is \"require\")"), "{e}");
        for tls in [
            DatabaseTls::Disable,
            DatabaseTls::Prefer,
            DatabaseTls::Require,
        ] {
            let cfg = DatabaseConfig {
                tls,
                ..Default::default()
            };
            assert!(Connector::new(&cfg).is_ok());
        }
    }

    #[test]
    fn ca_file_problems_name_the_file() {
        let verify_full = |ca_file: PathBuf| DatabaseConfig {
            tls: DatabaseTls::VerifyFull,
            ca_file,
            ..Default::default()
        };
        let missing = std::env::temp_dir().join(format!("ferrule-no-ca-{}", uuid::Uuid::new_v4()));
        let e = format!(
            "{:#}",
            Connector::new(&verify_full(missing.clone())).unwrap_err()
        );
        assert!(e.contains(&missing.display().to_string()), "{e}");
        let empty = std::env::temp_dir().join(format!("ferrule-empty-ca-{}", uuid::Uuid::new_v4()));
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = format!(
            "{:#}",
            Connector::new(&verify_full(empty.clone())).unwrap_err()
        );
        assert!(e.contains("holds no certificate"), "{e}");
        std::fs::remove_file(empty).unwrap();
    }

    #[test]
    fn finds_parameters_in_both_url_forms() {
        assert!(has_parameter("postgres://h/db?sslmode=disable", "sslmode"));
        assert!(has_parameter(
            "postgres://h/db?a=b&sslmode=disable",
            "sslmode"
        ));
        assert!(has_parameter("host=h sslmode=disable", "sslmode"));
        assert!(!has_parameter("postgres://h/sslmode", "sslmode"));
        assert!(!has_parameter("host=h sslmodes=x", "sslmode"));
        assert!(has_parameter("host=h sslmode = x", "sslmode"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h"), "host=h");
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact("postgres://u@h/db?password=secret&sslmode=disable"),
            "postgres://u@h/db?password=***&sslmode=disable"
        );
    }
}
