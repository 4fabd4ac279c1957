//! The routing state against the real PostgreSQL and the real broker: Hono's target-selection
//! rule, lifespans, dead instances, unregistering, and a restarted reader of the route topic.

mod common;

use ferrule_command_router::{CommandTarget, RoutingState};
use ferrule_registry::{DatabaseConfig, RegistryConfig};
use std::time::Duration;

async fn setup() -> (RoutingState, ferrule_registry::Store, String) {
    let db = DatabaseConfig {
        url: std::env::var("FERRULE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ferrule_test".into()),
        pool_size: 2,
        ..Default::default()
    };
    let store = ferrule_registry::open_store(&db, &RegistryConfig::default())
        .await
        .unwrap();
    let tenant = format!("t-{}", uuid::Uuid::new_v4().simple());
    let t = ferrule_registry::model::tenant::Tenant::parse(b"{}").unwrap();
    store.create_tenant(Some(tenant.clone()), t).await.unwrap();
    for d in ["dev", "gw1", "gw2", "other"] {
        let doc = ferrule_registry::model::device::Device::parse(b"{}").unwrap();
        store
            .create_device(&tenant, Some(d.into()), doc)
            .await
            .unwrap();
    }
    let routing = RoutingState::new(
        store.pool().clone(),
        Duration::from_secs(30),
        &common::kafka_config(),
    );
    (routing, store, tenant)
}

fn target(instance: &str, gateway: Option<&str>) -> Option<CommandTarget> {
    Some(CommandTarget {
        instance_id: instance.into(),
        gateway_id: gateway.map(str::to_owned),
    })
}

fn id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn target_selection_follows_hono_rule() {
    let (r, _store, t) = setup().await;
    let (a, b, c) = (id("inst-a"), id("inst-b"), id("inst-c"));
    for i in [&a, &b, &c] {
        r.heartbeat(i).await.unwrap();
    }
    let via = vec!["gw1".to_owned(), "gw2".to_owned()];
    assert_eq!(
        r.resolve(&t, "dev", &via, &[]).await.unwrap(),
        None,
        "nobody subscribed"
    );

    // 3. Any subscribed gateway in via.
    r.register(&t, "gw1", &a, None).await.unwrap();
    assert_eq!(
        r.resolve(&t, "dev", &via, &[]).await.unwrap(),
        target(&a, Some("gw1"))
    );
    // A gateway outside via never counts.
    r.register(&t, "other", &c, None).await.unwrap();
    assert_eq!(
        r.resolve(&t, "dev", &via, &[]).await.unwrap(),
        target(&a, Some("gw1"))
    );

    // 2. The last known gateway wins over other gateways in via.
    r.register(&t, "gw2", &b, None).await.unwrap();
    r.set_last_gateway(&t, "dev", "gw1").await.unwrap();
    assert_eq!(
        r.resolve(&t, "dev", &via, &[]).await.unwrap(),
        target(&a, Some("gw1"))
    );
    r.set_last_gateway(&t, "dev", "gw2").await.unwrap();
    assert_eq!(
        r.resolve(&t, "dev", &via, &[]).await.unwrap(),
        target(&b, Some("gw2"))
    );

    // 1. The device's own subscription wins over everything.
    r.register(&t, "dev", &c, None).await.unwrap();
    assert_eq!(
        r.resolve(&t, "dev", &via, &[]).await.unwrap(),
        target(&c, None)
    );
}

