//! Hono's Kafka topic names (`hono.<kind>.<suffix>`), built and parsed in one place so that a
//! later "shared topic for small tenants" mode is a change here and nowhere else.

use std::sync::Arc;

/// The prefix every Hono topic starts with.
pub const PREFIX: &str = "hono.";

/// The longest topic name Kafka accepts.
pub const MAX_NAME_LEN: usize = 249;

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

    /// Whether the suffix of this kind's topics is a tenant id (rather than an adapter
    /// instance id or a fixed name).
    pub const fn is_per_tenant(self) -> bool {
        match self {
            TopicKind::Telemetry
            | TopicKind::Event
            | TopicKind::Command
            | TopicKind::CommandResponse => true,
            TopicKind::CommandInternal | TopicKind::Notification => false,
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
    /// The topic of `kind` for a tenant (or instance) id, checked as Hono names it.
    pub fn new(kind: TopicKind, suffix: impl Into<String>) -> Result<Self, TopicError> {
        let topic = HonoTopic {
            kind,
            suffix: suffix.into(),
        };
        check(PREFIX, kind, &topic.suffix)?;
        Ok(topic)
    }

    /// The tenant this topic belongs to, for the per-tenant kinds.
    pub fn tenant(&self) -> Option<&str> {
        self.kind.is_per_tenant().then_some(self.suffix.as_str())
    }
}

/// How one deployment names its topics: Hono's names (`hono.<kind>.<suffix>`) behind an
/// optional prefix the operator chose (`kafka.topic_prefix`, empty by default), so several
/// deployments can share a cluster and a cluster's naming rules can be met. Every topic name
/// and subscription pattern of every component is built here, and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    /// The operator's prefix followed by `hono.`.
    hono: Arc<str>,
    /// The operator's prefix alone.
    operator: Arc<str>,
}

impl Default for TopicNames {
    fn default() -> Self {
        TopicNames {
            hono: PREFIX.into(),
            operator: "".into(),
        }
    }
}

impl TopicNames {
    /// Names behind `prefix`, which must itself be made of Kafka's topic characters
    /// (`[a-zA-Z0-9._-]`) and leave room for the names after it.
    pub fn new(prefix: &str) -> Result<Self, TopicError> {
        let hono = format!("{prefix}{PREFIX}");
        // The shortest tenant id must still fit.
        if !prefix.bytes().all(legal_byte) || max_tenant_id_len(&hono) == 0 {
            return Err(TopicError::IllegalName(format!("{hono}<kind>.<suffix>")));
        }
        Ok(TopicNames {
            hono: hono.into(),
            operator: prefix.into(),
        })
    }

    /// What every Hono topic name starts with: the operator's prefix and `hono.`.
    pub fn hono_prefix(&self) -> &str {
        &self.hono
    }

    /// The name of the topic of `kind` for `suffix` (a tenant or instance id), built in one
    /// allocation: the ingest path needs it for every message.
    pub fn name(&self, kind: TopicKind, suffix: &str) -> Result<String, TopicError> {
        check(&self.hono, kind, suffix)?;
        let kind = kind.as_str();
        let mut name = String::with_capacity(self.hono.len() + kind.len() + 1 + suffix.len());
        name.push_str(&self.hono);
        name.push_str(kind);
        name.push('.');
        name.push_str(suffix);
        Ok(name)
    }

