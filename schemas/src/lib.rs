//! The contract between Ferrule's processes and with Hono clients: every name and encoding that
//! crosses a process boundary is defined here once, so services never spell a topic or header
//! by hand.
#![forbid(unsafe_code)]

pub mod avro;
pub mod command;
pub mod content_type;
pub mod headers;
pub mod outcome;
pub mod topic;
pub mod ttl;

pub use content_type::ContentType;
pub use topic::{HonoTopic, TopicKind, TopicNames};
