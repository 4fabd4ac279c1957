//! Port of Hono's `CredentialsManagementIT` checklist against real PostgreSQL over real HTTP.

mod common;

use base64::Engine;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::Digest;

fn b64(b: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

async fn setup(reg: &TestRegistry) -> (String, String) {
    let tenant = reg.tenant(json!({})).await;
    let device = random_id("d");
    reg.device(&tenant, &device, json!({})).await;
    (tenant, device)
}

#[tokio::test]
async fn all_four_types_round_trip_without_secrets() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = setup(&reg).await;
    let salt = b"pepper";
    let digest = sha2::Sha256::digest([salt.as_slice(), b"secret"].concat());
    let creds = json!([
        {"type": "hashed-password", "auth-id": "sensor1",
         "secrets": [{"pwd-hash": b64(digest), "salt": b64(salt), "hash-function": "sha-256",
                      "not-before": "2020-01-01T00:00:00Z", "comment": "first"}]},
        {"type": "psk", "auth-id": "psk-id", "secrets": [{"key": b64("shared-key")}]},
        {"type": "x509-cert", "auth-id": "CN=device,O=Ferrule", "secrets": [{}]},
        {"type": "rpk", "auth-id": "rpk-id", "secrets": [{"key": b64("public-key-der"), "algorithm": "EC"}]},
    ]);
    reg.credentials(&tenant, &device, creds).await;
    let r = reg.get(&format!("/v1/credentials/{tenant}/{device}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!etag(&r).is_empty());
    let text = r.text().await.unwrap();
    let got: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got.as_array().unwrap().len(), 4);
    for secret_material in [
        b64(digest),
        b64(salt),
        b64("shared-key"),
        b64("public-key-der"),
    ] {
        assert!(
            !text.contains(&secret_material),
            "a stored secret leaked: {text}"
        );
    }
    let pw = got
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "hashed-password")
        .unwrap();
    assert_eq!(pw["auth-id"], "sensor1");
    assert!(pw["secrets"][0]["id"].is_string());
    assert_eq!(pw["secrets"][0]["comment"], "first");
    assert_eq!(pw["secrets"][0]["not-before"], "2020-01-01T00:00:00Z");
}

#[tokio::test]
async fn plain_password_is_hashed_server_side_and_never_returned() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = setup(&reg).await;
    reg.credentials(
        &tenant,
        &device,
        json!([{"type": "hashed-password", "auth-id": "sensor1",
                "secrets": [{"pwd-plain": "hono-secret"}]}]),
    )
    .await;
    let text = reg
        .get(&format!("/v1/credentials/{tenant}/{device}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("hono-secret") && !text.contains("pwd-hash") && !text.contains("$2a$"),
        "{text}"
    );
    // What is stored is a bcrypt hash, never the plain text.
    let db = reg.store.pool().get().await.unwrap();
    let row = db
        .query_one(
            "SELECT data::text FROM credentials WHERE tenant_id = $1 AND auth_id = 'sensor1'",
            &[&tenant],
        )
        .await
        .unwrap();
    let stored: String = row.get(0);
    assert!(
        stored.contains("$2a$04$") && !stored.contains("hono-secret"),
        "{stored}"
    );
}

