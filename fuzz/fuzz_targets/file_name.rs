//! File names as clients send them. An accepted name keeps its trimmed original and gets a safe
//! name with no separators, control or forbidden characters, dots or spaces at the ends, or a
//! reserved device stem; the safe name is accepted and kept as it is (idempotent), and both
//! make a valid `Content-Disposition` header. A refusal names the field.
#![no_main]

use aimesh_files::content_disposition;
use aimesh_files::domain::{FileName, RESERVED_STEMS};
use aimesh_kit::{ErrorCode, ServiceError};
use libfuzzer_sys::fuzz_target;

const FORBIDDEN: [char; 9] = ['/', '\\', '<', '>', ':', '"', '|', '?', '*'];

fn assert_safe(safe: &str) {
    assert!(!safe.is_empty());
    assert!(!safe.contains(FORBIDDEN), "{safe:?}");
    assert!(!safe.chars().any(char::is_control), "{safe:?}");
    assert!(!safe.starts_with(['.', ' ']) && !safe.ends_with(['.', ' ']), "{safe:?}");
    assert!(!safe.starts_with(char::is_whitespace) && !safe.ends_with(char::is_whitespace), "{safe:?}");
    let stem = safe.split('.').next().unwrap_or_default().trim_end();
    assert!(!RESERVED_STEMS.iter().any(|reserved| reserved.eq_ignore_ascii_case(stem)), "{safe:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match FileName::parse("name", text) {
        Ok(name) => {
            assert_eq!(name.original, text.trim());
            assert_safe(&name.safe);
            let again = FileName::parse("name", &name.safe).map_err(ServiceError::from);
            assert_eq!(again.as_ref().map(|n| n.safe.as_str()).ok(), Some(name.safe.as_str()), "{again:?}");
            for shown in [&name.original, &name.safe] {
                let header = content_disposition(shown);
                assert!(http::HeaderValue::from_str(&header).is_ok(), "{header:?}");
            }
        }
        Err(error) => {
            let error = ServiceError::from(error);
            assert_eq!(error.code, ErrorCode::InvalidArgument);
            assert_eq!(error.field.as_deref(), Some("name"));
        }
    }
});
