//! Domain types and rules of identity: roles, validation of what people type, passwords,
//! issued secrets, encrypted settings.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;

use aimesh_kit::auth::ProjectRole;
use aimesh_kit::auth::{ACCESS_TOKEN_PREFIX, API_KEY_PREFIX, REFRESH_TOKEN_PREFIX, SCOPES, credential_hash};
use aimesh_kit::wire::fields;

use crate::error::{IdentityError, Result};

/// A role as the database spells it; anything else is a bug, not the caller's fault.
pub fn role_from_db(value: &str) -> Result<ProjectRole> {
    ProjectRole::parse(value)
        .ok_or_else(|| aimesh_kit::ServiceError::internal(format!("unknown project role {value:?} in database")).into())
}

/// The role a request names; unspecified is an error naming `field`.
pub fn role_field(value: i32, field: &'static str) -> Result<ProjectRole> {
    ProjectRole::from_proto(value)
        .ok_or_else(|| IdentityError::invalid(field, "must be viewer, member, admin or owner"))
}

/// An email address, trimmed; compared case-insensitively by the store.
pub fn validate_email(value: &str) -> Result<String> {
    let email = value.trim();
    let invalid = || IdentityError::invalid("email", "is not a valid email address");
    if email.is_empty() {
        return Err(IdentityError::invalid("email", "is required"));
    }
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    if local.is_empty() || local.len() > 64 || local.contains('@') || !domain_ok {
        return Err(invalid());
    }
    Ok(email.to_owned())
}

/// 3 to 32 letters, digits, `_`, `.` or `-`, starting with a letter or digit.
pub fn validate_username(value: &str) -> Result<String> {
    let name = value.trim();
    if name.is_empty() {
        return Err(IdentityError::invalid("username", "is required"));
    }
    if !(3..=32).contains(&name.chars().count()) {
        return Err(IdentityError::invalid("username", "must be 3 to 32 characters long"));
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(IdentityError::invalid(
            "username",
            "may hold only letters, digits, '_', '.' and '-', and must start with a letter or digit",
        ));
    }
    Ok(name.to_owned())
}

/// Passwords: 10 to 256 characters; anything else is allowed (NIST SP 800-63B).
pub fn validate_password(field: &'static str, value: &str) -> Result<()> {
    let length = value.chars().count();
    if length < 10 {
        return Err(IdentityError::invalid(field, "must be at least 10 characters long"));
    }
    if length > 256 {
        return Err(IdentityError::invalid(field, "must be at most 256 characters long"));
    }
    Ok(())
}

/// An http(s) URL of at most 2048 characters, or empty.
pub fn validate_url(field: &'static str, value: &str) -> Result<String> {
    let url = fields::text(field, value, 2048, false)?;
    let is_http = url.starts_with("https://") || url.starts_with("http://");
    if !url.is_empty() && (!is_http || url.contains(' ')) {
        return Err(IdentityError::invalid(field, "must be an http or https URL"));
    }
    Ok(url)
}

/// The largest rate limit a project or key may be given, requests per minute.
pub const MAX_REQUESTS_PER_MINUTE: u32 = 1_000_000;

/// A rate limit in requests per minute as stored: 0 is "the deployment's default" (none
/// stored), anything above [`MAX_REQUESTS_PER_MINUTE`] is refused.
pub fn validate_requests_per_minute(field: &'static str, value: u32) -> Result<Option<i32>> {
    match value {
        0 => Ok(None),
        n if n > MAX_REQUESTS_PER_MINUTE => {
            Err(IdentityError::invalid(field, format!("must be at most {MAX_REQUESTS_PER_MINUTE} (0: the default)")))
        }
        n => Ok(i32::try_from(n).ok()),
    }
}

/// A stored rate limit as the API shows it: 0 for "the deployment's default".
pub fn requests_per_minute_to_proto(value: Option<i32>) -> u32 {
    value.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// API key scopes: known ones, at least one, no duplicates.
pub fn validate_scopes(scopes: &[String]) -> Result<Vec<String>> {
    if scopes.is_empty() {
        return Err(IdentityError::invalid("scopes", "at least one scope is required"));
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for scope in scopes {
        if !SCOPES.contains(&scope.as_str()) {
            return Err(IdentityError::invalid(
                "scopes",
                format!("unknown scope {scope:?}; known: {}", SCOPES.join(", ")),
            ));
        }
        if !out.contains(scope) {
            out.push(scope.clone());
        }
    }
    Ok(out)
}

/// A settings key: 1 to 128 lowercase letters, digits, `_`, separated by single dots.
pub fn validate_setting_key(value: &str) -> Result<String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    if !ok {
        return Err(IdentityError::invalid("key", "must be lowercase words of a-z, 0-9 and '_' separated by dots"));
    }
    Ok(value.to_owned())
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| aimesh_kit::ServiceError::internal(format!("hashing a password: {e}")).into())
}

