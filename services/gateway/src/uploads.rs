//! Uploads to client-streaming RPCs: a raw body or a multipart form, streamed as chunk messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures::StreamExt;
use http::header;
use prost_reflect::{DynamicMessage, Kind, Value};

use crate::dispatch::{json_reply, outgoing, upstream_call};
use crate::reply::RestError;
use crate::routes::Route;
use crate::server::Gateway;
use crate::transcode;

/// Largest chunk message an upload is cut into (the services accept 4 MiB per message).
const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;

/// A raw-body upload to a client-streaming RPC: the first message from the path and query
/// (`?metadata.name=report.pdf`), then the body as it arrives, one message per chunk, and a
/// last message with `finish` set when the input has that field. A body cut off midway ends the
/// stream without `finish`, so the service keeps nothing of it. No body limit applies here: the
/// service enforces its own.
pub(crate) async fn upload(
    gateway: &Gateway,
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
    parts: http::request::Parts,
    body: Body,
    chunk_field: prost_reflect::FieldDescriptor,
) -> Result<Response, RestError> {
    let first = transcode::request_message(route, bound, parts.uri.query(), &[])?;
    let input = route.method.input();
    let finish_field = input.get_field_by_name("finish").filter(|f| f.kind() == Kind::Bool);
    let cut_off = Arc::new(AtomicBool::new(false));
    let seen_cut = Arc::clone(&cut_off);
    let descriptor = input.clone();
    let chunks = body
        .into_data_stream()
        .take_while(move |frame| {
            if let Err(error) = frame {
                tracing::info!(%error, "upload body cut off; the upload is abandoned");
                seen_cut.store(true, Ordering::Relaxed);
            }
            futures::future::ready(frame.is_ok())
        })
        .filter_map(|frame| futures::future::ready(frame.ok()))
        .flat_map(|bytes| futures::stream::iter(split(bytes, UPLOAD_CHUNK_BYTES)))
        .map(move |piece| {
            let mut message = DynamicMessage::new(descriptor.clone());
            message.set_field(&chunk_field, Value::Bytes(piece));
            message
        });
    let last = futures::stream::once(async move {
        let field = finish_field.filter(|_| !cut_off.load(Ordering::Relaxed))?;
        let mut message = DynamicMessage::new(input);
        message.set_field(&field, Value::Bool(true));
        Some(message)
    })
    .filter_map(futures::future::ready);
    let messages = futures::stream::once(futures::future::ready(first)).chain(chunks).chain(last);
    let (mut grpc, path, codec) = upstream_call(gateway, route).await?;
    let request = outgoing(gateway, messages, &parts);
    let response = grpc.client_streaming(request, path, codec).await.map_err(|s| RestError::from_status(&s))?;
    json_reply(&response)
}

/// The part of a multipart upload that carries the content; every other part is a text field.
const FILE_PART: &str = "file";
/// Largest text part of a multipart upload (the metadata fields are short).
const MAX_FORM_TEXT_BYTES: usize = 64 * 1024;

/// The boundary when the request is `multipart/form-data`; an error when it is but has none.
pub(crate) fn form_boundary(headers: &http::HeaderMap) -> Option<Result<String, RestError>> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    Some(
        multer::parse_boundary(content_type).map_err(|error| {
            RestError::from(aimesh_kit::ServiceError::invalid_field("Content-Type", format!("{error}")))
        }),
    )
}

fn form_error(field: &str, message: impl std::fmt::Display) -> aimesh_kit::ServiceError {
    aimesh_kit::ServiceError::invalid_field(field, message.to_string())
}

