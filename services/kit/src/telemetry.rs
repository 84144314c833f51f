//! Structured logs, OpenTelemetry traces over OTLP (when configured), Prometheus metrics, and the
//! W3C trace-context propagation between services.
//!
//! Database latency comes from sqlx's own tracing events (see [`database_metrics_layer`]): the
//! log filter applies to the log and trace layers only, so the metrics layer sees sqlx's TRACE
//! events while they are neither printed nor exported.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
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
        // The database histograms are bound to the recorder that exists when they are made.
        metrics_handle()?;
        // Per layer, not global: the metrics layer must see sqlx's TRACE events whatever is logged.
        let filter = EnvFilter::try_new(&log.filter)?;
        let logged = filter.max_level_hint();
        let fmt = match log.format {
            LogFormat::Json => tracing_subscriber::fmt::layer().json().with_current_span(true).boxed(),
            LogFormat::Text => tracing_subscriber::fmt::layer().compact().boxed(),
        }
        .with_filter(filter);
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
        // Filtered outside the Option, not inside: a `None` layer is interested in every
        // callsite, which made the registry build every TRACE span of h2 and hyper (filtered
        // out only afterwards) and cost about a third of the CPU of a cheap RPC.
        let otel = tracer_provider
            .as_ref()
            .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("aimesh")))
            .with_filter(EnvFilter::try_new(&log.filter)?);
        tracing_subscriber::registry().with(fmt).with(otel).with(database_metrics_layer()).try_init()?;
        // `try_init` let the `log` crate's records through up to TRACE, since the metrics layer
        // wants sqlx's TRACE events; those it asks for through `tracing` itself. Records of
        // crates that log through `log` (fred) need only pass up to what is logged.
        tracing::log::set_max_level(match logged {
            Some(LevelFilter::OFF) => tracing::log::LevelFilter::Off,
            Some(LevelFilter::ERROR) => tracing::log::LevelFilter::Error,
            Some(LevelFilter::WARN) => tracing::log::LevelFilter::Warn,
            Some(LevelFilter::INFO) => tracing::log::LevelFilter::Info,
            Some(LevelFilter::DEBUG) => tracing::log::LevelFilter::Debug,
            _ => tracing::log::LevelFilter::Trace,
        });
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

/// The span field naming the service whose work a span is: the database label of the statements
/// and pool waits inside it (each service owns its database; see [`database_metrics_layer`]).
pub const SERVICE_FIELD: &str = "service";
/// A span for a service's background work (periodic tasks, health checks, the outbox relay):
/// at TRACE, so that it is neither logged nor traced (a trace as long as the process would
/// gather every background span), yet names the service for [`database_metrics_layer`].
pub fn service_span(service: &'static str) -> tracing::Span {
    tracing::trace_span!("service", service)
}

/// The target of sqlx's event after each statement (`sqlx-core/src/logger.rs`).
const STATEMENT_TARGET: &str = "sqlx::query";
/// The target of sqlx's event after each pool acquire (`sqlx-core/src/pool/inner.rs`).
const ACQUIRE_TARGET: &str = "sqlx::pool::acquire";
/// The database label of statements outside any span naming a service.
const OTHER_DATABASE: &str = "other";

/// Turns sqlx's events into `db_statement_duration_seconds{database,statement}` (statement:
/// select, insert, update, delete or other) and `db_pool_acquire_duration_seconds{database}`;
/// `database` is the [`SERVICE_FIELD`] of the nearest enclosing span that has one, else "other".
/// sqlx builds these events only when a layer wants them, so the pools log statements and
/// acquires at TRACE (see [`crate::data::db`]) and this layer wants exactly those.
pub fn database_metrics_layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    DatabaseMetrics.with_filter(DatabaseEvents)
}

/// Spans that name a service, and sqlx's statement and acquire events, at every level.
struct DatabaseEvents;

impl DatabaseEvents {
    fn wants(metadata: &Metadata<'_>) -> bool {
        if metadata.is_span() {
            metadata.fields().field(SERVICE_FIELD).is_some()
        } else {
            matches!(metadata.target(), STATEMENT_TARGET | ACQUIRE_TARGET)
        }
    }
}

impl<S> Filter<S> for DatabaseEvents {
    fn enabled(&self, metadata: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        Self::wants(metadata)
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if Self::wants(metadata) { Interest::always() } else { Interest::never() }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }
}

/// See [`database_metrics_layer`].
struct DatabaseMetrics;

