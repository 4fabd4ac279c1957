//! Port of Hono's `TenantManagementIT` checklist against real PostgreSQL over real HTTP.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn create_with_and_without_id_and_with_empty_body() {
    let reg = TestRegistry::start().await;
    // Without id, no body at all and no content type: the registry picks the id.
    let r = reg.req(Method::POST, "/v1/tenants").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(!etag(&r).is_empty());
    let id = body(r).await["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/tenants/{id}"));
    let got = reg.get(&location).await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(body(got).await["enabled"], true);

    // With id and a document.
    let id = random_id("t");
    let r = reg
        .post_json(
            &format!("/v1/tenants/{id}"),
            json!({"enabled": false, "ext": {"messaging-type": "kafka"},
                   "adapters": [{"type": "hono-http", "enabled": true}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(body(r).await["id"], id.as_str());
    let t = body(reg.get(&format!("/v1/tenants/{id}")).await).await;
    assert_eq!(t["enabled"], false);
    assert_eq!(t["ext"]["messaging-type"], "kafka");
    assert_eq!(t["adapters"][0]["device-authentication-required"], true);
}

#[tokio::test]
async fn duplicate_id_or_alias_is_a_conflict() {
    let reg = TestRegistry::start().await;
    let id = reg.tenant(json!({})).await;
    let r = reg.post_json(&format!("/v1/tenants/{id}"), json!({})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(body(r).await["error"].is_string());

    let alias = random_id("alias").to_lowercase();
    reg.tenant(json!({"alias": alias})).await;
    let r = reg
        .post_json(
            &format!("/v1/tenants/{}", random_id("t")),
            json!({"alias": alias}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn trust_anchor_subject_dn_is_unique_outside_a_group() {
    let reg = TestRegistry::start().await;
    let dn = format!("CN={},O=Ferrule", random_id("ca"));
    let ca = json!([{"subject-dn": dn, "public-key": "MFkwEwYHKoZIzj0CAQ=="}]);
    let first = reg.tenant(json!({"trusted-ca": ca})).await;
    let t = body(reg.get(&format!("/v1/tenants/{first}")).await).await;
    assert!(
        t["trusted-ca"][0]["id"].is_string(),
        "a missing trust anchor id is generated"
    );

    let r = reg
        .post_json(
            &format!("/v1/tenants/{}", random_id("t")),
            json!({"trusted-ca": ca}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    // Tenants of one trust-anchor group may share a CA.
    let group = random_id("g");
    let dn2 = format!("CN={},O=Ferrule", random_id("ca"));
    let ca2 = json!([{"subject-dn": dn2, "public-key": "MFkwEwYHKoZIzj0CAQ=="}]);
    reg.tenant(json!({"trusted-ca": ca2, "trust-anchor-group": group}))
        .await;
    reg.tenant(json!({"trusted-ca": ca2, "trust-anchor-group": group}))
        .await;
}

#[tokio::test]
async fn malformed_documents_are_bad_requests() {
    let reg = TestRegistry::start().await;
    let cases = [
        json!({"unknown-property": 1}),
        json!({"enabled": "yes"}),
        json!({"adapters": [{"type": "hono-mqtt"}, {"type": "hono-mqtt"}]}),
        json!({"adapters": []}),
        json!({"trusted-ca": [{"id": "a", "subject-dn": "CN=a", "public-key": "AAEC"},
                              {"id": "a", "subject-dn": "CN=b", "public-key": "AAEC"}]}),
        json!({"trusted-ca": [{"subject-dn": "CN=a", "public-key": "not base64!"}]}),
        json!({"trusted-ca": [{"subject-dn": "CN=a", "public-key": "AAEC",
                               "not-before": "2030-01-01T00:00:00Z",
                               "not-after": "2020-01-01T00:00:00Z"}]}),
        json!({"resource-limits": {"data-volume": {"effective-since": "yesterday"}}}),
        json!({"alias": "Not An LDH Label"}),
    ];
    for case in cases {
        let r = reg
            .post_json(&format!("/v1/tenants/{}", random_id("t")), case.clone())
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{case}");
    }
    // Illegal tenant id.
    let r = reg.post_json("/v1/tenants/bad%20id", json!({})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Not JSON at all, and a non-JSON content type.
    let r = reg
        .req(Method::POST, &format!("/v1/tenants/{}", random_id("t")))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = reg
        .req(Method::POST, &format!("/v1/tenants/{}", random_id("t")))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let reg = TestRegistry::start().await;
    let big = json!({"ext": {"blob": "x".repeat(20_000)}});
    let r = reg
        .post_json(&format!("/v1/tenants/{}", random_id("t")), big)
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn update_get_delete_with_etags() {
    let reg = TestRegistry::start().await;
    let id = reg.tenant(json!({"ext": {"v": 1}})).await;
    let path = format!("/v1/tenants/{id}");
    let r = reg.get(&path).await;
    let v1 = etag(&r);

    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", "stale-version")
        .json(&json!({"ext": {"v": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);

    let r = reg
        .req(Method::PUT, &path)
        .header("if-match", &v1)
        .json(&json!({"ext": {"v": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let v2 = etag(&r);
    assert_ne!(v1, v2, "every update issues a new ETag");
    let r = reg.get(&path).await;
    assert_eq!(etag(&r), v2);
    assert_eq!(body(r).await["ext"]["v"], 2);

    // Update without If-Match is allowed.
    let r = reg.put_json(&path, json!({"enabled": false})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    let r = reg
        .req(Method::DELETE, &path)
        .header("if-match", &v1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(reg.delete(&path).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(reg.get(&path).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(reg.delete(&path).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        reg.put_json(&path, json!({})).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn search_pages_filters_and_sorts() {
    let reg = TestRegistry::start().await;
    let run = random_id("run");
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = reg
            .tenant(json!({"enabled": i % 2 == 0, "ext": {"run": run, "rank": i, "name": format!("tenant-{i}x")}}))
            .await;
        ids.push(id);
    }
    let by_run = enc(&json!({"field": "/ext/run", "value": run}).to_string());
    let sort_desc = enc(&json!({"field": "/ext/rank", "direction": "desc"}).to_string());

    let r = reg
        .get(&format!(
            "/v1/tenants?filterJson={by_run}&sortJson={sort_desc}&pageSize=2&pageOffset=1"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let page = body(r).await;
    assert_eq!(page["total"], 5);
    let result = page["result"].as_array().unwrap();
    assert_eq!(result.len(), 2);
    assert_eq!(result[0]["ext"]["rank"], 3);
    assert_eq!(result[1]["ext"]["rank"], 2);
    assert_eq!(result[0]["id"], ids[3].as_str());

    // Two filters are ANDed; a boolean filter.
    let enabled = enc(&json!({"field": "/enabled", "value": false}).to_string());
    let page = body(
        reg.get(&format!(
            "/v1/tenants?filterJson={by_run}&filterJson={enabled}"
        ))
        .await,
    )
    .await;
    assert_eq!(page["total"], 2);

    // Wildcards: `*` any run of characters, `?` exactly one.
    let star = enc(&json!({"field": "/ext/name", "value": "tenant-*x"}).to_string());
    let page = body(
        reg.get(&format!(
            "/v1/tenants?filterJson={by_run}&filterJson={star}"
        ))
        .await,
    )
    .await;
    assert_eq!(page["total"], 5);
    let one = enc(&json!({"field": "/ext/name", "value": "tenant-?x"}).to_string());
    let page = body(
        reg.get(&format!("/v1/tenants?filterJson={by_run}&filterJson={one}"))
            .await,
    )
    .await;
    assert_eq!(page["total"], 5);
    let none = enc(&json!({"field": "/ext/name", "value": "tenant-??x"}).to_string());
    let r = reg
        .get(&format!(
            "/v1/tenants?filterJson={by_run}&filterJson={none}"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "an empty result is 404");

    // Invalid paging and filters.
    for q in [
        "pageSize=201".to_owned(),
        "pageSize=-1".to_owned(),
        "pageOffset=-3".to_owned(),
        format!("filterJson={}", enc("{\"field\": \"ext\"}")),
        format!(
            "sortJson={}",
            enc("{\"field\": \"/ext\", \"direction\": \"sideways\"}")
        ),
    ] {
        let r = reg.get(&format!("/v1/tenants?{q}")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
    }
}

#[tokio::test]
async fn management_api_refuses_anonymous_and_wrong_callers() {
    let reg = TestRegistry::start().await;
    let path = format!("/v1/tenants/{}", random_id("t"));
    let r = reg.anonymous(Method::POST, &path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let r = reg
        .anonymous(Method::POST, &path)
        .basic_auth(USER, Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = reg
        .anonymous(Method::GET, "/v1/tenants")
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The configured bearer token works.
    let r = reg
        .anonymous(Method::POST, &path)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// `random_id("t")` padded with `x` to `len` characters.
fn id_of_len(len: usize) -> String {
    let mut id = random_id("t");
    id.push_str(&"x".repeat(len - id.len()));
    id
}

#[tokio::test]
async fn tenant_ids_must_fit_kafkas_topic_name_limit() {
    let reg = TestRegistry::start().await;
    // `hono.command_response.<id>` is the longest per-tenant topic: 22 + 227 = 249 characters.
    let longest = id_of_len(227);
    let r = reg
        .post_json(&format!("/v1/tenants/{longest}"), json!({}))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(
        reg.get(&format!("/v1/tenants/{longest}")).await.status(),
        StatusCode::OK
    );

    for len in [228, 230, 240, 300] {
        let id = id_of_len(len);
        let r = reg.post_json(&format!("/v1/tenants/{id}"), json!({})).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{len} characters");
        let msg = body(r).await["error"].as_str().unwrap().to_owned();
        assert!(msg.contains("hono.command_response.<tenant>"), "{msg}");
        assert!(msg.contains("249"), "{msg}");
        assert!(msg.contains("at most 227"), "{msg}");
        if len <= 256 {
            // (Longer ones are no tenant id at all, even to read.)
            assert_eq!(
                reg.get(&format!("/v1/tenants/{id}")).await.status(),
                StatusCode::NOT_FOUND
            );
        }
    }
}

#[tokio::test]
async fn tenant_ids_kafka_would_take_for_another_topic_kind_are_refused() {
    let reg = TestRegistry::start().await;
    let base = random_id("t");
    // `hono.command.response.<base>` is `hono.command_response.<base>` for Kafka.
    for (id, clash) in [
        (
            format!("response.{base}"),
            format!("hono.command_response.{base}"),
        ),
        (
            format!("internal_{base}"),
            format!("hono.command_internal.{base}"),
        ),
    ] {
        let r = reg.post_json(&format!("/v1/tenants/{id}"), json!({})).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{id}");
        let msg = body(r).await["error"].as_str().unwrap().to_owned();
        assert!(msg.contains(&clash), "{msg}");
    }
}

#[tokio::test]
async fn ids_equal_but_for_dot_and_underscore_are_a_conflict() {
    let reg = TestRegistry::start().await;
    for (first, second) in [(".", "_"), ("_", ".")] {
        let base = random_id("t");
        let existing = format!("{base}{first}x");
        let clashing = format!("{base}{second}x");
        let r = reg
            .post_json(&format!("/v1/tenants/{existing}"), json!({}))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = reg
            .post_json(&format!("/v1/tenants/{clashing}"), json!({}))
            .await;
        assert_eq!(r.status(), StatusCode::CONFLICT, "{clashing}");
        let msg = body(r).await["error"].as_str().unwrap().to_owned();
        assert!(msg.contains(&format!("`{existing}`")), "{msg}");
        assert_eq!(
            reg.get(&format!("/v1/tenants/{clashing}")).await.status(),
            StatusCode::NOT_FOUND
        );
        // The same id again is still the plain duplicate.
        let r = reg
            .post_json(&format!("/v1/tenants/{existing}"), json!({}))
            .await;
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(body(r).await["error"], "a tenant with this id exists");
        // Once the first is gone, the other spelling may be created.
        assert_eq!(
            reg.delete(&format!("/v1/tenants/{existing}"))
                .await
                .status(),
            StatusCode::NO_CONTENT
        );
        let r = reg
            .post_json(&format!("/v1/tenants/{clashing}"), json!({}))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
}

#[tokio::test]
async fn concurrent_creates_of_clashing_ids_leave_one_tenant() {
    let reg = TestRegistry::start().await;
    let bases: Vec<String> = (0..8).map(|_| random_id("t")).collect();
    let creates = bases.iter().flat_map(|base| {
        [format!("{base}.a.b"), format!("{base}_a_b")].map(|id| {
            let reg = &reg;
            async move {
                let r = reg.post_json(&format!("/v1/tenants/{id}"), json!({})).await;
                let status = r.status();
                (id, status, body(r).await)
            }
        })
    });
    let results = futures_util::future::join_all(creates).await;
    for pair in results.chunks(2) {
        let statuses: Vec<StatusCode> = pair.iter().map(|(_, s, _)| *s).collect();
        assert!(
            statuses.contains(&StatusCode::CREATED) && statuses.contains(&StatusCode::CONFLICT),
            "{pair:?}"
        );
        let (winner, _, _) = pair
            .iter()
            .find(|(_, s, _)| *s == StatusCode::CREATED)
            .unwrap();
        let (_, _, refusal) = pair
            .iter()
            .find(|(_, s, _)| *s == StatusCode::CONFLICT)
            .unwrap();
        let msg = refusal["error"].as_str().unwrap();
        assert!(msg.contains(&format!("`{winner}`")), "{msg}");
    }
}

/// A database of its own (created here, dropped at the end) that holds tenants from before
/// the rule: `<base>.a.b` and `<base>_a_b`.
#[tokio::test]
async fn start_up_survives_tenants_that_clash_from_before_the_rule() {
    let shared = database();
    let (url, query) = match shared.url.split_once('?') {
        Some((u, q)) => (u.to_owned(), format!("?{q}")),
        None => (shared.url.clone(), String::new()),
    };
    let name = format!("ferrule_legacy_{}", uuid::Uuid::new_v4().simple());
    let db = ferrule_registry::DatabaseConfig {
        url: format!("{}/{name}{query}", url.rsplit_once('/').unwrap().0),
        pool_size: 2,
        ..Default::default()
    };
    // All migrations, then back to before migration 4 with two clashing tenants.
    let reg = TestRegistry::start_on(&db, config()).await;
    let sql = reg.store.pool().get().await.unwrap();
    let base = random_id("t");
    let (old_dot, old_underscore) = (format!("{base}.a.b"), format!("{base}_a_b"));
    sql.batch_execute(&format!(
        "DROP INDEX tenants_topic_key_idx;
         DELETE FROM ferrule_migrations WHERE version = 4;
         INSERT INTO tenants (tenant_id, version, data)
              VALUES ('{old_dot}', 'v', '{{}}'), ('{old_underscore}', 'v', '{{}}');"
    ))
    .await
    .unwrap();
    drop(sql);
    drop(reg);

    // Migration 4 runs on them and the start-up succeeds.
    let reg = TestRegistry::start_on(&db, config()).await;
    let sql = reg.store.pool().get().await.unwrap();
    let partial: bool = sql
        .query_one(
            "SELECT indpred IS NOT NULL FROM pg_index
              WHERE indexrelid = 'tenants_topic_key_idx'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(partial, "the clashing rows are left out of the index");
    drop(sql);
    // Both old tenants still work.
    for id in [&old_dot, &old_underscore] {
        assert_eq!(
            reg.get(&format!("/v1/tenants/{id}")).await.status(),
            StatusCode::OK
        );
    }
    // A third spelling of their key is refused, and so is a new clashing pair.
    let r = reg
        .post_json(&format!("/v1/tenants/{base}.a_b"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let new = random_id("t");
    let r = reg
        .post_json(&format!("/v1/tenants/{new}.c"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg
        .post_json(&format!("/v1/tenants/{new}_c"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    drop(reg);

    let admin = ferrule_registry::DatabaseConfig {
        url: format!("{}/postgres{query}", url.rsplit_once('/').unwrap().0),
        ..db
    };
    let admin = ferrule_registry::db::Connector::new(&admin).unwrap();
    let (client, conn) = admin.connect().await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}
