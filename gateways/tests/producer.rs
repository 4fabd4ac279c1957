//! The gateways' Kafka producer against the real broker: a producer that librdkafka declared
//! fatally failed is replaced, and the records that follow get through.

mod common;

use common::*;
use ferrule_gateways::DownstreamSender;
use ferrule_gateways::kafka::OutboundRecord;
use rdkafka::bindings::{
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
    rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER, rd_kafka_test_fatal_error,
};
use rdkafka::message::OwnedHeaders;

async fn send(sender: &DownstreamSender, topic: &str, payload: &[u8]) {
    sender
        .enqueue(OutboundRecord {
            topic,
            key: "dev",
            headers: OwnedHeaders::new(),
            payload,
        })
        .expect("the producer takes the record")
        .acked()
        .await
        .expect("the broker acknowledges the record");
}

#[tokio::test]
async fn a_producer_that_failed_fatally_is_replaced() {
    ferrule_gateways::metrics::init();
    let sender = DownstreamSender::new(&kafka()).unwrap();
    let topic = format!("hono.telemetry.{}", random_id("t"));
    sender.ensure_topic(&topic, None).await.unwrap();
    send(&sender, &topic, b"before").await;

    // librdkafka's own test hook puts the producer into the state a broker that lost the
    // idempotent producer's sequence leaves it in: every later record is refused.
    let reason = std::ffi::CString::new("injected by the test").unwrap();
    // SAFETY: the handle belongs to the sender, which outlives the call; the reason is a valid
    // C string.
    let injected = unsafe {
        rd_kafka_test_fatal_error(
            sender.native_producer(),
            RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(injected, RD_KAFKA_RESP_ERR_NO_ERROR);

    send(&sender, &topic, b"after").await;
    send(&sender, &topic, b"and on").await;
    let payloads: Vec<Vec<u8>> = read(&topic, 3)
        .await
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(payloads, [&b"before"[..], b"after", b"and on"]);

    let metrics = prometheus_text();
    assert!(
        metrics.contains("ferrule_kafka_producer_replaced_total{client=\"gateway\"} 1"),
        "{metrics}"
    );
}
