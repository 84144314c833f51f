-- Delivered events are marked, not deleted at once: they stay for outbox.retention_hours
-- (what was sent, for an operator replaying to analytics), then the relay prunes them.
ALTER TABLE outbox_events ADD COLUMN delivered_at TIMESTAMPTZ;
DROP INDEX outbox_events_due;
CREATE INDEX outbox_events_due ON outbox_events (next_attempt_at, id) WHERE delivered_at IS NULL;
CREATE INDEX outbox_events_delivered ON outbox_events (delivered_at) WHERE delivered_at IS NOT NULL;
