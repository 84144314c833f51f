#!/usr/bin/env python3
"""The Grafana dashboards of aimesh, written as dashboards/*.json (python3, standard library only).

  python3 helm/aimesh/monitoring/dashboards.py          write dashboards/*.json
  python3 helm/aimesh/monitoring/dashboards.py --check  fail when a file differs from what this writes

Edit this file, not the JSON: one overview and one dashboard per component share their panels
here, so a query is written once. scripts/k8s-check.sh runs --check. Every query names only metrics
the mesh exports (tests/tests/metrics_catalog.rs checks each `expr` against a real /metrics).

Variables: `datasource` (a Prometheus), `namespace`, and `service`: a choice on the overview, a
constant on a component's dashboard. Metrics of a process rather than of an RPC (dependencies,
caches, Redis, rate limits) are selected by the scrape's `job`, the component's Service
(<release>-<component>), as the chart's ServiceMonitor names it.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
SERVICES = ["identity", "chat", "usage", "files", "analytics", "gateway"]
SERVER_ERRORS = "Internal|Unavailable|Unknown|DataLoss|DeadlineExceeded"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

# Selectors. NS: every series; RPC: one component's RPC metrics; JOB: one component's process.
NS = 'namespace="$namespace"'
RPC = NS + ', service=~"$service"'
JOB = NS + ', job=~".*$service.*"'


def q(expr, legend=""):
    """A query of a panel."""
    return {"expr": expr, "legend": legend}


def quantiles(metric, selector, by, legend):
    """p50, p95 and p99 of a histogram, each by `by` (a label list, may be empty)."""
    group = ", ".join(by + ["le"])
    out = []
    for quantile in ("0.5", "0.95", "0.99"):
        label = f"p{int(float(quantile) * 100)}"
        out.append(q(f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
                     f"{legend} {label}".strip()))
    return out


def zero_filled_ratio(part, whole):
    """part / whole, 0 rather than no data while `part` has no series (no error yet)."""
    return f"({part} or 0 * {whole}) / {whole}"


def panel(title, queries, unit="short", description="", kind="timeseries", width=8, threshold=None, max_value=None):
    """A panel; laid out by `dashboard`."""
    return {"title": title, "queries": queries, "unit": unit, "description": description, "kind": kind,
            "width": width, "threshold": threshold, "max": max_value}


def row(title, *panels):
    return {"row": title, "panels": list(panels)}


# ---- panels shared by the overview and the component dashboards ---------------------------

def rpc_rows(by_method):
    """Traffic, errors and latency of RPCs, by method (a component) or by service (overview)."""
    by = "method" if by_method else "service"
    legend = "{{method}}" if by_method else "{{service}}"
    traffic = row(
        "Traffic and errors",
        panel("RPCs per second", [q(f"sum by ({by}) (rate(rpc_requests_total{{{RPC}}}[{RATE}]))", legend)], "reqps"),
        panel("Errors per second by code",
              [q(f'sum by ({by}, code) (rate(rpc_requests_total{{{RPC}, code!="Ok"}}[{RATE}]))', legend + " {{code}}")],
              "reqps", "Every code but Ok: client errors (InvalidArgument, NotFound, ...) as well as server errors."),
        panel("Server error ratio (SLO: 99.9% succeed)",
              [q(zero_filled_ratio(f'sum by ({by}) (rate(rpc_requests_total{{{RPC}, code=~"{SERVER_ERRORS}"}}[{RATE}]))',
                                   f"sum by ({by}) (rate(rpc_requests_total{{{RPC}}}[{RATE}]))"), legend)],
              "percentunit", f"Share of RPCs ending in {SERVER_ERRORS}; the line is the 0.1% error budget.",
              threshold=0.001),
    )
    latency_panels = []
    if by_method:
        latency_panels.append(panel("Latency p50 / p95 / p99", quantiles("rpc_duration_seconds", RPC, [], ""), "s"))
        latency_panels.append(panel("Latency p99 by method",
                                    [quantiles("rpc_duration_seconds", RPC, ["method"], "{{method}}")[2]], "s"))
    else:
        for quantile in quantiles("rpc_duration_seconds", RPC, ["service"], "{{service}}"):
            name = quantile["legend"].split()[-1]
            latency_panels.append(panel(f"Latency {name} by service", [quantile], "s"))
    latency_panels.append(panel(
        "RPCs slower than 0.5 s (SLO: under 1%)",
        [q(f'1 - sum by ({by}) (rate(rpc_duration_seconds_bucket{{{RPC}, le="0.5", method!~"Upload|WatchSession"}}[{RATE}]))'
           f' / sum by ({by}) (rate(rpc_duration_seconds_bucket{{{RPC}, le="+Inf", method!~"Upload|WatchSession"}}[{RATE}]))',
           legend)],
        "percentunit", "Streams whose length is the client's (Upload, WatchSession) are left out, as in the SLO.",
        threshold=0.01))
    return [traffic, row("Latency", *latency_panels)]


def gateway_rows():
    sel = NS
    return [
        row("Gateway (REST)",
            panel("HTTP requests per second by status",
                  [q(f"sum by (status) (rate(http_requests_total{{{sel}}}[{RATE}]))", "{{status}}")], "reqps"),
            panel("HTTP 5xx ratio",
                  [q(zero_filled_ratio(f'sum(rate(http_requests_total{{{sel}, status=~"5.."}}[{RATE}]))',
                                       f"sum(rate(http_requests_total{{{sel}}}[{RATE}]))"), "5xx")],
                  "percentunit", "The AimeshGateway5xxRatioHigh alert fires above 5%.", threshold=0.05),
            panel("HTTP latency p50 / p95 / p99", quantiles("http_request_duration_seconds", sel, [], ""), "s")),
    ]


def gateway_route_rows():
    sel = NS
    return [
        row("Routes",
            panel("Requests per second by route",
                  [q(f"sum by (route, method) (rate(http_requests_total{{{sel}}}[{RATE}]))", "{{method}} {{route}}")],
                  "reqps", width=12),
            panel("Latency p99 by route",
                  [quantiles("http_request_duration_seconds", sel, ["route", "method"], "{{method}} {{route}}")[2]],
                  "s", width=12),
            panel("5xx per second by route",
                  [q(f'sum by (route, method, status) (rate(http_requests_total{{{sel}, status=~"5.."}}[{RATE}]))',
                     "{{method}} {{route}} {{status}}")], "reqps", width=12),
            panel("4xx per second by route",
                  [q(f'sum by (route, method, status) (rate(http_requests_total{{{sel}, status=~"4.."}}[{RATE}]))',
                     "{{method}} {{route}} {{status}}")], "reqps", width=12)),
    ]


def dependency_panel(selector, by):
    return panel("Dependencies up",
                 [q(f"min by ({by}) (dependency_up{{{selector}}})", "{{" + by.split(", ")[0] + "}} {{dependency}}")],
                 "short", "1: every pod reaches it; 0: at least one pod does not (health NOT_SERVING).",
                 kind="stat", max_value=1)


def outbox_panels(selector, by_database):
    legend = "{{database}}"
    return [
        panel("Outbox events pending", [q(f"max by (database) (outbox_pending{{{selector}}})", legend)], "short",
              "Events not yet delivered to analytics (AimeshOutboxBacklog above 1000)."),
        panel("Oldest pending outbox event", [q(f"max by (database) (outbox_oldest_pending_age_seconds{{{selector}}})", legend)],
              "s", "0 when nothing waits (AimeshOutboxEventsOld above 10 minutes)."),
        panel("Dead-lettered outbox events", [q(f"max by (database) (outbox_dead_letters{{{selector}}})", legend)], "short",
              "Refused by analytics for good; list and replay them with `aimesh outbox`."),
    ] + ([
        panel("Outbox deliveries per second by topic",
              [q(f"sum by (database, topic) (rate(outbox_delivered_total{{{selector}}}[{RATE}]))", "{{topic}}")], "ops"),
        panel("Outbox delivery failures per second",
              [q(f"sum by (database) (rate(outbox_delivery_failures_total{{{selector}}}[{RATE}]))", legend)], "ops",
              "Failed batch deliveries; the relay retries them."),
        panel("Dead-lettered per second by topic",
              [q(f"sum by (database, topic) (rate(outbox_dead_lettered_total{{{selector}}}[{RATE}]))", "{{topic}}")], "ops"),
    ] if by_database else [])


def cache_hit_panel(selector):
    return panel("Cache hit ratio",
                 [q(f'sum by (cache) (rate(cache_requests_total{{{selector}, level=~"local|shared", result="hit"}}[{RATE}]))'
                    f' / sum by (cache) (rate(cache_requests_total{{{selector}, level="local"}}[{RATE}]))', "{{cache}}")],
                 "percentunit", "Lookups answered from L1 (local) or L2 (Redis) without loading from the source.",
                 max_value=1)


def pool_use_panel(selector, by):
    return panel("Pool connections in use",
                 [q(f"max by ({by}) ((db_pool_connections{{{selector}}} - db_pool_idle_connections{{{selector}}})"
                    f" / db_pool_max_connections{{{selector}}})", "{{database}} {{server}}")],
                 "percentunit", "Busiest pod's share of its pool in use (AimeshDbPoolSaturated above 90%).",
                 threshold=0.9, max_value=1)


# ---- a component's own rows ----------------------------------------------------------------

def database_rows():
    db = NS + ', database="$service"'
    outbox = NS + ', database=~".*$service.*"'
    return [
        row("Outbox", *outbox_panels(outbox, True)),
        row("Database pools",
            pool_use_panel(db, "database, server"),
            panel("Pool connections",
                  [q(f"sum by (server) (db_pool_connections{{{db}}})", "{{server}} open"),
                   q(f"sum by (server) (db_pool_idle_connections{{{db}}})", "{{server}} idle"),
                   q(f"sum by (server) (db_pool_max_connections{{{db}}})", "{{server}} max")],
                  "short", "Summed over the component's pods."),
            panel("Connection acquire wait", quantiles("db_pool_acquire_duration_seconds", db, [], ""), "s",
                  "Time to get a connection from the pool (AimeshDbPoolWaitHigh: p95 above 100 ms).")),
        row("Statements and reads",
            panel("Statement latency p99 by kind",
                  [quantiles("db_statement_duration_seconds", db, ["statement"], "{{statement}}")[2]], "s",
                  "AimeshDbStatementsSlow: p99 above 0.5 s."),
            panel("Statements per second by kind",
                  [q(f'sum by (statement) (rate(db_statement_duration_seconds_bucket{{{db}, le="+Inf"}}[{RATE}]))',
                     "{{statement}}")], "ops"),
            panel("Reads per second by target",
                  [q(f"sum by (target, reason) (rate(db_reads_total{{{db}}}[{RATE}]))", "{{target}} ({{reason}})")], "ops",
                  "Reads sent to a replica or kept on the primary, and why.")),
        row("Replicas",
            panel("Replica lag", [q(f"max by (replica) (db_replica_lag_seconds{{{db}}})", "{{replica}}")], "s",
                  "AimeshReplicaLagHigh above 30 s."),
            panel("Replica usable", [q(f"min by (replica) (db_replica_usable{{{db}}})", "{{replica}}")], "short",
                  "1: reads may go there; 0: too far behind or unreachable.", max_value=1)),
    ]


def process_rows():
    """Dependencies, caches, Redis and rate limits of the component's pods."""
    return [
        row("Dependencies and caches",
            dependency_panel(JOB, "job, dependency"),
            cache_hit_panel(JOB),
            panel("Cache lookups per second",
                  [q(f"sum by (cache, level, result) (rate(cache_requests_total{{{JOB}}}[{RATE}]))",
                     "{{cache}} {{level}} {{result}}")], "ops"),
            panel("Cache Redis errors per second",
                  [q(f"sum by (cache, operation) (rate(cache_redis_errors_total{{{JOB}}}[{RATE}]))",
                     "{{cache}} {{operation}}")], "ops")),
        row("Redis and rate limits",
            panel("Redis command latency p99",
                  [quantiles("redis_command_duration_seconds", JOB, ["operation"], "{{operation}}")[2]], "s",
                  "AimeshRedisCommandsSlow: p99 above 50 ms."),
            panel("Redis commands per second",
                  [q(f'sum by (operation) (rate(redis_command_duration_seconds_bucket{{{JOB}, le="+Inf"}}[{RATE}]))',
                     "{{operation}}")], "ops"),
            panel("Redis breaker trips",
                  [q(f"sum by (component) (increase(redis_breaker_trips_total{{{JOB}}}[{RATE}]))", "{{component}}")],
                  "short", "A trip: the component stops calling Redis for a while after failures."),
            panel("Rate limit decisions per second",
                  [q(f"sum by (dimension, outcome, source) (rate(rate_limit_decisions_total{{{JOB}}}[{RATE}]))",
                     "{{dimension}} {{outcome}} ({{source}})")], "ops")),
    ]


