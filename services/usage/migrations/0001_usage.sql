-- The usage service's own database: the model catalog and its prices, usage records (monthly
-- partitions), quotas and reservations. The outbox of usage events is the kit's
-- (aimesh_kit::outbox), migrated separately.

CREATE FUNCTION touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

-- Seed 003's ai_models, with prices moved to model_prices (so a price change never rewrites past
-- costs) and the columns the catalog API exposes.
CREATE TABLE ai_models (
    id UUID PRIMARY KEY,
    provider TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL DEFAULT '',
    model_type TEXT NOT NULL CHECK (model_type IN ('chat', 'completion', 'embedding', 'image', 'audio')),
    display_name TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    -- Provider-specific settings (seed 003); not exposed by the v1 API yet.
    config JSONB NOT NULL DEFAULT '{}',
    capabilities TEXT[] NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deprecated', 'retired')),
    max_tokens INTEGER NOT NULL DEFAULT 0 CHECK (max_tokens >= 0),
    context_window INTEGER NOT NULL DEFAULT 0 CHECK (context_window >= 0),
    -- A regular expression matched against the model strings usage is reported with; '' for none.
    match_pattern TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT ai_models_provider_name_version_key UNIQUE (provider, name, version)
);
CREATE INDEX ai_models_by_lower_name ON ai_models (lower(name));
CREATE TRIGGER ai_models_touch BEFORE UPDATE ON ai_models FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

-- US dollars per million tokens. The price in force at time T is the row with the latest
-- effective_at <= T; rows are only ever added.
CREATE TABLE model_prices (
    model_id UUID NOT NULL REFERENCES ai_models (id),
    input_per_million NUMERIC(20, 10) NOT NULL CHECK (input_per_million >= 0),
    output_per_million NUMERIC(20, 10) NOT NULL CHECK (output_per_million >= 0),
    cached_input_per_million NUMERIC(20, 10) NOT NULL CHECK (cached_input_per_million >= 0),
    effective_at TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT model_prices_model_effective_key UNIQUE (model_id, effective_at)
);

-- One row per model call. Partitioned by month of request_time; a unique index of a partitioned
-- table must contain the partition key, so idempotency by (project_id, request_id) lives in
-- usage_requests instead. created_at is the time the record was accepted: quota windows and the
-- live counters count usage by it (see the ledger).
CREATE TABLE model_usage_logs (
    id UUID NOT NULL,
    request_id TEXT NOT NULL,
    project_id UUID NOT NULL,
    user_id UUID NOT NULL,
    api_key_id UUID,
    model_id UUID NOT NULL REFERENCES ai_models (id),
    chat_session_id UUID,
    reservation_id UUID,
    request_type TEXT NOT NULL
        CHECK (request_type IN ('chat', 'completion', 'embedding', 'image', 'audio', 'other')),
    input_tokens BIGINT NOT NULL CHECK (input_tokens >= 0),
    output_tokens BIGINT NOT NULL CHECK (output_tokens >= 0),
    cached_input_tokens BIGINT NOT NULL CHECK (cached_input_tokens >= 0 AND cached_input_tokens <= input_tokens),
    total_tokens BIGINT NOT NULL,
    cost NUMERIC(24, 10) NOT NULL CHECK (cost >= 0),
    duration_ms BIGINT NOT NULL CHECK (duration_ms >= 0),
    status TEXT NOT NULL CHECK (status IN ('success', 'error', 'timeout', 'cancelled')),
    error_message TEXT NOT NULL DEFAULT '',
    request_time TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (id, request_time)
) PARTITION BY RANGE (request_time);
-- ListUsage (newest first, cursor) and the rebuild of counters (by created_at within a project).
CREATE INDEX model_usage_logs_by_project ON model_usage_logs (project_id, request_time DESC, id DESC);
CREATE INDEX model_usage_logs_by_project_created ON model_usage_logs (project_id, created_at);
CREATE INDEX model_usage_logs_by_user ON model_usage_logs (project_id, user_id, request_time DESC);

-- Rows of a month nobody created a partition for land here rather than failing the insert;
-- usage_create_month_partition moves them out when their month's partition is created.
CREATE TABLE model_usage_logs_default PARTITION OF model_usage_logs DEFAULT;

