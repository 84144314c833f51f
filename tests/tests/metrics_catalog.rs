//! Every metric the chart's alert rules (`helm/aimesh/monitoring/rules.yaml`) and dashboards
//! (`helm/aimesh/monitoring/dashboards/*.json`) read is one the mesh really exports: a mesh with
//! read replicas takes traffic in every service through the gateway (and the internal usage
//! RPCs), its outboxes drain into analytics, then `/metrics` is scraped and every name an
//! expression reads must be there (a histogram as `<name>_bucket`, as Prometheus reads it).
//! Names that recording rules define count as defined; [`EXTERNAL`] names come from elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aimesh_kit::testing::ScratchPostgres;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::rest::Form;
use aimesh_tests::{Mesh, catalog, eventually, expect_code, outbox_drains, record, set_daily_token_budget};
use aimesh_tests::{metric, reserve_tokens, test_config, use_postgres_server};
use http::{Method, StatusCode};
use serde_json::json;

/// Names read by the rules or dashboards that no aimesh process exports, with why.
const EXTERNAL: &[(&str, &str)] = &[(
    "kube_",
    "kube-state-metrics (kube_cronjob_status_last_successful_time{cronjob}: the backup CronJob's last success)",
)];

/// How long the scrape may take to show every series: pool gauges are published every 5 s,
/// replica checks every 100 ms here.
const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn every_metric_the_rules_and_dashboards_read_is_exported_after_traffic_through_every_service() {
    let sources = Sources::read(&repository_root().join("helm/aimesh/monitoring"));
    assert!(!sources.read.is_empty(), "no expression names a metric in {sources:?}");

    // As `aimesh` installs it, so the database histograms come from sqlx's own events.
    let log = aimesh_kit::config::LogConfig { filter: "warn".into(), ..Default::default() };
    let _telemetry = aimesh_kit::telemetry::Telemetry::init("metrics-catalog", &log, &Default::default())
        .expect("install the telemetry");
    let metrics_config = aimesh_kit::config::MetricsConfig { listen: Some(([127, 0, 0, 1], 0).into()) };
    let scrape_address =
        aimesh_kit::telemetry::serve_metrics(&metrics_config).await.expect("serve /metrics").expect("an address");

    // Replicas, so that the replica series exist.
    let primary = ScratchPostgres::start();
    let replica = primary.start_replica();
    let (mut config, _unused_databases) = test_config();
    use_postgres_server(&mut config, &primary.url(), Some(&replica.url()));
    config.common.database.replica_check_interval_ms = 100;
    let mesh = Mesh::start_with(config, Vec::new()).await;

    drive_traffic(&mesh).await;
    let databases = [
        ("identity", mesh.identity_db().await),
        ("usage", mesh.usage_db().await),
        ("chat", mesh.chat_db().await),
        ("files", mesh.files_db().await),
    ];
    for (service, pool) in databases {
        outbox_drains(&pool, service).await;
        pool.close().await;
    }

    let scrape = || async {
        let url = format!("http://{scrape_address}/metrics");
        let body = reqwest::get(&url).await.expect("scrape /metrics").text().await.expect("a text body");
        exported_names(&body)
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let missing = loop {
        let missing = sources.missing_from(&scrape().await);
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let report: Vec<String> = missing.iter().map(|(name, used_in)| format!("{name} (read by {used_in:?})")).collect();
    assert!(report.is_empty(), "not exported after {PATIENCE:?}:\n{}", report.join("\n"));

    // The series of issue 21 carry what they should: the service whose work ran a statement or
    // waited for a connection (its RPCs, and its background work such as the outbox relay).
    for (name, labels) in [
        ("db_statement_duration_seconds_count", &["database=\"chat\"", "statement=\"insert\""][..]),
        ("db_statement_duration_seconds_count", &["database=\"usage\"", "statement=\"select\""]),
        ("db_statement_duration_seconds_count", &["database=\"identity\"", "statement=\"update\""]),
        ("db_pool_acquire_duration_seconds_count", &["database=\"files\""]),
        ("db_pool_max_connections", &["database=\"usage\"", "server=\"primary\""]),
        ("redis_command_duration_seconds_count", &["operation=\"reserve\""]),
        ("redis_command_duration_seconds_count", &["operation=\"ratelimit\""]),
        ("redis_command_duration_seconds_count", &["operation=\"cache_get\""]),
        ("clickhouse_insert_duration_seconds_count", &["table=\"usage_events\""]),
        ("usage_quota_near_limit_total", &["scope=\"project\""]),
        ("usage_quota_exceeded_total", &["scope=\"project\""]),
    ] {
        assert!(metric(name, labels) > 0.0, "{name}{labels:?} counted nothing");
    }
    // Series that count rare events exist, at 0, before any happened.
    let exposition = aimesh_kit::telemetry::metrics_handle().expect("the recorder").render();
    for series in [
        r#"usage_quota_exceeded_total{scope="user"} 0"#,
        r#"usage_quota_near_limit_total{scope="api_key"} 0"#,
        r#"redis_breaker_trips_total{component="cache"}"#,
        r#"redis_breaker_trips_total{component="ratelimit"}"#,
        r#"redis_breaker_trips_total{component="stream_access"}"#,
    ] {
        assert!(exposition.lines().any(|line| line.starts_with(series)), "{series} is exported");
    }
    mesh.stop().await.expect("the mesh stops");
}

/// Traffic that makes every service record what its series count: identity (sign-up, login,
/// projects, keys), chat (sessions, messages), files (upload, download), usage (catalog, quota,
/// a reservation near its limit and one over it, records), analytics (ingest through the
/// outboxes, queries), the gateway (REST calls, a 404), caches and rate limits on the way.
async fn drive_traffic(mesh: &Mesh) {
    let rest = mesh.rest();
    let (_admin, _model) = catalog(mesh).await;
    rest.post("/v1/users", json!({ "email": "kim@example.org", "username": "kim", "password": "kim-password-123" }))
        .send()
        .await
        .expect(StatusCode::OK);
    let login = rest
        .post("/v1/auth/login", json!({ "login": "kim@example.org", "password": "kim-password-123" }))
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    let token = login["accessToken"].as_str().expect("an access token").to_owned();
    let project = rest
        .post("/v1/projects", json!({ "name": "Catalog" }))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    let project_id = project["id"].as_str().expect("a project id").to_owned();
    let key = rest
        .post(
            &format!("/v1/projects/{project_id}/apiKeys"),
            json!({ "name": "backend", "scopes": ["usage:write", "usage:read", "chat:read", "chat:write"] }),
        )
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    let secret = key["secret"].as_str().expect("a key secret").to_owned();
    rest.get(&format!("/v1/projects/{project_id}")).bearer(&token).send().await.expect(StatusCode::OK);
    rest.get(&format!("/v1/projects/{project_id}/apiKeys")).bearer(&token).send().await.expect(StatusCode::OK);

    // Chat.
    let session = rest
        .post("/v1/chat/sessions", json!({ "projectId": project_id, "model": "gpt-4o", "title": "metrics" }))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json();
    let session_id = session["id"].as_str().expect("a session id").to_owned();
    let messages = format!("/v1/chat/sessions/{session_id}/messages");
    for content in ["one", "two", "three"] {
        rest.post(&messages, json!({ "role": "MESSAGE_ROLE_USER", "content": content }))
            .bearer(&token)
            .send()
            .await
            .expect(StatusCode::OK);
    }
    rest.get(&format!("{messages}?pageSize=10")).bearer(&token).send().await.expect(StatusCode::OK);
    rest.get(&format!("/v1/chat/sessions?projectId={project_id}")).bearer(&token).send().await.expect(StatusCode::OK);

    // Files.
    let form = Form::new().file("file", "notes.txt", "text/plain", b"metrics catalog notes");
    let uploads = format!("/v1/projects/{project_id}/files");
    let file = rest.call(Method::POST, &uploads).form(form).bearer(&token).send().await.expect(StatusCode::OK).json();
    let file_id = file["id"].as_str().expect("a file id").to_owned();
    rest.get(&format!("/v1/files/{file_id}:download")).bearer(&token).send().await.expect(StatusCode::OK);
    rest.get(&uploads).bearer(&token).send().await.expect(StatusCode::OK);

    // Usage: a budget of 1000 tokens a day, 850 reserved (85%: near), 300 more refused.
    set_daily_token_budget(mesh, &token, &project_id, 1000).await;
    let reserve = |tokens: i64| reserve_tokens(&project_id, tokens);
    let near = mesh.quotas().reserve(mesh.on_behalf(reserve(850), &secret)).await.expect("room for 850").into_inner();
    expect_code(
        "a reservation over the budget",
        tonic::Code::ResourceExhausted,
        mesh.quotas().reserve(mesh.on_behalf(reserve(300), &secret)).await,
    );
    let release = usage_pb::ReleaseReservationRequest { project_id: project_id.clone(), reservation_id: near.id };
    mesh.quotas().release_reservation(mesh.on_behalf(release, &secret)).await.expect("release");
    let small = usage_pb::RecordUsageRequest {
        input_tokens: 10,
        cached_input_tokens: 0,
        output_tokens: 5,
        ..record(&project_id, "catalog-1")
    };
    mesh.usage().record_usage(mesh.on_behalf(small, &secret)).await.expect("record usage");
    rest.get(&format!("/v1/projects/{project_id}/usage")).bearer(&token).send().await.expect(StatusCode::OK);
    rest.get(&format!("/v1/projects/{project_id}/quotas")).bearer(&token).send().await.expect(StatusCode::OK);

    // Analytics, once the record reached it.
    let now = chrono::Utc::now();
    let (start, end) =
        ((now - chrono::Duration::hours(1)).to_rfc3339(), (now + chrono::Duration::hours(1)).to_rfc3339());
    let breakdown = format!(
        "/v1/projects/{project_id}/analytics/usage:breakdown?dimension=model&startTime={}&endTime={}",
        start.replace('+', "%2B"),
        end.replace('+', "%2B")
    );
    eventually("analytics has the usage record", || async {
        let reply = rest.get(&breakdown).bearer(&token).send().await;
        assert!(reply.status == StatusCode::OK, "breakdown: {:?}", reply.json());
        reply.json()["rows"].as_array().is_some_and(|rows| !rows.is_empty())
    })
    .await;
    rest.get(&format!("/v1/projects/{project_id}/analytics/audit")).bearer(&token).send().await.expect(StatusCode::OK);

    // The gateway's refusals count too.
    rest.get("/v1/nothing/here").send().await.expect(StatusCode::NOT_FOUND);
}

/// The repository's root (this crate is `tests/` in it).
fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

/// The metric names of a Prometheus text exposition (`# HELP`/`# TYPE` lines left out).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// What the chart's rules and dashboards read.
#[derive(Debug)]
struct Sources {
    /// Metric name -> the files whose expressions read it.
    read: BTreeMap<String, BTreeSet<String>>,
    /// Names the recording rules define.
    recorded: BTreeSet<String>,
}

impl Sources {
    fn read(monitoring: &Path) -> Self {
        let mut read: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut note = |file: &str, expression: &str| {
            for name in promql::metric_names(expression) {
                read.entry(name).or_default().insert(file.to_owned());
            }
        };
        let rules_path = monitoring.join("rules.yaml");
        let rules = std::fs::read_to_string(&rules_path).unwrap_or_else(|e| panic!("read {rules_path:?}: {e}"));
        let rules = rule_file::parse(&rules);
        assert!(!rules.expressions.is_empty(), "{rules_path:?} holds no expression");
        for expression in &rules.expressions {
            note("rules.yaml", expression);
        }
        let dashboards = monitoring.join("dashboards");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dashboards)
            .unwrap_or_else(|e| panic!("list {dashboards:?}: {e}"))
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no dashboard in {dashboards:?}");
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
            let dashboard: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?} is not JSON: {e}"));
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let expressions = target_expressions(&dashboard);
            assert!(!expressions.is_empty(), "{path:?} has no panel query");
            for expression in expressions {
                note(&format!("dashboards/{name}"), &expression);
            }
        }
        Self { read, recorded: rules.recorded }
    }

    /// The names read that are neither exported, nor recorded by a rule, nor external.
    fn missing_from(&self, exported: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
        self.read
            .iter()
            .filter(|(name, _)| {
                !exported.contains(*name)
                    && !self.recorded.contains(*name)
                    && !EXTERNAL.iter().any(|(prefix, _)| name.starts_with(prefix))
            })
            .map(|(name, files)| (name.clone(), files.clone()))
            .collect()
    }
}