def retention_row(stores):
    sel = NS + ', store=~"' + "|".join(stores) + '"'
    return row("Retention",
               panel("Rows deleted per second",
                     [q(f"sum by (store, kind) (rate(retention_rows_deleted_total{{{sel}}}[{RATE}]))", "{{store}} {{kind}}")],
                     "ops"),
               panel("Since the last retention round",
                     [q(f"time() - max by (store) (retention_last_run_timestamp_seconds{{{sel}}} > 0)", "{{store}}")], "s",
                     "AimeshRetentionStalled above 26 hours."))


def analytics_rows():
    return [
        row("Ingest",
            panel("Events per second",
                  [q(f"sum(rate(analytics_events_accepted_total{{{NS}}}[{RATE}]))", "accepted"),
                   q(f"sum(rate(analytics_events_duplicate_total{{{NS}}}[{RATE}]))", "duplicate"),
                   q(f"sum(rate(analytics_events_rejected_total{{{NS}}}[{RATE}]))", "rejected")], "ops",
                  "Rejected events are dead-lettered by the outbox that sent them."),
            panel("Ingest rounds: timeouts and claim conflicts",
                  [q(f"sum(increase(analytics_ingest_round_timeouts_total{{{NS}}}[{RATE}]))", "round timeouts"),
                   q(f"sum(increase(analytics_ingest_claim_conflicts_total{{{NS}}}[{RATE}]))", "claim conflicts")], "short"),
            panel("ClickHouse insert latency",
                  [quantiles("clickhouse_insert_duration_seconds", NS, ["table"], "{{table}}")[i] for i in (0, 2)], "s",
                  "AimeshClickHouseInsertsSlow: p99 above 1 s.")),
    ]