/// A `multipart/form-data` upload: text parts before the `file` part fill the first message as
/// query parameters do (`metadata.name`), the file part's name and Content-Type stand in for
/// `metadata.name` and `metadata.mimeType` when nothing else gives them, and the file part streams
/// into the RPC chunk by chunk. Anything after the file part (a second file, a late text part) or
/// a body cut off ends the stream without `finish`, so the service keeps nothing, and the
/// answer is 400 naming the part.
pub(crate) async fn upload_form(
    gateway: &Gateway,
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
    parts: http::request::Parts,
    body: Body,
    boundary: String,
    chunk_field: prost_reflect::FieldDescriptor,
) -> Result<Response, RestError> {
    let mut form = multer::Multipart::new(body.into_data_stream(), boundary);
    let mut fields = Vec::new();
    let file = loop {
        let field = form.next_field().await.map_err(|e| form_error("body", format!("is not valid multipart: {e}")))?;
        let Some(mut field) = field else {
            return Err(form_error(FILE_PART, "the form has no file part").into());
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == FILE_PART {
            break field;
        }
        let mut text = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| form_error(&name, format!("cannot be read: {e}")))? {
            if text.len() + chunk.len() > MAX_FORM_TEXT_BYTES {
                return Err(form_error(&name, format!("is longer than {MAX_FORM_TEXT_BYTES} bytes")).into());
            }
            text.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(text).map_err(|_| form_error(&name, "is not UTF-8 text"))?;
        fields.push((name, text));
    };
    let given = |names: &[&str]| {
        fields.iter().any(|(name, _)| names.contains(&name.as_str()))
            || form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
                .any(|(name, _)| names.contains(&name.as_ref()))
    };
    let mut defaults = Vec::new();
    if let Some(file_name) = file.file_name().filter(|_| !given(&["metadata.name"])) {
        defaults.push(("metadata.name".to_owned(), file_name.to_owned()));
    }
    if let Some(mime) = file.content_type().filter(|_| !given(&["metadata.mimeType", "metadata.mime_type"])) {
        defaults.push(("metadata.mimeType".to_owned(), mime.essence_str().to_owned()));
    }
    fields.extend(defaults);
    let first = transcode::upload_message(route, bound, parts.uri.query(), &fields)?;

    let input = route.method.input();
    let finish_field = input.get_field_by_name("finish").filter(|f| f.kind() == Kind::Bool);
    // What went wrong with the form after the stream started; it answers the request in place
    // of the service's "not finished".
    let refused = Arc::new(std::sync::Mutex::new(None::<aimesh_kit::ServiceError>));
    let state = FormUpload { form, file: Some(file), refused: Arc::clone(&refused) };
    let descriptor = input.clone();
    let pieces = futures::stream::unfold(state, |mut state| async move {
        let piece = state.next_piece().await?;
        Some((piece, state))
    });
    let messages = pieces.flat_map(move |piece| {
        let messages: Vec<DynamicMessage> = match piece {
            FormPiece::Bytes(bytes) => split(bytes, UPLOAD_CHUNK_BYTES)
                .into_iter()
                .map(|chunk| {
                    let mut message = DynamicMessage::new(descriptor.clone());
                    message.set_field(&chunk_field, Value::Bytes(chunk));
                    message
                })
                .collect(),
            FormPiece::End => finish_field
                .iter()
                .map(|field| {
                    let mut message = DynamicMessage::new(descriptor.clone());
                    message.set_field(field, Value::Bool(true));
                    message
                })
                .collect(),
        };
        futures::stream::iter(messages)
    });
    let messages = futures::stream::once(futures::future::ready(first)).chain(messages);
    let (mut grpc, path, codec) = upstream_call(gateway, route).await?;
    let request = outgoing(gateway, messages, &parts);
    let result = grpc.client_streaming(request, path, codec).await;
    let refusal = refused.lock().map(|mut slot| slot.take()).unwrap_or_default();
    if let Some(error) = refusal {
        return Err(error.into());
    }
    let response = result.map_err(|s| RestError::from_status(&s))?;
    json_reply(&response)
}

/// What the file part of a form yields next.
enum FormPiece {
    Bytes(Bytes),
    /// The file ended and nothing followed it: the upload may finish.
    End,
}

/// The rest of a form once its file part has begun.
struct FormUpload {
    form: multer::Multipart<'static>,
    /// The file part until it ends.
    file: Option<multer::Field<'static>>,
    refused: Arc<std::sync::Mutex<Option<aimesh_kit::ServiceError>>>,
}

impl FormUpload {
    /// The next bytes of the file, its end, or `None` (after recording why) when the form goes
    /// wrong: either way the stream then ends, with `finish` only after `End`.
    async fn next_piece(&mut self) -> Option<FormPiece> {
        let file = self.file.as_mut()?;
        match file.chunk().await {
            Ok(Some(bytes)) => return Some(FormPiece::Bytes(bytes)),
            Ok(None) => {}
            Err(error) => {
                tracing::info!(%error, "upload form cut off; the upload is abandoned");
                return self.refuse(form_error(FILE_PART, format!("was cut off: {error}")));
            }
        }
        self.file = None;
        match self.form.next_field().await {
            Ok(None) => Some(FormPiece::End),
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                let error = if name == FILE_PART {
                    form_error(FILE_PART, "the form has more than one file part")
                } else {
                    form_error(&name, "comes after the file part; send text parts before it")
                };
                self.refuse(error)
            }
            Err(error) => self.refuse(form_error("body", format!("is not valid multipart: {error}"))),
        }
    }

    fn refuse(&mut self, error: aimesh_kit::ServiceError) -> Option<FormPiece> {
        if let Ok(mut slot) = self.refused.lock() {
            slot.get_or_insert(error);
        }
        None
    }
}

fn split(mut bytes: Bytes, size: usize) -> Vec<Bytes> {
    let mut pieces = Vec::with_capacity(bytes.len() / size + 1);
    while bytes.len() > size {
        pieces.push(bytes.split_to(size));
    }
    if !bytes.is_empty() {
        pieces.push(bytes);
    }
    pieces
}
