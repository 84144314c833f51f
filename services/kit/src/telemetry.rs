//! Structured logs, OpenTelemetry traces over OTLP (when configured), Prometheus metrics, and the
//! W3C trace-context propagation between services.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, MetricsConfig, TelemetryConfig};

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes buffered spans.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global logger and, when `telemetry.otlp_endpoint` is set, the OTLP exporter.
    /// Call once, early in `main`, inside the Tokio runtime.
    pub fn init(service: &str, log: &LogConfig, telemetry: &TelemetryConfig) -> anyhow::Result<Self> {
        let filter = EnvFilter::try_new(&log.filter)?;
        let fmt = match log.format {
            LogFormat::Json => tracing_subscriber::fmt::layer().json().with_current_span(true).boxed(),
            LogFormat::Text => tracing_subscriber::fmt::layer().compact().boxed(),
        };
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let tracer_provider = match &telemetry.otlp_endpoint {
            Some(endpoint) => {
                use opentelemetry_otlp::WithExportConfig;
                let exporter =
                    opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint.clone()).build()?;
                let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
                Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
            }
            None => None,
        };
        let otel = tracer_provider
            .as_ref()
            .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("aimesh")).boxed());
        tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init()?;
        Ok(Self { tracer_provider })
    }

    /// Flushes and stops the span exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces failed");
        }
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])?
        .install_recorder()?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Serves `/metrics` of this process when configured; returns where.
pub async fn serve_metrics(config: &MetricsConfig) -> anyhow::Result<Option<SocketAddr>> {
    let handle = metrics_handle()?;
    let Some(listen) = config.listen else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let app = axum::Router::new().route("/metrics", axum::routing::get(move || render(handle.clone())));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(Some(address))
}

async fn render(handle: PrometheusHandle) -> String {
    handle.render()
}

/// Makes the current span a child of the trace context in `headers` (W3C `traceparent`).
pub fn adopt_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderCarrier(headers)));
    let _ = span.set_parent(context);
}

/// The current span's trace context as a W3C `traceparent` (through the configured propagator);
/// none outside a traced span.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent")
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_current_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut MetadataCarrier(metadata)));
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataCarrier<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        {
            self.0.insert(key, value);
        }
    }
}
