//! The bridge's per-record work that does not touch the network: a record of the gateway's
//! shape (six headers, 64-byte payload) mapped to Hono's AMQP message and encoded as fe2o3-amqp
//! encodes it before a transfer. `cargo bench -p ferrule-stream-bridge --bench downstream`.

use criterion::{Criterion, criterion_group, criterion_main};
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use std::hint::black_box;

fn record() -> Vec<(&'static str, Option<&'static [u8]>)> {
    vec![
        ("content-type", Some(b"application/octet-stream".as_slice())),
        ("creation-time", Some(b"1764633600123".as_slice())),
        ("device_id", Some(b"dev-17".as_slice())),
        ("qos", Some(b"1".as_slice())),
        ("orig_adapter", Some(b"hono-mqtt".as_slice())),
        ("orig_address", Some(b"telemetry".as_slice())),
    ]
}

fn bench(c: &mut Criterion) {
    let headers = record();
    let payload = [b'x'; 64];
    c.bench_function("downstream", |b| {
        b.iter(|| {
            black_box(ferrule_stream_bridge::message::downstream(
                "telemetry",
                "a-tenant-id-of-usual-length",
                headers.iter().copied(),
                &payload,
            ))
        })
    });
    c.bench_function("downstream+encode", |b| {
        b.iter(|| {
            let m = ferrule_stream_bridge::message::downstream(
                "telemetry",
                "a-tenant-id-of-usual-length",
                headers.iter().copied(),
                &payload,
            );
            black_box(serde_amqp::to_vec(&Serializable(m)).expect("encodes"))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
