//! Command outcomes (Hono's AMQP APIs): an AMQP application learns a command's fate from the disposition
//! of its transfer, but only the router (no route, unknown device) or the gateway (sent,
//! PUBACKed, not acknowledged in time, device gone) knows it. The bridge names a topic of its
//! own and an id on each command it writes; whoever learns the fate writes one outcome record
//! there. Commands written to Kafka directly carry no route and keep Hono's Kafka behaviour
//! (delivery-failure responses).

use crate::headers as h;
use crate::topic::TopicNames;

/// Header naming the topic the outcome goes to.
pub const OUTCOME_TO: &str = "ferrule-outcome-to";
/// Header carrying the bridge's id for the command; copied into the outcome record.
pub const OUTCOME_ID: &str = "ferrule-outcome-id";
/// Every outcome topic starts with this (after the operator's `kafka.topic_prefix`), so a
/// command cannot make a gateway write elsewhere.
pub const OUTCOME_TOPIC_PREFIX: &str = "ferrule.command_outcome.";

/// Status of an outcome record for a command that reached its device.
pub const DELIVERED: u16 = 200;

/// Where the outcome of one command is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRoute {
    pub topic: String,
    pub id: String,
}

impl OutcomeRoute {
    /// The route a command's headers name; `None` without one, or when the topic is not an
    /// outcome topic of this deployment ([`TopicNames::outcome`]).
    pub fn from_headers<'a, I>(names: &TopicNames, headers: I) -> Option<Self>
    where
        I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)> + Clone,
    {
        let text = |name| h::first(headers.clone(), name).and_then(h::decode_str);
        let topic = text(OUTCOME_TO)?;
        names.outcome_instance(topic)?;
        if !crate::topic::is_legal_kafka_name(topic) {
            return None;
        }
        let id = text(OUTCOME_ID).filter(|id| !id.is_empty())?;
        Some(OutcomeRoute {
            topic: topic.to_owned(),
            id: id.to_owned(),
        })
    }

    /// The headers a command carries to ask for its outcome.
    pub fn command_headers(&self) -> [(&'static str, &str); 2] {
        [(OUTCOME_TO, &self.topic), (OUTCOME_ID, &self.id)]
    }

    /// The headers of the outcome record; its payload is the reason, its key the id.
    pub fn outcome_headers(&self, status: u16) -> [(&'static str, Vec<u8>); 2] {
        [
            (OUTCOME_ID, self.id.as_bytes().to_vec()),
            (h::STATUS, h::encode_i64(i64::from(status))),
        ]
    }
}

/// How an application's command transfer is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The command reached the device (sent, or acknowledged where the protocol acknowledges).
    Accepted,
    /// Not the application's fault: device not connected, no acknowledgement in time,
    /// forwarding failed. It may try again.
    Released,
    /// The application's fault (unknown device, malformed command): trying again will not help.
    Rejected,
}

impl Disposition {
    /// 2xx accepted, 4xx rejected, anything else released.
    pub fn for_status(status: u16) -> Self {
        match status {
            200..=299 => Disposition::Accepted,
            400..=499 => Disposition::Rejected,
            _ => Disposition::Released,
        }
    }
}

/// The id and status of an outcome record.
pub fn parse_outcome<'a, I>(headers: I) -> Option<(&'a str, u16)>
where
    I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)> + Clone,
{
    let id = h::first(headers.clone(), OUTCOME_ID).and_then(h::decode_str)?;
    let status = h::first(headers, h::STATUS)
        .and_then(h::decode_i64)
        .and_then(|s| u16::try_from(s).ok())?;
    Some((id, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn borrowed<'a>(hs: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, Option<&'a [u8]>)> {
        hs.iter().map(|(k, v)| (*k, Some(v.as_slice()))).collect()
    }

    #[test]
    fn a_route_survives_the_command_headers_and_comes_back_in_the_outcome() {
        let route = OutcomeRoute {
            topic: TopicNames::default().outcome("b1"),
            id: "42".into(),
        };
        let on_command: Vec<(&'static str, Vec<u8>)> = route
            .command_headers()
            .iter()
            .map(|(k, v)| (*k, v.as_bytes().to_vec()))
            .chain([(h::DEVICE_ID, b"dev".to_vec())])
            .collect();
        assert_eq!(
            OutcomeRoute::from_headers(&TopicNames::default(), borrowed(&on_command)),
            Some(route.clone())
        );
        let outcome = route.outcome_headers(503);
        assert_eq!(parse_outcome(borrowed(&outcome)), Some(("42", 503)));
    }

    #[test]
    fn only_outcome_topics_are_routes() {
        for (to, id) in [
            ("hono.command_response.t1", "1"),
            ("ferrule.command_outcome.", "1"),
            ("ferrule.command_outcome.b/1", "1"),
            ("ferrule.command_outcome.b1", ""),
        ] {
            let hs = [
                (OUTCOME_TO, to.as_bytes().to_vec()),
                (OUTCOME_ID, id.into()),
            ];
            assert_eq!(
                OutcomeRoute::from_headers(&TopicNames::default(), borrowed(&hs)),
                None,
                "{to} {id}"
            );
        }
        assert_eq!(
            OutcomeRoute::from_headers(&TopicNames::default(), borrowed(&[])),
            None
        );
        // Another deployment's outcome topic is not one of this deployment's.
        let prod = TopicNames::new("prod.").unwrap();
        let hs = [
            (OUTCOME_TO, b"ferrule.command_outcome.b1".to_vec()),
            (OUTCOME_ID, b"1".to_vec()),
        ];
        assert_eq!(OutcomeRoute::from_headers(&prod, borrowed(&hs)), None);
    }

    #[test]
    fn statuses_map_to_dispositions() {
        assert_eq!(Disposition::for_status(200), Disposition::Accepted);
        assert_eq!(Disposition::for_status(204), Disposition::Accepted);
        assert_eq!(Disposition::for_status(404), Disposition::Rejected);
        assert_eq!(Disposition::for_status(400), Disposition::Rejected);
        assert_eq!(Disposition::for_status(503), Disposition::Released);
        assert_eq!(Disposition::for_status(500), Disposition::Released);
    }
}
