//! Server-streaming RPCs that carry a file, answered as a plain download (206 for a range).

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures::StreamExt;
use http::{HeaderValue, StatusCode, header};
use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};
use tonic::codec::Streaming;

use crate::reply::RestError;

/// `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` into the `offset`, `length` and `suffix_length`
/// fields of a download's request, when it has them. Anything else (several ranges, other
/// units) is ignored and the whole file is sent, as RFC 9110 allows. True when a range was set.
pub(crate) fn apply_range(message: &mut DynamicMessage, headers: &http::HeaderMap) -> bool {
    let Some(spec) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("bytes="))
    else {
        return false;
    };
    let descriptor = message.descriptor();
    let field = |name: &str| descriptor.get_field_by_name(name).filter(|f| f.kind() == Kind::Int64);
    let (Some(offset), Some(length), Some(suffix)) = (field("offset"), field("length"), field("suffix_length")) else {
        return false;
    };
    let Some((start, end)) = spec.trim().split_once('-').filter(|_| !spec.contains(',')) else { return false };
    match (start.parse::<i64>().ok(), end.parse::<i64>().ok()) {
        (Some(start), Some(end)) if end >= start => {
            message.set_field(&offset, Value::I64(start));
            message.set_field(&length, Value::I64(end - start + 1));
        }
        (Some(start), None) if end.is_empty() => message.set_field(&offset, Value::I64(start)),
        (None, Some(last)) if start.is_empty() && last > 0 => message.set_field(&suffix, Value::I64(last)),
        _ => return false,
    }
    true
}

/// Streams that carry a file, sent as a plain body rather than as events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DownloadShape {
    /// Every message has `bytes data`; the first names `content_type` and `file_name`
    /// (chat's exports).
    DataChunks,
    /// A first message with `header` (the `file`: `mime_type`, `safe_name`, `size_bytes`; the
    /// range served: `offset`, `length`), then messages with `bytes chunk` (files' downloads).
    HeaderThenChunks,
}

impl DownloadShape {
    pub(crate) fn of(output: &prost_reflect::MessageDescriptor) -> Option<Self> {
        let has = |name: &str, kind: fn(&Kind) -> bool| {
            output.get_field_by_name(name).is_some_and(|f| !f.is_list() && kind(&f.kind()))
        };
        if has("data", |k| *k == Kind::Bytes) && has("content_type", |k| *k == Kind::String) {
            Some(Self::DataChunks)
        } else if has("chunk", |k| *k == Kind::Bytes) && has("header", |k| k.as_message().is_some()) {
            Some(Self::HeaderThenChunks)
        } else {
            None
        }
    }

    /// The bytes a message carries.
    fn bytes(self, message: &DynamicMessage) -> Bytes {
        let name = match self {
            Self::DataChunks => "data",
            Self::HeaderThenChunks => "chunk",
        };
        message.get_field_by_name(name).and_then(|v| v.as_bytes().cloned()).unwrap_or_default()
    }
}

/// A field's value, `None` when unset.
fn field_of(message: &DynamicMessage, name: &str) -> Option<Value> {
    message.has_field_by_name(name).then(|| message.get_field_by_name(name).map(|v| v.into_owned())).flatten()
}

