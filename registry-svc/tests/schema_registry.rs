//! The Confluent-compatible schema registry API over real HTTP and PostgreSQL: versions, ids,
//! compatibility, error codes, who may read and write, and the gateways' cached view.

mod common;

use common::*;
use ferrule_registry::DeviceAuthenticator;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const CT: &str = "application/vnd.schemaregistry.v1+json";

fn v1() -> String {
    json!({"type": "record", "name": "Reading", "fields": [{"name": "temp", "type": "double"}]})
        .to_string()
}

/// v1 plus a field with a default: BACKWARD and FORWARD compatible.
fn v2() -> String {
    json!({"type": "record", "name": "Reading", "fields": [
        {"name": "temp", "type": "double"},
        {"name": "unit", "type": "string", "default": "C"}]})
    .to_string()
}

/// A new field without a default: not BACKWARD compatible with v1 or v2.
fn breaking() -> String {
    json!({"type": "record", "name": "Reading", "fields": [
        {"name": "temp", "type": "double"}, {"name": "site", "type": "string"}]})
    .to_string()
}

async fn call(
    reg: &TestRegistry,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = reg.req(method, path);
    if let Some(b) = body {
        req = req.header("content-type", CT).body(b.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    if status != StatusCode::NO_CONTENT {
        assert_eq!(r.headers()["content-type"], CT, "{path}");
    }
    (status, r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> i64 {
    v["error_code"].as_i64().unwrap_or_default()
}

#[tokio::test]
async fn versions_ids_and_lookups_as_confluent_serves_them() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    let subject = format!("hono.telemetry.{tenant}-value");
    let versions = format!("/subjects/{subject}/versions");

    let (s, e) = call(&reg, Method::GET, &versions, None).await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40401));

    let (s, r) = call(&reg, Method::POST, &versions, Some(json!({"schema": v1()}))).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let id1 = r["id"].as_i64().unwrap();
    // The same schema again, even spelled differently: the same id, no new version.
    let spaced =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&v1()).unwrap()).unwrap();
    let (_, r) = call(
        &reg,
        Method::POST,
        &versions,
        Some(json!({"schema": spaced, "schemaType": "AVRO"})),
    )
    .await;
    assert_eq!(r["id"].as_i64(), Some(id1));
    let (_, r) = call(&reg, Method::POST, &versions, Some(json!({"schema": v2()}))).await;
    let id2 = r["id"].as_i64().unwrap();
    assert_ne!(id1, id2);
    let (_, list) = call(&reg, Method::GET, &versions, None).await;
    assert_eq!(list, json!([1, 2]));

    let (_, latest) = call(&reg, Method::GET, &format!("{versions}/latest"), None).await;
    assert_eq!(latest["subject"], subject.as_str());
    assert_eq!(latest["version"], 2);
    assert_eq!(latest["id"].as_i64(), Some(id2));
    let stored: Value = serde_json::from_str(latest["schema"].as_str().unwrap()).unwrap();
    assert_eq!(stored["fields"][1]["default"], "C", "defaults are kept");
    let (_, first) = call(&reg, Method::GET, &format!("{versions}/1"), None).await;
    assert_eq!(first["id"].as_i64(), Some(id1));
    let (_, raw) = call(&reg, Method::GET, &format!("{versions}/1/schema"), None).await;
    assert_eq!(raw["name"], "Reading");
    let (s, e) = call(&reg, Method::GET, &format!("{versions}/9"), None).await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40402));
    let (s, e) = call(&reg, Method::GET, &format!("{versions}/zero"), None).await;
    assert_eq!((s, code(&e)), (StatusCode::UNPROCESSABLE_ENTITY, 42202));

    let (_, by_id) = call(&reg, Method::GET, &format!("/schemas/ids/{id1}"), None).await;
    assert_eq!(by_id["schema"], first["schema"]);
    let (_, used) = call(
        &reg,
        Method::GET,
        &format!("/schemas/ids/{id2}/versions"),
        None,
    )
    .await;
    // Ids are global: other tenants that registered the same schema share it.
    assert!(
        used.as_array()
            .unwrap()
            .contains(&json!({"subject": subject, "version": 2})),
        "{used}"
    );
    let (s, e) = call(&reg, Method::GET, "/schemas/ids/2000000000", None).await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40403));

    let (_, found) = call(
        &reg,
        Method::POST,
        &format!("/subjects/{subject}"),
        Some(json!({"schema": v1()})),
    )
    .await;
    assert_eq!(
        (found["version"].as_i64(), found["id"].as_i64()),
        (Some(1), Some(id1))
    );
    let (s, e) = call(
        &reg,
        Method::POST,
        &format!("/subjects/{subject}"),
        Some(json!({"schema": breaking()})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40403));

    let (_, subjects) = call(
        &reg,
        Method::GET,
        &format!("/subjects?subjectPrefix=hono.telemetry.{tenant}"),
        None,
    )
    .await;
    assert_eq!(subjects, json!([subject]));

    // Soft delete, then permanent.
    let (s, e) = call(
        &reg,
        Method::DELETE,
        &format!("/subjects/{subject}?permanent=true"),
        None,
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40405));
    let (_, gone) = call(&reg, Method::DELETE, &format!("/subjects/{subject}"), None).await;
    assert_eq!(gone, json!([1, 2]));
    let (s, _) = call(&reg, Method::GET, &versions, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, kept) = call(&reg, Method::GET, &format!("{versions}?deleted=true"), None).await;
    assert_eq!(kept, json!([1, 2]));
    let (_, gone) = call(
        &reg,
        Method::DELETE,
        &format!("/subjects/{subject}?permanent=true"),
        None,
    )
    .await;
    assert_eq!(gone, json!([1, 2]));
}

