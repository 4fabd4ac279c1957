//! `database.tls` against the test cluster, which scripts/lib.sh starts with `ssl=on` and a
//! certificate for 127.0.0.1 and localhost from a test CA (`FERRULE_TEST_PG_CA`). Whether a
//! session is encrypted is asked of the server (`pg_stat_ssl`), not inferred from the client.
//! Names that are not in the certificate are reached through `hostaddr`, which connects to
//! 127.0.0.1 while the certificate is checked against `host`.

use ferrule_registry::db::{self, Connector};
use ferrule_registry::{DatabaseConfig, DatabaseTls};
use std::path::PathBuf;

/// The test CA, or `None` (the test is skipped) when neither it nor the database is given.
fn test_ca() -> Option<PathBuf> {
    match std::env::var_os("FERRULE_TEST_PG_CA") {
        Some(ca) => Some(ca.into()),
        None if std::env::var_os("FERRULE_TEST_DATABASE_URL").is_some() => panic!(
            "FERRULE_TEST_DATABASE_URL is set but FERRULE_TEST_PG_CA is not: set it to the CA \
             that signed the test cluster's certificate (scripts/test does)"
        ),
        None => {
            eprintln!(
                "skipped: FERRULE_TEST_PG_CA is not set (scripts/test sets it with the database)"
            );
            None
        }
    }
}

fn test_url() -> String {
    std::env::var("FERRULE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into())
}

/// The test database as a key/value connection string with `host` (and `hostaddr`, if given)
/// replaced.
fn at_host(host: &str, hostaddr: Option<&str>) -> String {
    let pg: tokio_postgres::Config = test_url().parse().unwrap();
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut s = format!(
        "host={} port={} user={} dbname={}",
        quote(host),
        pg.get_ports().first().copied().unwrap_or(5432),
        quote(pg.get_user().unwrap_or("postgres")),
        quote(pg.get_dbname().unwrap_or("ferrule_test")),
    );
    if let Some(addr) = hostaddr {
        s += &format!(" hostaddr={addr}");
    }
    if let Some(pw) = pg.get_password() {
        s += &format!(" password={}", quote(&String::from_utf8_lossy(pw)));
    }
    s
}

fn config(url: String, tls: DatabaseTls, ca_file: Option<PathBuf>) -> DatabaseConfig {
    DatabaseConfig {
        url,
        pool_size: 1,
        tls,
        ca_file: ca_file.unwrap_or_default(),
    }
}

/// Connects once and asks the server whether this session is encrypted.
async fn encrypted(cfg: &DatabaseConfig) -> Result<bool, String> {
    let connector = Connector::new(cfg).map_err(|e| format!("{e:#}"))?;
    let (client, conn) = connector.connect().await.map_err(|e| chain(&e))?;
    let driver = tokio::spawn(conn);
    let ssl = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| chain(&e))?
        .get(0);
    drop(client);
    let _ = driver.await;
    Ok(ssl)
}

/// An error with its causes, as an operator reads it in the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

