//! Cursor pagination: `page_size` and opaque `page_token` as in Google's AIP-158.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ServiceError;

/// Page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Larger requested sizes are lowered to this.
pub const MAX_PAGE_SIZE: i64 = 200;

/// The number of items to return for a requested `page_size`.
pub fn page_size(requested: i32) -> Result<i64, ServiceError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(ServiceError::invalid_field("page_size", "must not be negative")),
        n => Ok(i64::from(n).min(MAX_PAGE_SIZE)),
    }
}

/// Where the next page of a list ordered by (time, id) descending starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(rename = "t")]
    pub time: DateTime<Utc>,
    #[serde(rename = "i")]
    pub id: Uuid,
}

impl Cursor {
    /// The opaque token a client sends back.
    pub fn encode(&self) -> String {
        // Serialising two plain fields cannot fail.
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads a `page_token`; an empty one means the first page. Only the exact token a cursor
    /// encodes to is taken: the JSON and time parsers accept other spellings of the same cursor
    /// (`T 0:00:00`, braced UUIDs, spaces), which no list ever returned.
    pub fn decode(token: &str) -> Result<Option<Self>, ServiceError> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || ServiceError::invalid_field("page_token", "is not a token this list returned");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let cursor: Self = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if cursor.encode() != token {
            return Err(invalid());
        }
        Ok(Some(cursor))
    }
}

/// Splits a fetched `limit + 1` rows into the page and the next token.
pub fn paginate<T>(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> Cursor) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        let next = rows.last().map(|last| cursor_of(last).encode()).unwrap_or_default();
        (rows, next)
    } else {
        (rows, String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_garbage() {
        let cursor = Cursor { time: Utc::now(), id: Uuid::new_v4() };
        assert_eq!(Cursor::decode(&cursor.encode()).ok().flatten(), Some(cursor));
        assert_eq!(Cursor::decode("").ok().flatten(), None);
        let error = Cursor::decode("not-a-token!").err().map(|e| e.field);
        assert_eq!(error, Some(Some("page_token".to_owned())));
    }

    /// Found by the page_token fuzz target: another spelling of a cursor's time was accepted.
    #[test]
    fn only_the_canonical_token_is_taken() {
        let spelled = |json: &str| URL_SAFE_NO_PAD.encode(json);
        let id = "00000000-0000-0000-0000-000000000000";
        let canonical = spelled(&format!(r#"{{"t":"2024-02-29T00:00:00Z","i":"{id}"}}"#));
        assert!(Cursor::decode(&canonical).is_ok_and(|cursor| cursor.is_some()));
        for other in [
            format!(r#"{{"t":"2024-02-29T 0:00:00Z","i":"{id}"}}"#),
            format!(r#"{{"i":"{id}","t":"2024-02-29T00:00:00Z"}}"#),
            format!(r#"{{ "t":"2024-02-29T00:00:00Z","i":"{id}"}}"#),
            format!(r#"{{"t":"2024-02-29T01:00:00+01:00","i":"{id}"}}"#),
        ] {
            let error = Cursor::decode(&spelled(&other)).err().and_then(|e| e.field);
            assert_eq!(error.as_deref(), Some("page_token"), "{other}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(page_size(0).ok(), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(5000).ok(), Some(MAX_PAGE_SIZE));
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn paginate_emits_token_only_when_more() {
        let (page, next) = paginate(vec![1, 2, 3], 2, |_| Cursor { time: Utc::now(), id: Uuid::nil() });
        assert_eq!(page, vec![1, 2]);
        assert!(!next.is_empty());
        let (page, next) = paginate(vec![1, 2], 2, |_| Cursor { time: Utc::now(), id: Uuid::nil() });
        assert_eq!(page.len(), 2);
        assert!(next.is_empty());
    }
}
