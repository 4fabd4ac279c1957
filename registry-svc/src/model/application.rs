//! Application credentials: a business application scoped to one tenant, signing in to the
//! AMQP bridge as `<app-id>@<tenant>`. Its secrets follow the rules of device
//! `hashed-password` credentials (server-side hashing of `pwd-plain`, the bcrypt cost cap,
//! secret ids kept on update), so the same code prepares and shows them.

use super::credentials::{self, CredentialRules, Credentials, HASHED_PASSWORD};
use super::{Invalid, JsonObject, check_auth_id, default_true};
use serde::{Deserialize, Serialize};

/// An application document as the management API takes and gives it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Application {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub secrets: Vec<JsonObject>,
}

impl Application {
    /// Parses the body of `PUT /v1/applications/{tenant}/{app}`.
    pub fn parse(body: &[u8]) -> Result<Application, Invalid> {
        let app: Application = super::from_json("application", body)?;
        if app.secrets.is_empty() {
            return Err(Invalid::new("an application needs at least one secret"));
        }
        Ok(app)
    }
}

fn as_credentials(app_id: &str, app: Application) -> Credentials {
    Credentials {
        cred_type: HASHED_PASSWORD.into(),
        auth_id: app_id.into(),
        enabled: app.enabled,
        ext: None,
        secrets: app.secrets,
    }
}

/// The stored form of `requested`, given what is stored now (patch mode for secret ids).
/// Slow when it hashes: call it off the async runtime.
pub fn prepare(
    app_id: &str,
    requested: Application,
    existing: Option<Application>,
    rules: CredentialRules,
) -> Result<Application, Invalid> {
    check_auth_id(app_id)?;
    let existing: Vec<Credentials> = existing
        .map(|e| as_credentials(app_id, e))
        .into_iter()
        .collect();
    let prepared = credentials::prepare(vec![as_credentials(app_id, requested)], &existing, rules)?;
    let c = prepared
        .into_iter()
        .next()
        .ok_or_else(|| Invalid::new("no secrets"))?;
    Ok(Application {
        enabled: c.enabled,
        secrets: c.secrets,
    })
}

/// What the API shows: no hash, salt or plain password ever.
pub fn public_view(app_id: &str, stored: Application) -> Application {
    let shown = credentials::public_view(&[as_credentials(app_id, stored)]);
    let c = shown.into_iter().next();
    Application {
        enabled: c.as_ref().is_none_or(|c| c.enabled),
        secrets: c.map(|c| c.secrets).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CredentialRules {
        CredentialRules {
            max_bcrypt_cost: 10,
            plain_password_cost: 4,
        }
    }

    #[test]
    fn plain_passwords_are_hashed_and_never_shown() {
        let app = Application::parse(br#"{"secrets": [{"pwd-plain": "s3cret"}]}"#).unwrap();
        let stored = prepare("app", app, None, rules()).unwrap();
        let secret = &stored.secrets[0];
        assert!(secret.get("pwd-plain").is_none());
        assert!(secret["pwd-hash"].as_str().unwrap().starts_with("$2"));
        let shown = public_view("app", stored);
        assert!(shown.enabled);
        assert!(shown.secrets[0].get("pwd-hash").is_none());
        assert_eq!(shown.secrets[0]["hash-function"], "bcrypt");
    }

    #[test]
    fn bad_documents_are_refused() {
        assert!(Application::parse(b"{}").is_err(), "no secret");
        assert!(Application::parse(br#"{"secrets": [], "x": 1}"#).is_err());
        let app = Application::parse(br#"{"secrets": [{"pwd-plain": "x"}]}"#).unwrap();
        assert!(
            prepare("a@b", app, None, rules()).is_err(),
            "auth-id pattern"
        );
    }
}
