//! Hono's Kafka topic names (`hono.<kind>.<suffix>`), built and parsed in one place so that a
//! later "shared topic for small tenants" mode is a change here and nowhere else.

use std::fmt;

/// The prefix every Hono topic starts with.
pub const PREFIX: &str = "hono.";

/// What a Hono topic carries; the suffix after it is a tenant id or an adapter instance id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    Telemetry,
    Event,
    Command,
    CommandResponse,
    /// Router → one gateway instance; the suffix is the instance id, not a tenant.
    CommandInternal,
    /// Registry change notifications; the suffix is `registry-tenant` or `registry-device`.
    Notification,
}

impl TopicKind {
    /// The middle segment of the topic name.
    pub const fn as_str(self) -> &'static str {
        match self {
            TopicKind::Telemetry => "telemetry",
            TopicKind::Event => "event",
            TopicKind::Command => "command",
            TopicKind::CommandResponse => "command_response",
            TopicKind::CommandInternal => "command_internal",
            TopicKind::Notification => "notification",
        }
    }

    const ALL: [TopicKind; 6] = [
        TopicKind::Telemetry,
        TopicKind::Event,
        TopicKind::Command,
        TopicKind::CommandResponse,
        TopicKind::CommandInternal,
        TopicKind::Notification,
    ];
}

/// A parsed Hono topic: its kind and its non-empty suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HonoTopic {
    pub kind: TopicKind,
    pub suffix: String,
}

/// Why a string is not a Hono topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("`{0}` does not start with `hono.`")]
    NotHono(String),
    #[error("`{0}` names no known Hono topic kind")]
    UnknownKind(String),
    #[error("`{0}` has an empty tenant or instance suffix")]
    EmptySuffix(String),
    #[error("`{0}` is not a legal Kafka topic name")]
    IllegalName(String),
}

impl HonoTopic {
    /// The topic of `kind` for a tenant (or instance) id.
    pub fn new(kind: TopicKind, suffix: impl Into<String>) -> Result<Self, TopicError> {
        let topic = HonoTopic {
            kind,
            suffix: suffix.into(),
        };
        check(kind, &topic.suffix)?;
        Ok(topic)
    }

    /// Just the name of the topic of `kind` for `suffix`, built in one allocation: the
    /// ingest path needs it for every message.
    pub fn name(kind: TopicKind, suffix: &str) -> Result<String, TopicError> {
        check(kind, suffix)?;
        let kind = kind.as_str();
        let mut name = String::with_capacity(PREFIX.len() + kind.len() + 1 + suffix.len());
        name.push_str(PREFIX);
        name.push_str(kind);
        name.push('.');
        name.push_str(suffix);
        Ok(name)
    }

    /// `hono.telemetry.<tenant>`.
    pub fn telemetry(tenant: &str) -> Result<Self, TopicError> {
        Self::new(TopicKind::Telemetry, tenant)
    }

    /// `hono.event.<tenant>`.
    pub fn event(tenant: &str) -> Result<Self, TopicError> {
        Self::new(TopicKind::Event, tenant)
    }

    /// `hono.command.<tenant>`.
    pub fn command(tenant: &str) -> Result<Self, TopicError> {
        Self::new(TopicKind::Command, tenant)
    }

    /// `hono.command_response.<tenant>`.
    pub fn command_response(tenant: &str) -> Result<Self, TopicError> {
        Self::new(TopicKind::CommandResponse, tenant)
    }

    /// `hono.command_internal.<adapter instance id>`.
    pub fn command_internal(instance: &str) -> Result<Self, TopicError> {
        Self::new(TopicKind::CommandInternal, instance)
    }

