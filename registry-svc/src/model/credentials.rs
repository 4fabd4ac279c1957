//! Credentials documents (Hono's `TypedCredentials`): the write rules of the management API
//! (patch mode, server-side hashing of `pwd-plain`, the bcrypt cost cap) and the read view
//! that never carries a stored secret.

use super::{
    Invalid, JsonObject, check_auth_id, check_credential_type, default_true, is_true, parse_instant,
};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};

pub const HASHED_PASSWORD: &str = "hashed-password";
pub const PSK: &str = "psk";
pub const X509_CERT: &str = "x509-cert";
pub const RPK: &str = "rpk";

/// Secret fields that are written but never read back through the API.
pub const CONFIDENTIAL: [&str; 5] = ["pwd-hash", "salt", "key", "pwd-plain", "cert"];
const COMMON_SECRET_FIELDS: [&str; 5] = ["id", "enabled", "not-before", "not-after", "comment"];

/// One credentials entry as stored: the document with its secrets in stored (hashed) form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Credentials {
    #[serde(rename = "type")]
    pub cred_type: String,
    pub auth_id: String,
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<JsonObject>,
    pub secrets: Vec<JsonObject>,
}

/// Limits that apply while accepting credentials.
#[derive(Debug, Clone, Copy)]
pub struct CredentialRules {
    /// Highest bcrypt cost accepted in a `pwd-hash` (checking a password costs 2^cost).
    pub max_bcrypt_cost: u32,
    /// Cost used when the registry hashes a `pwd-plain` itself.
    pub plain_password_cost: u32,
}

impl Default for CredentialRules {
    fn default() -> Self {
        CredentialRules {
            max_bcrypt_cost: 10,
            plain_password_cost: 10,
        }
    }
}

/// Parses the body of `PUT /v1/credentials/{tenant}/{device}`.
pub fn parse_list(body: &[u8]) -> Result<Vec<Credentials>, Invalid> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Invalid::new("a credentials array is required"));
    }
    let list: Vec<Credentials> = serde_json::from_slice(body)
        .map_err(|e| Invalid::new(format!("malformed credentials: {e}")))?;
    let mut keys = HashSet::new();
    for c in &list {
        check_credential_type(&c.cred_type)?;
        match c.cred_type.as_str() {
            HASHED_PASSWORD | PSK => check_auth_id(&c.auth_id)?,
            _ if c.auth_id.trim().is_empty() => return Err(Invalid::new("auth-id is empty")),
            _ => {}
        }
        if c.secrets.is_empty() {
            return Err(Invalid::new(format!(
                "credentials `{}`/`{}` need at least one secret",
                c.cred_type, c.auth_id
            )));
        }
        if c.cred_type == X509_CERT && c.secrets.len() != 1 {
            return Err(Invalid::new(
                "x509-cert credentials take exactly one secret",
            ));
        }
        if !keys.insert((c.cred_type.as_str(), c.auth_id.as_str())) {
            return Err(Invalid::new(format!(
                "credentials `{}`/`{}` are listed twice",
                c.cred_type, c.auth_id
            )));
        }
    }
    Ok(list)
}

