//! Server-streaming RPCs as Server-Sent Events, resumable with `Last-Event-ID`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures::{Stream, StreamExt};
use http::{HeaderValue, header};
use prost_reflect::{DynamicMessage, ReflectMessage, Value};
use tokio_util::sync::CancellationToken;
use tonic::codec::Streaming;

use crate::reply::RestError;
use crate::transcode;

/// A reconnecting EventSource sends `Last-Event-ID`; for a stream that resumes by sequence
/// number (`after_sequence` in, `sequence` out) it becomes the resume point.
pub(crate) fn resume_from_last_event_id(
    message: &mut DynamicMessage,
    headers: &http::HeaderMap,
) -> Result<(), aimesh_kit::ServiceError> {
    let Some(last) = headers.get("last-event-id") else { return Ok(()) };
    let Some(field) = message.descriptor().get_field_by_name("after_sequence") else { return Ok(()) };
    let sequence = last
        .to_str()
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| aimesh_kit::ServiceError::invalid_field("Last-Event-ID", "must be a sequence number"))?;
    message.set_field(&field, Value::I64(sequence));
    Ok(())
}

/// Server-Sent Events: `event: message` per message (with `id:` its sequence number when it has
/// one), a comment every `keep_alive`, and on failure one `event: error` with the error body
/// before the stream closes.
pub(crate) fn server_sent_events(
    stream: Streaming<DynamicMessage>,
    keep_alive: Duration,
    shutdown: CancellationToken,
) -> Response {
    let events = sse_events(stream, keep_alive, shutdown).map(Ok::<_, Infallible>);
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

enum SseState {
    Open(Box<(Streaming<DynamicMessage>, tokio::time::Interval, CancellationToken)>),
    Closed,
}

fn sse_events(
    stream: Streaming<DynamicMessage>,
    keep_alive: Duration,
    shutdown: CancellationToken,
) -> impl Stream<Item = Bytes> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold(SseState::Open(Box::new((stream, tick, shutdown))), |state| async move {
        let SseState::Open(open) = state else { return None };
        let (mut stream, mut tick, shutdown) = *open;
        let event = tokio::select! {
            () = shutdown.cancelled() => return None,
            _ = tick.tick() => Bytes::from_static(b": keep-alive\n\n"),
            item = stream.message() => match item {
                Ok(Some(message)) => message_event(&message),
                Ok(None) => return None,
                Err(status) => {
                    let error = RestError::from_status(&status);
                    return Some((error_event(&error), SseState::Closed));
                }
            },
        };
        Some((event, SseState::Open(Box::new((stream, tick, shutdown)))))
    })
}

fn message_event(message: &DynamicMessage) -> Bytes {
    let mut event = Vec::with_capacity(256);
    if let Some(Value::I64(sequence)) = message.get_field_by_name("sequence").map(|v| v.into_owned()) {
        event.extend_from_slice(format!("id: {sequence}\n").as_bytes());
    }
    match transcode::encode(message) {
        Ok(json) => {
            event.extend_from_slice(b"event: message\ndata: ");
            event.extend_from_slice(&json);
            event.extend_from_slice(b"\n\n");
            Bytes::from(event)
        }
        Err(error) => error_event(&RestError::from(error)),
    }
}

fn error_event(error: &RestError) -> Bytes {
    let mut event = b"event: error\ndata: ".to_vec();
    event.extend_from_slice(&error.body(None));
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}