    /// Parses a topic name; the kind that matches is the longest one, so
    /// `hono.command_response.x` is never read as a command topic.
    pub fn parse(&self, name: &str) -> Result<HonoTopic, TopicError> {
        let rest = name
            .strip_prefix(&*self.hono)
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

    /// The regex (librdkafka's `^` form) matching every tenant's command topic: what the
    /// command router subscribes to.
    pub fn command_pattern(&self) -> String {
        format!(
            "^{}{}\\..+",
            regex_escape(&self.hono),
            TopicKind::Command.as_str()
        )
    }

    /// Whether `tenant` can name every per-tenant topic behind this prefix
    /// (see [`check_tenant_topics`]).
    pub fn check_tenant(&self, tenant: &str) -> Result<(), TenantIdError> {
        check_tenant_topics(&self.hono, tenant)
    }

    /// The compacted topic of every gateway instance's command subscriptions
    /// (`ferrule.device_routes`, behind the operator's prefix).
    pub fn device_routes(&self) -> String {
        format!("{}ferrule.device_routes", self.operator)
    }

    /// The outcome topic of one AMQP bridge instance (see [`crate::outcome`]).
    pub fn outcome(&self, instance: &str) -> String {
        format!(
            "{}{}{instance}",
            self.operator,
            crate::outcome::OUTCOME_TOPIC_PREFIX
        )
    }

    /// The instance id of an outcome topic name of this deployment, if it is one.
    pub fn outcome_instance<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(&*self.operator)?
            .strip_prefix(crate::outcome::OUTCOME_TOPIC_PREFIX)
            .filter(|i| !i.is_empty())
    }
}

/// `.` is the only character of a legal topic name that a regex reads specially.
fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

/// Whether `<prefix><kind>.<suffix>` is a legal topic name, checked without building it.
fn check(prefix: &str, kind: TopicKind, suffix: &str) -> Result<(), TopicError> {
    let full = || format!("{prefix}{}.{suffix}", kind.as_str());
    if suffix.is_empty() {
        return Err(TopicError::EmptySuffix(full()));
    }
    let len = prefix.len() + kind.as_str().len() + 1 + suffix.len();
    if len > MAX_NAME_LEN || !suffix.bytes().all(legal_byte) {
        return Err(TopicError::IllegalName(full()));
    }
    Ok(())
}

/// Kafka accepts topic names of up to 249 characters from `[a-zA-Z0-9._-]`.
pub fn is_legal_kafka_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name.bytes().all(legal_byte)
}

fn legal_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Why a tenant id cannot name the per-tenant topics Ferrule derives from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantIdError {
    #[error("a tenant id must not be empty")]
    Empty,
    #[error(
        "tenant id `{id}` contains `{ch}`, but Kafka topic names (`{pattern}`) allow only \
         [a-zA-Z0-9._-]"
    )]
    IllegalChar {
        id: String,
        ch: char,
        pattern: String,
    },
    #[error(
        "tenant id is too long: its {len} characters make topic `{pattern}` {topic_len} \
         characters long, more than Kafka's limit of {limit}; a tenant id may have at most \
         {max} characters",
        limit = MAX_NAME_LEN
    )]
    TooLong {
        len: usize,
        pattern: String,
        topic_len: usize,
        max: usize,
    },
    #[error(
        "tenant id `{id}` is reserved: its topic `{topic}` is the same topic for Kafka as \
         `{clashes_with}` (Kafka treats `.` and `_` in topic names alike)"
    )]
    Reserved {
        id: String,
        topic: String,
        clashes_with: String,
    },
    #[error("tenant id makes topic `{0}`, which is not a legal Kafka topic name")]
    IllegalTopic(String),
}

/// The per-tenant topic kinds, every one of which Ferrule may create for a tenant.
fn per_tenant_kinds() -> impl Iterator<Item = TopicKind> {
    TopicKind::ALL.into_iter().filter(|k| k.is_per_tenant())
}

/// The longest tenant id whose per-tenant topics all fit Kafka's limit when topic names start
/// with `prefix`; `hono.command_response.<tenant>` is the longest of them, so with [`PREFIX`]
/// it is 249 − 22 = 227.
pub fn max_tenant_id_len(prefix: &str) -> usize {
    let longest = per_tenant_kinds()
        .map(|k| k.as_str().len())
        .max()
        .unwrap_or(0);
    MAX_NAME_LEN.saturating_sub(prefix.len() + longest + 1)
}

