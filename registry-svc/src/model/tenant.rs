//! The tenant document (Hono's `Tenant` schema).

use super::{Invalid, JsonObject, default_true, parse_instant};
use base64::Engine;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Tenant {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_anchor_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<JsonObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defaults: Option<JsonObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_message_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapters: Option<Vec<Adapter>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_limits: Option<RegistrationLimits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_limits: Option<ResourceLimits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_ca: Option<Vec<TrustedCa>>,
}

/// Per-protocol-adapter settings of a tenant; an entry that exists is disabled unless it says
/// otherwise, and a tenant without the list allows every adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Adapter {
    #[serde(rename = "type")]
    pub adapter_type: String,
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_true")]
    pub device_authentication_required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<JsonObject>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RegistrationLimits {
    #[serde(default = "unlimited")]
    pub max_devices: i64,
    #[serde(default = "unlimited")]
    pub max_credentials_per_device: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResourceLimits {
    #[serde(default = "unlimited")]
    pub max_connections: i64,
    #[serde(default = "unlimited")]
    pub max_ttl: i64,
    #[serde(default = "unlimited")]
    pub max_ttl_telemetry_qos0: i64,
    #[serde(default = "unlimited")]
    pub max_ttl_telemetry_qos1: i64,
    #[serde(default = "unlimited")]
    pub max_ttl_command_response: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolume>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_duration: Option<ConnectionDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<JsonObject>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DataVolume {
    pub effective_since: String,
    #[serde(default = "unlimited")]
    pub max_bytes: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<LimitPeriod>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConnectionDuration {
    pub effective_since: String,
    #[serde(default = "unlimited")]
    pub max_minutes: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<LimitPeriod>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitPeriod {
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_of_days: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TracingConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_mode_per_auth_id: Option<std::collections::BTreeMap<String, String>>,
}

/// A trust anchor: client certificates issued by this CA authenticate devices of the tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrustedCa {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_dn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_id_template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_provisioning_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_provision_as_gateway: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_provisioning_device_id_template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ocsp_revocation_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ocsp_responder_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ocsp_responder_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ocsp_nonce_enabled: Option<bool>,
}

fn unlimited() -> i64 {
    -1
}

impl Tenant {
    /// Parses and checks a tenant document; trust anchors without an id get one.
    pub fn parse(body: &[u8]) -> Result<Tenant, Invalid> {
        let mut t: Tenant = super::from_json("tenant", body)?;
        t.validate()?;
        Ok(t)
    }

    fn validate(&mut self) -> Result<(), Invalid> {
        if let Some(alias) = &self.alias
            && (alias.is_empty()
                || !alias
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return Err(Invalid::new(format!(
                "alias `{alias}` must be a lower-case LDH label"
            )));
        }
        if let Some(adapters) = &self.adapters {
            if adapters.is_empty() {
                return Err(Invalid::new("`adapters` must not be empty when present"));
            }
            let mut seen = std::collections::HashSet::new();
            for a in adapters {
                if a.adapter_type.is_empty() {
                    return Err(Invalid::new("adapter `type` must not be empty"));
                }
                if !seen.insert(a.adapter_type.as_str()) {
                    return Err(Invalid::new(format!(
                        "adapter type `{}` is listed more than once",
                        a.adapter_type
                    )));
                }
            }
        }
        if let Some(limits) = &self.resource_limits {
            for (name, dv) in [
                (
                    "data-volume",
                    limits
                        .data_volume
                        .as_ref()
                        .map(|d| (&d.effective_since, &d.period)),
                ),
                (
                    "connection-duration",
                    limits
                        .connection_duration
                        .as_ref()
                        .map(|d| (&d.effective_since, &d.period)),
                ),
            ] {
                if let Some((since, period)) = dv {
                    parse_instant(&format!("{name}/effective-since"), since)?;
                    if let Some(p) = period {
                        match p.mode.as_str() {
                            "monthly" => {}
                            "days" if p.no_of_days.is_some_and(|d| d > 0) => {}
                            "days" => {
                                return Err(Invalid::new(format!(
                                    "{name}: mode `days` needs a positive `no-of-days`"
                                )));
                            }
                            other => {
                                return Err(Invalid::new(format!(
                                    "{name}: unknown period mode `{other}`"
                                )));
                            }
                        }
                    }
                }
            }
        }
        if let Some(cas) = &mut self.trusted_ca {
            let mut ids = std::collections::HashSet::new();
            for ca in cas.iter_mut() {
                ca.validate()?;
                let id = ca
                    .id
                    .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
                    .clone();
                if !ids.insert(id.clone()) {
                    return Err(Invalid::new(format!("trusted-ca id `{id}` is used twice")));
                }
            }
        }
        Ok(())
    }

    /// The subject DNs of the tenant's trust anchors.
    pub fn trust_anchor_dns(&self) -> impl Iterator<Item = &str> {
        self.trusted_ca
            .iter()
            .flatten()
            .filter_map(|ca| ca.subject_dn.as_deref())
    }
}

impl TrustedCa {
    fn validate(&self) -> Result<(), Invalid> {
        if self.cert.is_some() {
            return Err(Invalid::new(
                "trusted-ca `cert` is not supported yet: give `subject-dn` and `public-key`",
            ));
        }
        let dn = self
            .subject_dn
            .as_deref()
            .filter(|d| !d.trim().is_empty())
            .ok_or_else(|| Invalid::new("trusted-ca needs a `subject-dn`"))?;
        if !dn.contains('=') {
            return Err(Invalid::new(format!(
                "trusted-ca subject-dn `{dn}` is not a DN"
            )));
        }
        let key = self
            .public_key
            .as_deref()
            .ok_or_else(|| Invalid::new("trusted-ca needs a `public-key`"))?;
        match base64::engine::general_purpose::STANDARD.decode(key) {
            Ok(k) if !k.is_empty() => {}
            _ => return Err(Invalid::new("trusted-ca public-key is not base64 DER")),
        }
        if let Some(alg) = &self.algorithm
            && alg != "RSA"
            && alg != "EC"
        {
            return Err(Invalid::new(format!(
                "trusted-ca algorithm `{alg}` is not RSA or EC"
            )));
        }
        let nb = self
            .not_before
            .as_deref()
            .map(|s| parse_instant("not-before", s))
            .transpose()?;
        let na = self
            .not_after
            .as_deref()
            .map(|s| parse_instant("not-after", s))
            .transpose()?;
        if let (Some(nb), Some(na)) = (nb, na)
            && nb >= na
        {
            return Err(Invalid::new("trusted-ca not-before must precede not-after"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_body_is_an_enabled_tenant() {
        let t = Tenant::parse(b"").unwrap();
        assert!(t.enabled);
        let t = Tenant::parse(b"{}").unwrap();
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            serde_json::json!({"enabled": true})
        );
    }

    #[test]
    fn rejects_unknown_properties_and_duplicate_adapters() {
        assert!(Tenant::parse(br#"{"unknown": 1}"#).is_err());
        assert!(Tenant::parse(br#"{"adapters": []}"#).is_err());
        assert!(
            Tenant::parse(br#"{"adapters": [{"type": "hono-http"}, {"type": "hono-http"}]}"#)
                .is_err()
        );
        let t = Tenant::parse(br#"{"adapters": [{"type": "hono-http"}]}"#).unwrap();
        let a = &t.adapters.unwrap()[0];
        assert!(!a.enabled);
        assert!(a.device_authentication_required);
    }

    #[test]
    fn trust_anchor_rules() {
        let ok = br#"{"trusted-ca": [{"subject-dn": "CN=ca,O=x", "public-key": "AAEC"}]}"#;
        let t = Tenant::parse(ok).unwrap();
        assert!(t.trusted_ca.unwrap()[0].id.is_some());
        let dup = br#"{"trusted-ca": [{"id": "a", "subject-dn": "CN=a", "public-key": "AAEC"},
                                      {"id": "a", "subject-dn": "CN=b", "public-key": "AAEC"}]}"#;
        assert!(Tenant::parse(dup).is_err());
        assert!(
            Tenant::parse(br#"{"trusted-ca": [{"subject-dn": "CN=a", "public-key": "%%"}]}"#)
                .is_err()
        );
        assert!(Tenant::parse(br#"{"trusted-ca": [{"public-key": "AAEC"}]}"#).is_err());
    }
}
