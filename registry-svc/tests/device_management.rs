//! Port of Hono's `DeviceManagementIT` checklist against real PostgreSQL over real HTTP.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn create_with_and_without_id() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;

    // No body and no content type at all.
    let r = reg
        .req(Method::POST, &format!("/v1/devices/{tenant}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let id = body(r).await["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/devices/{tenant}/{id}"));
    let d = body(reg.get(&location).await).await;
    assert_eq!(d["enabled"], true);
    assert!(d["status"]["created"].is_string());

    let r = reg
        .post_json(
            &format!("/v1/devices/{tenant}/4711:a=b"),
            json!({"enabled": false, "via": ["gw-1"], "defaults": {"content-type": "text/plain"},
                   "ext": {"k": "v"}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(!etag(&r).is_empty());
    let d = body(reg.get(&format!("/v1/devices/{tenant}/4711:a=b")).await).await;
    assert_eq!(d["enabled"], false);
    assert_eq!(d["via"], json!(["gw-1"]));
    assert_eq!(d["defaults"]["content-type"], "text/plain");
}

#[tokio::test]
async fn duplicates_invalid_ids_and_unknown_tenants() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    reg.device(&tenant, "dev-1", json!({})).await;
    let r = reg
        .post_json(&format!("/v1/devices/{tenant}/dev-1"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    let r = reg
        .post_json(&format!("/v1/devices/{tenant}/bad%20id"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = reg
        .post_json("/v1/devices/bad%2Ftenant/dev-1", json!({}))
        .await;
    assert!(r.status() == StatusCode::BAD_REQUEST || r.status() == StatusCode::NOT_FOUND);
    let r = reg
        .post_json(
            &format!("/v1/devices/{}/dev-1", random_id("nope")),
            json!({}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = reg
        .post_json(&format!("/v1/devices/{}", random_id("nope")), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    for bad in [
        json!({"unknown": true}),
        json!({"via": "gw-1"}),
        json!({"via": ["gw"], "memberOf": ["group"]}),
    ] {
        let r = reg
            .post_json(
                &format!("/v1/devices/{tenant}/{}", random_id("d")),
                bad.clone(),
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = reg
        .req(
            Method::POST,
            &format!("/v1/devices/{tenant}/{}", random_id("d")),
        )
        .header("content-type", "application/xml")
        .body("<device/>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = reg
        .post_json(
            &format!("/v1/devices/{tenant}/{}", random_id("d")),
            json!({"ext": {"blob": "x".repeat(17_000)}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn update_replaces_all_fields_and_checks_etag() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    reg.device(&tenant, "d1", json!({"ext": {"a": 1}, "via": ["gw"]}))
        .await;
    let path = format!("/v1/devices/{tenant}/d1");
    let v1 = etag(&reg.get(&path).await);

    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", "\"not-the-version\"")
        .json(&json!({"ext": {"b": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", format!("\"{v1}\""))
        .json(&json!({"ext": {"b": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_ne!(etag(&r), v1);
    let d = body(reg.get(&path).await).await;
    assert_eq!(d["ext"], json!({"b": 2}));
    assert!(
        d.get("via").is_none(),
        "update replaces the whole document: {d}"
    );
    assert!(d["status"]["updated"].is_string());

    let r = reg
        .put_json(&format!("/v1/devices/{tenant}/missing"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn delete_cascades_to_credentials_and_delete_all() {
    let reg = TestRegistry::start().await;
    let (tenant, device) = reg.device_with_password("sensor-a", "pw").await;
    let creds = format!("/v1/credentials/{tenant}/{device}");
    assert_eq!(reg.get(&creds).await.status(), StatusCode::OK);
    let r = reg
        .req(Method::DELETE, &format!("/v1/devices/{tenant}/{device}"))
        .header("if-match", "old")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        reg.delete(&format!("/v1/devices/{tenant}/{device}"))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(reg.get(&creds).await.status(), StatusCode::NOT_FOUND);
    // The auth-id is free again: another device may take it.
    reg.device(&tenant, "other", json!({})).await;
    reg.credentials(
        &tenant,
        "other",
        json!([{"type": "hashed-password", "auth-id": "sensor-a", "secrets": [{"pwd-plain": "x"}]}]),
    )
    .await;

    for i in 0..3 {
        reg.device(&tenant, &format!("bulk-{i}"), json!({})).await;
    }
    assert_eq!(
        reg.delete(&format!("/v1/devices/{tenant}")).await.status(),
        StatusCode::NO_CONTENT
    );
    let r = reg.get(&format!("/v1/devices/{tenant}")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "no device is left");
}

#[tokio::test]
async fn deleting_the_tenant_makes_its_devices_unreachable() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    reg.device(&tenant, "d1", json!({})).await;
    assert_eq!(
        reg.delete(&format!("/v1/tenants/{tenant}")).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        reg.get(&format!("/v1/devices/{tenant}/d1")).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        reg.get(&format!("/v1/credentials/{tenant}/d1"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn search_pages_filters_wildcards_sort_and_gateways() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    reg.device(&tenant, "gw-1", json!({"ext": {"kind": "gateway"}}))
        .await;
    reg.device(&tenant, "gw-2", json!({"memberOf": ["group-a"]}))
        .await;
    for i in 0..6 {
        reg.device(
            &tenant,
            &format!("sensor-{i}"),
            json!({"enabled": i < 4, "via": ["gw-1"], "ext": {"rank": i, "model": format!("m{}00", i % 3)}}),
        )
        .await;
    }
    let base = format!("/v1/devices/{tenant}");

    let page = body(reg.get(&format!("{base}?pageSize=3")).await).await;
    assert_eq!(page["total"], 8);
    assert_eq!(page["result"].as_array().unwrap().len(), 3);
    assert_eq!(page["result"][0]["id"], "gw-1");

    let disabled = enc(&json!({"field": "/enabled", "value": false}).to_string());
    let page = body(reg.get(&format!("{base}?filterJson={disabled}")).await).await;
    assert_eq!(page["total"], 2);

    let by_id = enc(&json!({"field": "/id", "value": "sensor-*"}).to_string());
    let desc = enc(&json!({"field": "/ext/rank", "direction": "desc"}).to_string());
    let page = body(
        reg.get(&format!(
            "{base}?filterJson={by_id}&sortJson={desc}&pageOffset=1&pageSize=2"
        ))
        .await,
    )
    .await;
    assert_eq!(page["total"], 6);
    assert_eq!(page["result"][0]["id"], "sensor-4");
    assert_eq!(page["result"][1]["id"], "sensor-3");

    let model = enc(&json!({"field": "/ext/model", "value": "m?00"}).to_string());
    let page = body(reg.get(&format!("{base}?filterJson={model}")).await).await;
    assert_eq!(page["total"], 6);
    let rank = enc(&json!({"field": "/ext/rank", "value": 5}).to_string());
    let page = body(reg.get(&format!("{base}?filterJson={rank}")).await).await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["result"][0]["id"], "sensor-5");

    // isGateway wins over filterJson.
    let page = body(
        reg.get(&format!("{base}?isGateway=true&filterJson={disabled}"))
            .await,
    )
    .await;
    let mut ids: Vec<_> = page["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["gw-1", "gw-2"]);
    let page = body(reg.get(&format!("{base}?isGateway=false")).await).await;
    assert_eq!(page["total"], 6);

    let nothing = enc(&json!({"field": "/ext/model", "value": "zzz"}).to_string());
    assert_eq!(
        reg.get(&format!("{base}?filterJson={nothing}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        reg.get(&format!("{base}?pageSize=1000")).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        reg.get(&format!("{base}?isGateway=perhaps")).await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn registration_limit_caps_devices() {
    let reg = TestRegistry::start().await;
    let tenant = reg
        .tenant(json!({"registration-limits": {"max-devices": 2}}))
        .await;
    reg.device(&tenant, "a", json!({})).await;
    reg.device(&tenant, "b", json!({})).await;
    let r = reg
        .post_json(&format!("/v1/devices/{tenant}/c"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}
