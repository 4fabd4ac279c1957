//! One classification of Kafka errors for every component: retrying the same request later
//! may succeed (a broker restarts, a leader moves, a queue drains), or it cannot (the
//! credentials, the permissions, the record or the client itself are wrong). Callers retry
//! or answer "try again" (503) on the first, and log, count and answer for good on the second.

use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Temporary: the same request may succeed later.
    Retriable,
    /// Permanent for this request or this client: retrying the same thing cannot help.
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retriable => "retriable",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// Which class `e` belongs to. Errors without a Kafka code are about the client's own
/// configuration or use and fatal, except a cancelled or empty wait.
pub fn classify(e: &KafkaError) -> ErrorClass {
    match e {
        KafkaError::Canceled | KafkaError::NoMessageReceived | KafkaError::PartitionEOF(_) => {
            ErrorClass::Retriable
        }
        KafkaError::MessageConsumptionFatal(_) => ErrorClass::Fatal,
        KafkaError::Transaction(t) if t.is_fatal() => ErrorClass::Fatal,
        _ => match e.rdkafka_error_code() {
            Some(code) => classify_code(code),
            None => ErrorClass::Fatal,
        },
    }
}

/// The class of one librdkafka or Kafka protocol error code.
pub fn classify_code(code: Code) -> ErrorClass {
    match code {
        // The client is unusable (an idempotent producer lost its sequence, say).
        Code::Fatal
        | Code::Fenced
        | Code::ProducerFenced
        | Code::FencedInstanceId
        // Credentials and permissions.
        | Code::Authentication
        | Code::SaslAuthenticationFailed
        | Code::UnsupportedSASLMechanism
        | Code::IllegalSASLState
        | Code::SSL
        | Code::TopicAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::ClusterAuthorizationFailed
        | Code::TransactionalIdAuthorizationFailed
        | Code::DelegationTokenAuthorizationFailed
        // The request or the record itself.
        | Code::InvalidArgument
        | Code::InvalidMessage
        | Code::InvalidMessageSize
        | Code::MessageSizeTooLarge
        | Code::InvalidRecord
        | Code::InvalidTopic
        | Code::InvalidRequiredAcks
        | Code::InvalidConfig
        | Code::InvalidRequest
        | Code::InvalidPartitions
        | Code::InvalidReplicationFactor
        | Code::InvalidReplicaAssignment
        | Code::InvalidTimestamp
        | Code::InvalidGroupId
        | Code::PolicyViolation
        | Code::UnsupportedVersion
        | Code::UnsupportedFeature
        | Code::UnsupportedCompressionType
        | Code::UnsupportedForMessageFormat => ErrorClass::Fatal,
        // Everything else — transport failures, timeouts, full queues, leader elections,
        // coordinators moving, topics not yet known — passes.
        _ => ErrorClass::Retriable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_retriable_and_wrong_requests_fatal() {
        for code in [
            Code::QueueFull,
            Code::MessageTimedOut,
            Code::BrokerTransportFailure,
            Code::AllBrokersDown,
            Code::NotLeaderForPartition,
            Code::LeaderNotAvailable,
            Code::RequestTimedOut,
            Code::NotEnoughReplicas,
            Code::UnknownTopicOrPartition,
        ] {
            let e = KafkaError::MessageProduction(code);
            assert_eq!(classify(&e), ErrorClass::Retriable, "{code:?}");
        }
        for code in [
            Code::Fatal,
            Code::SaslAuthenticationFailed,
            Code::TopicAuthorizationFailed,
            Code::MessageSizeTooLarge,
            Code::InvalidTopic,
            Code::SSL,
        ] {
            let e = KafkaError::MessageProduction(code);
            assert_eq!(classify(&e), ErrorClass::Fatal, "{code:?}");
        }
        assert_eq!(classify(&KafkaError::Canceled), ErrorClass::Retriable);
        assert_eq!(
            classify(&KafkaError::ClientCreation("bad".into())),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify(&KafkaError::MessageConsumptionFatal(Code::Unknown)),
            ErrorClass::Fatal
        );
    }
}