/// Turns the requested credentials into their stored form (patch mode): secrets with an `id`
/// keep the confidential fields already stored, secrets without one are new, `pwd-plain` is
/// hashed with bcrypt here. Slow when it hashes, so call it off the async runtime.
pub fn prepare(
    requested: Vec<Credentials>,
    existing: &[Credentials],
    rules: CredentialRules,
) -> Result<Vec<Credentials>, Invalid> {
    let stored: HashMap<(&str, &str), &Credentials> = existing
        .iter()
        .map(|c| ((c.cred_type.as_str(), c.auth_id.as_str()), c))
        .collect();
    let mut out = Vec::with_capacity(requested.len());
    for mut cred in requested {
        let before = stored.get(&(cred.cred_type.as_str(), cred.auth_id.as_str()));
        let mut secrets = Vec::with_capacity(cred.secrets.len());
        let mut ids = HashSet::new();
        for secret in std::mem::take(&mut cred.secrets) {
            let merged = match secret.get("id") {
                Some(Value::String(id)) => {
                    let old = before
                        .and_then(|b| {
                            b.secrets
                                .iter()
                                .find(|s| s.get("id").and_then(Value::as_str) == Some(id))
                        })
                        .ok_or_else(|| {
                            Invalid::new(format!(
                                "secret id `{id}` does not exist for `{}`/`{}`",
                                cred.cred_type, cred.auth_id
                            ))
                        })?;
                    merge_secret(old, secret)
                }
                Some(_) => return Err(Invalid::new("secret `id` must be a string")),
                None => {
                    let mut s = secret;
                    s.insert("id".into(), Value::String(uuid::Uuid::new_v4().to_string()));
                    s
                }
            };
            let id = merged.get("id").and_then(Value::as_str).unwrap_or_default();
            if !ids.insert(id.to_owned()) {
                return Err(Invalid::new(format!("secret id `{id}` is used twice")));
            }
            secrets.push(check_secret(&cred.cred_type, merged, rules)?);
        }
        cred.secrets = secrets;
        out.push(cred);
    }
    Ok(out)
}

/// A stored secret updated by a request: confidential fields stay unless the request gives
/// new ones, every other field is what the request says.
fn merge_secret(old: &JsonObject, new: JsonObject) -> JsonObject {
    let replaces_secret = CONFIDENTIAL.iter().any(|k| new.contains_key(*k));
    let mut merged = JsonObject::new();
    if !replaces_secret {
        for k in CONFIDENTIAL.iter().chain(["hash-function"].iter()) {
            if let Some(v) = old.get(*k) {
                merged.insert((*k).to_owned(), v.clone());
            }
        }
    }
    merged.extend(new);
    merged
}

fn str_field<'a>(s: &'a JsonObject, key: &str) -> Result<Option<&'a str>, Invalid> {
    match s.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) => Ok(Some(v)),
        Some(_) => Err(Invalid::new(format!("secret `{key}` must be a string"))),
    }
}

fn b64(field: &str, v: &str) -> Result<Vec<u8>, Invalid> {
    base64::engine::general_purpose::STANDARD
        .decode(v)
        .map_err(|_| Invalid::new(format!("secret `{field}` is not base64")))
}

fn check_secret(
    cred_type: &str,
    mut s: JsonObject,
    rules: CredentialRules,
) -> Result<JsonObject, Invalid> {
    if let Some(v) = s.get("enabled")
        && !v.is_boolean()
    {
        return Err(Invalid::new("secret `enabled` must be a boolean"));
    }
    str_field(&s, "comment")?;
    let nb = str_field(&s, "not-before")?
        .map(|v| parse_instant("not-before", v))
        .transpose()?;
    let na = str_field(&s, "not-after")?
        .map(|v| parse_instant("not-after", v))
        .transpose()?;
    if let (Some(nb), Some(na)) = (nb, na)
        && nb >= na
    {
        return Err(Invalid::new("secret not-before must precede not-after"));
    }
    let allowed: &[&str] = match cred_type {
        HASHED_PASSWORD => &["pwd-hash", "salt", "hash-function", "pwd-plain"],
        PSK => &["key"],
        X509_CERT => &[],
        RPK => &["key", "algorithm"],
        // Other types carry secrets we cannot interpret; they are stored as given and never
        // read back beyond the common fields.
        _ => return Ok(s),
    };
    if let Some(k) = s
        .keys()
        .find(|k| !COMMON_SECRET_FIELDS.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(Invalid::new(format!(
            "unknown secret property `{k}` for type `{cred_type}`"
        )));
    }
    match cred_type {
        HASHED_PASSWORD => check_password_secret(&mut s, rules)?,
        PSK | RPK => {
            let key = str_field(&s, "key")?.ok_or_else(|| Invalid::new("secret needs a `key`"))?;
            if b64("key", key)?.is_empty() {
                return Err(Invalid::new("secret `key` is empty"));
            }
            if let Some(alg) = str_field(&s, "algorithm")?
                && alg != "RSA"
                && alg != "EC"
            {
                return Err(Invalid::new(format!("unknown key algorithm `{alg}`")));
            }
        }
        _ => {}
    }
    Ok(s)
}