    /// Parses a topic name; the kind that matches is the longest one, so
    /// `hono.command_response.x` is never read as a command topic.
    pub fn parse(name: &str) -> Result<Self, TopicError> {
        let rest = name
            .strip_prefix(PREFIX)
            .ok_or_else(|| TopicError::NotHono(name.to_owned()))?;
        let (kind_str, suffix) = rest
            .split_once('.')
            .ok_or_else(|| TopicError::UnknownKind(name.to_owned()))?;
        let kind = TopicKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind_str)
            .ok_or_else(|| TopicError::UnknownKind(name.to_owned()))?;
        if suffix.is_empty() {
            return Err(TopicError::EmptySuffix(name.to_owned()));
        }
        Ok(HonoTopic {
            kind,
            suffix: suffix.to_owned(),
        })
    }

    /// The tenant this topic belongs to, for the per-tenant kinds.
    pub fn tenant(&self) -> Option<&str> {
        match self.kind {
            TopicKind::Telemetry
            | TopicKind::Event
            | TopicKind::Command
            | TopicKind::CommandResponse => Some(&self.suffix),
            TopicKind::CommandInternal | TopicKind::Notification => None,
        }
    }
}

impl fmt::Display for HonoTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}.{}", self.kind.as_str(), self.suffix)
    }
}

/// Whether `hono.<kind>.<suffix>` is a legal topic name, checked without building it.
fn check(kind: TopicKind, suffix: &str) -> Result<(), TopicError> {
    let full = || format!("{PREFIX}{}.{suffix}", kind.as_str());
    if suffix.is_empty() {
        return Err(TopicError::EmptySuffix(full()));
    }
    let len = PREFIX.len() + kind.as_str().len() + 1 + suffix.len();
    if len > 249 || !suffix.bytes().all(legal_byte) {
        return Err(TopicError::IllegalName(full()));
    }
    Ok(())
}

/// Kafka accepts topic names of up to 249 characters from `[a-zA-Z0-9._-]`.
pub fn is_legal_kafka_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(legal_byte)
}

fn legal_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The regex the command router subscribes with, matching every tenant's command topic.
pub const COMMAND_TOPIC_PATTERN: &str = r"^hono\.command\..+";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_per_tenant_names() {
        assert_eq!(
            HonoTopic::telemetry("DEFAULT_TENANT").unwrap().to_string(),
            "hono.telemetry.DEFAULT_TENANT"
        );
        assert_eq!(HonoTopic::event("t1").unwrap().to_string(), "hono.event.t1");
        assert_eq!(
            HonoTopic::command_response("t1").unwrap().to_string(),
            "hono.command_response.t1"
        );
        assert_eq!(
            HonoTopic::command_internal("gw-1").unwrap().to_string(),
            "hono.command_internal.gw-1"
        );
    }

    #[test]
    fn parses_every_kind_and_round_trips() {
        for kind in TopicKind::ALL {
            let t = HonoTopic::new(kind, "my.tenant-1").unwrap();
            assert_eq!(HonoTopic::parse(&t.to_string()).unwrap(), t);
        }
        let t = HonoTopic::parse("hono.command_response.a.b").unwrap();
        assert_eq!(t.kind, TopicKind::CommandResponse);
        assert_eq!(t.tenant(), Some("a.b"));
        assert_eq!(
            HonoTopic::parse("hono.command_internal.x")
                .unwrap()
                .tenant(),
            None
        );
    }

    #[test]
    fn rejects_non_hono_and_empty_suffix() {
        assert!(matches!(
            HonoTopic::parse("telemetry.t"),
            Err(TopicError::NotHono(_))
        ));
        assert!(matches!(
            HonoTopic::parse("hono.telemetry."),
            Err(TopicError::EmptySuffix(_))
        ));
        assert!(matches!(
            HonoTopic::parse("hono.telemetry"),
            Err(TopicError::UnknownKind(_))
        ));
        assert!(matches!(
            HonoTopic::parse("hono.metrics.t"),
            Err(TopicError::UnknownKind(_))
        ));
        assert!(matches!(
            HonoTopic::telemetry(""),
            Err(TopicError::EmptySuffix(_))
        ));
        assert!(matches!(
            HonoTopic::telemetry("a/b"),
            Err(TopicError::IllegalName(_))
        ));
    }

    #[test]
    fn kafka_name_rules() {
        assert!(is_legal_kafka_name("hono.telemetry.a_b-c.9"));
        assert!(!is_legal_kafka_name(".."));
        assert!(!is_legal_kafka_name(&"a".repeat(250)));
        assert!(!is_legal_kafka_name("a b"));
    }
}
