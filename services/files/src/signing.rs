//! Signed download links for backends without presigned URLs (the local filesystem): the files
//! service signs `(file id, expiry)` with HMAC-SHA256, the gateway serves
//! `/v1/files/signed/{token}` by passing the token to `DownloadSigned`, which verifies it.
//! [`UrlSigner::verify`] is public so that the gateway may refuse a bad token before calling.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{FilesError, Result};

/// Shortest key accepted.
pub const MIN_KEY_BYTES: usize = 32;
/// The gateway route a signed token is served under.
pub const SIGNED_PATH_PREFIX: &str = "/v1/files/signed/";

/// Signs and verifies download tokens with one deployment-wide key. Never logged.
#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(..)")
    }
}

/// What a valid token grants: one file until a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedDownload {
    pub file_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

impl UrlSigner {
    /// A signer with `key` (at least [`MIN_KEY_BYTES`] bytes).
    pub fn new(key: &[u8]) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!("a URL signing key needs at least {MIN_KEY_BYTES} bytes"));
        }
        Ok(Self { key: key.to_vec() })
    }

    /// The key of `files.url_signing_key` (base64), else `auth.link_signing_key`, the
    /// deployment's own secret for download links: never one derived from the service token, so
    /// a holder of that token cannot mint links. Neither set is an error naming both, since
    /// replicas with keys of their own would refuse each other's links.
    pub fn from_settings(configured: Option<&str>, link_signing_key: Option<&str>) -> Result<Self, String> {
        if let Some(encoded) = configured {
            let key = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| "files.url_signing_key: must be base64".to_owned())?;
            return Self::new(&key).map_err(|e| format!("files.url_signing_key: {e}"));
        }
        let key = link_signing_key.ok_or_else(|| {
            "auth.link_signing_key is not set: files needs it to sign download links (the same secret on every \
             files replica; `aimesh all` makes one up)"
                .to_owned()
        })?;
        // A MAC of the secret, so the key is always 32 bytes whatever its spelling.
        Self::new(&hmac_sha256(key.as_bytes(), b"aimesh files download links"))
            .map_err(|e| format!("auth.link_signing_key: {e}"))
    }

    /// A token for `file_id` valid until `expires_at` (second precision).
    pub fn sign(&self, file_id: Uuid, expires_at: DateTime<Utc>) -> String {
        let payload = payload(file_id, expires_at.timestamp());
        let mac = hmac_sha256(&self.key, &payload);
        format!("{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(mac))
    }

    /// What `token` grants, if this deployment signed it and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<SignedDownload> {
        let (payload, mac) = token.split_once('.').ok_or(FilesError::LinkInvalid)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| FilesError::LinkInvalid)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| FilesError::LinkInvalid)?;
        let expected = hmac_sha256(&self.key, &payload);
        // Constant time, so response times leak nothing of the right signature.
        if mac.len() != expected.len() || mac.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) != 0 {
            return Err(FilesError::LinkInvalid);
        }
        let (id, expiry) = payload.split_at_checked(16).ok_or(FilesError::LinkInvalid)?;
        let file_id = Uuid::from_slice(id).map_err(|_| FilesError::LinkInvalid)?;
        let seconds = i64::from_be_bytes(expiry.try_into().map_err(|_| FilesError::LinkInvalid)?);
        let expires_at = DateTime::from_timestamp(seconds, 0).ok_or(FilesError::LinkInvalid)?;
        if expires_at <= now {
            return Err(FilesError::LinkInvalid);
        }
        Ok(SignedDownload { file_id, expires_at })
    }
}

/// The gateway path serving `token`.
pub fn signed_path(token: &str) -> String {
    format!("{SIGNED_PATH_PREFIX}{token}")
}

fn payload(file_id: Uuid, expires: i64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(24);
    payload.extend_from_slice(file_id.as_bytes());
    payload.extend_from_slice(&expires.to_be_bytes());
    payload
}

/// HMAC-SHA256 (RFC 2104) over the workspace's sha2.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn tokens_verify_until_they_expire() {
        let signer = UrlSigner::new(&[7u8; 32]).expect("key");
        let file_id = Uuid::new_v4();
        let now = Utc::now();
        let token = signer.sign(file_id, now + chrono::Duration::seconds(60));
        let granted = signer.verify(&token, now).expect("valid");
        assert_eq!(granted.file_id, file_id);
        assert!(signer.verify(&token, now + chrono::Duration::seconds(61)).is_err());
        let other = UrlSigner::new(&[8u8; 32]).expect("key");
        assert!(other.verify(&token, now).is_err());
        let mut forged = token.clone();
        forged.insert(3, 'A');
        assert!(signer.verify(&forged, now).is_err());
        assert!(signer.verify("garbage", now).is_err());
        assert!(UrlSigner::new(&[1u8; 16]).is_err());
    }

    #[test]
    fn the_link_key_is_its_own_secret() {
        let error = UrlSigner::from_settings(None, None).expect_err("no key");
        assert!(error.contains("auth.link_signing_key"), "{error}");
        let secret = "k".repeat(40);
        let signer = UrlSigner::from_settings(None, Some(&secret)).expect("key");
        let token = signer.sign(Uuid::new_v4(), Utc::now() + chrono::Duration::seconds(60));
        assert!(UrlSigner::from_settings(None, Some(&secret)).expect("key").verify(&token, Utc::now()).is_ok());
        // The key of old, derived from the service token, no longer verifies anything.
        let service_token = format!("amsvc_{}", "s".repeat(40));
        let old = UrlSigner::new(&hmac_sha256(service_token.as_bytes(), b"aimesh files download links")).expect("key");
        let forged = old.sign(Uuid::new_v4(), Utc::now() + chrono::Duration::seconds(60));
        assert!(signer.verify(&forged, Utc::now()).is_err());
    }
}
