-- The relay takes the oldest due events (ORDER BY id LIMIT batch_size). An index of the
-- undelivered rows in id order lets it read one batch and stop; on (next_attempt_at, id) it
-- had to fetch and sort every due row first, about 250 ms per batch behind a backlog of
-- 100,000 events. Rows waiting for a retry are skipped by the filter on next_attempt_at.
DROP INDEX outbox_events_due;
CREATE INDEX outbox_events_due ON outbox_events (id) WHERE delivered_at IS NULL;
