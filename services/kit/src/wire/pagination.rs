//! Cursor pagination: `page_size` and opaque `page_token` as in Google's AIP-158.
//!
//! Every list pages the same way. [`Page::new`] reads a request's token and size; the store
//! fetches the rows after [`Page::after`] (for a list by (time, id) descending, below
//! [`Page::bounds`]), at most [`Page::fetch_limit`] of them: one more than the page holds, which
//! tells whether another page follows. [`Page::finish`] then cuts the page and makes the next
//! token from its last row. What a token carries is a [`PageKey`]: a [`Cursor`] for most lists.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::error::ServiceError;

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

/// One page of a list as a request asks for it: after which key it starts (nowhere: the first
/// page) and how many items it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<K = Cursor> {
    after: Option<K>,
    limit: i64,
}

impl<K: PageKey> Page<K> {
    /// The page a request's `page_token` and `page_size` ask for; the size is checked first.
    pub fn new(page_token: &str, requested_size: i32) -> Result<Self, ServiceError> {
        let limit = page_size(requested_size)?;
        Ok(Self { after: K::decode(page_token)?, limit })
    }

    /// [`Page::split`], with the next page as the token a client sends back (empty on the last
    /// page).
    pub fn finish<T>(&self, rows: Vec<T>, key_of: impl FnOnce(&T) -> K) -> (Vec<T>, String) {
        let (rows, next) = self.split(rows, key_of);
        (rows, next.and_then(|next| next.after).map(|key| key.encode()).unwrap_or_default())
    }
}

impl<K> Page<K> {
    /// The first page of `limit` items: for a caller that walks a whole list itself.
    pub fn first(limit: i64) -> Self {
        Self { after: None, limit }
    }

    /// The page of `limit` items after `after`, the first page when `None`.
    pub fn starting_after(after: Option<K>, limit: i64) -> Self {
        Self { after, limit }
    }

    /// The key the page starts after; `None` on the first page.
    pub fn after(&self) -> Option<&K> {
        self.after.as_ref()
    }

    /// How many items the page holds.
    pub fn limit(&self) -> i64 {
        self.limit
    }

    /// How many rows to fetch: one more than the page holds, which tells whether another follows.
    pub fn fetch_limit(&self) -> i64 {
        self.limit.saturating_add(1)
    }

    /// Splits the rows fetched for this page (at most [`Page::fetch_limit`]) into the page and
    /// the page after it, which starts after the key of the page's last row; `None` when this is
    /// the last page.
    pub fn split<T>(&self, mut rows: Vec<T>, key_of: impl FnOnce(&T) -> K) -> (Vec<T>, Option<Self>) {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        if rows.len() <= limit {
            return (rows, None);
        }
        rows.truncate(limit);
        let next = rows.last().map(|last| Self { after: Some(key_of(last)), limit: self.limit });
        (rows, next)
    }
}

impl Page<Cursor> {
    /// The upper bound of a keyset page by (time, id) descending, to bind in
    /// `(time, id) < ($n, $m)`: the cursor, or "after everything" for the first page.
    pub fn bounds(&self) -> (DateTime<Utc>, Uuid) {
        self.after.map_or((DateTime::<Utc>::MAX_UTC, Uuid::max()), |c| (c.time, c.id))
    }
}

/// What a page token carries: the key of the last item of the previous page, in the list's order.
pub trait PageKey: Sized {
    /// The opaque token a client sends back.
    fn encode(&self) -> String;

    /// Reads a `page_token`; an empty one means the first page.
    fn decode(token: &str) -> Result<Option<Self>, ServiceError>;
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
        encode_json(self)
    }

    /// Reads a `page_token`; an empty one means the first page. Only the exact token a cursor
    /// encodes to is taken: the JSON and time parsers accept other spellings of the same cursor
    /// (`T 0:00:00`, braced UUIDs, spaces), which no list ever returned.
    pub fn decode(token: &str) -> Result<Option<Self>, ServiceError> {
        let cursor: Option<Self> = decode_json(token)?;
        if cursor.is_some_and(|cursor| cursor.encode() != token) {
            return Err(invalid_token());
        }
        Ok(cursor)
    }
}

impl PageKey for Cursor {
    fn encode(&self) -> String {
        Cursor::encode(self)
    }

    fn decode(token: &str) -> Result<Option<Self>, ServiceError> {
        Cursor::decode(token)
    }
}

