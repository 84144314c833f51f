//! The HTTP server: routes every REST call to its RPC, plus `/healthz`, `/readyz` and
//! `/openapi.json`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use futures::{Stream, StreamExt};
use http::{HeaderValue, StatusCode, header};
use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::client::Grpc;
use tonic::codec::Streaming;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tracing::Instrument;

use aimesh_kit::config::CommonConfig;
use aimesh_kit::ratelimit::client::ClientVoucher;
use aimesh_kit::ratelimit::{Decision, RateLimiter};
use aimesh_kit::redis::Redis;

use crate::client::TrustedProxies;
use crate::config::GatewayConfig;
use crate::reply::{PASSED_BACK, RestError, json_response, passed_back};
use crate::routes::{Lookup, Route, RouteTable, aimesh_pool, raw_body_field};
use crate::transcode;
use crate::upstream::{Connection, DynamicCodec, Upstreams};

const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
/// Headers forwarded to the services as gRPC metadata. The credential is forwarded, never
/// replaced: every service verifies it itself.
const FORWARDED: &[&str] = &["authorization", "traceparent", "tracestate", "x-request-id", "user-agent"];

/// What every request handler shares.
struct Gateway {
    routes: RouteTable,
    upstreams: Upstreams,
    openapi: Bytes,
    config: GatewayConfig,
    /// Limits callers without a credential per client address, like the services would.
    limiter: RateLimiter,
    trusted_proxies: TrustedProxies,
    /// Vouches for the client address on every call (see `aimesh_kit::ratelimit::client`).
    voucher: Option<ClientVoucher>,
    /// False from the start of a shutdown, so `/readyz` sends load balancers elsewhere.
    ready: AtomicBool,
    shutdown: CancellationToken,
}

/// Serves the gateway on `listener` until `shutdown` is cancelled, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    common: CommonConfig,
    config: GatewayConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let address = listener.local_addr()?;
    let pool = aimesh_pool().context("reading the descriptor set")?;
    let routes = RouteTable::from_pool(&pool).map_err(|e| anyhow::anyhow!(e)).context("building the routes")?;
    let openapi = Bytes::from(serde_json::to_vec(&crate::openapi::document(&routes))?);
    let upstreams = Upstreams::new(config.upstream_urls()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let trusted_proxies = TrustedProxies::parse(&config.trusted_proxies).map_err(|e| anyhow::anyhow!("{e}"))?;
    let redis = Redis::connect(&common.redis_urls, &common.redis).await.context("connecting to redis")?;
    redis.log_errors();
    let limiter = RateLimiter::new(redis, &common.rate_limit);
    let voucher = common.auth.service_token.as_ref().and_then(ClientVoucher::new);
    if voucher.is_none() {
        tracing::warn!(
            "auth.service_token is not set: the services cannot tell the gateway's clients apart and limit them as one"
        );
    }
    let gateway = Arc::new(Gateway {
        routes,
        upstreams,
        openapi,
        config: config.clone(),
        limiter,
        trusted_proxies,
        voucher,
        ready: AtomicBool::new(true),
        shutdown: shutdown.clone(),
    });
    let app = router(Arc::clone(&gateway))?;
    tracing::info!(service = "gateway", %address, routes = gateway.routes.routes().len(), "serving REST");

    let stop_accepting = CancellationToken::new();
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    // Replies leave at once rather than waiting behind Nagle's algorithm for the client's ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY on a REST connection");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    let not_ready = async move { gateway.ready.store(false, Ordering::Relaxed) };
    aimesh_kit::server::stop_gracefully("gateway", server, stop_accepting, &common.server, shutdown, not_ready).await
}

fn router(gateway: Arc<Gateway>) -> anyhow::Result<axum::Router> {
    let cors = cors(&gateway.config.cors_allowed_origins)?;
    let router = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()) }),
        )
        .route("/readyz", axum::routing::get(readyz))
        .route("/openapi.json", axum::routing::get(openapi))
        .fallback(handle)
        .with_state(gateway)
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid));
    Ok(match cors {
        Some(cors) => router.layer(cors),
        None => router,
    })
}

