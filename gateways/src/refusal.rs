//! Why the ingest pipeline did not take a message, a subscription or a command response, and
//! the one table that turns each reason into every protocol's answer.
//!
//! The pipeline decides; a protocol module only looks its reason up here. Sources of the codes:
//! Hono's HTTP status table (its HTTP adapter guide), its CONNACK table and MQTT error policy
//! (MQTT adapter guide) and its CoAP response codes (CoAP adapter guide); MQTT 5's reason codes
//! (OASIS MQTT 5.0 §2.4).

use crate::mqtt::codec::{CloseReason, ConnectOutcome, SubAckFailure};
use std::borrow::Cow;

/// Why something was refused or could not be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The request itself is wrong: its address, a header or option, the content type, QoS 0
    /// for an event, a command response to an unknown request or with an invalid status.
    Malformed,
    /// No credentials where they are needed, or credentials that do not check out.
    Unauthenticated,
    /// The tenant is disabled.
    TenantDisabled,
    /// The protocol adapter is disabled for the tenant.
    AdapterDisabled,
    /// A gateway named a device of another tenant, or a connection mixed tenants.
    OtherTenant,
    /// The acting gateway is unknown, disabled, or not in the device's `via` / `viaGroups`.
    GatewayNotAuthorised,
    /// The tenant does not exist.
    TenantNotFound,
    /// The device is unknown or disabled.
    DeviceNotFound,
    /// The payload is larger than `max_payload_size`.
    PayloadTooLarge,
    /// The payload does not fit the Avro schema registered for its topic (docs/analytics.md).
    PayloadNotConforming,
    /// The device registry could not be asked.
    RegistryUnavailable,
    /// Kafka did not take or acknowledge the record.
    DownstreamUnavailable,
    /// No application waits for this command response any more, or commands are not enabled.
    NoConsumer,
    /// The adapter has as much in hand as it takes (requests in flight).
    Overloaded,
}

/// What each protocol answers for a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codes {
    /// HTTP status (also the `code` of an MQTT error message).
    pub http: u16,
    /// CoAP response code, class and detail (4.03 is `(4, 3)`).
    pub coap: (u8, u8),
    /// The CONNACK of a refused CONNECT (its 3.1.1 and 5.0 codes follow from it).
    pub connack: ConnectOutcome,
    /// The MQTT 5 DISCONNECT reason when a connection is closed for it.
    pub disconnect: CloseReason,
    /// A refused subscription's SUBACK code (MQTT 5; 3.1.1 answers 0x80 for each, as Hono).
    pub suback: SubAckFailure,
    /// Whether the MQTT adapter closes the connection whatever `on-error` asks (Hono's
    /// terminal errors: not allowed, too large).
    pub terminal: bool,
    /// Hono's `hono.connections.attempts` outcome for a refused connection.
    pub attempt: &'static str,
    /// The `reason` label of `ferrule_gateway_rejected_total`.
    pub label: &'static str,
}