/// Whether `tenant` is usable for every per-tenant topic Ferrule derives from it
/// (`<prefix><kind>.<tenant>` for telemetry, event, command and command_response):
///
/// - only `[a-zA-Z0-9._-]`, as Kafka requires;
/// - short enough that the longest of them, `<prefix>command_response.<tenant>`, stays within
///   Kafka's 249 characters (see [`max_tenant_id_len`]);
/// - none of them is, for Kafka, a topic of another kind: Kafka treats `.` and `_` alike, so
///   the command topic of tenant `response.x` (`hono.command.response.x`) would be the
///   command-response topic of tenant `x` (`hono.command_response.x`), and that of
///   `internal.gw` the internal command topic of adapter instance `gw`. Ids that start with
///   `response` or `internal` followed by `.` or `_` and more characters are therefore
///   refused.
///
/// Collisions between two tenants (`a.b` and `a_b`) depend on which tenants exist; see
/// [`tenant_collision_key`].
///
/// `prefix` is what every topic name starts with: [`PREFIX`], behind `kafka.topic_prefix` when
/// one is configured (the registry passes what the topic names of this deployment use).
pub fn check_tenant_topics(prefix: &str, tenant: &str) -> Result<(), TenantIdError> {
    if tenant.is_empty() {
        return Err(TenantIdError::Empty);
    }
    if let Some(ch) = tenant
        .chars()
        .find(|c| !c.is_ascii() || !legal_byte(*c as u8))
    {
        return Err(TenantIdError::IllegalChar {
            id: tenant.to_owned(),
            ch,
            pattern: format!("{prefix}<kind>.<tenant>"),
        });
    }
    let max = max_tenant_id_len(prefix);
    if tenant.len() > max {
        let longest = per_tenant_kinds()
            .max_by_key(|k| k.as_str().len())
            .unwrap_or(TopicKind::CommandResponse);
        return Err(TenantIdError::TooLong {
            len: tenant.len(),
            pattern: format!("{prefix}{}.<tenant>", longest.as_str()),
            topic_len: prefix.len() + longest.as_str().len() + 1 + tenant.len(),
            max,
        });
    }
    let key = tenant_collision_key(tenant);
    for own in per_tenant_kinds() {
        for other in TopicKind::ALL {
            // `<own>_<rest>` is another kind's name: `<own>.<rest>.<s>` and `<own>_<rest>.<s>`
            // are one topic for Kafka.
            let Some(rest) = other
                .as_str()
                .strip_prefix(own.as_str())
                .and_then(|r| r.strip_prefix('_'))
            else {
                continue;
            };
            let rest_key = tenant_collision_key(rest);
            let clash = key
                .strip_prefix(rest_key.as_str())
                .and_then(|r| r.strip_prefix('_'))
                .is_some_and(|s| !s.is_empty());
            if clash {
                // The key has the same length as the id, so the id splits where the key does.
                let suffix = &tenant[rest.len() + 1..];
                return Err(TenantIdError::Reserved {
                    id: tenant.to_owned(),
                    topic: format!("{prefix}{}.{tenant}", own.as_str()),
                    clashes_with: format!("{prefix}{}.{suffix}", other.as_str()),
                });
            }
        }
    }
    for kind in per_tenant_kinds() {
        let topic = format!("{prefix}{}.{tenant}", kind.as_str());
        if !is_legal_kafka_name(&topic) {
            return Err(TenantIdError::IllegalTopic(topic));
        }
    }
    Ok(())
}

