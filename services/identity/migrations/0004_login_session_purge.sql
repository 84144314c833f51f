-- Ended login sessions are purged some time after they end (identity.session_purge_after_hours):
-- a session ends when it is revoked or when its refresh token expires (until then it can be
-- renewed), whichever comes first. The purge deletes in small batches by this index, so no
-- batch scans the whole table.
CREATE INDEX user_sessions_ended ON user_sessions ((LEAST(revoked_at, GREATEST(expires_at, refresh_expires_at))));
