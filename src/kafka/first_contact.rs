//! The first contact with the cluster, at start: either the brokers answer,
//! or the service stops at once with what is wrong.
//!
//! librdkafka retries every failed connection for ever and reports the
//! failures only to an error callback; a metadata request simply times
//! out. A wrong password or an untrusted broker certificate would then
//! look like an unreachable cluster, after the whole timeout. So the
//! clients' contexts note the errors that a retry cannot cure, and the
//! start-up asks for metadata in short steps, looking at them between
//! steps: authentication refused (SASL) or the TLS handshake failed
//! (certificate not trusted, wrong host name). After the start, the same
//! errors are only logged: a broker restarted with a new certificate or a
//! rotated password is for an operator to fix while the service retries.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::error::PipelineError;

/// How long the start-up waits for a first answer from the brokers.
pub const FIRST_CONTACT: Duration = Duration::from_secs(30);
/// How often it looks at the errors noted while it waits.
const STEP: Duration = Duration::from_millis(500);

/// The first error of a client that a retry cannot cure, if any.
#[derive(Debug, Default)]
pub struct Refusal(Mutex<Option<String>>);

impl Refusal {
    /// Notes `error` if it is a refusal; returns whether it was.
    pub fn note(&self, error: &KafkaError, reason: &str) -> bool {
        let Some(hint) = error.rdkafka_error_code().and_then(hint) else {
            return false;
        };
        let mut first = self.0.lock();
        if first.is_none() {
            *first = Some(format!("{reason} ({hint})"));
        }
        true
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().clone()
    }
}

/// What to check for an error that a retry cannot cure; `None` for the
/// others.
fn hint(code: RDKafkaErrorCode) -> Option<&'static str> {
    match code {
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => Some(
            "the brokers refused the credentials: check sasl.mechanisms, sasl.username and sasl.password in [kafka.options]",
        ),
        RDKafkaErrorCode::SSL => Some(
            "the TLS connection failed: check ssl.ca.location (the CA that signed the brokers' certificates) and that their certificates name the hosts in kafka.brokers",
        ),
        _ => None,
    }
}

/// The context of a client used only to ask for metadata: it notes
/// refusals and logs the rest.
#[derive(Default)]
pub struct RefusalContext {
    pub refusal: Refusal,
}

impl ClientContext for RefusalContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.refusal.note(&error, reason);
        tracing::warn!("metadata client: {error}: {reason}");
    }
}

impl ConsumerContext for RefusalContext {}

/// Waits until `client` gets an answer from the brokers; fails at once
/// when `refusal` notes one, or after [`FIRST_CONTACT`]. `serve_events`
/// runs between steps: a consumer's errors reach it only through its poll
/// (a producer's, with librdkafka's whole text, through its context).
pub fn wait_for_brokers<C: ClientContext>(
    client: &Client<C>,
    refusal: &Refusal,
    serve_events: impl Fn(),
    brokers: &str,
    which: &'static str,
) -> Result<(), PipelineError> {
    let deadline = Instant::now() + FIRST_CONTACT;
    loop {
        let error = match client.fetch_metadata(None, STEP) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        serve_events();
        if let Some(reason) = refusal.get() {
            return Err(PipelineError::Refused {
                brokers: brokers.to_string(),
                client: which,
                reason,
            });
        }
        if Instant::now() >= deadline {
            return Err(PipelineError::Unreachable {
                brokers: brokers.to_string(),
                source: error,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_a_retry_cannot_cure_are_refusals() {
        let refusal = Refusal::default();
        assert!(!refusal.note(
            &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "connection refused"
        ));
        assert!(!refusal.note(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "all down"
        ));
        assert_eq!(refusal.get(), None);
        assert!(refusal.note(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error: invalid credentials"
        ));
        assert!(refusal.note(
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "certificate verify failed"
        ));
        let first = refusal.get().unwrap();
        assert!(
            first.starts_with("SASL authentication error") && first.contains("sasl.password"),
            "the first one, with what to check: {first}"
        );
    }
}
