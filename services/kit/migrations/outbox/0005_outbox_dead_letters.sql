-- Events the sink refused for good (analytics rejects a malformed event: retrying would never
-- succeed) leave outbox_events for this table, in the transaction that settles their batch,
-- instead of vanishing into a log line. Operators list and replay them (`aimesh outbox`); a
-- replay moves them back into outbox_events as pending. `id` orders the list (keyset pages).
CREATE TABLE outbox_dead_letters (
    id BIGSERIAL PRIMARY KEY,
    event_id UUID NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    event_type TEXT NOT NULL,
    project_id UUID,
    payload JSONB NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    traceparent TEXT,
    -- Deliveries tried, the one that was refused included.
    attempts INT NOT NULL,
    -- Why the sink refused it (for analytics: the offending field and the message).
    reason TEXT NOT NULL,
    dead_lettered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- When an event entered the outbox (or was replayed into it), for the age of the oldest pending
-- event: occurred_at is when the reported change happened, which a caller may set in the past.
-- now() is stable, so existing rows take the migration's time without a table rewrite.
ALTER TABLE outbox_events ADD COLUMN created_at TIMESTAMPTZ NOT NULL DEFAULT now();
