-- The transactional outbox (aimesh_kit::outbox), in the database of each service that uses
-- it. The kit owns this schema: services apply it with aimesh_kit::outbox::migrate, tracked in
-- a migrations table of its own, so no service copies it.
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