-- Creates the partition of the month containing `day` (model_usage_logs_yYYYYmMM, bounds at UTC
-- midnight) unless it exists. Safe to call from several replicas at once.
CREATE FUNCTION usage_create_month_partition(day DATE) RETURNS void AS $$
DECLARE
    month_start DATE := date_trunc('month', day)::date;
    from_ts TIMESTAMPTZ := month_start::timestamp AT TIME ZONE 'UTC';
    to_ts TIMESTAMPTZ := (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC';
    part TEXT := format('model_usage_logs_y%sm%s', to_char(month_start, 'YYYY'), to_char(month_start, 'MM'));
BEGIN
    -- Serialises creators; the lock ends with the caller's transaction.
    PERFORM pg_advisory_xact_lock(hashtext('model_usage_logs partitions'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE model_usage_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    -- Rows that went to the default partition for this month move over, or ATTACH would refuse.
    EXECUTE format(
        'WITH moved AS (DELETE FROM model_usage_logs_default WHERE request_time >= %L AND request_time < %L RETURNING *) '
        'INSERT INTO %I SELECT * FROM moved', from_ts, to_ts, part);
    EXECUTE format('ALTER TABLE model_usage_logs ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, from_ts, to_ts);
END;
$$ LANGUAGE plpgsql;

-- Creates the partitions of the previous month (records may arrive up to 35 days late), the
-- current one and the next `months_ahead`.
CREATE FUNCTION usage_ensure_partitions(months_ahead INTEGER) RETURNS void AS $$
BEGIN
    FOR i IN -1..months_ahead LOOP
        PERFORM usage_create_month_partition(((now() AT TIME ZONE 'UTC')::date + make_interval(months => i))::date);
    END LOOP;
END;
$$ LANGUAGE plpgsql;

SELECT usage_ensure_partitions(3);

-- The idempotency claim of a usage record: the first RecordUsage of a (project, request id)
-- inserts it; a retry, or a concurrent duplicate waiting on the primary key, finds the record
-- through usage_id and request_time (which names the partition).
CREATE TABLE usage_requests (
    project_id UUID NOT NULL,
    request_id TEXT NOT NULL,
    usage_id UUID NOT NULL,
    request_time TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, request_id)
);
CREATE INDEX usage_requests_by_time ON usage_requests (request_time);

-- Limits of one subject of a project; 0 means no limit. subject_id is the nil UUID for the
-- project scope, so the primary key needs no NULL.
CREATE TABLE quotas (
    project_id UUID NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('project', 'user', 'api_key')),
    subject_id UUID NOT NULL,
    tokens_per_day BIGINT NOT NULL DEFAULT 0 CHECK (tokens_per_day >= 0),
    cost_per_month NUMERIC(20, 9) NOT NULL DEFAULT 0 CHECK (cost_per_month >= 0),
    requests_per_minute BIGINT NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
    tokens_per_minute BIGINT NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
    soft_limit_percent INTEGER NOT NULL DEFAULT 0 CHECK (soft_limit_percent BETWEEN 0 AND 100),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, scope, subject_id)
);
CREATE TRIGGER quotas_touch BEFORE UPDATE ON quotas FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

-- Estimates held against quotas between Reserve and RecordUsage/ReleaseReservation. An open row
-- whose expires_at has passed is expired: it counts nowhere and cannot be settled or released.
CREATE TABLE quota_reservations (
    id UUID PRIMARY KEY,
    project_id UUID NOT NULL,
    user_id UUID NOT NULL,
    api_key_id UUID,
    model_id UUID NOT NULL REFERENCES ai_models (id),
    tokens BIGINT NOT NULL CHECK (tokens >= 0),
    cost NUMERIC(24, 10) NOT NULL CHECK (cost >= 0),
    -- cost in units of 1e-9 USD, rounded up: what the live counters hold.
    cost_nanos BIGINT NOT NULL CHECK (cost_nanos >= 0),
    state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'settled', 'released')),
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    closed_at TIMESTAMPTZ,
    -- The usage record that settled it.
    usage_id UUID
);
CREATE INDEX quota_reservations_open ON quota_reservations (project_id, expires_at) WHERE state = 'open';
CREATE INDEX quota_reservations_by_time ON quota_reservations (expires_at);