fn cors(origins: &[String]) -> anyhow::Result<Option<tower_http::cors::CorsLayer>> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).with_context(|| format!("gateway.cors_allowed_origins: {o:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    let exposed = std::iter::once(REQUEST_ID).chain(PASSED_BACK.map(header::HeaderName::from_static));
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                http::Method::GET,
                http::Method::POST,
                http::Method::PUT,
                http::Method::PATCH,
                http::Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                REQUEST_ID,
                header::HeaderName::from_static("traceparent"),
            ])
            .expose_headers(exposed.collect::<Vec<_>>())
            .max_age(Duration::from_secs(600)),
    ))
}

async fn openapi(State(gateway): State<Arc<Gateway>>) -> Response {
    json_response(StatusCode::OK, gateway.openapi.to_vec())
}

/// Ready when every service answers grpc.health.v1 with SERVING and no shutdown has begun.
async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let checks = gateway.upstreams.iter().map(|(service, upstream)| {
        let mut client = upstream.health();
        async move {
            let check = client.check(HealthCheckRequest { service: String::new() });
            let serving = matches!(
                tokio::time::timeout(Duration::from_secs(1), check).await,
                Ok(Ok(response)) if response.get_ref().status() == ServingStatus::Serving
            );
            (service.to_owned(), serving)
        }
    });
    let services: serde_json::Map<String, serde_json::Value> = futures::future::join_all(checks)
        .await
        .into_iter()
        .map(|(service, serving)| (service, serde_json::Value::from(if serving { "SERVING" } else { "NOT_SERVING" })))
        .collect();
    let ready = gateway.ready.load(Ordering::Relaxed) && services.values().all(|v| v == "SERVING");
    let body = serde_json::json!({ "status": if ready { "ok" } else { "unavailable" }, "services": services });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, serde_json::to_vec(&body).unwrap_or_default())
}

/// Every REST route: find the RPC, build its request, call the service, answer.
async fn handle(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let started = Instant::now();
    let request_id =
        request.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).map(str::to_owned);
    let method = request.method().clone();
    let (route, bound) = match gateway.routes.lookup(&method, request.uri().path()) {
        Lookup::Found(route, bound) => (route, bound),
        Lookup::WrongMethod => {
            let error = RestError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNIMPLEMENTED",
                "METHOD_NOT_ALLOWED",
                format!("{method} is not allowed here"),
            );
            return error.into_response(request_id.as_deref());
        }
        Lookup::NotFound => {
            let message = format!("no route for {method} {}", request.uri().path());
            return RestError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "NO_ROUTE", message)
                .into_response(request_id.as_deref());
        }
    };
    let span = tracing::info_span!("rest", http.method = %method, http.route = %route.label(), request_id = request_id.as_deref().unwrap_or(""));
    aimesh_kit::telemetry::adopt_remote_parent(&span, request.headers());
    let client = client_ip(&gateway, &request);
    let response = limited_call(&gateway, route, bound, request, client)
        .instrument(span)
        .await
        .unwrap_or_else(|error| error.into_response(request_id.as_deref()));
    let labels = [
        ("route", route.label().to_owned()),
        ("method", method.as_str().to_owned()),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels[..2]).record(started.elapsed().as_secs_f64());
    response
}

/// The client's address: the socket peer, or what a trusted proxy in front of it saw.
fn client_ip(gateway: &Gateway, request: &Request) -> Option<IpAddr> {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>()?.0.ip();
    Some(gateway.trusted_proxies.client_ip(peer, request.headers()))
}