impl Reason {
    /// The one table.
    pub const fn codes(self) -> Codes {
        use CloseReason as D;
        use ConnectOutcome as C;
        let (http, coap, connack, disconnect, terminal, attempt, label) = match self {
            Reason::Malformed => (
                400,
                (4, 0),
                C::NotAuthorized,
                D::ImplementationSpecific,
                false,
                "unknown",
                "bad-request",
            ),
            Reason::Unauthenticated => (
                401,
                (4, 1),
                C::BadCredentials,
                D::NotAuthorized,
                true,
                "unauthorized",
                "unauthorized",
            ),
            Reason::TenantDisabled => (
                403,
                (4, 3),
                C::NotAuthorized,
                D::NotAuthorized,
                true,
                "unknown",
                "tenant-disabled",
            ),
            Reason::AdapterDisabled => (
                403,
                (4, 3),
                C::NotAuthorized,
                D::NotAuthorized,
                true,
                "adapter-disabled",
                "adapter-disabled",
            ),
            Reason::OtherTenant => (
                403,
                (4, 3),
                C::NotAuthorized,
                D::NotAuthorized,
                true,
                "unknown",
                "other-tenant",
            ),
            Reason::GatewayNotAuthorised => (
                403,
                (4, 3),
                C::NotAuthorized,
                D::NotAuthorized,
                true,
                "unknown",
                "gateway-not-authorised",
            ),
            Reason::TenantNotFound => (
                404,
                (4, 4),
                C::NotAuthorized,
                D::NotAuthorized,
                true,
                "unknown",
                "tenant-not-found",
            ),
            Reason::DeviceNotFound => (
                404,
                (4, 4),
                C::NotAuthorized,
                D::NotAuthorized,
                true,
                "unknown",
                "device-not-found",
            ),
            Reason::PayloadTooLarge => (
                413,
                (4, 13),
                C::NotAuthorized,
                D::PacketTooLarge,
                true,
                "unknown",
                "payload-too-large",
            ),
            Reason::PayloadNotConforming => (
                400,
                (4, 0),
                C::NotAuthorized,
                D::PayloadFormatInvalid,
                false,
                "unknown",
                "payload-not-conforming",
            ),
            Reason::RegistryUnavailable => (
                503,
                (5, 3),
                C::ServerUnavailable,
                D::ServerBusy,
                false,
                "unavailable",
                "registry-unavailable",
            ),
            Reason::DownstreamUnavailable => (
                503,
                (5, 3),
                C::ServerUnavailable,
                D::ServerBusy,
                false,
                "unavailable",
                "downstream-unavailable",
            ),
            Reason::NoConsumer => (
                503,
                (5, 3),
                C::ServerUnavailable,
                D::ServerBusy,
                false,
                "unavailable",
                "no-consumer",
            ),
            Reason::Overloaded => (
                503,
                (5, 3),
                C::ServerUnavailable,
                D::ServerBusy,
                false,
                "unavailable",
                "overloaded",
            ),
        };
        use SubAckFailure as S;
        let suback = match self {
            // Never a subscription's refusal in fact; a bad request like any other.
            Reason::Malformed | Reason::PayloadNotConforming => S::TopicFilterInvalid,
            Reason::Unauthenticated
            | Reason::TenantDisabled
            | Reason::AdapterDisabled
            | Reason::OtherTenant
            | Reason::GatewayNotAuthorised
            | Reason::TenantNotFound
            | Reason::DeviceNotFound => S::NotAuthorized,
            Reason::PayloadTooLarge => S::ImplementationSpecific,
            Reason::RegistryUnavailable
            | Reason::DownstreamUnavailable
            | Reason::NoConsumer
            | Reason::Overloaded => S::Unspecified,
        };
        Codes {
            http,
            coap,
            connack,
            disconnect,
            suback,
            terminal,
            attempt,
            label,
        }
    }

    /// Every reason, for tests and documentation.
    pub const ALL: [Reason; 14] = [
        Reason::Malformed,
        Reason::Unauthenticated,
        Reason::TenantDisabled,
        Reason::AdapterDisabled,
        Reason::OtherTenant,
        Reason::GatewayNotAuthorised,
        Reason::TenantNotFound,
        Reason::DeviceNotFound,
        Reason::PayloadTooLarge,
        Reason::PayloadNotConforming,
        Reason::RegistryUnavailable,
        Reason::DownstreamUnavailable,
        Reason::NoConsumer,
        Reason::Overloaded,
    ];
}

/// A refusal: the typed reason, and words for the device (the HTTP body, the MQTT error
/// message, the CoAP diagnostic payload).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Refusal {
    pub reason: Reason,
    detail: Cow<'static, str>,
}

impl Refusal {
    pub fn new(reason: Reason, detail: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            reason,
            detail: detail.into(),
        }
    }

    pub fn malformed(detail: impl Into<Cow<'static, str>>) -> Self {
        Refusal::new(Reason::Malformed, detail)
    }

    pub fn unauthenticated(detail: impl Into<Cow<'static, str>>) -> Self {
        Refusal::new(Reason::Unauthenticated, detail)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Refusal::new(
            Reason::PayloadTooLarge,
            format!("payload larger than {limit} bytes"),
        )
    }

    /// The adapter has as much in hand as it takes (its bound on requests in flight).
    pub fn overloaded(detail: &'static str) -> Self {
        Refusal::new(Reason::Overloaded, detail)
    }

    /// Whether the payload was larger than the adapter takes.
    pub fn is_too_large(&self) -> bool {
        self.reason == Reason::PayloadTooLarge
    }

    pub fn downstream(e: impl std::fmt::Display) -> Self {
        Refusal::new(
            Reason::DownstreamUnavailable,
            format!("downstream unavailable: {e}"),
        )
    }

    pub fn codes(&self) -> Codes {
        self.reason.codes()
    }

    /// The HTTP status for this refusal (HTTP answers, MQTT error messages).
    pub fn status(&self) -> u16 {
        self.reason.codes().http
    }

    /// The metric label.
    pub fn label(&self) -> &'static str {
        self.reason.codes().label
    }

    /// Whether Kafka or the registry failed rather than the request.
    pub fn is_unavailable(&self) -> bool {
        self.status() == 503
    }
}

