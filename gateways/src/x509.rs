//! Client certificates: the subject and issuer DNs in RFC 2253 form (as Hono compares them)
//! and the check that a certificate was signed by a tenant's trust anchor.

use x509_parser::prelude::*;
use x509_parser::x509::SubjectPublicKeyInfo;

/// What the gateway needs from a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub subject_dn: String,
    pub issuer_dn: String,
}

/// Reads the DNs of a DER certificate.
pub fn parse(der: &[u8]) -> Result<ClientCertificate, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("malformed certificate: {e}"))?;
    Ok(ClientCertificate {
        subject_dn: rfc2253(cert.subject()),
        issuer_dn: rfc2253(cert.issuer()),
    })
}

/// Whether `der` is valid now and signed by the key in `spki_der` (a trust anchor's
/// `public-key`, a DER SubjectPublicKeyInfo).
pub fn signed_by(der: &[u8], spki_der: &[u8]) -> bool {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    let Ok((_, spki)) = SubjectPublicKeyInfo::from_der(spki_der) else {
        return false;
    };
    cert.validity().is_valid() && cert.verify_signature(Some(&spki)).is_ok()
}

/// The RFC 2253 string of a name: RDNs last-to-first, `,` between them, `+` inside one.
pub fn rfc2253(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let key = match atv.attr_type().to_id_string().as_str() {
                        "2.5.4.3" => "CN".to_owned(),
                        "2.5.4.6" => "C".to_owned(),
                        "2.5.4.7" => "L".to_owned(),
                        "2.5.4.8" => "ST".to_owned(),
                        "2.5.4.9" => "STREET".to_owned(),
                        "2.5.4.10" => "O".to_owned(),
                        "2.5.4.11" => "OU".to_owned(),
                        "0.9.2342.19200300.100.1.25" => "DC".to_owned(),
                        "0.9.2342.19200300.100.1.1" => "UID".to_owned(),
                        other => other.to_owned(),
                    };
                    let value = atv.as_str().map(escape).unwrap_or_default();
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == v.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_rfc2253_specials() {
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape("#x "), "\\#x\\ ");
        assert_eq!(escape("plain"), "plain");
    }
}

#[cfg(test)]
mod der_tests {
    /// A certificate whose subject is, in DER order, CN=device-1 then O=Ferrule; `openssl x509
    /// -nameopt RFC2253` prints it as `O=Ferrule,CN=device-1`, and so must we.
    #[test]
    fn rfc2253_order_matches_openssl() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIBRTCB7KADAgECAhQtiep0eYcpSi9ePAsVppc5RxecGjAKBggqhkjOPQQDAjAf\nMQswCQYDVQQDDAJjYTEQMA4GA1UECgwHRmVycnVsZTAgFw03NTAxMDEwMDAwMDBa\nGA80MDk2MDEwMTAwMDAwMFowJTERMA8GA1UEAwwIZGV2aWNlLTExEDAOBgNVBAoM\nB0ZlcnJ1bGUwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQS/YRBI113bHifMR/m\n9zRqWtP9xO/0+8J/XTMALH0awgr3iKWtGTRl1ZsnVa9RLlHOdXwZ405vHQD7f7c2\nbVnZMAoGCCqGSM49BAMCA0gAMEUCIBnzgYS3hO1qegKznrHynraENTwgXrK7hHCn\nfrGHHoV7AiEA1/Rw2K/x08MO27RCo6F1VoQhBhItwcNUSdAWORqdPAA=\n-----END CERTIFICATE-----\n";
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let c = super::parse(&der).unwrap();
        assert_eq!(c.subject_dn, "O=Ferrule,CN=device-1");
        assert_eq!(c.issuer_dn, "O=Ferrule,CN=ca");
    }
}
