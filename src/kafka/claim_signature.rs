//! The proof that a member claim (or its withdrawal) comes from an instance
//! of the group: an HMAC-SHA256 made with the secret every instance shares,
//! the customer API's bearer token (`[http] api_token_env`).
//!
//! Why the token: it is the secret the group already shares, and the one a
//! forged claim would steal (other instances forward requests, with the
//! caller's `Authorization` header, to the URL a claim names). Whoever
//! holds the token can read every score anyway; whoever can only write to
//! the members topic cannot sign.
//!
//! What is signed is the record as it is on the topic, key included, under
//! a label that keeps a claim's signature from passing for a withdrawal's:
//!
//! - a claim: `ces-stream claim v1` NUL key NUL payload (the JSON, with its
//!   sender's time);
//! - a withdrawal (a tombstone, so that compaction still removes the key):
//!   `ces-stream withdrawal v1` NUL key NUL time, the time in a header.
//!
//! The time makes an old signed record useless to replay: a reader takes a
//! record for a key only if it is at least as new as the last one it took.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::timestamp::Millis;

/// The header that carries the signature (32 bytes).
pub const SIGNATURE_HEADER: &str = "ces-signature";
/// The header that carries a withdrawal's time (decimal milliseconds).
pub const WITHDRAWN_AT_HEADER: &str = "ces-withdrawn-at";

const CLAIM_LABEL: &[u8] = b"ces-stream claim v1";
const WITHDRAWAL_LABEL: &[u8] = b"ces-stream withdrawal v1";

/// Signs and verifies with the group's shared secret.
#[derive(Clone)]
pub struct ClaimSignature {
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for ClaimSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("ClaimSignature")
    }
}

impl ClaimSignature {
    pub fn new(secret: &[u8]) -> ClaimSignature {
        ClaimSignature {
            // HMAC takes a key of any length.
            keyed: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length"),
        }
    }

    fn mac(&self, label: &[u8], key: &str, content: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(label);
        mac.update(&[0]);
        mac.update(key.as_bytes());
        mac.update(&[0]);
        mac.update(content);
        mac
    }

    pub fn sign_claim(&self, key: &str, payload: &[u8]) -> [u8; 32] {
        self.mac(CLAIM_LABEL, key, payload)
            .finalize()
            .into_bytes()
            .into()
    }

    pub fn sign_withdrawal(&self, key: &str, at: Millis) -> [u8; 32] {
        self.mac(WITHDRAWAL_LABEL, key, at.to_string().as_bytes())
            .finalize()
            .into_bytes()
            .into()
    }

    /// In constant time, as every MAC check must be.
    pub fn verify_claim(&self, key: &str, payload: &[u8], signature: &[u8]) -> bool {
        self.mac(CLAIM_LABEL, key, payload)
            .verify_slice(signature)
            .is_ok()
    }

    pub fn verify_withdrawal(&self, key: &str, at: Millis, signature: &[u8]) -> bool {
        self.mac(WITHDRAWAL_LABEL, key, at.to_string().as_bytes())
            .verify_slice(signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_only_for_its_record_and_its_secret() {
        let group = ClaimSignature::new(b"the group's token");
        let payload = br#"{"url":"http://a:9464","partitions":[1],"at":5}"#;
        let signature = group.sign_claim("http://a:9464", payload);
        assert!(group.verify_claim("http://a:9464", payload, &signature));
        // Another key, payload, secret, or a truncated signature: refused.
        assert!(!group.verify_claim("http://b:9464", payload, &signature));
        let mut changed = payload.to_vec();
        changed[40] = b'2';
        assert!(!group.verify_claim("http://a:9464", &changed, &signature));
        let outsider = ClaimSignature::new(b"a guess");
        assert!(!outsider.verify_claim("http://a:9464", payload, &signature));
        assert!(!group.verify_claim("http://a:9464", payload, &signature[..16]));
        assert!(!group.verify_claim("http://a:9464", payload, &[]));
    }

    #[test]
    fn a_claim_signature_is_no_withdrawal_signature() {
        let group = ClaimSignature::new(b"token");
        let withdrawal = group.sign_withdrawal("http://a", 1_000);
        assert!(group.verify_withdrawal("http://a", 1_000, &withdrawal));
        assert!(!group.verify_withdrawal("http://a", 1_001, &withdrawal));
        assert!(!group.verify_claim("http://a", b"1000", &withdrawal));
        let claim = group.sign_claim("http://a", b"1000");
        assert!(!group.verify_withdrawal("http://a", 1_000, &claim));
    }
}