fn text_of(message: &DynamicMessage, name: &str) -> String {
    field_of(message, name).and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn int_of(message: &DynamicMessage, name: &str) -> i64 {
    field_of(message, name).and_then(|v| v.as_i64()).unwrap_or_default()
}

fn message_of(message: &DynamicMessage, name: &str) -> Option<DynamicMessage> {
    field_of(message, name).and_then(|v| v.as_message().cloned())
}

/// What the first message of a download says about the file.
#[derive(Debug, Default)]
struct DownloadHead {
    content_type: String,
    file_name: String,
    bytes: Bytes,
    /// Bytes served and the `Content-Range`, when the stream says (files' downloads).
    length: Option<i64>,
    content_range: Option<String>,
}

impl DownloadHead {
    fn of(first: &DynamicMessage, shape: DownloadShape, ranged: bool) -> Self {
        match shape {
            DownloadShape::DataChunks => Self {
                content_type: text_of(first, "content_type"),
                file_name: text_of(first, "file_name"),
                bytes: shape.bytes(first),
                ..Self::default()
            },
            DownloadShape::HeaderThenChunks => {
                let header = message_of(first, "header").unwrap_or_else(|| DynamicMessage::new(first.descriptor()));
                let file = message_of(&header, "file");
                let size = file.as_ref().map_or(0, |f| int_of(f, "size_bytes"));
                let (offset, length) = (int_of(&header, "offset"), int_of(&header, "length"));
                let last = (offset + length - 1).max(offset);
                Self {
                    content_type: file.as_ref().map(|f| text_of(f, "mime_type")).unwrap_or_default(),
                    file_name: file.as_ref().map(|f| text_of(f, "safe_name")).unwrap_or_default(),
                    bytes: Bytes::new(),
                    length: Some(length),
                    content_range: ranged.then(|| format!("bytes {offset}-{last}/{size}")),
                }
            }
        }
    }
}

/// A file download: headers from the first message, then the bytes as they come; 206 with
/// `Content-Range` for a range request. A failure after the first byte can only cut the
/// connection (the client sees a truncated transfer).
pub(crate) async fn download(
    mut stream: Streaming<DynamicMessage>,
    shape: DownloadShape,
    ranged: bool,
) -> Result<Response, RestError> {
    let first = stream.message().await.map_err(|status| RestError::from_status(&status))?;
    let head = first.map(|first| DownloadHead::of(&first, shape, ranged)).unwrap_or_default();
    let rest = stream.map(move |item| match item {
        Ok(message) => Ok(shape.bytes(&message)),
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = status.message(), "download failed mid-stream");
            Err(std::io::Error::other(status.message().to_owned()))
        }
    });
    let first_bytes = head.bytes.clone();
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first_bytes) }).chain(rest);
    let mut response = Response::new(Body::from_stream(body));
    if head.content_range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let headers = response.headers_mut();
    let content_type = if head.content_type.is_empty() { "application/octet-stream" } else { &head.content_type };
    if let Ok(value) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Some(length) = head.length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    if let Some(range) = head.content_range.and_then(|r| HeaderValue::from_str(&r).ok()) {
        headers.insert(header::CONTENT_RANGE, range);
    }
    make_inert(headers, &head.file_name);
    Ok(response)
}

/// What keeps a download from running in a browser as a page of the gateway's origin, whatever
/// its uploader declared (`text/html`, `image/svg+xml`, XML, JavaScript, PDF...): no sniffing
/// past the declared type, always saved rather than shown (`attachment`, with the file name),
/// and, were it shown anyway, sandboxed with nothing allowed to load. Every download gets all
/// three, since nothing a download serves is meant to run and a list of "active" types is
/// easy to get wrong (`+xml` suffixes, parameters, new types).
fn make_inert(headers: &mut http::HeaderMap, file_name: &str) {
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(DOWNLOAD_CSP));
    let disposition = HeaderValue::from_str(&content_disposition(file_name))
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"));
    headers.insert(header::CONTENT_DISPOSITION, disposition);
}

/// The policy of every download: no script, style, frame or fetch, in a unique origin.
const DOWNLOAD_CSP: &str = "default-src 'none'; sandbox";

/// `attachment` with the file name (RFC 6266): a quoted ASCII fallback, plus the UTF-8 name
/// (RFC 5987 `filename*`) when the fallback had to leave characters out.
fn content_disposition(file_name: &str) -> String {
    if file_name.is_empty() {
        return "attachment".to_owned();
    }
    let fallback: String = file_name.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\').collect();
    if fallback == file_name {
        return format!("attachment; filename=\"{fallback}\"");
    }
    let mut encoded = String::with_capacity(file_name.len() * 3);
    for byte in file_name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    let fallback = if fallback.is_empty() { "download" } else { &fallback };
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_name_is_quoted_and_any_other_also_percent_encoded() {
        assert_eq!(content_disposition("hello.txt"), "attachment; filename=\"hello.txt\"");
        assert_eq!(content_disposition(""), "attachment");
        assert_eq!(
            content_disposition("报告 \"Q1\".pdf"),
            "attachment; filename=\"Q1.pdf\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A%20%22Q1%22.pdf"
        );
        assert_eq!(
            content_disposition("报告"),
            "attachment; filename=\"download\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A"
        );
    }

    #[test]
    fn every_download_is_inert() {
        let mut headers = http::HeaderMap::new();
        make_inert(&mut headers, "page.html");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::CONTENT_SECURITY_POLICY], DOWNLOAD_CSP);
        assert_eq!(headers[header::CONTENT_DISPOSITION], "attachment; filename=\"page.html\"");
    }
}