#[tokio::test]
async fn invalid_and_incompatible_schemas_get_confluents_codes() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    let subject = format!("hono.event.{tenant}-value");
    let versions = format!("/subjects/{subject}/versions");

    let (s, e) = call(
        &reg,
        Method::POST,
        &versions,
        Some(json!({"schema": "{\"type\": \"recrod\"}"})),
    )
    .await;
    assert_eq!(
        (s, code(&e)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42201),
        "{e}"
    );
    let (s, e) = call(
        &reg,
        Method::POST,
        &versions,
        Some(json!({"schema": "{}", "schemaType": "PROTOBUF"})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::UNPROCESSABLE_ENTITY, 42201));
    for bad in [
        "orders-value",
        "hono.command.x-value",
        &format!("hono.telemetry.{tenant}-key"),
    ] {
        let (s, e) = call(
            &reg,
            Method::POST,
            &format!("/subjects/{bad}/versions"),
            Some(json!({"schema": v1()})),
        )
        .await;
        assert_eq!(
            (s, code(&e)),
            (StatusCode::UNPROCESSABLE_ENTITY, 42208),
            "{bad}: {e}"
        );
    }
    let (s, e) = call(
        &reg,
        Method::POST,
        "/subjects/hono.telemetry.no-such-tenant-value/versions",
        Some(json!({"schema": v1()})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::UNPROCESSABLE_ENTITY, 42208));

    call(&reg, Method::POST, &versions, Some(json!({"schema": v1()}))).await;
    // BACKWARD by default: a required new field is refused.
    let (_, c) = call(&reg, Method::GET, "/config", None).await;
    assert!(c["compatibilityLevel"].is_string());
    let (s, e) = call(&reg, Method::GET, &format!("/config/{subject}"), None).await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40408));
    let (_, c) = call(
        &reg,
        Method::GET,
        &format!("/config/{subject}?defaultToGlobal=true"),
        None,
    )
    .await;
    assert!(c["compatibilityLevel"].is_string());
    let (_, t) = call(
        &reg,
        Method::POST,
        &format!("/compatibility/subjects/{subject}/versions/latest?verbose=true"),
        Some(json!({"schema": breaking()})),
    )
    .await;
    assert_eq!(t["is_compatible"], false);
    assert!(!t["messages"].as_array().unwrap().is_empty());
    let (_, t) = call(
        &reg,
        Method::POST,
        &format!("/compatibility/subjects/{subject}/versions"),
        Some(json!({"schema": v2()})),
    )
    .await;
    assert_eq!(t, json!({"is_compatible": true}));
    // The subject's own level wins over the global one.
    let (_, set) = call(
        &reg,
        Method::PUT,
        &format!("/config/{subject}"),
        Some(json!({"compatibility": "BACKWARD"})),
    )
    .await;
    assert_eq!(set, json!({"compatibility": "BACKWARD"}));
    let (s, e) = call(
        &reg,
        Method::POST,
        &versions,
        Some(json!({"schema": breaking()})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::CONFLICT, 409), "{e}");
    assert!(e["message"].as_str().unwrap().contains("incompatible"));
    let (s, e) = call(
        &reg,
        Method::PUT,
        &format!("/config/{subject}"),
        Some(json!({"compatibility": "SIDEWAYS"})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::UNPROCESSABLE_ENTITY, 42203));
    call(
        &reg,
        Method::PUT,
        &format!("/config/{subject}"),
        Some(json!({"compatibility": "NONE"})),
    )
    .await;
    let (s, r) = call(
        &reg,
        Method::POST,
        &versions,
        Some(json!({"schema": breaking()})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (_, removed) = call(&reg, Method::DELETE, &format!("/config/{subject}"), None).await;
    assert_eq!(removed, json!({"compatibilityLevel": "NONE"}));
}

/// `{"type": "record", "name": "R", "fields": [{"name": <name>, "type": <kind>}]}`
fn one_field(name: &str, kind: &str) -> String {
    json!({"type": "record", "name": "R", "fields": [{"name": name, "type": kind}]}).to_string()
}

#[tokio::test]
async fn compatibility_tests_name_their_version_and_an_empty_subject_takes_anything() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    let subject = format!("hono.telemetry.{tenant}-value");
    let versions = format!("/subjects/{subject}/versions");
    // Before the first registration a schema can be tested against `latest`.
    let (s, t) = call(&reg, Method::GET, &format!("{versions}/latest"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "reading it is still 40401: {t}");
    let (s, t) = call(
        &reg,
        Method::POST,
        &format!("/compatibility/subjects/{subject}/versions/latest"),
        Some(json!({"schema": one_field("a", "int")})),
    )
    .await;
    assert_eq!((s, t), (StatusCode::OK, json!({"is_compatible": true})));
    let (s, e) = call(
        &reg,
        Method::POST,
        &format!("/compatibility/subjects/{subject}/versions/3"),
        Some(json!({"schema": one_field("a", "int")})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40401));

    call(
        &reg,
        Method::PUT,
        &format!("/config/{subject}"),
        Some(json!({"compatibility": "NONE"})),
    )
    .await;
    for (name, kind) in [("a", "int"), ("b", "string"), ("c", "long")] {
        let (s, r) = call(
            &reg,
            Method::POST,
            &versions,
            Some(json!({"schema": one_field(name, kind)})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{r}");
    }
    call(
        &reg,
        Method::PUT,
        &format!("/config/{subject}"),
        Some(json!({"compatibility": "BACKWARD"})),
    )
    .await;
    let test_v2 = || async {
        let (_, t) = call(
            &reg,
            Method::POST,
            &format!("/compatibility/subjects/{subject}/versions/2"),
            Some(json!({"schema": one_field("b", "string")})),
        )
        .await;
        t["is_compatible"].clone()
    };
    assert_eq!(
        test_v2().await,
        true,
        "version 2's own schema reads version 2"
    );
    // With version 1 gone, version 2 is still version 2 (not the second live one).
    call(&reg, Method::DELETE, &format!("{versions}/1"), None).await;
    assert_eq!(test_v2().await, true);

    // Deleting a level the subject never had leaves the one that applies.
    let (s, c) = call(&reg, Method::DELETE, &format!("/config/{subject}"), None).await;
    assert_eq!(
        (s, c),
        (StatusCode::OK, json!({"compatibilityLevel": "BACKWARD"}))
    );
    let (s, c) = call(&reg, Method::DELETE, &format!("/config/{subject}"), None).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    // A subject that cannot exist here is not found on reads (42208 only on writes).
    for path in ["/subjects/orders-value/versions", "/config/orders-value"] {
        let (s, e) = call(&reg, Method::GET, path, None).await;
        assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, 40401), "{path}");
    }
}

#[tokio::test]
async fn applications_read_their_tenants_subjects_only_and_never_write() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    let other = reg.tenant(json!({})).await;
    let r = reg
        .put_json(
            &format!("/v1/applications/{tenant}/analytics"),
            json!({"secrets": [{"pwd-plain": "app-pw"}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let own = format!("hono.telemetry.{tenant}-value");
    let foreign = format!("hono.telemetry.{other}-value");
    call(
        &reg,
        Method::POST,
        &format!("/subjects/{own}/versions"),
        Some(json!({"schema": v1()})),
    )
    .await;
    let (_, r) = call(
        &reg,
        Method::POST,
        &format!("/subjects/{foreign}/versions"),
        Some(json!({"schema": breaking()})),
    )
    .await;
    let foreign_id = r["id"].as_i64().unwrap();

    let app = |method: Method, path: &str| {
        reg.anonymous(method, path)
            .basic_auth(format!("analytics@{tenant}"), Some("app-pw"))
    };
    let r = app(Method::GET, "/subjects").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!([own]),
        "only its own tenant's subjects"
    );
    let r = app(Method::GET, &format!("/subjects/{own}/versions/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app(Method::GET, &format!("/subjects/{foreign}/versions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app(Method::GET, &format!("/schemas/ids/{foreign_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "another tenant's schema id is not served"
    );
    let r = app(Method::POST, &format!("/subjects/{own}/versions"))
        .header("content-type", CT)
        .body(json!({"schema": v2()}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(code(&r.json().await.unwrap()), 40301);

    let r = reg
        .anonymous(Method::GET, "/subjects")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(code(&r.json().await.unwrap()), 40101);
    let r = reg
        .anonymous(Method::GET, "/subjects")
        .basic_auth(format!("analytics@{tenant}"), Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A tenant's deletion takes its subjects along.
    assert_eq!(
        reg.delete(&format!("/v1/tenants/{other}")).await.status(),
        StatusCode::NO_CONTENT
    );
    let (s, _) = call(
        &reg,
        Method::GET,
        &format!("/subjects/{foreign}/versions?deleted=true"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn gateways_see_a_topics_schemas_through_the_cache_and_its_invalidation() {
    let reg = TestRegistry::start().await;
    let tenant = reg.tenant(json!({})).await;
    let topic = format!("hono.telemetry.{tenant}");
    let auth = DeviceAuthenticator::new(reg.store.pool().clone(), &Default::default());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    auth.spawn_listener(
        ferrule_registry::db::Connector::new(&database()).unwrap(),
        shutdown,
    );
    wait_until(|| auth.cache_active()).await;

    // The absence is cached too (a lookup racing with any registry change is not cached,
    // and parallel tests change the registry: ask until one sticks).
    for _ in 0..50 {
        assert!(auth.topic_schemas(&tenant, &topic).await.unwrap().is_none());
        if auth.cached_topic_schemas(&tenant, &topic).is_some() {
            break;
        }
    }
    assert!(auth.cached_topic_schemas(&tenant, &topic).is_some());
    let (_, r) = call(
        &reg,
        Method::POST,
        &format!("/subjects/{topic}-value/versions"),
        Some(json!({"schema": v1()})),
    )
    .await;
    let id1 = r["id"].as_u64().unwrap() as u32;
    // The registry's notification drops the cached absence.
    wait_until(|| auth.cached_topic_schemas(&tenant, &topic).is_none()).await;
    let got = auth.topic_schemas(&tenant, &topic).await.unwrap();
    assert_eq!(got.as_ref().as_ref().unwrap().latest().id(), id1);
    let (_, r) = call(
        &reg,
        Method::POST,
        &format!("/subjects/{topic}-value/versions"),
        Some(json!({"schema": v2()})),
    )
    .await;
    let id2 = r["id"].as_u64().unwrap() as u32;
    wait_until(|| auth.cached_topic_schemas(&tenant, &topic).is_none()).await;
    let got = auth.topic_schemas(&tenant, &topic).await.unwrap();
    let schemas = got.as_ref().as_ref().unwrap();
    assert_eq!(schemas.latest().id(), id2);
    assert!(
        schemas.by_id(id1).is_some(),
        "earlier live versions stay usable"
    );
    let by_id = auth.schema_by_id(&tenant, id1).await.unwrap();
    assert_eq!(by_id.as_ref().as_ref().map(|s| s.id()), Some(id1));
    assert!(
        auth.schema_by_id("another-tenant", id1)
            .await
            .unwrap()
            .is_none()
    );
}

async fn wait_until(mut ok: impl FnMut() -> bool) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("condition not met within 5 s");
}
