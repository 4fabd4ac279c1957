//! The router's producer against the real broker: after librdkafka declared it fatally failed
//! (injected with librdkafka's own test hook), commands are still forwarded, in order. The
//! router's producer is not idempotent (`forward.rs` says why), and librdkafka raises fatal
//! errors only for idempotent producers, so the hook is the one way to set the flag; the
//! replacement of a producer that did fail is tested for the gateways and the bridge, whose
//! producers are idempotent. A test binary of its own: the hook reaches every router producer
//! of the process.

mod common;

use common::*;
use rdkafka::bindings::{
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER, rd_kafka_test_fatal_error,
};

#[tokio::test]
async fn the_routers_forwarding_survives_a_fatal_error_of_its_producer() {
    let s = setup().await;
    let instance = id("inst");
    s.routing.heartbeat(&instance).await.unwrap();
    s.routing
        .register(&s.tenant, "dev", &instance, None)
        .await
        .unwrap();
    let _router = start_router(&s, &id("group"));
    let internal = format!("hono.command_internal.{instance}");
    send_command(
        &s.tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "before")],
        "1",
    )
    .await;
    assert_eq!(records(&internal, 1).await[0].1["subject"], "before");

    let producers = ferrule_kafka::producers();
    let (_, producer) = producers
        .iter()
        .find(|(name, _)| *name == "command-router")
        .expect("the router's producer is registered");
    let reason = std::ffi::CString::new("injected by the test").unwrap();
    // SAFETY: the handle belongs to the router's producer, which the list above keeps alive
    // during the call; the reason is a valid C string.
    let injected = unsafe {
        rd_kafka_test_fatal_error(
            producer.native_ptr(),
            RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(injected, RD_KAFKA_RESP_ERR_NO_ERROR);

    // Forwarding goes on: by the flagged producer or, should it refuse, by its replacement.
    send_command(
        &s.tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "after")],
        "2",
    )
    .await;
    send_command(
        &s.tenant,
        "dev",
        &[("device_id", "dev"), ("subject", "and-on")],
        "3",
    )
    .await;
    let subjects: Vec<String> = records(&internal, 3)
        .await
        .into_iter()
        .map(|(_, h, _)| h["subject"].clone())
        .collect();
    assert_eq!(subjects, ["before", "after", "and-on"]);
}