/// Whether `password` matches `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// Spends the same time as a real check, so a login with an unknown name is not faster than one
/// with a wrong password.
pub fn burn_password_check(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hash = DUMMY.get_or_init(|| hash_password("not a password anybody has").unwrap_or_default());
    let _ = verify_password(password, hash);
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A freshly issued pair of login-session tokens, with the hashes that are stored.
#[derive(Debug)]
pub struct SessionTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub access_hash: String,
    pub refresh_hash: String,
}

impl SessionTokens {
    pub fn generate() -> Self {
        let access_token = format!("{ACCESS_TOKEN_PREFIX}{}", random_token());
        let refresh_token = format!("{REFRESH_TOKEN_PREFIX}{}", random_token());
        Self {
            access_hash: credential_hash(&access_token),
            refresh_hash: credential_hash(&refresh_token),
            access_token,
            refresh_token,
        }
    }
}

/// A freshly issued API key: `amk_<8 hex>_<secret>`. The first part is shown in listings so
/// people can tell keys apart; only the hash of the whole key is stored.
#[derive(Debug)]
pub struct ApiKeySecret {
    pub secret: String,
    pub display_prefix: String,
    pub hash: String,
}

impl ApiKeySecret {
    pub fn generate() -> Self {
        let mut id = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let display_prefix = format!("{API_KEY_PREFIX}{}", hex::encode(id));
        let secret = format!("{display_prefix}_{}", random_token());
        Self { hash: credential_hash(&secret), secret, display_prefix }
    }
}

/// Encrypts settings marked encrypted: AES-256-GCM, a random 96-bit nonce stored before the
/// ciphertext.
#[derive(Clone)]
pub struct SettingsCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SettingsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SettingsCipher(..)")
    }
}

impl SettingsCipher {
    /// From the base64 of a 32-byte key.
    pub fn from_base64(key: &str) -> anyhow::Result<Self> {
        let bytes = STANDARD.decode(key.trim())?;
        anyhow::ensure!(bytes.len() == 32, "identity.settings_key must be 32 bytes, base64 encoded");
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|e| anyhow::anyhow!("identity.settings_key: {e}"))?;
        Ok(Self { cipher })
    }

    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext)
            .map_err(|_| aimesh_kit::ServiceError::internal("encrypting a setting failed"))?;
        Ok([nonce.as_slice(), &ciphertext].concat())
    }

    pub fn decrypt(&self, stored: &[u8]) -> Result<Vec<u8>> {
        let fail =
            || IdentityError::from(aimesh_kit::ServiceError::internal("decrypting a setting failed (wrong key?)"));
        if stored.len() < 12 {
            return Err(fail());
        }
        let (nonce, ciphertext) = stored.split_at(12);
        self.cipher.decrypt(Nonce::from_slice(nonce), ciphertext).map_err(|_| fail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(validate_email("  Ann@Example.org ").ok().as_deref(), Some("Ann@Example.org"));
        for bad in
            ["", "ann", "ann@", "@example.org", "ann@example", "a n@example.org", "ann@exa..mple.org", "a\u{7}@x.org"]
        {
            assert!(validate_email(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn usernames_and_texts() {
        assert!(validate_username("ann.smith-2").is_ok());
        for bad in ["ab", "_ann", "ann smith", "ann/../x", &"a".repeat(33)] {
            assert!(validate_username(bad).is_err(), "{bad:?} passed");
        }
        assert!(fields::text("name", "Team\u{0}X", 100, true).is_err());
        assert!(fields::text("name", "  ", 100, true).is_err());
        assert!(fields::text("name", &"x".repeat(101), 100, true).is_err());
        assert!(validate_setting_key("chat.max_message_bytes").is_ok());
        assert!(validate_setting_key("Chat..x").is_err());
    }

    #[test]
    fn passwords_hash_and_verify() {
        assert!(validate_password("password", "short").is_err());
        let hash = hash_password("correct horse battery").ok().unwrap_or_default();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("wrong horse battery", &hash));
    }

    #[test]
    fn secrets_have_their_shape() {
        let key = ApiKeySecret::generate();
        assert!(key.secret.starts_with(&key.display_prefix));
        assert_eq!(key.hash, credential_hash(&key.secret));
        assert!(aimesh_kit::auth::check_credential_shape(&key.secret, &[API_KEY_PREFIX]).is_ok());
        let tokens = SessionTokens::generate();
        assert_ne!(tokens.access_hash, tokens.refresh_hash);
    }

    #[test]
    fn settings_cipher_round_trip() {
        let cipher = SettingsCipher::from_base64(&STANDARD.encode([7u8; 32])).ok();
        let cipher = cipher.as_ref().map(|c| (c.clone(), c.encrypt(b"{\"a\":1}").ok()));
        let Some((cipher, Some(stored))) = cipher else { panic!("cipher") };
        assert_eq!(cipher.decrypt(&stored).ok().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert!(SettingsCipher::from_base64("c2hvcnQ=").is_err());
    }
}
