//! The HTTP server: routes every REST call to its RPC, plus `/healthz`, `/readyz` and
//! `/openapi.json`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use aimesh_kit::config::CommonConfig;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::serving::ratelimit::RateLimiter;
use aimesh_kit::serving::ratelimit::client::ClientVoucher;

use crate::client::TrustedProxies;
use crate::config::GatewayConfig;
use crate::dispatch::handle;
use crate::reply::{PASSED_BACK, json_response};
use crate::routes::{RouteTable, aimesh_pool};
use crate::upstream::Upstreams;

const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// What every request handler shares.
pub(crate) struct Gateway {
    pub(crate) routes: RouteTable,
    pub(crate) upstreams: Upstreams,
    openapi: Bytes,
    pub(crate) config: GatewayConfig,
    /// Limits callers without a credential per client address, like the services would.
    pub(crate) limiter: RateLimiter,
    pub(crate) trusted_proxies: TrustedProxies,
    /// Vouches for the client address on every call (see `aimesh_kit::serving::ratelimit::client`).
    pub(crate) voucher: ClientVoucher,
    /// False from the start of a shutdown, so `/readyz` sends load balancers elsewhere.
    ready: AtomicBool,
    pub(crate) shutdown: CancellationToken,
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
    let upstreams = Upstreams::new(&common.services).map_err(|e| anyhow::anyhow!("{e}"))?;
    let trusted_proxies = TrustedProxies::parse(&config.trusted_proxies).map_err(|e| anyhow::anyhow!("{e}"))?;
    let redis = Redis::connect(&common.redis_urls, &common.redis).await.context("connecting to redis")?;
    redis.log_errors();
    let limiter = RateLimiter::new(redis, &common.rate_limit);
    // Without it the services would count every client's failures against the gateway's own
    // address, and a few bad credentials would lock everybody out.
    let voucher = common.auth.gateway_token.as_ref().and_then(ClientVoucher::new).context(
        "auth.gateway_token is not set: the gateway must vouch for its clients' addresses to the services \
         (set the same secret on every service; `aimesh all` makes one up)",
    )?;
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
    aimesh_kit::serving::server::stop_gracefully("gateway", server, stop_accepting, &common.server, shutdown, not_ready)
        .await
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