impl From<ferrule_registry::AuthError> for Refusal {
    fn from(e: ferrule_registry::AuthError) -> Self {
        use ferrule_registry::AuthError as A;
        let reason = match &e {
            A::Unavailable(_) => Reason::RegistryUnavailable,
            A::TenantDisabled => Reason::TenantDisabled,
            A::DeviceDisabled => Reason::DeviceNotFound,
            A::MalformedUsername | A::UnknownTenant | A::BadCredentials => Reason::Unauthenticated,
        };
        Refusal::new(reason, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hono's codes (its HTTP, MQTT and CoAP adapter guides): every reason answers alike in each protocol.
    #[test]
    fn each_reason_maps_to_hono_codes_in_every_protocol() {
        for r in Reason::ALL {
            let c = r.codes();
            let coap = u16::from(c.coap.0) * 100 + u16::from(c.coap.1);
            assert_eq!(coap, c.http, "{r:?}: CoAP and HTTP tell the same");
            match c.http {
                401 => assert_eq!(c.connack, ConnectOutcome::BadCredentials, "{r:?}"),
                503 => assert_eq!(c.connack, ConnectOutcome::ServerUnavailable, "{r:?}"),
                _ => assert_eq!(c.connack, ConnectOutcome::NotAuthorized, "{r:?}"),
            }
            // Not allowed or too large closes an MQTT connection; a bad request or an outage
            // follows the device's `on-error`.
            assert_eq!(c.terminal, matches!(c.http, 401 | 403 | 404 | 413), "{r:?}");
            // A refused subscription: not allowed (or nothing to subscribe to) says so in an
            // MQTT 5 SUBACK; an outage says nothing more than 0x80.
            let suback = match c.http {
                400 => SubAckFailure::TopicFilterInvalid,
                401 | 403 | 404 => SubAckFailure::NotAuthorized,
                503 => SubAckFailure::Unspecified,
                _ => SubAckFailure::ImplementationSpecific,
            };
            assert_eq!(c.suback, suback, "{r:?}");
        }
        let labels: std::collections::HashSet<_> =
            Reason::ALL.iter().map(|r| r.codes().label).collect();
        assert_eq!(
            labels.len(),
            Reason::ALL.len(),
            "one metric label per reason"
        );
        assert_eq!(Reason::AdapterDisabled.codes().attempt, "adapter-disabled");
    }

    /// Each reason's row, written out from Hono's tables (its HTTP, MQTT and CoAP adapter
    /// guides): a wrong mapping fails here, not only an inconsistent one.
    #[test]
    fn the_table_says_what_hono_says() {
        use ConnectOutcome as C;
        let rows = [
            (Reason::Malformed, 400, (4, 0), C::NotAuthorized),
            (Reason::Unauthenticated, 401, (4, 1), C::BadCredentials),
            (Reason::TenantDisabled, 403, (4, 3), C::NotAuthorized),
            (Reason::AdapterDisabled, 403, (4, 3), C::NotAuthorized),
            (Reason::OtherTenant, 403, (4, 3), C::NotAuthorized),
            (Reason::GatewayNotAuthorised, 403, (4, 3), C::NotAuthorized),
            (Reason::TenantNotFound, 404, (4, 4), C::NotAuthorized),
            (Reason::DeviceNotFound, 404, (4, 4), C::NotAuthorized),
            (Reason::PayloadTooLarge, 413, (4, 13), C::NotAuthorized),
            // Ferrule's own (docs/analytics.md): a bad request in every protocol.
            (Reason::PayloadNotConforming, 400, (4, 0), C::NotAuthorized),
            (
                Reason::RegistryUnavailable,
                503,
                (5, 3),
                C::ServerUnavailable,
            ),
            (
                Reason::DownstreamUnavailable,
                503,
                (5, 3),
                C::ServerUnavailable,
            ),
            (Reason::NoConsumer, 503, (5, 3), C::ServerUnavailable),
            (Reason::Overloaded, 503, (5, 3), C::ServerUnavailable),
        ];
        assert_eq!(rows.len(), Reason::ALL.len());
        for (reason, http, coap, connack) in rows {
            let c = reason.codes();
            assert_eq!(
                (c.http, c.coap, c.connack),
                (http, coap, connack),
                "{reason:?}"
            );
        }
        assert_eq!(
            Reason::PayloadTooLarge.codes().disconnect,
            CloseReason::PacketTooLarge
        );
        let schema = Reason::PayloadNotConforming.codes();
        assert_eq!(schema.disconnect, CloseReason::PayloadFormatInvalid);
        assert_eq!(schema.disconnect.code(), 0x99);
        assert!(!schema.terminal, "the MQTT error policy decides");
        assert_eq!(Reason::Unauthenticated.codes().attempt, "unauthorized");
        assert_eq!(Reason::RegistryUnavailable.codes().attempt, "unavailable");
    }

    #[test]
    fn registry_failures_keep_their_kind() {
        use ferrule_registry::AuthError as A;
        assert_eq!(
            Refusal::from(A::BadCredentials).reason,
            Reason::Unauthenticated
        );
        assert_eq!(Refusal::from(A::TenantDisabled).status(), 403);
        assert_eq!(Refusal::from(A::DeviceDisabled).status(), 404);
        assert_eq!(Refusal::from(A::Unavailable("down".into())).status(), 503);
    }
}
