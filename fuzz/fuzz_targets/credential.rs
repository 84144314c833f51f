//! Credentials as they arrive: the `authorization` header, the shape check every API key and
//! token passes before any lookup, the configured service token, and what people type at sign
//! up and login (email, username) or as a settings key.
#![no_main]

use aimesh_identity::domain::{validate_email, validate_setting_key, validate_username};
use aimesh_kit::auth::{
    ACCESS_TOKEN_PREFIX, API_KEY_PREFIX, REFRESH_TOKEN_PREFIX, SERVICE_TOKEN_PREFIX, ServiceToken, bearer,
    check_credential_shape,
};
use aimesh_kit::{ErrorCode, ServiceError};
use libfuzzer_sys::fuzz_target;

fn credential_alphabet(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A validator that accepts its own output unchanged, and names `field` when it refuses.
fn check_validator(
    field: &str,
    text: &str,
    validate: impl Fn(&str) -> Result<String, aimesh_identity::error::IdentityError>,
) {
    match validate(text) {
        Ok(accepted) => {
            let again = validate(&accepted).map_err(ServiceError::from);
            assert_eq!(again.as_ref().ok(), Some(&accepted), "{field}: not idempotent on {accepted:?}: {again:?}");
        }
        Err(error) => {
            let error = ServiceError::from(error);
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{field}: {error:?}");
            assert_eq!(error.field.as_deref(), Some(field), "{field}: {error:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = http::HeaderValue::from_bytes(data)
        && let Some(credential) = bearer(&header)
    {
        assert!(!credential.is_empty());
        assert_eq!(credential, credential.trim());
        assert!(data.len() > 7 && data[..7].eq_ignore_ascii_case(b"bearer "), "{data:?}");
    }

    let Ok(text) = std::str::from_utf8(data) else { return };
    let prefixes = [ACCESS_TOKEN_PREFIX, API_KEY_PREFIX, REFRESH_TOKEN_PREFIX];
    match check_credential_shape(text, &prefixes) {
        Ok(()) => {
            assert!(text.len() <= 128);
            assert!(prefixes.iter().any(|prefix| text.starts_with(prefix)));
            assert!(credential_alphabet(text));
            // A credential that passes is a valid header value, so it can be sent back as one.
            assert!(http::HeaderValue::from_str(&format!("Bearer {text}")).is_ok());
        }
        Err(error) => assert_eq!(error.code, ErrorCode::Unauthenticated),
    }

    // auth.service_token as a configuration file or environment variable gives it.
    if let Ok(token) = serde_json::from_value::<ServiceToken>(serde_json::Value::String(text.to_owned())) {
        match token.validate() {
            Ok(()) => {
                assert!(text.starts_with(SERVICE_TOKEN_PREFIX) && text.len() >= SERVICE_TOKEN_PREFIX.len() + 32);
                assert!(text.len() <= 128 && credential_alphabet(text));
            }
            Err(error) => assert_eq!(error.field.as_deref(), Some("auth.service_token")),
        }
    }

    check_validator("email", text, validate_email);
    check_validator("username", text, validate_username);
    check_validator("key", text, validate_setting_key);
});
