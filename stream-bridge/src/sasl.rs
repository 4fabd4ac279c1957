//! SASL PLAIN for applications: `<app-id>@<tenant>` and a password checked against the
//! registry's application credentials. The acceptor is made per TCP connection and keeps the
//! identity it verified, since the connection does not expose it afterwards.

use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use ferrule_registry::{AuthenticatedApplication, DeviceAuthenticator};
use std::sync::{Arc, OnceLock};

#[derive(Clone)]
pub(crate) struct ApplicationSasl {
    registry: DeviceAuthenticator,
    /// Set once the application's password was verified.
    pub identity: Arc<OnceLock<AuthenticatedApplication>>,
}

impl ApplicationSasl {
    pub fn new(registry: DeviceAuthenticator) -> Self {
        ApplicationSasl {
            registry,
            identity: Arc::default(),
        }
    }
}

/// Splits a PLAIN initial response `[authzid] NUL authcid NUL passwd`.
pub(crate) fn parse_plain(response: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let password = parts.next()?;
    if parts.next().is_some() || user.is_empty() {
        return None;
    }
    Some((user.to_owned(), password.to_vec()))
}

impl SaslAcceptor for ApplicationSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let credentials = (init.mechanism.as_str() == "PLAIN")
            .then(|| {
                init.initial_response
                    .as_ref()
                    .and_then(|r| parse_plain(r.as_slice()))
            })
            .flatten();
        let code = match credentials {
            None => {
                crate::metrics::refused("bad-sasl-init");
                SaslCode::Auth
            }
            Some((user, password)) => {
                // The acceptor's callback is synchronous; the check needs PostgreSQL and maybe
                // bcrypt, so it runs on this worker with the runtime told it may block.
                let registry = self.registry.clone();
                let verified = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current()
                        .block_on(registry.verify_application(&user, &password))
                });
                match verified {
                    Ok(app) => {
                        let _ = self.identity.set(app);
                        SaslCode::Ok
                    }
                    Err(e) => {
                        crate::metrics::refused("unauthorized");
                        tracing::debug!(user, error = %e, "application sign-in refused");
                        match e {
                            ferrule_registry::AuthError::Unavailable(_) => SaslCode::SysTemp,
                            _ => SaslCode::Auth,
                        }
                    }
                }
            }
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Sys,
            additional_data: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_responses() {
        assert_eq!(
            parse_plain(b"\0app@t1\0pw"),
            Some(("app@t1".into(), b"pw".to_vec()))
        );
        assert_eq!(
            parse_plain(b"authz\0app@t1\0p\xffw"),
            Some(("app@t1".into(), b"p\xffw".to_vec()))
        );
        assert_eq!(parse_plain(b"app@t1"), None);
        assert_eq!(parse_plain(b"\0\0pw"), None);
        assert_eq!(parse_plain(b"\0a\0b\0c"), None);
    }
}
