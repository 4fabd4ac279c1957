//! The router against the real broker and PostgreSQL: commands reach the internal topic of the
//! instance that holds the device (directly or through a gateway), malformed and undeliverable
//! request/response commands get Hono's delivery-failure responses, and a router that starts
//! after the command was sent still delivers it.

mod common;

use common::*;

#[tokio::test]
async fn commands_reach_the_instance_that_holds_the_device() {
    let s = setup().await;
    let (direct, via_gw) = (id("inst"), id("inst"));
    for i in [&direct, &via_gw] {
        s.routing.heartbeat(i).await.unwrap();
    }
    s.routing
        .register(&s.tenant, "dev", &direct, None)
        .await
        .unwrap();
    s.routing
        .register(&s.tenant, "gw", &via_gw, None)
        .await
        .unwrap();
    let _router = start_router(&s, &id("group"));
    send_command(
        &s.tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "setVolume")],
        "{\"v\":5}",
    )
    .await;
    send_command(
        &s.tenant,
        "edge",
        &[
            ("device_id", "edge"),
            ("subject", "getState"),
            ("response-required", "true"),
            ("correlation-id", "c-7"),
        ],
        "",
    )
    .await;

    let (key, h, payload) = first_record(&format!("hono.command_internal.{direct}")).await;
    assert_eq!(key, "dev");
    assert_eq!(payload, "{\"v\":5}");
    assert_eq!(h["subject"], "setVolume");
    assert_eq!(h["tenant_id"], s.tenant);
    assert!(
        h["orig-partition"].parse::<i32>().is_ok() && h["orig-offset"].parse::<i64>().is_ok(),
        "{h:?}"
    );
    assert!(!h.contains_key("via"));

    let (key, h, _) = first_record(&format!("hono.command_internal.{via_gw}")).await;
    assert_eq!(key, "edge");
    assert_eq!(h["via"], "gw", "mapped to the gateway");
    assert_eq!(h["correlation-id"], "c-7");
}

#[tokio::test]
async fn malformed_and_undeliverable_commands_get_responses() {
    let s = setup().await;
    let _router = start_router(&s, &id("group"));
    // No subject, response wanted: 400 with the correlation id and the metadata header.
    send_command(
        &s.tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("response-required", "true"),
            ("correlation-id", "bad-1"),
            ("delivery-failure-notification-metadata[app]", "x"),
        ],
        "",
    )
    .await;
    let (key, h, payload) = first_record(&format!("hono.command_response.{}", s.tenant)).await;
    assert_eq!(key, "dev");
    assert_eq!(h["status"], "400");
    assert_eq!(h["correlation-id"], "bad-1");
    assert_eq!(
        h["content-type"],
        "application/vnd.eclipse-hono-delivery-failure-notification+json"
    );
    assert_eq!(h["delivery-failure-notification-metadata[app]"], "x");
    assert!(payload.contains("\"error\""), "{payload}");

    // Well-formed, but nobody holds the device: 503.
    let s2 = setup().await;
    let _router2 = start_router(&s2, &id("group"));
    send_command(
        &s2.tenant,
        "dev",
        &[
            ("device_id", "dev"),
            ("subject", "x"),
            ("response-required", "true"),
            ("correlation-id", "c-9"),
        ],
        "",
    )
    .await;
    let (_, h, _) = first_record(&format!("hono.command_response.{}", s2.tenant)).await;
    assert_eq!(h["status"], "503");
    assert_eq!(h["correlation-id"], "c-9");
}

#[tokio::test]
async fn a_router_started_after_the_command_still_delivers_it() {
    let s = setup().await;
    let inst = id("inst");
    s.routing.heartbeat(&inst).await.unwrap();
    s.routing
        .register(&s.tenant, "dev", &inst, None)
        .await
        .unwrap();
    send_command(
        &s.tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "late")],
        "p",
    )
    .await;
    let _router = start_router(&s, &id("group"));
    let (_, h, _) = first_record(&format!("hono.command_internal.{inst}")).await;
    assert_eq!(h["subject"], "late");
}
