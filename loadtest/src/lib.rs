//! The load-testing harness as a library: simulated devices and measurements, used by the
//! `ferrule-loadtest` binary and by the smoke test that keeps the harness from rotting.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod coap;
pub mod coap_dtls;
pub mod commands;
pub mod devices;
pub mod latency;
pub mod measure;
pub mod mix;
pub mod mqtt5;
pub mod otlp_sink;
pub mod plot;
pub mod progress;
pub mod report;
pub mod resilience;
pub mod timeline;
pub mod typed;
