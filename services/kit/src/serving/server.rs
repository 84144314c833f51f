//! Server bootstrap shared by every service: grpc.health.v1 following each dependency,
//! reflection, request deadlines, per-RPC metrics and trace spans, panic catching,
//! authentication then rate limiting, and graceful
//! shutdown (health flips to NOT_SERVING, drain, stop accepting, let in-flight requests finish).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument;

use crate::auth::{CredentialVerifier, DeploymentSecret};
use crate::config::ServerConfig;
use crate::data::redis::Redis;
use crate::data::replicas::Database;
use crate::serving::authenticate::{AuthLayer, Authenticator};
use crate::serving::ratelimit::{RateLimitLayer, RateLimiter};
use crate::serving::read_your_writes::RecordWritesLayer;

/// A store a service cannot work without; health follows it.
#[derive(Clone, Debug)]
pub enum Dependency {
    Postgres(PgPool),
    Redis(Redis),
    /// A store the kit does not know, probed by the service that owns it (ClickHouse).
    Other(Arc<dyn Probe>),
}

/// How a service tells whether a store of its own answers.
pub trait Probe: std::fmt::Debug + Send + Sync + 'static {
    /// Short name for logs and the `dependency_up` gauge, such as "clickhouse".
    fn name(&self) -> &'static str;
    /// Whether it answers now.
    fn is_healthy(&self) -> BoxFuture<'_, bool>;
}

impl Dependency {
    fn name(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Redis(_) => "redis",
            Self::Other(probe) => probe.name(),
        }
    }

    async fn is_healthy(&self) -> bool {
        let probe = async {
            match self {
                Self::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
                Self::Redis(redis) => redis.is_healthy().await,
                Self::Other(probe) => probe.is_healthy().await,
            }
        };
        tokio::time::timeout(Duration::from_secs(2), probe).await.unwrap_or(false)
    }
}

/// What a service hands to [`serve`].
pub struct ServiceSpec {
    /// Short name for logs and metrics, such as "identity".
    pub name: &'static str,
    pub routes: tonic::service::Routes,
    /// Fully qualified gRPC service names, such as "aimesh.identity.v1.UserService", for health.
    pub grpc_services: Vec<&'static str>,
    pub dependencies: Vec<Dependency>,
    /// The service's database, when it has read replicas to keep its callers' writes in view of.
    pub database: Option<Database>,
}

/// Serves `spec` on `listener`, authenticating callers with `verifier` and then limiting them
/// with `limiter` (believing the client addresses vouched for with `gateway_token`), until
/// `shutdown` is cancelled, then shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    spec: ServiceSpec,
    verifier: CredentialVerifier,
    limiter: RateLimiter,
    gateway_token: Option<DeploymentSecret>,
    settings: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let address = listener.local_addr()?;
    // Last-use times of credentials go to Redis every few seconds and once more after the
    // server stopped, so the last requests' times are kept too.
    let stop_recorder = CancellationToken::new();
    let recorder = tokio::spawn({
        let (last_use, stop) = (verifier.last_use().clone(), stop_recorder.clone());
        async move {
            crate::serving::periodic::every(LAST_USE_RECORD_INTERVAL, &stop, || last_use.flush()).await;
            last_use.flush().await;
        }
    });
    let limiter = limiter.trusting_gateway(gateway_token);
    let layers = Layers {
        auth: AuthLayer::new(Authenticator::new(verifier, limiter.clone())),
        rate_limit: RateLimitLayer::new(limiter),
        record_writes: spec.database.clone().filter(Database::has_replicas).map(RecordWritesLayer::new),
    };
    let served = serve_until_shutdown(listener, address, spec, layers, settings, shutdown).await;
    stop_recorder.cancel();
    let _ = recorder.await;
    served
}

/// How often each process writes the last-use times it collected to Redis.
const LAST_USE_RECORD_INTERVAL: Duration = Duration::from_secs(2);

/// The layers every service's requests pass, outermost first after observation.
struct Layers {
    auth: AuthLayer,
    rate_limit: RateLimitLayer,
    /// Only with read replicas.
    record_writes: Option<RecordWritesLayer>,
}

async fn serve_until_shutdown(
    listener: TcpListener,
    address: std::net::SocketAddr,
    spec: ServiceSpec,
    layers: Layers,
    settings: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl and many other tools still speak only v1alpha. Only
    // the services served on this port are advertised, not every service of the descriptor set.
    let reflection = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(aimesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        spec.grpc_services.iter().fold(builder, |builder, service| builder.with_service_name(*service))
    };
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let health = HealthMonitor {
        reporter,
        services: Arc::new(spec.grpc_services.clone()),
        dependencies: Arc::new(spec.dependencies),
    };
    health.report(health.check().await).await;
    tokio::spawn(
        health
            .clone()
            .run(settings.health_interval(), shutdown.clone())
            .instrument(crate::telemetry::service_span(spec.name)),
    );

    let stop_accepting = CancellationToken::new();
    let routes = spec.routes.add_service(health_service).add_service(reflection_v1).add_service(reflection_v1alpha);
    let server = tonic::transport::Server::builder()
        .timeout(settings.request_timeout())
        .layer(ObserveLayer { service: spec.name })
        // Outside the rate limit: failed authentications are limited before any credential
        // is looked up, and the principal is known when the other limits are chosen.
        .layer(layers.auth)
        .layer(layers.rate_limit)
        // Inside the others: the caller is known, and a refused call is not counted as a write.
        .layer(tower::util::option_layer(layers.record_writes))
        .add_routes(routes)
        .serve_with_incoming_shutdown(nodelay_incoming(listener), stop_accepting.clone().cancelled_owned());
    let server = tokio::spawn(server);
    tracing::info!(service = spec.name, %address, "serving gRPC");
    let not_serving = async move { health.report(false).await };
    stop_gracefully(spec.name, server, stop_accepting, &settings, shutdown, not_serving).await
}