/// [`call`] after the gateway's own rate limit: a request without a credential counts against
/// its client address here (the services then leave that address alone, as the gateway vouches
/// for it); a credential's limits are the services' to decide, once they verified it.
async fn limited_call(
    gateway: &Gateway,
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
    request: Request,
    client: Option<IpAddr>,
) -> Result<Response, RestError> {
    let decision = if request.headers().contains_key(header::AUTHORIZATION) {
        Decision::unlimited()
    } else {
        let limits = gateway.limiter.limits_for(None, client, route.grpc_path().path());
        let decision = gateway.limiter.decide(&limits).await?;
        if !decision.allowed {
            return Err(RestError::from_status(&decision.status()));
        }
        decision
    };
    // Like a service's, every answer to a limited request says how much is left, errors too.
    match call(gateway, route, bound, request, client).await {
        Ok(mut response) => {
            decision.write_headers(response.headers_mut());
            Ok(response)
        }
        Err(mut error) => {
            decision.write_headers(&mut error.headers);
            Err(error)
        }
    }
}

async fn call(
    gateway: &Gateway,
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
    request: Request,
    client: Option<IpAddr>,
) -> Result<Response, RestError> {
    let (parts, body) = request.into_parts();
    if let Some(chunk_field) = raw_body_field(&route.method, &route.body).filter(|_| route.method.is_client_streaming())
    {
        // Uploads carry no vouched address (that code is changing elsewhere): they need a
        // credential, so only a refused anonymous attempt also counts against the gateway's own
        // address at files.
        if let Some(boundary) = form_boundary(&parts.headers) {
            return upload_form(gateway, route, bound, parts, body, boundary?, chunk_field).await;
        }
        return upload(gateway, route, bound, parts, body, chunk_field).await;
    }
    let body = axum::body::to_bytes(body, gateway.config.max_body_bytes).await.map_err(|_| {
        let message = format!("the body is larger than {} bytes or was cut off", gateway.config.max_body_bytes);
        RestError::new(StatusCode::PAYLOAD_TOO_LARGE, "INVALID_ARGUMENT", "BODY_TOO_LARGE", message)
    })?;
    let mut message = transcode::request_message(route, bound, parts.uri.query(), &body)?;
    let ranged = route.method.is_server_streaming() && apply_range(&mut message, &parts.headers);
    if route.method.is_server_streaming() {
        resume_from_last_event_id(&mut message, &parts.headers)?;
    }
    let mut grpc_request = outgoing(message, &parts.headers);
    if let Some((client, voucher)) = client.zip(gateway.voucher.as_ref()) {
        voucher.vouch(&mut grpc_request, client);
    }
    let timeout = Duration::from_secs(gateway.config.request_timeout_secs);
    let (mut grpc, path, codec) = upstream_call(gateway, route).await?;
    if !route.method.is_server_streaming() {
        grpc_request.set_timeout(timeout);
        let response = match tokio::time::timeout(timeout, grpc.unary(grpc_request, path, codec)).await {
            Ok(result) => result.map_err(|status| RestError::from_status(&status))?,
            Err(_) => return Err(deadline_exceeded()),
        };
        return json_reply(&response);
    }
    // A stream has no overall deadline (a watch lasts as long as the client wants), but it must
    // start within the timeout.
    let response = match tokio::time::timeout(timeout, grpc.server_streaming(grpc_request, path, codec)).await {
        Ok(result) => result.map_err(|status| RestError::from_status(&status))?,
        Err(_) => return Err(deadline_exceeded()),
    };
    let headers = passed_back(response.metadata().as_ref());
    let stream = response.into_inner();
    let mut reply = if let Some(shape) = DownloadShape::of(&route.method.output()) {
        download(stream, shape, ranged).await?
    } else {
        let keep_alive = Duration::from_secs(gateway.config.sse_keep_alive_secs.max(1));
        server_sent_events(stream, keep_alive, gateway.shutdown.clone())
    };
    reply.headers_mut().extend(headers);
    Ok(reply)
}

