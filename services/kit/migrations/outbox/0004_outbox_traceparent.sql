-- The W3C trace context (traceparent) of the request that wrote the event, so an event can be
-- followed back to the request's trace; none for events written outside a traced request.
ALTER TABLE outbox_events ADD COLUMN traceparent TEXT;
