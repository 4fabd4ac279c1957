//! The registry's documents as the Management API v1 accepts them. Unknown properties are
//! rejected (the API's schemas forbid them) and every check a request needs lives here, so the
//! HTTP handlers only move documents between the wire and the database.

pub mod application;
pub mod credentials;
pub mod device;
pub mod tenant;

use serde_json::{Map, Value};

/// Why a document or an id is not acceptable; always answered with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(msg: impl Into<String>) -> Self {
        Invalid(msg.into())
    }
}

/// A free-form JSON object (`ext`, `defaults`).
pub type JsonObject = Map<String, Value>;

fn matches_chars(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Tenant ids: `[a-zA-Z0-9-_.]+`.
pub fn check_tenant_id(id: &str) -> Result<(), Invalid> {
    if matches_chars(id, b"-_.") {
        Ok(())
    } else {
        Err(Invalid::new(format!("invalid tenant id `{id}`")))
    }
}

/// The id of a tenant about to be created: a tenant id, and one that every per-tenant Kafka
/// topic Ferrule derives from it can be named after (at most 227 characters, since
/// `hono.command_response.<id>` must stay within Kafka's 249; no id whose command topic Kafka
/// would take for another kind's). Existing tenants are only held to [`check_tenant_id`], so
/// ones created before this rule can still be read, updated and deleted.
pub fn check_new_tenant_id(names: &ferrule_schemas::TopicNames, id: &str) -> Result<(), Invalid> {
    names
        .check_tenant(id)
        .map_err(|e| Invalid::new(e.to_string()))?;
    check_tenant_id(id)
}

/// Device ids: `[a-zA-Z0-9-_.:=]+`.
pub fn check_device_id(id: &str) -> Result<(), Invalid> {
    if matches_chars(id, b"-_.:=") {
        Ok(())
    } else {
        Err(Invalid::new(format!("invalid device id `{id}`")))
    }
}

/// Auth-ids of `hashed-password` and `psk` credentials: `[a-zA-Z0-9-_=.]+` (never `@` or `:`,
/// since devices send `authId@tenant:password`).
pub fn check_auth_id(id: &str) -> Result<(), Invalid> {
    if matches_chars(id, b"-_=.") {
        Ok(())
    } else {
        Err(Invalid::new(format!("invalid auth-id `{id}`")))
    }
}

/// Credential types: `[a-z0-9-]+`.
pub fn check_credential_type(t: &str) -> Result<(), Invalid> {
    if !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(())
    } else {
        Err(Invalid::new(format!("invalid credentials type `{t}`")))
    }
}

/// An RFC 3339 instant, as used by `not-before`/`not-after`/`effective-since`.
pub fn parse_instant(field: &str, s: &str) -> Result<chrono::DateTime<chrono::Utc>, Invalid> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| Invalid::new(format!("`{field}` is not an RFC 3339 date-time: `{s}`")))
}

/// Decodes a document, turning serde's message (unknown field, wrong type) into a 400 text.
pub fn from_json<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, Invalid> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| Invalid::new(format!("malformed {what}: {e}")))
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_patterns() {
        assert!(check_tenant_id("DEFAULT_TENANT.a-b").is_ok());
        assert!(check_tenant_id("a:b").is_err());
        assert!(check_tenant_id("").is_err());
        assert!(check_tenant_id("a/b").is_err());
        assert!(check_new_tenant_id(&Default::default(), &"t".repeat(227)).is_ok());
        assert!(check_new_tenant_id(&Default::default(), &"t".repeat(228)).is_err());
        assert!(
            check_tenant_id(&"t".repeat(228)).is_ok(),
            "existing ids stay usable"
        );
        assert!(check_new_tenant_id(&Default::default(), "response.t").is_err());
        assert!(check_new_tenant_id(&Default::default(), "a:b").is_err());
        assert!(check_device_id("4711:x=y").is_ok());
        assert!(check_device_id("dev 1").is_err());
        assert!(check_auth_id("sensor1=").is_ok());
        assert!(check_auth_id("a@b").is_err());
        assert!(check_auth_id("a:b").is_err());
        assert!(check_credential_type("hashed-password").is_ok());
        assert!(check_credential_type("Hashed").is_err());
    }

    #[test]
    fn instants() {
        assert!(parse_instant("not-before", "2026-01-01T00:00:00Z").is_ok());
        assert!(parse_instant("not-before", "2026-01-01T00:00:00+02:00").is_ok());
        assert!(parse_instant("not-before", "yesterday").is_err());
    }
}