def usage_rows():
    return [
        row("Budgets and quotas",
            panel("Reservations leaving a quota at 80% or more",
                  [q(f"sum by (scope) (increase(usage_quota_near_limit_total{{{NS}}}[{RATE}]))", "{{scope}}")], "short"),
            panel("Reservations refused by a quota",
                  [q(f"sum by (scope) (increase(usage_quota_exceeded_total{{{NS}}}[{RATE}]))", "{{scope}}")], "short")),
    ]


# ---- dashboards ----------------------------------------------------------------------------

def overview():
    rows = rpc_rows(by_method=False) + gateway_rows() + [
        row("Stores",
            dependency_panel(NS, "job, dependency"),
            *outbox_panels(NS, False),
            cache_hit_panel(NS),
            pool_use_panel(NS, "database, server")),
    ]
    return dashboard("aimesh-overview", "aimesh / Overview",
                     "Every component at a glance: RPC traffic, errors and latency per service, the REST gateway, "
                     "dependencies, outboxes, caches and pools.", rows, service=None)


def component(name):
    if name == "gateway":
        rows = gateway_rows() + gateway_route_rows() + process_rows()
    else:
        rows = rpc_rows(by_method=True)
        if name in ("identity", "chat", "usage", "files"):
            rows += database_rows()
        rows += process_rows()
        if name == "analytics":
            rows += analytics_rows()
        if name == "usage":
            rows += usage_rows()
        rows.append(retention_row([name]))
    return dashboard(f"aimesh-{name}", f"aimesh / {name.capitalize()}",
                     f"The {name} component: traffic, errors, latency by method, and its stores.", rows, service=name)


