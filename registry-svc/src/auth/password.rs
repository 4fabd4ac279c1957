//! Checking a password against a stored `hashed-password` secret.

use base64::Engine;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// A stored password hash, decoded once when the credentials are loaded.
#[derive(Debug, Clone)]
pub enum PasswordHash {
    /// `hash(salt || password)` with SHA-256.
    Sha256 { digest: Vec<u8>, salt: Vec<u8> },
    /// `hash(salt || password)` with SHA-512.
    Sha512 { digest: Vec<u8>, salt: Vec<u8> },
    /// A `$2a$` bcrypt hash that carries its own salt and cost.
    Bcrypt(String),
}

impl PasswordHash {
    /// Decodes the `pwd-hash`/`salt`/`hash-function` fields of a stored secret.
    pub fn from_secret(secret: &serde_json::Map<String, serde_json::Value>) -> Option<Self> {
        let hash = secret.get("pwd-hash")?.as_str()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = match secret.get("salt").and_then(|s| s.as_str()) {
            Some(s) => b64.decode(s).ok()?,
            None => Vec::new(),
        };
        match secret
            .get("hash-function")
            .and_then(|s| s.as_str())
            .unwrap_or("sha-256")
        {
            "sha-256" => Some(PasswordHash::Sha256 {
                digest: b64.decode(hash).ok()?,
                salt,
            }),
            "sha-512" => Some(PasswordHash::Sha512 {
                digest: b64.decode(hash).ok()?,
                salt,
            }),
            "bcrypt" => Some(PasswordHash::Bcrypt(hash.to_owned())),
            _ => None,
        }
    }

    /// Whether `password` matches; digests are compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Sha256 { digest, salt } => {
                let mut h = Sha256::new();
                h.update(salt);
                h.update(password);
                bool::from(h.finalize().as_slice().ct_eq(digest))
            }
            PasswordHash::Sha512 { digest, salt } => {
                let mut h = Sha512::new();
                h.update(salt);
                h.update(password);
                bool::from(h.finalize().as_slice().ct_eq(digest))
            }
            PasswordHash::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
        }
    }

    /// Whether checking costs enough that it must run off the async runtime.
    pub fn is_expensive(&self) -> bool {
        matches!(self, PasswordHash::Bcrypt(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn sha256_with_and_without_salt() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let salted = Sha256::digest([b"salt".as_slice(), b"pw"].concat());
        let h = PasswordHash::from_secret(&secret(json!({
            "pwd-hash": b64.encode(salted), "salt": b64.encode("salt")})))
        .unwrap();
        assert!(h.verify(b"pw"));
        assert!(!h.verify(b"pw2"));
        let plain = Sha256::digest(b"pw");
        let h = PasswordHash::from_secret(&secret(json!({"pwd-hash": b64.encode(plain),
            "hash-function": "sha-256"})))
        .unwrap();
        assert!(h.verify(b"pw"));
    }

    #[test]
    fn sha512_and_bcrypt() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let d = Sha512::digest(b"pw");
        let h = PasswordHash::from_secret(&secret(json!({"pwd-hash": b64.encode(d),
            "hash-function": "sha-512"})))
        .unwrap();
        assert!(h.verify(b"pw") && !h.verify(b"px"));
        let bc = bcrypt::hash_with_result("pw", 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoA);
        let h =
            PasswordHash::from_secret(&secret(json!({"pwd-hash": bc, "hash-function": "bcrypt"})))
                .unwrap();
        assert!(h.is_expensive());
        assert!(h.verify(b"pw") && !h.verify(b"px"));
        assert!(
            PasswordHash::from_secret(&secret(json!({"pwd-hash": "x", "hash-function": "md5"})))
                .is_none()
        );
    }
}