impl<S> Layer<S> for DatabaseMetrics
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut service = ServiceOfSpan(None);
        attributes.record(&mut service);
        if let (Some(histograms), Some(span)) = (service.0, ctx.span(id)) {
            span.extensions_mut().insert(histograms);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = SqlxEvent::default();
        event.record(&mut fields);
        let Some(seconds) = fields.seconds else { return };
        let record = |histograms: &DatabaseHistograms| match event.metadata().target() {
            STATEMENT_TARGET => {
                histograms.statements[fields.statement.unwrap_or(Statement::Other) as usize].record(seconds);
            }
            _ => histograms.acquire.record(seconds),
        };
        let recorded = ctx.event_scope(event).into_iter().flatten().any(|span| {
            let extensions = span.extensions();
            extensions.get::<Arc<DatabaseHistograms>>().map(|histograms| record(histograms)).is_some()
        });
        if !recorded {
            record(&DatabaseHistograms::of(OTHER_DATABASE));
        }
    }
}

/// The histograms of one database label, made once per label (no allocation per event).
struct DatabaseHistograms {
    /// By [`Statement`].
    statements: [metrics::Histogram; Statement::ALL.len()],
    acquire: metrics::Histogram,
}

impl DatabaseHistograms {
    fn of(database: &str) -> Arc<Self> {
        static MADE: OnceLock<RwLock<HashMap<String, Arc<DatabaseHistograms>>>> = OnceLock::new();
        let made = MADE.get_or_init(Default::default);
        if let Some(histograms) = made.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(database) {
            return Arc::clone(histograms);
        }
        let mut made = made.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let histograms = made.entry(database.to_owned()).or_insert_with(|| {
            Arc::new(Self {
                statements: Statement::ALL.map(|statement| {
                    metrics::histogram!("db_statement_duration_seconds",
                        "database" => database.to_owned(), "statement" => statement.label())
                }),
                acquire: metrics::histogram!("db_pool_acquire_duration_seconds", "database" => database.to_owned()),
            })
        });
        Arc::clone(histograms)
    }
}

/// The histograms of a new span's [`SERVICE_FIELD`], if it has one.
struct ServiceOfSpan(Option<Arc<DatabaseHistograms>>);

impl Visit for ServiceOfSpan {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == SERVICE_FIELD {
            self.0 = Some(DatabaseHistograms::of(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `service = %name` arrives here; such spans are rare enough to format.
        if field.name() == SERVICE_FIELD {
            self.0 = Some(DatabaseHistograms::of(&format!("{value:?}")));
        }
    }
}

/// What a sqlx event says: how long, and for a statement, which kind.
#[derive(Default)]
struct SqlxEvent {
    seconds: Option<f64>,
    statement: Option<Statement>,
}

impl Visit for SqlxEvent {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if matches!(field.name(), "elapsed_secs" | "acquired_after_secs") {
            self.seconds = Some(value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            // The first four words; enough unless the statement starts with WITH.
            "summary" if self.statement.is_none() => self.statement = Some(Statement::of(value)),
            // The whole statement, given when longer than its summary.
            "db.statement" if !value.trim().is_empty() => self.statement = Some(Statement::of(value)),
            _ => {}
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

/// The kind of an SQL statement, the `statement` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Statement {
    Select,
    Insert,
    Update,
    Delete,
    Other,
}

impl Statement {
    const ALL: [Self; 5] = [Self::Select, Self::Insert, Self::Update, Self::Delete, Self::Other];

    fn label(self) -> &'static str {
        match self {
            Self::Select => "select",
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Other => "other",
        }
    }

