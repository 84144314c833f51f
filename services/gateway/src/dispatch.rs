//! The request path of an ordinary JSON route: find its RPC, build the request, call the service in time, answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use http::{StatusCode, header};
use prost_reflect::DynamicMessage;
use tonic::client::Grpc;
use tower_http::request_id::RequestId;
use tracing::Instrument;

use crate::downloads::{DownloadShape, apply_range, download};
use crate::reply::{RestError, json_response, passed_back};
use crate::routes::{Lookup, Route, raw_body_field};
use crate::server::Gateway;
use crate::streams::{resume_from_last_event_id, server_sent_events};
use crate::transcode;
use crate::uploads::{form_boundary, upload, upload_form};
use crate::upstream::{Connection, DynamicCodec};

/// Headers forwarded to the services as gRPC metadata. The credential is forwarded, never
/// replaced: every service verifies it itself.
const FORWARDED: &[&str] = &["authorization", "traceparent", "tracestate", "x-request-id", "user-agent"];

/// Every REST route: find the RPC, build its request, call the service, answer.
pub(crate) async fn handle(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
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
    let mut request = request;
    if let Some(client) = client {
        request.extensions_mut().insert(ClientIp(client));
    }
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

/// The client's address, in the request's extensions for [`outgoing`] to vouch for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(IpAddr);

/// The client's address: the socket peer, or what a trusted proxy in front of it saw.
fn client_ip(gateway: &Gateway, request: &Request) -> Option<IpAddr> {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>()?.0.ip();
    Some(gateway.trusted_proxies.client_ip(peer, request.headers()))
}

/// [`call`] after the gateway's own rate limits: a request without a credential counts against
/// its client address here; one with a credential is refused while its address is out of failed
/// authentications (`rate_limit.per_ip_failed_auth`), before any service looks the credential
/// up, and costs the address one when the service found it UNAUTHENTICATED. The services leave
/// both limits of an address the gateway vouches for to the gateway; a credential's own limits
/// are the services' to decide, once they verified it.
async fn limited_call(
    gateway: &Gateway,
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
    request: Request,
    client: Option<IpAddr>,
) -> Result<Response, RestError> {
    if request.headers().contains_key(header::AUTHORIZATION) {
        let Some(client) = client else { return call(gateway, route, bound, request).await };
        let admitted = gateway.limiter.admit_credential(client).await?;
        if !admitted.allowed {
            return Err(RestError::from_status(&admitted.status()));
        }
        let answer = call(gateway, route, bound, request).await;
        if answer.as_ref().is_err_and(|error| error.status == StatusCode::UNAUTHORIZED) {
            gateway.limiter.charge_failed_auth(client).await;
        }
        return answer;
    }
    let decision = {
        let limits = gateway.limiter.limits_for(None, client, route.grpc_path().path());
        let decision = gateway.limiter.decide(&limits).await?;
        if !decision.allowed {
            return Err(RestError::from_status(&decision.status()));
        }
        decision
    };
    // Like a service's, every answer to a limited request says how much is left, errors too.
    match call(gateway, route, bound, request).await {
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
) -> Result<Response, RestError> {
    let (parts, body) = request.into_parts();
    if let Some(chunk_field) = raw_body_field(&route.method, &route.body).filter(|_| route.method.is_client_streaming())
    {
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
    let mut grpc_request = outgoing(gateway, message, &parts);
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

/// `message` as a gRPC request carrying the forwarded headers of `parts` and the client address
/// the gateway vouches for (see `aimesh_kit::serving::ratelimit::client`), so the service counts
/// the client and not the gateway.
pub(crate) fn outgoing<T>(gateway: &Gateway, message: T, parts: &http::request::Parts) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for name in FORWARDED {
        if let Some(value) = parts.headers.get(*name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
            request.metadata_mut().insert(*name, value);
        }
    }
    if let Some(ClientIp(client)) = parts.extensions.get::<ClientIp>() {
        gateway.voucher.vouch(&mut request, *client);
    }
    // When tracing is on, the gateway's span becomes the parent; otherwise the caller's
    // traceparent passes through unchanged (copied above).
    aimesh_kit::telemetry::inject_current_context(request.metadata_mut());
    request
}

/// A ready client of the route's service, the RPC's path and its codec.
pub(crate) async fn upstream_call(
    gateway: &Gateway,
    route: &Route,
) -> Result<(Grpc<Connection>, http::uri::PathAndQuery, DynamicCodec), RestError> {
    let mut grpc = gateway.upstreams.get(&route.service)?.grpc();
    grpc.ready().await.map_err(|e| RestError::from(aimesh_kit::ServiceError::unavailable(e)))?;
    Ok((grpc, route.grpc_path().clone(), DynamicCodec::new(route.method.output())))
}

pub(crate) fn json_reply(response: &tonic::Response<DynamicMessage>) -> Result<Response, RestError> {
    let mut reply = json_response(StatusCode::OK, transcode::encode(response.get_ref())?);
    reply.headers_mut().extend(passed_back(response.metadata().as_ref()));
    Ok(reply)
}

fn deadline_exceeded() -> RestError {
    RestError::from(aimesh_kit::ServiceError::new(
        aimesh_kit::ErrorCode::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
        "the service did not answer in time",
    ))
}