#[tokio::test]
async fn lifespans_dead_instances_and_unregistering() {
    let (r, _store, t) = setup().await;
    let (a, b) = (id("inst-a"), id("inst-b"));
    r.heartbeat(&a).await.unwrap();
    // An expired subscription does not count.
    r.register(&t, "dev", &a, Some(Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(r.resolve(&t, "dev", &[], &[]).await.unwrap(), None);
    // An instance that never sent a heartbeat (or stopped) does not count.
    r.register(&t, "dev", &b, None).await.unwrap();
    assert_eq!(r.resolve(&t, "dev", &[], &[]).await.unwrap(), None);
    r.heartbeat(&b).await.unwrap();
    assert_eq!(
        r.resolve(&t, "dev", &[], &[]).await.unwrap(),
        target(&b, None)
    );
    let short = RoutingState::new(
        _store.pool().clone(),
        Duration::from_millis(1),
        &common::kafka_config(),
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        short.resolve(&t, "dev", &[], &[]).await.unwrap(),
        None,
        "b missed its heartbeat"
    );

    // Unregistering by another instance fails; the holder succeeds.
    assert!(!r.unregister(&t, "dev", &a).await.unwrap());
    assert!(r.unregister(&t, "dev", &b).await.unwrap());
    assert!(!r.unregister(&t, "dev", &b).await.unwrap());
    assert_eq!(r.resolve(&t, "dev", &[], &[]).await.unwrap(), None);
}

#[tokio::test]
async fn routing_rows_go_with_the_device_and_purge_drops_stale_ones() {
    let (r, store, t) = setup().await;
    let a = id("inst-a");
    r.heartbeat(&a).await.unwrap();
    r.register(&t, "dev", &a, None).await.unwrap();
    r.set_last_gateway(&t, "dev", "gw1").await.unwrap();
    r.register(&t, "gw1", &a, Some(Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        r.purge().await.unwrap() >= 1,
        "the expired gateway subscription is purged"
    );
    store.delete_device(&t, "dev", None).await.unwrap();
    let db = store.pool().get().await.unwrap();
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM last_known_gateways WHERE tenant_id = $1",
            &[&t],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the last known gateway goes with the device");
    // (A deleted device's subscription lives on until its connection ends; the router
    // refuses commands to unknown devices before it looks for a route.)
}

#[tokio::test]
async fn via_groups_make_group_members_gateways_of_the_device() {
    let (r, store, t) = setup().await;
    for (d, doc) in [
        ("gw-in", r#"{"memberOf": ["north", "east"]}"#),
        ("gw-out", r#"{"memberOf": ["south"]}"#),
        ("grouped", r#"{"viaGroups": ["north"]}"#),
    ] {
        let doc = ferrule_registry::model::device::Device::parse(doc.as_bytes()).unwrap();
        store.create_device(&t, Some(d.into()), doc).await.unwrap();
    }
    let (a, b) = (id("inst-a"), id("inst-b"));
    r.heartbeat(&a).await.unwrap();
    r.heartbeat(&b).await.unwrap();
    let groups = vec!["north".to_owned()];
    r.register(&t, "gw-out", &b, None).await.unwrap();
    assert_eq!(
        r.resolve(&t, "grouped", &[], &groups).await.unwrap(),
        None,
        "a gateway outside the device's groups never counts"
    );
    r.register(&t, "gw-in", &a, None).await.unwrap();
    assert_eq!(
        r.resolve(&t, "grouped", &[], &groups).await.unwrap(),
        target(&a, Some("gw-in"))
    );
}

#[tokio::test]
async fn an_instance_restarted_under_its_id_forgets_its_earlier_subscriptions() {
    let (r, _store, t) = setup().await;
    let (a, b) = (id("inst-a"), id("inst-b"));
    for i in [&a, &b] {
        r.heartbeat(i).await.unwrap();
    }
    r.register(&t, "dev", &a, None).await.unwrap();
    r.register(&t, "gw1", &a, None).await.unwrap();
    r.register(&t, "other", &b, None).await.unwrap();
    assert_eq!(r.forget_instance(&a).await.unwrap(), 2);
    // Instance a still sends heartbeats, but holds no device any more; b is untouched.
    r.heartbeat(&a).await.unwrap();
    assert_eq!(r.resolve(&t, "dev", &[], &[]).await.unwrap(), None);
    assert_eq!(
        r.resolve(&t, "other", &[], &[]).await.unwrap(),
        target(&b, None)
    );
}

#[tokio::test]
async fn concurrent_changes_are_answered_one_by_one() {
    // Many polls starting and ending at once: each caller gets its own answer, and the state
    // is what applying them in turn leaves.
    let (r, store, t) = setup().await;
    let (a, b) = (id("inst-a"), id("inst-b"));
    r.heartbeat(&a).await.unwrap();
    r.heartbeat(&b).await.unwrap();
    let devices: Vec<String> = (0..300).map(|n| format!("poller-{n}")).collect();
    for d in &devices {
        let doc = ferrule_registry::model::device::Device::parse(b"{}").unwrap();
        store.create_device(&t, Some(d.clone()), doc).await.unwrap();
    }
    let lifespan = Some(Duration::from_secs(60));
    let registers = devices.iter().map(|d| r.register(&t, d, &a, lifespan));
    for done in futures_util::future::join_all(registers).await {
        done.unwrap();
    }
    for d in &devices {
        assert_eq!(r.resolve(&t, d, &[], &[]).await.unwrap(), target(&a, None));
    }
    // The odd devices move to b; then a ends every poll it had: only the even ones were still
    // a's, so only their ends report that a held them.
    let moves = devices.iter().skip(1).step_by(2);
    for done in futures_util::future::join_all(moves.map(|d| r.register(&t, d, &b, lifespan))).await
    {
        done.unwrap();
    }
    let ends = devices.iter().map(|d| r.unregister(&t, d, &a));
    let held: Vec<bool> = futures_util::future::join_all(ends)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (n, (d, held)) in devices.iter().zip(held).enumerate() {
        let even = n % 2 == 0;
        assert_eq!(held, even, "{d}");
        let expected = if even { None } else { target(&b, None) };
        assert_eq!(r.resolve(&t, d, &[], &[]).await.unwrap(), expected, "{d}");
    }
}

#[tokio::test]
async fn a_reader_started_later_finds_the_same_routes() {
    // A router that starts (or restarts) after devices subscribed reads the route topic from
    // the start and routes as one that watched every change.
    let (r, _store, t) = setup().await;
    let (a, b) = (id("inst-a"), id("inst-b"));
    r.heartbeat(&a).await.unwrap();
    r.heartbeat(&b).await.unwrap();
    // A long-polling device: register and release, poll after poll.
    for _ in 0..3 {
        r.register(&t, "dev", &a, Some(Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(
            r.resolve(&t, "dev", &[], &[]).await.unwrap(),
            target(&a, None)
        );
        assert!(
            r.unregister(&t, "dev", &a).await.unwrap(),
            "the poll's own entry"
        );
        assert_eq!(r.resolve(&t, "dev", &[], &[]).await.unwrap(), None);
        assert!(
            !r.unregister(&t, "dev", &a).await.unwrap(),
            "a released entry is not released twice"
        );
    }
    r.register(&t, "gw1", &a, None).await.unwrap();
    r.register(&t, "gw1", &b, None).await.unwrap();
    r.register(&t, "other", &b, None).await.unwrap();
    r.unregister(&t, "other", &b).await.unwrap();
    let later = RoutingState::with_routes(
        _store.pool().clone(),
        Duration::from_secs(30),
        Some(
            ferrule_registry::device_connection::RouteLog::open(&common::kafka_config())
                .await
                .unwrap(),
        ),
    );
    for d in ["dev", "gw1", "other"] {
        assert_eq!(
            later.resolve(&t, d, &[], &[]).await.unwrap(),
            r.resolve(&t, d, &[], &[]).await.unwrap(),
            "{d}"
        );
    }
    assert_eq!(
        later.resolve(&t, "gw1", &[], &[]).await.unwrap(),
        target(&b, None),
        "the newest subscription wins after a replay too"
    );
    assert_eq!(later.routes().await.unwrap().unreadable(), 0);
}

#[tokio::test]
async fn a_silent_instance_is_forgotten_unless_it_came_back() {
    let (r, store, _t) = setup().await;
    let (a, b) = (id("inst-a"), id("inst-b"));
    r.heartbeat(&a).await.unwrap();
    r.heartbeat(&b).await.unwrap();
    let db = store.pool().get().await.unwrap();
    db.execute(
        "UPDATE adapter_instances SET last_seen = now() - interval '2 hours'
          WHERE instance_id = ANY($1)",
        &[&vec![a.clone(), b.clone()]],
    )
    .await
    .unwrap();
    let hour = Duration::from_secs(3600);
    let silent = r.silent_instances(hour).await.unwrap();
    assert!(silent.contains(&a) && silent.contains(&b), "{silent:?}");
    // `b` comes back between the listing and the forgetting: it stays known.
    assert!(r.heartbeat(&b).await.unwrap(), "b was known");
    assert!(r.forget_silent_instance(&a, hour).await.unwrap());
    assert!(!r.forget_silent_instance(&b, hour).await.unwrap());
    let silent = r.silent_instances(hour).await.unwrap();
    assert!(!silent.contains(&a) && !silent.contains(&b), "{silent:?}");
    // `a`'s next heartbeat tells it that it was forgotten (its gateway registers again).
    assert!(!r.heartbeat(&a).await.unwrap(), "a was forgotten");
    assert!(r.heartbeat(&a).await.unwrap(), "and is known again");
}

#[tokio::test]
async fn a_first_heartbeat_finds_the_instance_unknown() {
    let (r, _store, _t) = setup().await;
    let a = id("inst-a");
    assert!(!r.heartbeat(&a).await.unwrap());
    assert!(r.heartbeat(&a).await.unwrap());
}

#[tokio::test]
async fn a_release_queued_before_a_new_subscription_never_ends_it() {
    // A device reconnects to the same instance at once: the old connection's release and the
    // new subscription share one key, and must reach the topic in the order they happened.
    let (r, _store, t) = setup().await;
    let a = id("inst-a");
    r.heartbeat(&a).await.unwrap();
    r.register(&t, "dev", &a, None).await.unwrap();
    for _ in 0..5 {
        let released = r.unregister_queued(&t, "dev", &a);
        let registered = r.register_queued(&t, "dev", &a, None);
        // The new subscription is acknowledged first; the release still came before it.
        registered.await.unwrap();
        assert!(
            released.await.unwrap(),
            "the release ended a's own subscription"
        );
        assert_eq!(
            r.resolve(&t, "dev", &[], &[]).await.unwrap(),
            target(&a, None),
            "the new subscription lives on"
        );
    }
}