    /// The kind of `sql` by its first keyword; after WITH, by the first of select, insert,
    /// update or delete outside the common table expressions' parentheses.
    fn of(sql: &str) -> Self {
        let mut words = TopLevelWords { rest: sql.as_bytes(), sql, depth: 0 };
        let keyword = |word: &str| Self::ALL[..4].iter().copied().find(|kind| word.eq_ignore_ascii_case(kind.label()));
        match words.next() {
            Some(first) if first.eq_ignore_ascii_case("with") => words.find_map(keyword).unwrap_or(Self::Other),
            Some(first) => keyword(first).unwrap_or(Self::Other),
            None => Self::Other,
        }
    }
}

/// The words of an SQL text outside parentheses, string literals, quoted names and comments.
struct TopLevelWords<'a> {
    sql: &'a str,
    rest: &'a [u8],
    depth: usize,
}

impl<'a> Iterator for TopLevelWords<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let skip_past = |rest: &'a [u8], from: usize, end: &[u8]| -> &'a [u8] {
            let after = &rest[from..];
            match after.windows(end.len()).position(|w| w == end) {
                Some(at) => &after[at + end.len()..],
                None => &[],
            }
        };
        while let Some(&byte) = self.rest.first() {
            match byte {
                b'\'' => self.rest = skip_past(self.rest, 1, b"'"),
                b'"' => self.rest = skip_past(self.rest, 1, b"\""),
                b'-' if self.rest.starts_with(b"--") => self.rest = skip_past(self.rest, 2, b"\n"),
                b'/' if self.rest.starts_with(b"/*") => self.rest = skip_past(self.rest, 2, b"*/"),
                b'(' => {
                    self.depth += 1;
                    self.rest = &self.rest[1..];
                }
                b')' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.rest = &self.rest[1..];
                }
                b if b.is_ascii_alphanumeric() || b == b'_' => {
                    let length = self.rest.iter().position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'));
                    let length = length.unwrap_or(self.rest.len());
                    let start = self.sql.len() - self.rest.len();
                    self.rest = &self.rest[length..];
                    if self.depth == 0 {
                        // Between ASCII bytes, so on character boundaries.
                        return self.sql.get(start..start + length);
                    }
                }
                _ => self.rest = &self.rest[1..],
            }
        }
        None
    }
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

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use std::sync::{Arc, Mutex};

    use tracing_subscriber::Layer;
    use tracing_subscriber::fmt::MakeWriter;

    use super::{Statement, database_metrics_layer, metrics_handle};

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    /// As `Telemetry::init` layers them: the log filter keeps sqlx's TRACE statements out of
    /// the log (slow ones, at WARN, stay in it) while the metrics layer counts both.
    #[test]
    fn the_log_filter_hides_statements_from_the_log_but_not_from_the_metrics() {
        let handle = metrics_handle().expect("the recorder");
        let lines = Lines::default();
        let log = tracing_subscriber::fmt::layer()
            .with_writer(lines.clone())
            .with_ansi(false)
            .with_filter(tracing_subscriber::EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry().with(log).with(database_metrics_layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc", service = "telemetry_log_test");
            let _entered = span.enter();
            tracing::trace!(target: "sqlx::query", summary = "SELECT quietly", db.statement = "", elapsed_secs = 0.001_f64);
            tracing::warn!(target: "sqlx::query", summary = "SELECT slowly", db.statement = "", elapsed_secs = 2.0_f64, "slow statement: execution time exceeded alert threshold");
        });
        let logged = String::from_utf8(lines.0.lock().expect("not poisoned").clone()).expect("utf-8");
        assert!(logged.contains("SELECT slowly") && logged.contains("slow statement"), "{logged}");
        assert!(!logged.contains("SELECT quietly"), "{logged}");
        let series = r#"db_statement_duration_seconds_count{database="telemetry_log_test",statement="select"} 2"#;
        assert!(handle.render().contains(series), "both statements timed");
    }

    #[test]
    fn a_statement_is_named_by_its_first_keyword_or_after_its_common_table_expressions() {
        for (sql, kind) in [
            ("SELECT 1", Statement::Select),
            ("  select id FROM t FOR UPDATE", Statement::Select),
            ("INSERT INTO t VALUES ($1)", Statement::Insert),
            ("update t SET a = 1", Statement::Update),
            ("DELETE FROM t", Statement::Delete),
            ("BEGIN", Statement::Other),
            ("", Statement::Other),
            ("WITH moved AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM moved", Statement::Insert),
            ("WITH RECURSIVE r(n) AS (SELECT 1 UNION SELECT n + 1 FROM r) SELECT * FROM r", Statement::Select),
            ("WITH a AS MATERIALIZED (SELECT ')insert(' AS \"(\") UPDATE t SET x = 1", Statement::Update),
            ("WITH a AS (SELECT 1) -- insert\n, b AS (SELECT 2) DELETE FROM t", Statement::Delete),
            // A summary of four words cannot tell; the whole statement follows in the event.
            ("WITH a AS (SELECT", Statement::Other),
        ] {
            assert_eq!(Statement::of(sql), kind, "{sql}");
        }
    }

    /// Events as sqlx emits them (target, fields, level), inside and outside a service's span.
    #[test]
    fn sqlx_events_become_histograms_labelled_by_the_enclosing_service() {
        let handle = metrics_handle().expect("the recorder");
        let subscriber = tracing_subscriber::registry().with(database_metrics_layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc", service = "telemetry_test", method = "x");
            let _entered = span.enter();
            let inner = tracing::info_span!("inner");
            let _inner = inner.enter();
            tracing::trace!(target: "sqlx::query", summary = "WITH a AS (SELECT", db.statement = "\n\nWITH a AS (SELECT 1) DELETE FROM t\n", elapsed_secs = 0.002_f64);
            tracing::warn!(target: "sqlx::query", summary = "UPDATE t SET a", db.statement = "", elapsed_secs = 3.0_f64, "slow statement");
            tracing::trace!(target: "sqlx::pool::acquire", acquired_after_secs = 0.001_f64, "acquired connection");
            tracing::trace!(target: "sqlx::query_other", summary = "SELECT 1", elapsed_secs = 0.5_f64);
        });
        let rendered = handle.render();
        for series in [
            r#"db_statement_duration_seconds_count{database="telemetry_test",statement="delete"} 1"#,
            r#"db_statement_duration_seconds_count{database="telemetry_test",statement="update"} 1"#,
            r#"db_statement_duration_seconds_count{database="telemetry_test",statement="select"} 0"#,
            r#"db_pool_acquire_duration_seconds_count{database="telemetry_test"} 1"#,
        ] {
            assert!(rendered.contains(series), "{series} in\n{rendered}");
        }
    }
}