/// A CA that did not sign the server's certificate, as a PEM file.
fn other_ca() -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Some other CA");
    let pem = ca.self_signed(&key).unwrap().pem();
    let path = std::env::temp_dir().join(format!("ferrule-other-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test]
async fn verify_full_with_the_test_ca_encrypts_and_checks_the_address() {
    let Some(ca) = test_ca() else { return };
    // The IP address SAN.
    let cfg = config(test_url(), DatabaseTls::VerifyFull, Some(ca.clone()));
    assert_eq!(encrypted(&cfg).await, Ok(true));
    // The DNS SAN.
    let cfg = config(
        at_host("localhost", Some("127.0.0.1")),
        DatabaseTls::VerifyFull,
        Some(ca),
    );
    assert_eq!(encrypted(&cfg).await, Ok(true));
}

/// The pool (with its migrations) and the change listener connect as configured too.
#[tokio::test]
async fn the_pool_and_the_listener_use_verify_full() {
    let Some(ca) = test_ca() else { return };
    let cfg = config(test_url(), DatabaseTls::VerifyFull, Some(ca));
    let pool = db::connect(&cfg).await.unwrap();
    let client = pool.get().await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the pool's connection is encrypted");
    drop(client);

    let auth = ferrule_registry::DeviceAuthenticator::new(pool, &Default::default());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let listener = auth.spawn_listener(Connector::new(&cfg).unwrap(), rx);
    let start = std::time::Instant::now();
    while !auth.cache_active() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the change listener did not connect with verify-full"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    listener.await.unwrap();
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_from_another_ca() {
    if test_ca().is_none() {
        return;
    }
    let other = other_ca();
    let cfg = config(test_url(), DatabaseTls::VerifyFull, Some(other.clone()));
    let err = encrypted(&cfg).await.unwrap_err();
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    // What the operator sees at start-up.
    let err = format!("{:#}", db::connect(&cfg).await.unwrap_err());
    eprintln!("{err}");
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    let _ = std::fs::remove_file(other);
}

#[tokio::test]
async fn verify_full_refuses_a_host_the_certificate_does_not_name() {
    let Some(ca) = test_ca() else { return };
    for host in ["db.example.invalid", "127.0.0.2"] {
        let cfg = config(
            at_host(host, Some("127.0.0.1")),
            DatabaseTls::VerifyFull,
            Some(ca.clone()),
        );
        let err = encrypted(&cfg).await.unwrap_err();
        eprintln!("{host}: {err}");
        assert!(err.contains("invalid peer certificate"), "{host}: {err}");
        assert!(err.contains("not valid for name"), "{host}: {err}");
        assert!(err.contains(host), "{host}: {err}");
    }
}

#[tokio::test]
async fn require_encrypts_without_checking_the_certificate() {
    if test_ca().is_none() {
        return;
    }
    let cfg = config(test_url(), DatabaseTls::Require, None);
    assert_eq!(encrypted(&cfg).await, Ok(true));
    // Neither the issuer (no CA is given) nor the name is checked.
    let cfg = config(
        at_host("db.example.invalid", Some("127.0.0.1")),
        DatabaseTls::Require,
        None,
    );
    assert_eq!(encrypted(&cfg).await, Ok(true));
}

#[tokio::test]
async fn prefer_encrypts_when_the_server_offers_tls() {
    if test_ca().is_none() {
        return;
    }
    let cfg = config(test_url(), DatabaseTls::Prefer, None);
    assert_eq!(encrypted(&cfg).await, Ok(true));
    assert_eq!(DatabaseConfig::default().tls, DatabaseTls::Prefer);
}

#[tokio::test]
async fn disable_connects_in_plain() {
    if test_ca().is_none() {
        return;
    }
    let cfg = config(test_url(), DatabaseTls::Disable, None);
    assert_eq!(encrypted(&cfg).await, Ok(false));
}

/// PostgreSQL declines TLS on its Unix socket: `prefer` goes on in plain, `require` and
/// `verify-full` give up. The socket's folder is asked of the server.
#[tokio::test]
async fn over_the_unix_socket_prefer_falls_back_and_require_refuses() {
    let Some(ca) = test_ca() else { return };
    let cfg = config(test_url(), DatabaseTls::Disable, None);
    let (client, conn) = Connector::new(&cfg).unwrap().connect().await.unwrap();
    let driver = tokio::spawn(conn);
    let dirs: String = client
        .query_one("SHOW unix_socket_directories", &[])
        .await
        .unwrap()
        .get(0);
    drop(client);
    let _ = driver.await;
    let dir = dirs.split(',').next().unwrap().trim().to_owned();
    assert!(
        dir.starts_with('/'),
        "no socket folder to test with: {dirs:?}"
    );

    let cfg = config(at_host(&dir, None), DatabaseTls::Prefer, None);
    assert_eq!(encrypted(&cfg).await, Ok(false));
    for (tls, ca) in [
        (DatabaseTls::Require, None),
        (DatabaseTls::VerifyFull, Some(ca)),
    ] {
        let cfg = config(at_host(&dir, None), tls, ca);
        let err = encrypted(&cfg).await.unwrap_err();
        assert!(
            err.contains("server does not support TLS"),
            "{tls:?}: {err}"
        );
    }
}