/// The connections `listener` accepts, with `TCP_NODELAY` set. tonic sets it only on listeners
/// it binds itself: with Nagle's algorithm on, the small frames of an HTTP/2 answer (headers,
/// data, trailers) wait for the client's delayed ACK, up to 40 ms on Linux, while the CPU idles.
pub fn nodelay_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Waits until `server` ends by itself or `shutdown` is cancelled; then `not_serving` (health
/// turns NOT_SERVING), the drain pause, `stop_accepting` (the listener closes), and at most the
/// grace period for in-flight requests before they are aborted.
pub async fn stop_gracefully<E>(
    name: &'static str,
    mut server: tokio::task::JoinHandle<Result<(), E>>,
    stop_accepting: CancellationToken,
    settings: &ServerConfig,
    shutdown: CancellationToken,
    not_serving: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::select! {
        result = &mut server => return Ok(result??),
        () = shutdown.cancelled() => {}
    }
    not_serving.await;
    tracing::info!(service = name, drain = ?settings.drain(), "shutting down: draining");
    tokio::time::sleep(settings.drain()).await;
    stop_accepting.cancel();
    match tokio::time::timeout(settings.shutdown_grace(), &mut server).await {
        Ok(result) => result??,
        Err(_) => {
            tracing::warn!(service = name, "in-flight requests outlived the grace period; aborting them");
            server.abort();
        }
    }
    tracing::info!(service = name, "stopped");
    Ok(())
}

/// Sets grpc.health.v1 of a service's gRPC services (and the server as a whole) from its
/// dependencies.
#[derive(Clone)]
struct HealthMonitor {
    reporter: HealthReporter,
    services: Arc<Vec<&'static str>>,
    dependencies: Arc<Vec<Dependency>>,
}

impl HealthMonitor {
    async fn check(&self) -> bool {
        let results = futures::future::join_all(self.dependencies.iter().map(|d| async move {
            let healthy = d.is_healthy().await;
            metrics::gauge!("dependency_up", "dependency" => d.name()).set(if healthy { 1.0 } else { 0.0 });
            if !healthy {
                tracing::warn!(dependency = d.name(), "dependency is not answering");
            }
            healthy
        }))
        .await;
        results.into_iter().all(|healthy| healthy)
    }

    async fn report(&self, healthy: bool) {
        let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
        for service in self.services.iter().copied().chain([""]) {
            self.reporter.set_service_status(service, status).await;
        }
    }

    async fn run(self, every: Duration, shutdown: CancellationToken) {
        let last = std::sync::atomic::AtomicBool::new(true);
        crate::serving::periodic::every(every, &shutdown, || async {
            let healthy = self.check().await;
            if healthy != last.swap(healthy, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(healthy, "health changed");
            }
            // A shutdown that began during the check must not be overwritten with SERVING.
            if !shutdown.is_cancelled() {
                self.report(healthy).await;
            }
        })
        .await;
    }
}

/// Per-RPC trace span (child of the caller's W3C trace context), RED metrics
/// (`rpc_requests_total` and `rpc_duration_seconds` by service, method and gRPC code), and
/// panic catching: a panicking handler answers INTERNAL instead of dropping the connection.
#[derive(Clone, Copy, Debug)]
pub struct ObserveLayer {
    pub service: &'static str,
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, service: self.service }
    }
}

/// The service [`ObserveLayer`] makes.
#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    service: &'static str,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Observe<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().trim_start_matches('/');
        let (grpc_service, method) = path.split_once('/').unwrap_or((path, ""));
        let (grpc_service, method) = (grpc_service.to_owned(), method.to_owned());
        let span = tracing::info_span!(
            "rpc",
            service = self.service,
            otel.name = %format!("{grpc_service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %grpc_service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            user_id = tracing::field::Empty,
        );
        crate::telemetry::adopt_remote_parent(&span, request.headers());
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let service = self.service;
        Box::pin(
            async move {
                let response = match AssertUnwindSafe(future).catch_unwind().await {
                    Ok(result) => result?,
                    Err(_) => {
                        tracing::error!("handler panicked");
                        tonic::Status::internal("internal error").into_http()
                    }
                };
                // Unary errors are trailers-only responses, so the code is in the headers;
                // a success carries it in the trailers, which this layer does not wait for.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok);
                tracing::Span::current().record("rpc.grpc.status_code", code as i32);
                let labels = [
                    ("service", service.to_owned()),
                    ("grpc_service", grpc_service),
                    ("method", method),
                    ("code", format!("{code:?}")),
                ];
                metrics::counter!("rpc_requests_total", &labels).increment(1);
                metrics::histogram!("rpc_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                let _ = ctrl_c.await;
                cancel.cancel();
                return;
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}
