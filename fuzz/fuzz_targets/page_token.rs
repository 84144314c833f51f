//! `page_token`: opaque to clients, so anything may come back. A token that decodes is exactly
//! the one its cursor encodes to; anything else is refused naming `page_token`.
#![no_main]

use aimesh_kit::ErrorCode;
use aimesh_kit::wire::pagination::{Cursor, page_size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let requested = i32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match page_size(requested) {
            Ok(size) => assert!((1..=200).contains(&size)),
            Err(error) => assert_eq!(error.field.as_deref(), Some("page_size")),
        }
    }
    let Ok(token) = std::str::from_utf8(data) else { return };
    match Cursor::decode(token) {
        Ok(None) => assert!(token.is_empty()),
        Ok(Some(cursor)) => {
            assert_eq!(cursor.encode(), token, "a decoded token re-encodes to itself");
            assert_eq!(Cursor::decode(&cursor.encode()).ok().flatten(), Some(cursor));
        }
        Err(error) => {
            assert_eq!(error.code, ErrorCode::InvalidArgument);
            assert_eq!(error.field.as_deref(), Some("page_token"));
        }
    }
});
