//! Hono's well-known content types and the rules that tie a content type to an (empty) body.

/// An empty event that only tells reachability (`ttd`).
pub const EMPTY_NOTIFICATION: &str = "application/vnd.eclipse-hono-empty-notification";
/// A device connected or disconnected.
pub const CONNECTION_NOTIFICATION: &str = "application/vnd.eclipse-hono-dc-notification+json";
/// A device was auto-provisioned.
pub const PROVISIONING_NOTIFICATION: &str =
    "application/vnd.eclipse-hono-device-provisioning-notification";
/// A command response that Ferrule, not the device, produced.
pub const DELIVERY_FAILURE_NOTIFICATION: &str =
    "application/vnd.eclipse-hono-delivery-failure-notification+json";
/// A command acknowledgement (Pub/Sub style commands only).
pub const DELIVERY_SUCCESS_NOTIFICATION: &str =
    "application/vnd.eclipse-hono-delivery-success-notification+json";
/// Opaque bytes: the type given to a non-empty payload that names none.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The content type a message ends up with, after Hono's rules were applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentType(pub String);

/// Why a (content type, body) pair cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentTypeError {
    #[error("an empty payload needs a content type")]
    EmptyWithoutContentType,
    #[error("an empty notification must not carry a payload")]
    NotificationWithPayload,
}

impl ContentType {
    /// Applies Hono's upload rules: an empty body needs a type, an empty notification needs an
    /// empty body, and a non-empty body without a type becomes `application/octet-stream`.
    pub fn for_upload(given: Option<&str>, payload_len: usize) -> Result<Self, ContentTypeError> {
        let given = given.map(str::trim).filter(|s| !s.is_empty());
        match (given, payload_len) {
            (None, 0) => Err(ContentTypeError::EmptyWithoutContentType),
            (None, _) => Ok(ContentType(OCTET_STREAM.to_owned())),
            (Some(ct), n) if n > 0 && is_empty_notification(ct) => {
                Err(ContentTypeError::NotificationWithPayload)
            }
            (Some(ct), _) => Ok(ContentType(ct.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `ct` (parameters ignored, case-insensitive) is the empty-notification type.
pub fn is_empty_notification(ct: &str) -> bool {
    ct.split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(EMPTY_NOTIFICATION))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_rules() {
        assert_eq!(
            ContentType::for_upload(None, 0),
            Err(ContentTypeError::EmptyWithoutContentType)
        );
        assert_eq!(
            ContentType::for_upload(Some("  "), 0),
            Err(ContentTypeError::EmptyWithoutContentType)
        );
        assert_eq!(
            ContentType::for_upload(None, 3).unwrap().as_str(),
            OCTET_STREAM
        );
        assert_eq!(
            ContentType::for_upload(Some("text/plain"), 0)
                .unwrap()
                .as_str(),
            "text/plain"
        );
        assert_eq!(
            ContentType::for_upload(Some(EMPTY_NOTIFICATION), 0)
                .unwrap()
                .as_str(),
            EMPTY_NOTIFICATION
        );
        assert_eq!(
            ContentType::for_upload(Some(EMPTY_NOTIFICATION), 1),
            Err(ContentTypeError::NotificationWithPayload)
        );
        assert_eq!(
            ContentType::for_upload(
                Some("Application/Vnd.Eclipse-Hono-Empty-Notification; charset=utf-8"),
                2
            ),
            Err(ContentTypeError::NotificationWithPayload)
        );
    }
}