fn check_password_secret(s: &mut JsonObject, rules: CredentialRules) -> Result<(), Invalid> {
    if let Some(plain) = str_field(s, "pwd-plain")? {
        if s.contains_key("pwd-hash") || s.contains_key("salt") {
            return Err(Invalid::new(
                "`pwd-plain` cannot be combined with `pwd-hash` or `salt`",
            ));
        }
        if plain.is_empty() {
            return Err(Invalid::new("`pwd-plain` is empty"));
        }
        let hash = bcrypt::hash_with_result(plain, rules.plain_password_cost)
            .map_err(|e| Invalid::new(format!("cannot hash password: {e}")))?
            .format_for_version(bcrypt::Version::TwoA);
        s.remove("pwd-plain");
        s.insert("pwd-hash".into(), Value::String(hash));
        s.insert("hash-function".into(), Value::String("bcrypt".into()));
        return Ok(());
    }
    let hash = str_field(s, "pwd-hash")?
        .ok_or_else(|| Invalid::new("a password secret needs `pwd-hash` or `pwd-plain`"))?
        .to_owned();
    let function = str_field(s, "hash-function")?
        .unwrap_or("sha-256")
        .to_owned();
    match function.as_str() {
        "sha-256" | "sha-512" => {
            let want = if function == "sha-256" { 32 } else { 64 };
            if b64("pwd-hash", &hash)?.len() != want {
                return Err(Invalid::new(format!(
                    "`pwd-hash` is not a {function} digest"
                )));
            }
            if let Some(salt) = str_field(s, "salt")? {
                b64("salt", salt)?;
            }
        }
        "bcrypt" => {
            let cost = bcrypt_cost(&hash)?;
            if cost > rules.max_bcrypt_cost {
                return Err(Invalid::new(format!(
                    "bcrypt cost {cost} exceeds the maximum of {}",
                    rules.max_bcrypt_cost
                )));
            }
            if s.contains_key("salt") {
                return Err(Invalid::new("a bcrypt hash carries its own salt"));
            }
        }
        other => return Err(Invalid::new(format!("unsupported hash-function `{other}`"))),
    }
    s.insert("hash-function".into(), Value::String(function));
    Ok(())
}

/// The cost of a `$2a$NN$…` hash; other bcrypt versions are refused as Hono does.
pub fn bcrypt_cost(hash: &str) -> Result<u32, Invalid> {
    let bad = || Invalid::new("`pwd-hash` is not a `$2a$` bcrypt hash");
    let rest = hash.strip_prefix("$2a$").ok_or_else(bad)?;
    if rest.len() != 56 || rest.as_bytes()[2] != b'$' {
        return Err(bad());
    }
    rest[..2].parse::<u32>().map_err(|_| bad())
}