/// `message` as a gRPC request carrying the forwarded headers.
fn outgoing<T>(message: T, headers: &http::HeaderMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for name in FORWARDED {
        if let Some(value) = headers.get(*name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
            request.metadata_mut().insert(*name, value);
        }
    }
    // When tracing is on, the gateway's span becomes the parent; otherwise the caller's
    // traceparent passes through unchanged (copied above).
    aimesh_kit::telemetry::inject_current_context(request.metadata_mut());
    request
}

/// A ready client of the route's service, the RPC's path and its codec.
async fn upstream_call(
    gateway: &Gateway,
    route: &Route,
) -> Result<(Grpc<Connection>, http::uri::PathAndQuery, DynamicCodec), RestError> {
    let mut grpc = gateway.upstreams.get(&route.service)?.grpc();
    grpc.ready().await.map_err(|e| RestError::from(aimesh_kit::ServiceError::unavailable(e)))?;
    Ok((grpc, route.grpc_path().clone(), DynamicCodec::new(route.method.output())))
}

fn json_reply(response: &tonic::Response<DynamicMessage>) -> Result<Response, RestError> {
    let mut reply = json_response(StatusCode::OK, transcode::encode(response.get_ref())?);
    reply.headers_mut().extend(passed_back(response.metadata().as_ref()));
    Ok(reply)
}

/// Largest chunk message an upload is cut into (the services accept 4 MiB per message).
const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;

/// A raw-body upload to a client-streaming RPC: the first message from the path and query
/// (`?metadata.name=report.pdf`), then the body as it arrives, one message per chunk, and a
/// last message with `finish` set when the input has that field. A body cut off midway ends the
/// stream without `finish`, so the service keeps nothing of it. No body limit applies here: the
/// service enforces its own.
async fn upload(
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
    let request = outgoing(messages, &parts.headers);
    let response = grpc.client_streaming(request, path, codec).await.map_err(|s| RestError::from_status(&s))?;
    json_reply(&response)
}

/// The part of a multipart upload that carries the content; every other part is a text field.
const FILE_PART: &str = "file";
/// Largest text part of a multipart upload (the metadata fields are short).
const MAX_FORM_TEXT_BYTES: usize = 64 * 1024;

/// The boundary when the request is `multipart/form-data`; an error when it is but has none.
fn form_boundary(headers: &http::HeaderMap) -> Option<Result<String, RestError>> {
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
async fn upload_form(
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
    let request = outgoing(messages, &parts.headers);
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

/// `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` into the `offset`, `length` and `suffix_length`
/// fields of a download's request, when it has them. Anything else (several ranges, other
/// units) is ignored and the whole file is sent, as RFC 9110 allows. True when a range was set.
fn apply_range(message: &mut DynamicMessage, headers: &http::HeaderMap) -> bool {
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

fn deadline_exceeded() -> RestError {
    RestError::from(aimesh_kit::ServiceError::new(
        aimesh_kit::ErrorCode::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
        "the service did not answer in time",
    ))
}

/// A reconnecting EventSource sends `Last-Event-ID`; for a stream that resumes by sequence
/// number (`after_sequence` in, `sequence` out) it becomes the resume point.
fn resume_from_last_event_id(
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

/// Streams that carry a file, sent as a plain body rather than as events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownloadShape {
    /// Every message has `bytes data`; the first names `content_type` and `file_name`
    /// (chat's exports).
    DataChunks,
    /// A first message with `header` (the `file`: `mime_type`, `safe_name`, `size_bytes`; the
    /// range served: `offset`, `length`), then messages with `bytes chunk` (files' downloads).
    HeaderThenChunks,
}

impl DownloadShape {
    fn of(output: &prost_reflect::MessageDescriptor) -> Option<Self> {
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
async fn download(
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
    if !head.file_name.is_empty() {
        let safe: String = head.file_name.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\').collect();
        if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
            headers.insert(header::CONTENT_DISPOSITION, value);
        }
    }
    Ok(response)
}

/// Server-Sent Events: `event: message` per message (with `id:` its sequence number when it has
/// one), a comment every `keep_alive`, and on failure one `event: error` with the error body
/// before the stream closes.
fn server_sent_events(
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