/// Every `expr` of every panel's `targets` in a Grafana dashboard, rows' panels included.
fn target_expressions(dashboard: &serde_json::Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Object(object) => {
                if let Some(serde_json::Value::Array(targets)) = object.get("targets") {
                    found.extend(targets.iter().filter_map(|target| target.get("expr")?.as_str()).map(str::to_owned));
                }
                stack.extend(object.iter().filter(|(key, _)| *key != "targets").map(|(_, value)| value));
            }
            serde_json::Value::Array(values) => stack.extend(values),
            _ => {}
        }
    }
    found
}

/// The expressions and recorded names of a Prometheus rule file, read line by line: `expr:`
/// as a plain or quoted scalar on its line (continued on deeper lines) or a block scalar
/// (`|`, `>`), as rule files write them.
mod rule_file {
    use std::collections::BTreeSet;

    #[derive(Debug, Default)]
    pub struct Rules {
        pub expressions: Vec<String>,
        pub recorded: BTreeSet<String>,
    }

    pub fn parse(text: &str) -> Rules {
        let mut rules = Rules::default();
        let lines: Vec<&str> = text.lines().collect();
        let mut index = 0;
        while index < lines.len() {
            let (indent, key, value) = key_value(lines[index]);
            index += 1;
            match key {
                Some("record") => {
                    rules.recorded.insert(unquote(value).to_owned());
                }
                Some("expr") => {
                    let block = value.starts_with('|') || value.starts_with('>');
                    let mut expression = if block { String::new() } else { unquote(value).to_owned() };
                    while index < lines.len() {
                        let line = lines[index];
                        let deeper = line.len() - line.trim_start().len() > indent;
                        if !(line.trim().is_empty() || deeper) {
                            break;
                        }
                        expression.push('\n');
                        expression.push_str(line.trim());
                        index += 1;
                    }
                    rules.expressions.push(expression);
                }
                _ => {}
            }
        }
        rules
    }

