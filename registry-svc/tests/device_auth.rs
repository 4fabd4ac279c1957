//! The device-authentication library against real PostgreSQL: every hash function, every
//! enabled flag and validity window, and cache invalidation through LISTEN/NOTIFY.

mod common;

use base64::Engine;
use common::*;
use ferrule_registry::auth::RegistryChange;
use ferrule_registry::db::Connector;
use ferrule_registry::{AuthError, DeviceAuthenticator};
use serde_json::json;
use sha2::Digest;
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn b64(b: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// An authenticator whose change listener is running, as a gateway would hold it.
async fn authenticator(reg: &TestRegistry) -> (DeviceAuthenticator, watch::Sender<bool>) {
    let auth = DeviceAuthenticator::new(reg.store.pool().clone(), &Default::default());
    let (tx, rx) = watch::channel(false);
    auth.spawn_listener(Connector::new(&database()).unwrap(), rx);
    let start = Instant::now();
    while !auth.cache_active() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "listener did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (auth, tx)
}

async fn eventually_refused(auth: &DeviceAuthenticator, user: &str, pw: &str, want: AuthError) {
    let start = Instant::now();
    loop {
        match auth.verify_password(user, pw.as_bytes()).await {
            Err(e) if e == want => return,
            other => assert!(
                start.elapsed() < Duration::from_secs(1),
                "still {other:?} after one second"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn right_and_wrong_password_for_every_hash_function() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    reg.device(&tenant, "dev", json!({})).await;
    let salt = b"NaCl";
    let sha256 = sha2::Sha256::digest([salt.as_slice(), b"pw-256"].concat());
    let sha512 = sha2::Sha512::digest(b"pw-512");
    let bcrypt = bcrypt::hash_with_result("pw-bcrypt", 4)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoA);
    reg.credentials(
        &tenant,
        "dev",
        json!([
            {"type": "hashed-password", "auth-id": "s256",
             "secrets": [{"pwd-hash": b64(sha256), "salt": b64(salt), "hash-function": "sha-256"}]},
            {"type": "hashed-password", "auth-id": "s512",
             "secrets": [{"pwd-hash": b64(sha512), "hash-function": "sha-512"}]},
            {"type": "hashed-password", "auth-id": "bc",
             "secrets": [{"pwd-hash": bcrypt, "hash-function": "bcrypt"}]},
            {"type": "hashed-password", "auth-id": "plain", "secrets": [{"pwd-plain": "pw-plain"}]},
        ]),
    )
    .await;
    let (auth, _stop) = authenticator(&reg).await;
    for (auth_id, pw) in [
        ("s256", "pw-256"),
        ("s512", "pw-512"),
        ("bc", "pw-bcrypt"),
        ("plain", "pw-plain"),
    ] {
        let user = format!("{auth_id}@{tenant}");
        let dev = auth.verify_password(&user, pw.as_bytes()).await.unwrap();
        assert_eq!(
            (dev.tenant_id.as_str(), dev.device_id.as_str()),
            (tenant.as_str(), "dev")
        );
        // Again, now from the cache.
        assert!(auth.verify_password(&user, pw.as_bytes()).await.is_ok());
        assert_eq!(
            auth.verify_password(&user, b"wrong").await,
            Err(AuthError::BadCredentials),
            "{auth_id}"
        );
    }
    assert_eq!(
        auth.verify_password(&format!("nobody@{tenant}"), b"x")
            .await,
        Err(AuthError::BadCredentials)
    );
    assert_eq!(
        auth.verify_password(&format!("s256@{}", random_id("nope")), b"pw-256")
            .await,
        Err(AuthError::UnknownTenant)
    );
    assert_eq!(
        auth.verify_password("no-tenant-part", b"x").await,
        Err(AuthError::MalformedUsername)
    );
}

#[tokio::test]
async fn disabled_and_expired_things_are_refused() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    reg.device(&tenant, "on", json!({})).await;
    reg.device(&tenant, "off", json!({"enabled": false})).await;
    reg.credentials(
        &tenant,
        "on",
        json!([
            {"type": "hashed-password", "auth-id": "expired",
             "secrets": [{"pwd-plain": "pw", "not-after": "2001-01-01T00:00:00Z"}]},
            {"type": "hashed-password", "auth-id": "future",
             "secrets": [{"pwd-plain": "pw", "not-before": "2999-01-01T00:00:00Z"}]},
            {"type": "hashed-password", "auth-id": "secret-off",
             "secrets": [{"pwd-plain": "pw", "enabled": false}]},
            {"type": "hashed-password", "auth-id": "creds-off", "enabled": false,
             "secrets": [{"pwd-plain": "pw"}]},
            {"type": "hashed-password", "auth-id": "rotating",
             "secrets": [{"pwd-plain": "old", "not-after": "2001-01-01T00:00:00Z"},
                         {"pwd-plain": "new"}]},
        ]),
    )
    .await;
    reg.credentials(
        &tenant,
        "off",
        json!([
            {"type": "hashed-password", "auth-id": "dev-off", "secrets": [{"pwd-plain": "pw"}]},
        ]),
    )
    .await;
    let (auth, _stop) = authenticator(&reg).await;
    let user = |a: &str| format!("{a}@{tenant}");
    for a in ["expired", "future", "secret-off", "creds-off"] {
        assert_eq!(
            auth.verify_password(&user(a), b"pw").await,
            Err(AuthError::BadCredentials),
            "{a}"
        );
    }
    assert_eq!(
        auth.verify_password(&user("rotating"), b"old").await,
        Err(AuthError::BadCredentials)
    );
    assert!(
        auth.verify_password(&user("rotating"), b"new")
            .await
            .is_ok()
    );
    assert_eq!(
        auth.verify_password(&user("dev-off"), b"pw").await,
        Err(AuthError::DeviceDisabled)
    );

    let disabled_tenant = reg.tenant(json!({"enabled": false})).await;
    reg.device(&disabled_tenant, "d", json!({})).await;
    reg.credentials(
        &disabled_tenant,
        "d",
        json!([
            {"type": "hashed-password", "auth-id": "a", "secrets": [{"pwd-plain": "pw"}]},
        ]),
    )
    .await;
    assert_eq!(
        auth.verify_password(&format!("a@{disabled_tenant}"), b"pw")
            .await,
        Err(AuthError::TenantDisabled)
    );
}

#[tokio::test]
async fn changes_reach_the_cache_within_a_second() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = reg.device_with_password("sensor", "pw").await;
    let (auth, _stop) = authenticator(&reg).await;
    let mut changes = auth.subscribe();
    let user = format!("sensor@{tenant}");
    assert!(auth.verify_password(&user, b"pw").await.is_ok());
    assert!(
        auth.verify_password(&user, b"pw").await.is_ok(),
        "served from the cache"
    );

    // Disabling the device is noticed at once, not after the cache ttl.
    let r = reg
        .put_json(
            &format!("/v1/devices/{tenant}/{device}"),
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(r.status(), 204);
    eventually_refused(&auth, &user, "pw", AuthError::DeviceDisabled).await;
    let change: RegistryChange = loop {
        let c = tokio::time::timeout(Duration::from_secs(1), changes.recv())
            .await
            .expect("a change notification")
            .unwrap();
        // Other tests share the database: look for this tenant's device change.
        if c.kind == "device" && c.tenant == tenant {
            break c;
        }
    };
    assert_eq!(change.tenant, tenant);
    assert_eq!(change.device.as_deref(), Some(device.as_str()));
    assert!(change.revokes_access());

    // Re-enable, then change the password: the old one stops working at once.
    reg.put_json(&format!("/v1/devices/{tenant}/{device}"), json!({}))
        .await;
    let start = Instant::now();
    while auth.verify_password(&user, b"pw").await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "re-enabled device still refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reg.credentials(
        &tenant,
        &device,
        json!([
            {"type": "hashed-password", "auth-id": "sensor", "secrets": [{"pwd-plain": "pw2"}]},
        ]),
    )
    .await;
    eventually_refused(&auth, &user, "pw", AuthError::BadCredentials).await;
    assert!(auth.verify_password(&user, b"pw2").await.is_ok());

    // Disabling and deleting the tenant.
    reg.put_json(&format!("/v1/tenants/{tenant}"), json!({"enabled": false}))
        .await;
    eventually_refused(&auth, &user, "pw2", AuthError::TenantDisabled).await;
    reg.delete(&format!("/v1/tenants/{tenant}")).await;
    eventually_refused(&auth, &user, "pw2", AuthError::UnknownTenant).await;
}

#[tokio::test]
async fn psk_and_x509_lookups() {
    let reg = TestRegistry::start().await;
    let dn = format!("CN={},O=Ferrule", random_id("ca"));
    let tenant = reg
        .tenant(json!({"trusted-ca": [{"subject-dn": dn, "public-key": "MFkwEwYHKoZIzj0CAQ=="}]}))
        .await;
    reg.device(&tenant, "dev", json!({})).await;
    reg.credentials(
        &tenant,
        "dev",
        json!([
            {"type": "psk", "auth-id": "coap-dev", "secrets": [{"key": b64("the-psk")}]},
            {"type": "x509-cert", "auth-id": "CN=dev,O=Ferrule", "secrets": [{}]},
            {"type": "x509-cert", "auth-id": "CN=old,O=Ferrule",
             "secrets": [{"not-after": "2001-01-01T00:00:00Z"}]},
        ]),
    )
    .await;
    let (auth, _stop) = authenticator(&reg).await;
    let (dev, key) = auth.psk_key(&format!("coap-dev@{tenant}")).await.unwrap();
    assert_eq!(dev.device_id, "dev");
    assert_eq!(key, b"the-psk");
    assert_eq!(
        auth.psk_key(&format!("other@{tenant}")).await.unwrap_err(),
        AuthError::BadCredentials
    );
    assert_eq!(
        auth.x509(&tenant, "CN=dev,O=Ferrule")
            .await
            .unwrap()
            .device_id,
        "dev"
    );
    assert_eq!(
        auth.x509(&tenant, "CN=old,O=Ferrule").await,
        Err(AuthError::BadCredentials)
    );
    assert_eq!(
        auth.x509(&tenant, "CN=nobody").await,
        Err(AuthError::BadCredentials)
    );
    assert_eq!(
        auth.tenant_by_trust_anchor(&dn).await.unwrap(),
        Some(tenant)
    );
    assert_eq!(
        auth.tenant_by_trust_anchor("CN=unknown-ca").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn without_a_listener_nothing_is_cached() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = reg.device_with_password("sensor", "pw").await;
    let auth = DeviceAuthenticator::new(reg.store.pool().clone(), &Default::default());
    let user = format!("sensor@{tenant}");
    assert!(auth.verify_password(&user, b"pw").await.is_ok());
    assert!(!auth.cache_active());
    reg.put_json(
        &format!("/v1/devices/{tenant}/{device}"),
        json!({"enabled": false}),
    )
    .await;
    assert_eq!(
        auth.verify_password(&user, b"pw").await,
        Err(AuthError::DeviceDisabled)
    );
}
