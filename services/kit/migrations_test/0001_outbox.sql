-- The outbox table exactly as aimesh_kit::outbox::OUTBOX_TABLE_SQL defines it (a unit test
-- keeps the two equal), for the kit's own outbox tests.
CREATE TABLE outbox_events (
    id BIGSERIAL PRIMARY KEY,
    event_id UUID NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    event_type TEXT NOT NULL,
    project_id UUID,
    payload JSONB NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error TEXT
);
CREATE INDEX outbox_events_due ON outbox_events (next_attempt_at, id);
