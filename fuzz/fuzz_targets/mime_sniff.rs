//! A declared MIME type and the first bytes of an upload. The input's first byte is the length
//! of the declared type, the rest after it the content.
//!
//! Properties: an accepted type is its own normal form; a format recognised by its magic bytes
//! fits its own type, and text without control characters fits a text type (even when it starts
//! like `BM` or `MZ`); `application/octet-stream`
//! fits anything; a refused type names the field.
#![no_main]

use aimesh_files::domain::{SNIFF_BYTES, check_content, looks_like_text, mime_type, sniff};
use aimesh_kit::{ErrorCode, ServiceError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&length, rest)) = data.split_first() else { return };
    let (declared, head) = rest.split_at(usize::from(length).min(rest.len()));
    let head = &head[..head.len().min(SNIFF_BYTES)];

    if let Ok(declared) = std::str::from_utf8(declared) {
        match mime_type("mime_type", declared) {
            Ok(essence) => {
                assert_eq!(essence, essence.to_ascii_lowercase());
                assert_eq!(mime_type("mime_type", &essence).ok().as_ref(), Some(&essence), "not idempotent");
                // Whatever it says, checking content against it must not panic.
                let _ = check_content(&essence, head);
            }
            Err(error) => {
                let error = ServiceError::from(error);
                assert_eq!(error.code, ErrorCode::InvalidArgument);
                assert_eq!(error.field.as_deref(), Some("mime_type"));
            }
        }
    }

    if let Some(detected) = sniff(head) {
        assert!(mime_type("mime_type", detected).is_ok_and(|m| m == detected));
        assert!(check_content(detected, head).is_ok(), "{detected} does not fit its own magic");
    }
    assert!(check_content("application/octet-stream", head).is_ok());
    if let Ok(text) = std::str::from_utf8(head) {
        assert!(looks_like_text(head) || head.contains(&0));
        let plain = text.chars().all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0c'));
        if plain {
            assert!(check_content("text/plain", head).is_ok(), "text refused as text/plain: {head:?}");
        }
    }
    if !looks_like_text(head) {
        assert!(check_content("text/plain", head).is_err(), "binary accepted as text/plain: {head:?}");
    }
});
