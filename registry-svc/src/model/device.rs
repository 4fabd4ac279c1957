//! The device document (Hono's `Device` schema).

use super::{Invalid, JsonObject, check_device_id, default_true};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defaults: Option<JsonObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Vec<String>>,
    #[serde(rename = "viaGroups", skip_serializing_if = "Option::is_none")]
    pub via_groups: Option<Vec<String>>,
    #[serde(rename = "memberOf", skip_serializing_if = "Option::is_none")]
    pub member_of: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorities: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapper: Option<String>,
    #[serde(
        rename = "downstream-message-mapper",
        skip_serializing_if = "Option::is_none"
    )]
    pub downstream_message_mapper: Option<String>,
    #[serde(
        rename = "upstream-message-mapper",
        skip_serializing_if = "Option::is_none"
    )]
    pub upstream_message_mapper: Option<String>,
    #[serde(rename = "command-endpoint", skip_serializing_if = "Option::is_none")]
    pub command_endpoint: Option<CommandEndpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<JsonObject>,
    /// Read-only: accepted on input for round-tripping a GET, but never stored from a request.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CommandEndpoint {
    pub uri: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_properties: Option<std::collections::BTreeMap<String, String>>,
}

/// The only authority Hono defines: a gateway may create its edge devices on first use.
pub const AUTO_PROVISIONING_ENABLED: &str = "auto-provisioning-enabled";

impl Device {
    /// Parses and checks a device document.
    pub fn parse(body: &[u8]) -> Result<Device, Invalid> {
        let mut d: Device = super::from_json("device", body)?;
        d.status = None;
        for id in d.via.iter().flatten() {
            check_device_id(id).map_err(|e| Invalid::new(format!("via: {e}")))?;
        }
        for g in d
            .via_groups
            .iter()
            .flatten()
            .chain(d.member_of.iter().flatten())
        {
            check_device_id(g).map_err(|e| Invalid::new(format!("group: {e}")))?;
        }
        let gateway_side = d.member_of.as_ref().is_some_and(|m| !m.is_empty());
        let device_side = d.via.as_ref().is_some_and(|v| !v.is_empty())
            || d.via_groups.as_ref().is_some_and(|v| !v.is_empty());
        if gateway_side && device_side {
            return Err(Invalid::new(
                "`memberOf` must not be combined with `via` or `viaGroups`",
            ));
        }
        for a in d.authorities.iter().flatten() {
            if a != AUTO_PROVISIONING_ENABLED {
                return Err(Invalid::new(format!("unknown authority `{a}`")));
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hono_device() {
        let d = Device::parse(
            br#"{"enabled": false, "via": ["gw-1"], "viaGroups": ["g"], "defaults": {"content-type": "text/plain"}}"#,
        )
        .unwrap();
        assert!(!d.enabled);
        assert_eq!(d.via.unwrap(), vec!["gw-1"]);
        assert!(Device::parse(b"").unwrap().enabled);
    }

    #[test]
    fn rejects_bad_documents() {
        assert!(Device::parse(br#"{"foo": 1}"#).is_err());
        assert!(Device::parse(br#"{"via": ["a b"]}"#).is_err());
        assert!(Device::parse(br#"{"via": ["gw"], "memberOf": ["g"]}"#).is_err());
        assert!(Device::parse(br#"{"authorities": ["root"]}"#).is_err());
        assert!(Device::parse(br#"{"enabled": "yes"}"#).is_err());
    }

    #[test]
    fn status_is_never_taken_from_input() {
        let d = Device::parse(br#"{"status": {"created": "x"}}"#).unwrap();
        assert!(d.status.is_none());
        assert!(serde_json::to_value(&d).unwrap().get("status").is_none());
    }
}