def variables(service):
    namespace_query = "label_values(rpc_requests_total, namespace)"
    out = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DATASOURCE,
         "definition": namespace_query, "query": {"query": namespace_query, "refId": "namespace"},
         "current": {}, "hide": 0, "refresh": 2, "sort": 1, "includeAll": False, "multi": False, "options": []},
    ]
    if service is None:
        service_query = 'label_values(rpc_requests_total{namespace="$namespace"}, service)'
        out.append({"name": "service", "label": "Service", "type": "query", "datasource": DATASOURCE,
                    "definition": service_query, "query": {"query": service_query, "refId": "service"},
                    "current": {}, "hide": 0, "refresh": 2, "sort": 1, "includeAll": True, "allValue": ".*",
                    "multi": True, "options": []})
    else:
        out.append({"name": "service", "label": "Service", "type": "constant", "query": service, "hide": 2,
                    "current": {"text": service, "value": service}, "options": []})
    return out


def render_panel(spec, panel_id, x, y):
    defaults = {"unit": spec["unit"], "min": 0, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                           "showPoints": "never", "spanNulls": False}}
    if spec["max"] is not None:
        defaults["max"] = spec["max"]
    steps = [{"color": "green", "value": None}]
    if spec["threshold"] is not None:
        steps.append({"color": "red", "value": spec["threshold"]})
        defaults["custom"]["thresholdsStyle"] = {"mode": "line"}
    defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    if spec["kind"] == "stat":
        defaults.pop("custom")
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                                {"color": "green", "value": 1}]}
        defaults["mappings"] = [{"type": "value", "options": {"0": {"text": "down", "index": 0},
                                                              "1": {"text": "up", "index": 1}}}]
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "background", "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
                   "textMode": "value_and_name"}
    targets = []
    for index, query in enumerate(spec["queries"]):
        targets.append({"datasource": DATASOURCE, "expr": query["expr"], "legendFormat": query["legend"] or "__auto",
                        "range": True, "refId": chr(ord("A") + index)})
    return {"id": panel_id, "type": spec["kind"], "title": spec["title"], "description": spec["description"],
            "datasource": DATASOURCE, "gridPos": {"h": 8, "w": spec["width"], "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options, "targets": targets}


def dashboard(uid, title, description, rows, service):
    panels = []
    panel_id = 1
    y = 0
    for r in rows:
        panels.append({"id": panel_id, "type": "row", "title": r["row"], "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id += 1
        y += 1
        x = 0
        for spec in r["panels"]:
            if x + spec["width"] > 24:
                x = 0
                y += 8
            panels.append(render_panel(spec, panel_id, x, y))
            panel_id += 1
            x += spec["width"]
        y += 8
    links = [{"title": "aimesh", "type": "dashboards", "tags": ["aimesh"], "asDropdown": True,
              "includeVars": True, "keepTime": True}]
    return {
        "uid": uid, "title": title, "description": description, "tags": ["aimesh"],
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "timezone": "utc", "links": links,
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": variables(service)},
        "panels": panels,
    }


def all_dashboards():
    out = {"overview": overview()}
    for name in SERVICES:
        out[name] = component(name)
    return {name: json.dumps(board, indent=2) + "\n" for name, board in out.items()}


def main(argv):
    check = "--check" in argv[1:]
    wanted = all_dashboards()
    stale = []
    for name, text in wanted.items():
        path = OUT / f"{name}.json"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
    extra = sorted(p.name for p in OUT.glob("*.json") if p.stem not in wanted) if OUT.exists() else []
    if check and (stale or extra):
        print(f"dashboards: out of date: {', '.join(stale + extra)}; run python3 {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
