//! The router's producer against the real broker: after librdkafka declared it fatally failed
//! (injected with librdkafka's own test hook), a new producer takes over and commands are
//! forwarded again. A test binary of its own: the hook reaches every router producer of the
//! process.

mod common;

use common::*;
use rdkafka::bindings::{
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER, rd_kafka_test_fatal_error,
};

fn metrics_text() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&prometheus::gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn the_routers_producer_is_replaced_after_a_fatal_error() {
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

    // The failed producer refuses the next command; the new one forwards it and the ones after.
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
    let metrics = metrics_text();
    assert!(
        metrics.contains("ferrule_kafka_producer_replaced_total{client=\"command-router\"} 1"),
        "{metrics}"
    );
}