/// What the API returns for stored credentials: secrets with their ids, never their keys.
pub fn public_view(creds: &[Credentials]) -> Vec<Credentials> {
    creds
        .iter()
        .map(|c| {
            let known = matches!(
                c.cred_type.as_str(),
                HASHED_PASSWORD | PSK | X509_CERT | RPK
            );
            let secrets = c
                .secrets
                .iter()
                .map(|s| {
                    s.iter()
                        .filter(|(k, _)| {
                            let k = k.as_str();
                            if known {
                                !CONFIDENTIAL.contains(&k)
                            } else {
                                COMMON_SECRET_FIELDS.contains(&k)
                            }
                        })
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .collect();
            Credentials {
                secrets,
                ..c.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> CredentialRules {
        CredentialRules {
            max_bcrypt_cost: 10,
            plain_password_cost: 4,
        }
    }

    fn one(v: Value) -> Result<Vec<Credentials>, Invalid> {
        parse_list(v.to_string().as_bytes()).and_then(|l| prepare(l, &[], rules()))
    }

    #[test]
    fn plain_password_is_hashed_and_never_returned() {
        let stored = one(json!([{"type": "hashed-password", "auth-id": "sensor1",
            "secrets": [{"pwd-plain": "hono-secret"}]}]))
        .unwrap();
        let s = &stored[0].secrets[0];
        let hash = s["pwd-hash"].as_str().unwrap();
        assert!(hash.starts_with("$2a$04$"));
        assert!(bcrypt::verify("hono-secret", hash).unwrap());
        assert!(s.get("pwd-plain").is_none());
        assert!(s["id"].as_str().is_some());
        let view = serde_json::to_string(&public_view(&stored)).unwrap();
        assert!(
            !view.contains("pwd-hash") && !view.contains("$2a$"),
            "{view}"
        );
    }

    #[test]
    fn bcrypt_cost_is_capped() {
        let h11 = format!("$2a$11${}", "a".repeat(53));
        let err = one(json!([{"type": "hashed-password", "auth-id": "a",
            "secrets": [{"hash-function": "bcrypt", "pwd-hash": h11}]}]))
        .unwrap_err();
        assert!(err.0.contains("cost 11"), "{err}");
        let h2b = format!("$2b$04${}", "a".repeat(53));
        assert!(
            one(json!([{"type": "hashed-password", "auth-id": "a",
            "secrets": [{"hash-function": "bcrypt", "pwd-hash": h2b}]}]))
            .is_err()
        );
    }

    #[test]
    fn sha_digests_are_checked() {
        assert!(
            one(json!([{"type": "hashed-password", "auth-id": "a",
            "secrets": [{"pwd-hash": "AAAA"}]}]))
            .is_err()
        );
        let ok = one(json!([{"type": "hashed-password", "auth-id": "a",
            "secrets": [{"pwd-hash": base64::engine::general_purpose::STANDARD.encode([0u8; 32]),
                         "salt": "AAEC"}]}]))
        .unwrap();
        assert_eq!(ok[0].secrets[0]["hash-function"], "sha-256");
        assert!(
            one(json!([{"type": "hashed-password", "auth-id": "a",
            "secrets": [{"pwd-hash": "AAAA", "hash-function": "md5"}]}]))
            .is_err()
        );
    }

    #[test]
    fn structural_rules() {
        assert!(parse_list(b"").is_err());
        assert!(parse_list(br#"[{"auth-id": "a", "secrets": [{}]}]"#).is_err());
        assert!(parse_list(br#"[{"type": "psk", "secrets": [{}]}]"#).is_err());
        assert!(parse_list(br#"[{"type": "Psk!", "auth-id": "a", "secrets": [{}]}]"#).is_err());
        assert!(parse_list(br#"[{"type": "psk", "auth-id": "a@b", "secrets": [{}]}]"#).is_err());
        assert!(parse_list(br#"[{"type": "psk", "auth-id": "a", "secrets": []}]"#).is_err());
        assert!(
            parse_list(br#"[{"type": "psk", "auth-id": "a", "secrets": [{}], "x": 1}]"#).is_err()
        );
        assert!(
            one(json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC", "pwd": 1}]}]))
                .is_err()
        );
        assert!(
            one(json!([{"type": "x509-cert", "auth-id": "CN=d,O=t", "secrets": [{}]}])).is_ok()
        );
    }

    #[test]
    fn patch_mode_keeps_stored_secrets_and_refuses_unknown_ids() {
        let stored =
            one(json!([{"type": "psk", "auth-id": "a", "secrets": [{"key": "AAEC"}]}])).unwrap();
        let id = stored[0].secrets[0]["id"].as_str().unwrap().to_owned();
        let req = parse_list(
            json!([{"type": "psk", "auth-id": "a", "secrets": [{"id": id, "comment": "c"}]}])
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let merged = prepare(req, &stored, rules()).unwrap();
        assert_eq!(merged[0].secrets[0]["key"], "AAEC");
        assert_eq!(merged[0].secrets[0]["comment"], "c");
        let req = parse_list(
            json!([{"type": "psk", "auth-id": "a", "secrets": [{"id": "nope"}]}])
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert!(prepare(req.clone(), &stored, rules()).is_err());
        assert!(prepare(req, &[], rules()).is_err());
    }
}
