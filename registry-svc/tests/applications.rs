//! Application credentials (for the AMQP bridge) through the management API against the real
//! PostgreSQL, and their verification: scoped to one tenant, passwords never shown.

mod common;

use common::*;
use ferrule_registry::{AuthError, DeviceAuthenticator};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn applications_are_managed_and_verified_per_tenant() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    let other = reg.tenant(json!({})).await;
    let path = format!("/v1/applications/{tenant}/dashboard");

    // Unknown tenant, bad id, no secret, anonymous caller.
    let r = reg
        .put_json(
            "/v1/applications/no-such-tenant/dashboard",
            json!({"secrets": [{"pwd-plain": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = reg
        .put_json(
            &format!("/v1/applications/{tenant}/a@b"),
            json!({"secrets": [{"pwd-plain": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = reg.put_json(&path, json!({"enabled": true})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = reg
        .anonymous(Method::PUT, &path)
        .json(&json!({"secrets": [{"pwd-plain": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(reg.get(&path).await.status(), StatusCode::NOT_FOUND);

    let r = reg
        .put_json(&path, json!({"secrets": [{"pwd-plain": "app-secret"}]}))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = reg.get(&path).await;
    assert_eq!(r.status(), StatusCode::OK);
    let version = etag(&r);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("app-secret") && !text.contains("pwd-hash"),
        "{text}"
    );

    let auth = DeviceAuthenticator::new(reg.store.pool().clone(), &Default::default());
    let app = auth
        .verify_application(&format!("dashboard@{tenant}"), b"app-secret")
        .await
        .unwrap();
    assert_eq!(
        (app.tenant_id.as_str(), app.app_id.as_str()),
        (tenant.as_str(), "dashboard")
    );
    for (user, pw) in [
        (format!("dashboard@{tenant}"), "wrong"),
        (format!("dashboard@{other}"), "app-secret"),
        (format!("nobody@{tenant}"), "app-secret"),
    ] {
        assert_eq!(
            auth.verify_application(&user, pw.as_bytes()).await,
            Err(AuthError::BadCredentials),
            "{user}"
        );
    }
    assert_eq!(
        auth.verify_application("dashboard@no-such-tenant", b"app-secret")
            .await,
        Err(AuthError::UnknownTenant)
    );

    // Disabling the application or its tenant locks it out.
    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", "\"stale\"")
        .json(&json!({"enabled": false, "secrets": [{"pwd-plain": "app-secret"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", &version)
        .json(&json!({"enabled": false, "secrets": [{"pwd-plain": "app-secret"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        auth.verify_application(&format!("dashboard@{tenant}"), b"app-secret")
            .await,
        Err(AuthError::BadCredentials)
    );
    reg.put_json(&path, json!({"secrets": [{"pwd-plain": "app-secret"}]}))
        .await;
    let r = reg
        .put_json(&format!("/v1/tenants/{tenant}"), json!({"enabled": false}))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        auth.verify_application(&format!("dashboard@{tenant}"), b"app-secret")
            .await,
        Err(AuthError::TenantDisabled)
    );

    // Delete, and the tenant's deletion takes its applications along.
    assert_eq!(reg.delete(&path).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(reg.delete(&path).await.status(), StatusCode::NOT_FOUND);
    reg.put_json(&path, json!({"secrets": [{"pwd-plain": "x"}]}))
        .await;
    assert_eq!(
        reg.delete(&format!("/v1/tenants/{tenant}")).await.status(),
        StatusCode::NO_CONTENT
    );
    let db = reg.store.pool().get().await.unwrap();
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM applications WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}