/// The name under which Kafka tells a tenant's topics apart from other tenants': the id with
/// every `.` replaced by `_`. Kafka refuses to create a topic whose name differs from an
/// existing one's only in `.` versus `_` (the two are one name in its metrics), so two tenants
/// with the same key (`a.b`, `a_b`) cannot both have topics; the registry keeps keys unique.
pub fn tenant_collision_key(tenant: &str) -> String {
    tenant.replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hono() -> TopicNames {
        TopicNames::default()
    }

    #[test]
    fn builds_per_tenant_names() {
        let n = hono();
        assert_eq!(
            n.name(TopicKind::Telemetry, "DEFAULT_TENANT").unwrap(),
            "hono.telemetry.DEFAULT_TENANT"
        );
        assert_eq!(n.name(TopicKind::Event, "t1").unwrap(), "hono.event.t1");
        assert_eq!(
            n.name(TopicKind::CommandResponse, "t1").unwrap(),
            "hono.command_response.t1"
        );
        assert_eq!(
            n.name(TopicKind::CommandInternal, "gw-1").unwrap(),
            "hono.command_internal.gw-1"
        );
        assert_eq!(n.outcome("b1"), "ferrule.command_outcome.b1");
    }

    #[test]
    fn a_prefix_goes_before_every_name_and_pattern() {
        let n = TopicNames::new("prod.").unwrap();
        assert_eq!(
            n.name(TopicKind::Telemetry, "t1").unwrap(),
            "prod.hono.telemetry.t1"
        );
        assert_eq!(
            n.parse("prod.hono.command.t1").unwrap(),
            HonoTopic::new(TopicKind::Command, "t1").unwrap()
        );
        assert!(matches!(
            n.parse("hono.command.t1"),
            Err(TopicError::NotHono(_))
        ));
        assert_eq!(n.command_pattern(), r"^prod\.hono\.command\..+");
        assert_eq!(hono().command_pattern(), r"^hono\.command\..+");
        assert_eq!(n.outcome("b1"), "prod.ferrule.command_outcome.b1");
        assert_eq!(
            n.outcome_instance("prod.ferrule.command_outcome.b1"),
            Some("b1")
        );
        assert_eq!(n.outcome_instance("ferrule.command_outcome.b1"), None);
        // 227 characters fit behind `hono.`, 222 behind `prod.hono.`.
        assert!(n.check_tenant(&"t".repeat(222)).is_ok());
        assert!(n.check_tenant(&"t".repeat(223)).is_err());
        assert!(TopicNames::new("a/b").is_err());
        assert!(TopicNames::new(&"p".repeat(230)).is_err());
    }

    #[test]
    fn parses_every_kind_and_round_trips() {
        let n = hono();
        for kind in TopicKind::ALL {
            let t = HonoTopic::new(kind, "my.tenant-1").unwrap();
            assert_eq!(n.parse(&n.name(kind, &t.suffix).unwrap()).unwrap(), t);
        }
        let t = n.parse("hono.command_response.a.b").unwrap();
        assert_eq!(t.kind, TopicKind::CommandResponse);
        assert_eq!(t.tenant(), Some("a.b"));
        assert_eq!(n.parse("hono.command_internal.x").unwrap().tenant(), None);
    }

    #[test]
    fn rejects_non_hono_and_empty_suffix() {
        let n = hono();
        assert!(matches!(
            n.parse("telemetry.t"),
            Err(TopicError::NotHono(_))
        ));
        assert!(matches!(
            n.parse("hono.telemetry."),
            Err(TopicError::EmptySuffix(_))
        ));
        assert!(matches!(
            n.parse("hono.telemetry"),
            Err(TopicError::UnknownKind(_))
        ));
        assert!(matches!(
            n.parse("hono.metrics.t"),
            Err(TopicError::UnknownKind(_))
        ));
        assert!(matches!(
            n.name(TopicKind::Telemetry, ""),
            Err(TopicError::EmptySuffix(_))
        ));
        assert!(matches!(
            n.name(TopicKind::Telemetry, "a/b"),
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

    #[test]
    fn longest_tenant_id_fits_every_per_tenant_topic() {
        // `hono.command_response.` is 22 characters.
        assert_eq!(max_tenant_id_len(PREFIX), 227);
        let longest = "t".repeat(227);
        assert_eq!(check_tenant_topics(PREFIX, &longest), Ok(()));
        for kind in TopicKind::ALL.into_iter().filter(|k| k.is_per_tenant()) {
            let name = hono().name(kind, &longest).unwrap();
            assert!(is_legal_kafka_name(&name), "{name}");
        }
        assert_eq!(
            hono()
                .name(TopicKind::CommandResponse, &longest)
                .unwrap()
                .len(),
            249
        );

        let err = check_tenant_topics(PREFIX, &"t".repeat(228)).unwrap_err();
        assert_eq!(
            err,
            TenantIdError::TooLong {
                len: 228,
                pattern: "hono.command_response.<tenant>".into(),
                topic_len: 250,
                max: 227,
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("hono.command_response.<tenant>"), "{msg}");
        assert!(msg.contains("249"), "{msg}");
        assert!(msg.contains("at most 227"), "{msg}");
        // 230 characters: telemetry would still fit, the response topic would not.
        assert!(hono().name(TopicKind::Telemetry, &"t".repeat(230)).is_ok());
        assert!(
            hono()
                .name(TopicKind::CommandResponse, &"t".repeat(230))
                .is_err()
        );
        assert!(check_tenant_topics(PREFIX, &"t".repeat(230)).is_err());
    }

    #[test]
    fn a_longer_prefix_shortens_the_limit() {
        let prefix = "staging.hono.";
        assert_eq!(max_tenant_id_len(prefix), 227 - 8);
        assert!(check_tenant_topics(prefix, &"t".repeat(219)).is_ok());
        assert!(matches!(
            check_tenant_topics(prefix, &"t".repeat(220)),
            Err(TenantIdError::TooLong { pattern, .. })
                if pattern == "staging.hono.command_response.<tenant>"
        ));
        assert!(matches!(
            check_tenant_topics("bad prefix.", "t"),
            Err(TenantIdError::IllegalTopic(_))
        ));
    }

    #[test]
    fn tenant_id_characters() {
        for ok in [
            "DEFAULT_TENANT",
            "a.b-c_9",
            "x",
            "response",
            "internal",
            "response.",
        ] {
            assert_eq!(check_tenant_topics(PREFIX, ok), Ok(()), "{ok}");
        }
        assert_eq!(check_tenant_topics(PREFIX, ""), Err(TenantIdError::Empty));
        for (bad, ch) in [("a/b", '/'), ("a b", ' '), ("a:b", ':'), ("tü", 'ü')] {
            assert!(
                matches!(
                    check_tenant_topics(PREFIX, bad),
                    Err(TenantIdError::IllegalChar { ch: c, .. }) if c == ch
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_whose_command_topic_is_another_kind_for_kafka_are_reserved() {
        let err = check_tenant_topics(PREFIX, "response.x").unwrap_err();
        assert_eq!(
            err,
            TenantIdError::Reserved {
                id: "response.x".into(),
                topic: "hono.command.response.x".into(),
                clashes_with: "hono.command_response.x".into(),
            }
        );
        assert!(err.to_string().contains("`.` and `_`"));
        assert!(matches!(
            check_tenant_topics(PREFIX, "response_x.y"),
            Err(TenantIdError::Reserved { clashes_with, .. })
                if clashes_with == "hono.command_response.x.y"
        ));
        assert!(matches!(
            check_tenant_topics(PREFIX, "internal_gw-1"),
            Err(TenantIdError::Reserved { clashes_with, .. })
                if clashes_with == "hono.command_internal.gw-1"
        ));
        // Only the exact words followed by a separator: these are different topics for Kafka.
        for ok in ["responses.x", "my.response.x", "internal-x", "Response.x"] {
            assert_eq!(check_tenant_topics(PREFIX, ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn collision_key_treats_dot_and_underscore_alike() {
        assert_eq!(tenant_collision_key("a.b"), "a_b");
        assert_eq!(tenant_collision_key("a_b"), "a_b");
        assert_eq!(tenant_collision_key("a.b_c.d"), "a_b_c_d");
        assert_ne!(tenant_collision_key("a-b"), tenant_collision_key("a_b"));
        assert_ne!(tenant_collision_key("A.b"), tenant_collision_key("a.b"));
    }
}