    /// `(indentation of the key, key, value)` of a `key: value` line (`- key: value` too).
    fn key_value(line: &str) -> (usize, Option<&str>, &str) {
        let content = line.trim_start();
        if content.starts_with('#') {
            return (0, None, "");
        }
        let item = content.strip_prefix("- ").map(str::trim_start).unwrap_or(content);
        let indent = line.len() - item.len();
        match item.split_once(':') {
            Some((key, value)) if !key.contains(' ') => (indent, Some(key), value.trim()),
            _ => (indent, None, ""),
        }
    }

    fn unquote(value: &str) -> &str {
        let quoted = |q: char| value.len() >= 2 && value.starts_with(q) && value.ends_with(q);
        if quoted('"') || quoted('\'') { &value[1..value.len() - 1] } else { value }
    }

    #[test]
    fn block_plain_and_quoted_expressions_and_recorded_names_are_read() {
        let rules = parse(
            "groups:\n  - name: g\n    rules:\n      - record: job:a:rate5m\n        expr: sum(rate(a_total[5m]))\n\
             \x20     - alert: B\n        expr: |\n          b_seconds\n\n          > 3\n        for: 5m\n\
             \x20     - alert: C\n        expr: 'c_up == 0'\n        labels:\n          severity: page\n\
             \x20     - expr: d_total\n          > 1\n        record: e\n",
        );
        assert_eq!(rules.expressions, ["sum(rate(a_total[5m]))", "\nb_seconds\n\n> 3", "c_up == 0", "d_total\n> 1"]);
        assert_eq!(rules.recorded.into_iter().collect::<Vec<_>>(), ["e", "job:a:rate5m"]);
    }
}

