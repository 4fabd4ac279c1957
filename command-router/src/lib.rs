//! Ferrule's command router (in progress): the routing state that says which gateway instance
//! can deliver a command to a device. The Kafka consumer and forwarding come with the rest of
//! the command & control issue.
#![forbid(unsafe_code)]

pub mod routing;

pub use routing::{CommandTarget, RoutingError, RoutingState};