#[tokio::test]
async fn invalid_credentials_are_bad_requests() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = setup(&reg).await;
    let path = format!("/v1/credentials/{tenant}/{device}");
    let too_costly = format!("$2a$11${}", "a".repeat(53));
    let cases = [
        json!([{"type": "hashed-password", "auth-id": "a",
                "secrets": [{"hash-function": "bcrypt", "pwd-hash": too_costly}]}]),
        json!([{"auth-id": "a", "secrets": [{"key": "AAEC"}]}]),
        json!([{"type": "psk", "secrets": [{"key": "AAEC"}]}]),
        json!([{"type": "PSK!", "auth-id": "a", "secrets": [{"key": "AAEC"}]}]),
        json!([{"type": "hashed-password", "auth-id": "a@b", "secrets": [{"pwd-plain": "x"}]}]),
        json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC"}], "unknown": 1}]),
        json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC", "unknown": 1}]}]),
        json!([{"type": "psk", "auth-id": "a", "secrets": []}]),
        json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "%%%"}]}]),
        json!([{"type": "hashed-password", "auth-id": "a", "secrets": [{"pwd-hash": "AAEC", "hash-function": "md5"}]}]),
        json!([{"type": "hashed-password", "auth-id": "a", "secrets": [{"comment": "no hash"}]}]),
        // A secret with an id on an empty set.
        json!([{"type": "hashed-password", "auth-id": "a", "secrets": [{"id": "made-up"}]}]),
        json!({"type": "psk"}),
    ];
    for case in cases {
        let r = reg.put_json(&path, case.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{case}");
    }
    let r = reg
        .req(Method::PUT, &path)
        .header("content-type", "text/plain")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let big = json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC", "comment": "x".repeat(17_000)}]}]);
    assert_eq!(
        reg.put_json(&path, big).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

#[tokio::test]
async fn unknown_tenant_or_device_is_404() {
    let reg = TestRegistry::start().await;
    let (tenant, _) = setup(&reg).await;
    let creds = json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC"}]}]);
    let r = reg
        .put_json(
            &format!("/v1/credentials/{}/d", random_id("nope")),
            creds.clone(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = reg
        .put_json(&format!("/v1/credentials/{tenant}/missing"), creds)
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        reg.get(&format!("/v1/credentials/{tenant}/missing"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn etags_change_and_stale_ones_are_refused() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = setup(&reg).await;
    let path = format!("/v1/credentials/{tenant}/{device}");
    let v0 = etag(&reg.get(&path).await);
    let creds = json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC"}]}]);
    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", &v0)
        .json(&creds)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let v1 = etag(&r);
    assert_ne!(v0, v1);
    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", &v0)
        .json(&creds)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(etag(&reg.get(&path).await), v1);
}

#[tokio::test]
async fn patch_mode_keeps_secrets_by_id_and_drops_omitted_credentials() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = setup(&reg).await;
    let path = format!("/v1/credentials/{tenant}/{device}");
    reg.credentials(
        &tenant,
        &device,
        json!([
            {"type": "psk", "auth-id": "keep", "secrets": [{"key": b64("k1")}]},
            {"type": "psk", "auth-id": "drop", "secrets": [{"key": b64("k2")}]},
        ]),
    )
    .await;
    let got = body(reg.get(&path).await).await;
    let keep = got
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["auth-id"] == "keep")
        .unwrap();
    let id = keep["secrets"][0]["id"].as_str().unwrap().to_owned();

    // Send back what GET returned (no key), plus a new secret; leave `drop` out.
    reg.credentials(
        &tenant,
        &device,
        json!([{"type": "psk", "auth-id": "keep",
                "secrets": [{"id": id, "comment": "kept"}, {"key": b64("k3")}]}]),
    )
    .await;
    let got = body(reg.get(&path).await).await;
    assert_eq!(got.as_array().unwrap().len(), 1, "{got}");
    assert_eq!(got[0]["secrets"].as_array().unwrap().len(), 2);

    let auth =
        ferrule_registry::DeviceAuthenticator::new(reg.store.pool().clone(), &Default::default());
    let (dev, key) = auth.psk_key(&format!("keep@{tenant}")).await.unwrap();
    assert_eq!(dev.device_id, device);
    assert_eq!(key, b"k1", "the secret kept by id still has its stored key");
    assert_eq!(
        auth.psk_key(&format!("drop@{tenant}")).await.unwrap_err(),
        ferrule_registry::AuthError::BadCredentials
    );

    // An unknown secret id is refused.
    let r = reg
        .put_json(
            &path,
            json!([{"type": "psk", "auth-id": "keep", "secrets": [{"id": "no-such-id"}]}]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_auth_id_belongs_to_one_device_per_tenant() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = setup(&reg).await;
    reg.device(&tenant, "second", json!({})).await;
    let creds = json!([{"type": "psk", "auth-id": "shared", "secrets": [{"key": "AAEC"}]}]);
    reg.credentials(&tenant, &device, creds.clone()).await;
    let r = reg
        .put_json(&format!("/v1/credentials/{tenant}/second"), creds.clone())
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    // Listing the same credentials twice in one request is malformed.
    let twice = json!([
        {"type": "psk", "auth-id": "x", "secrets": [{"key": "AAEC"}]},
        {"type": "psk", "auth-id": "x", "secrets": [{"key": "AAEC"}]},
    ]);
    let r = reg
        .put_json(&format!("/v1/credentials/{tenant}/second"), twice)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Another tenant may use the same auth-id.
    let (other, other_dev) = setup(&reg).await;
    reg.credentials(&other, &other_dev, creds).await;
}

#[tokio::test]
async fn credentials_per_device_limit() {
    let reg = TestRegistry::start().await;
    let tenant = reg
        .tenant(json!({"registration-limits": {"max-credentials-per-device": 1}}))
        .await;
    reg.device(&tenant, "d", json!({})).await;
    let r = reg
        .put_json(
            &format!("/v1/credentials/{tenant}/d"),
            json!([
                {"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC"}]},
                {"type": "psk", "auth-id": "b", "secrets": [{"key": "AAEC"}]},
            ]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}