/// The metric names a PromQL expression reads: what is left once strings, label matchers,
/// ranges, `by`/`without`/`on`/`ignoring`/`group_*` label lists, functions, aggregations,
/// keywords, numbers, durations and Grafana variables are taken out.
mod promql {
    use std::collections::BTreeSet;

    /// Aggregation operators: `sum by (x) (...)` puts a label list between name and parenthesis.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    /// Keywords followed by a list of label names.
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    /// Other keywords (case-insensitive in PromQL).
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"];

    pub fn metric_names(expression: &str) -> BTreeSet<String> {
        let text: Vec<char> = expression.chars().collect();
        let mut names = BTreeSet::new();
        let mut at = 0;
        while at < text.len() {
            let c = text[at];
            at = match c {
                '"' | '\'' | '`' => past_quoted(&text, at),
                '{' => past_group(&text, at, '{', '}'),
                '[' => past_group(&text, at, '[', ']'),
                '#' => text[at..].iter().position(|c| *c == '\n').map_or(text.len(), |n| at + n),
                // A Grafana variable: `$name`, `${name}`, `$__rate_interval`.
                '$' if text.get(at + 1) == Some(&'{') => past_group(&text, at + 1, '{', '}'),
                '$' => past_word(&text, at + 1),
                // Numbers and durations: 3600, 0.5, 1e3, 0x1f, 5m, 1h30m.
                c if c.is_ascii_digit() || (c == '.' && text.get(at + 1).is_some_and(char::is_ascii_digit)) => {
                    past_word(&text, at + 1)
                }
                c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                    let end = past_word(&text, at);
                    let word: String = text[at..end].iter().collect();
                    let next = text[end..].iter().find(|c| !c.is_whitespace());
                    let lower = word.to_ascii_lowercase();
                    if LABEL_LISTS.contains(&lower.as_str()) {
                        match text[end..].iter().position(|c| !c.is_whitespace()) {
                            Some(gap) if next == Some(&'(') => past_group(&text, end + gap, '(', ')'),
                            _ => end,
                        }
                    } else {
                        let function = next == Some(&'(') || AGGREGATIONS.contains(&lower.as_str());
                        if !function && !KEYWORDS.contains(&lower.as_str()) {
                            names.insert(word);
                        }
                        end
                    }
                }
                _ => at + 1,
            };
        }
        names
    }

    /// Past the identifier-like run (letters, digits, `_`, `:`, `.`) starting at `at`.
    fn past_word(text: &[char], at: usize) -> usize {
        text[at..]
            .iter()
            .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.')))
            .map_or(text.len(), |n| at + n)
    }

    /// Past the string literal opening at `at` (backslash escapes; raw strings have none).
    fn past_quoted(text: &[char], at: usize) -> usize {
        let quote = text[at];
        let mut i = at + 1;
        while i < text.len() {
            match text[i] {
                '\\' if quote != '`' => i += 2,
                c if c == quote => return i + 1,
                _ => i += 1,
            }
        }
        text.len()
    }

    /// Past the group opening with `open` at `at`, nested groups and string literals included.
    fn past_group(text: &[char], at: usize, open: char, close: char) -> usize {
        let (mut depth, mut i) = (0usize, at);
        while i < text.len() {
            match text[i] {
                '"' | '\'' | '`' => {
                    i = past_quoted(text, i);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        text.len()
    }

    #[cfg(test)]
    fn names(expression: &str) -> Vec<String> {
        metric_names(expression).into_iter().collect()
    }

    #[test]
    fn aggregations_with_label_lists_and_functions_leave_only_the_metric() {
        assert_eq!(
            names(r#"sum by (namespace, service) (rate(rpc_requests_total{code=~"Internal|Unavailable"}[5m]))"#),
            ["rpc_requests_total"]
        );
        assert_eq!(
            names("histogram_quantile(0.99, sum without (pod) (rate(rpc_duration_seconds_bucket[$__rate_interval])))"),
            ["rpc_duration_seconds_bucket"]
        );
        assert_eq!(names("max by (namespace, database) (outbox_pending) > 1000"), ["outbox_pending"]);
        assert_eq!(names("sum(x_total) by (job)"), ["x_total"]);
        assert_eq!(names("topk(5, count_values(\"v\", build_info))"), ["build_info"]);
    }

    #[test]
    fn matchers_strings_and_variables_are_not_names() {
        assert_eq!(
            names(r#"rpc_requests_total{namespace="$namespace", service=~"${service}", le="+Inf", x='a{b}c'}"#),
            ["rpc_requests_total"]
        );
        assert_eq!(names(r#"label_replace(up_total, "a", "$1 and b_total", "instance", "(.*)")"#), ["up_total"]);
        assert_eq!(names("a_seconds > $threshold"), ["a_seconds"]);
    }

    #[test]
    fn vector_matching_keywords_numbers_and_durations_are_not_names() {
        assert_eq!(
            names(
                "(db_pool_connections - db_pool_idle_connections) / on (namespace, database) group_left (server) db_pool_max_connections"
            ),
            ["db_pool_connections", "db_pool_idle_connections", "db_pool_max_connections"]
        );
        assert_eq!(
            names("time() - max by (namespace, store) (retention_last_run_timestamp_seconds > 0) > 26 * 3600"),
            ["retention_last_run_timestamp_seconds"]
        );
        assert_eq!(
            names("rate(a_total[5m] offset 1h) > bool 1e3 and b_up unless ignoring(x) c_up or vector(0.5) + Inf"),
            ["a_total", "b_up", "c_up"]
        );
        assert_eq!(names("sum(rate(a_total[5m:30s])) # a comment naming b_total\n / 2"), ["a_total"]);
    }

    #[test]
    fn recording_rule_names_with_colons_are_names() {
        assert_eq!(
            names("max by (namespace, database, server) (aimesh:db_pool_in_use:ratio) > 0.9"),
            ["aimesh:db_pool_in_use:ratio"]
        );
    }
}