/// A list ordered by a text key (settings by key): the token is the key in URL-safe base64.
impl PageKey for String {
    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self)
    }

    fn decode(token: &str) -> Result<Option<Self>, ServiceError> {
        if token.is_empty() {
            return Ok(None);
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid_token())?;
        String::from_utf8(bytes).map(Some).map_err(|_| invalid_token())
    }
}

/// The token of a key serialised as JSON: its JSON in URL-safe base64.
pub fn encode_json<K: Serialize>(key: &K) -> String {
    // Serialising a key of plain fields cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).unwrap_or_default())
}

/// Reads a token [`encode_json`] made; an empty one means the first page. Other spellings of the
/// same JSON are taken too: a key that must refuse them compares the token with its encoding.
pub fn decode_json<K: DeserializeOwned>(token: &str) -> Result<Option<K>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid_token())?;
    serde_json::from_slice(&bytes).map(Some).map_err(|_| invalid_token())
}

/// The answer to a `page_token` that no list returned.
fn invalid_token() -> ServiceError {
    ServiceError::invalid_field("page_token", "is not a token this list returned")
}

/// Splits a fetched `limit + 1` rows into the page and the next token: [`Page::finish`] for a
/// list that still passes its position and size apart.
pub fn paginate<T>(rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> Cursor) -> (Vec<T>, String) {
    Page::first(limit).finish(rows, cursor_of)
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
    /// Tokens lists returned before [`Page`] still decode, and the same keys encode to them.
    #[test]
    fn tokens_are_those_lists_returned() {
        let cursor = Cursor { time: "2024-02-29T00:00:00Z".parse().expect("time"), id: Uuid::nil() };
        let token = "eyJ0IjoiMjAyNC0wMi0yOVQwMDowMDowMFoiLCJpIjoiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIn0";
        assert_eq!(PageKey::encode(&cursor), token);
        assert_eq!(Page::<Cursor>::new(token, 0).ok().and_then(|page| page.after().copied()), Some(cursor));
        assert_eq!(PageKey::encode(&"ui.theme".to_owned()), "dWkudGhlbWU");
        assert_eq!(
            Page::<String>::new("dWkudGhlbWU", 0).ok().and_then(|page| page.after().cloned()).as_deref(),
            Some("ui.theme")
        );
    }

    #[test]
    fn page_of_a_request() {
        let first = Page::<Cursor>::new("", 0).expect("first page");
        assert_eq!(
            (first.after(), first.limit(), first.fetch_limit()),
            (None, DEFAULT_PAGE_SIZE, DEFAULT_PAGE_SIZE + 1)
        );
        assert_eq!(first.bounds(), (DateTime::<Utc>::MAX_UTC, Uuid::max()));
        let cursor = Cursor { time: Utc::now(), id: Uuid::new_v4() };
        let next = Page::<Cursor>::new(&cursor.encode(), 5000).expect("next page");
        assert_eq!((next.bounds(), next.fetch_limit()), ((cursor.time, cursor.id), MAX_PAGE_SIZE + 1));
        // The size is checked before the token, as each list did.
        let field = |result: Result<Page, ServiceError>| result.err().and_then(|e| e.field);
        assert_eq!(field(Page::new("not-a-token!", -1)).as_deref(), Some("page_size"));
        assert_eq!(field(Page::new("not-a-token!", 1)).as_deref(), Some("page_token"));
        assert!(Page::<String>::new("_w", 1).is_err(), "not UTF-8");
    }

    #[test]
    fn finish_emits_a_token_only_when_more() {
        let page = Page::<String>::first(2);
        let (rows, next) = page.finish(vec!["a", "b", "c"], |last| (*last).to_owned());
        assert_eq!((rows, next), (vec!["a", "b"], PageKey::encode(&"b".to_owned())));
        let (rows, next) = page.finish(vec!["a", "b"], |last| (*last).to_owned());
        assert_eq!((rows.len(), next), (2, String::new()));
        let (rows, next) = page.finish(Vec::<&str>::new(), |last| (*last).to_owned());
        assert_eq!((rows.len(), next), (0, String::new()));
    }

    #[test]
    fn split_yields_the_next_page() {
        let page = Page::<i64>::starting_after(Some(10), 2);
        let (rows, next) = page.split(vec![11, 12, 13], |last| *last);
        assert_eq!(rows, vec![11, 12]);
        assert_eq!(next, Some(Page::starting_after(Some(12), 2)));
        assert_eq!(page.split(vec![11, 12], |last| *last), (vec![11, 12], None));
    }
}
