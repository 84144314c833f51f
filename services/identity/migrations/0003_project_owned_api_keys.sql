-- An API key is its creator's unless made the project's on purpose (a service key): a creator's
-- key acts only while the creator is still an admin of the project (or a system admin) with an
-- active account; a project-owned key outlives the person who made it.
ALTER TABLE api_keys ADD COLUMN project_owned BOOLEAN NOT NULL DEFAULT FALSE;
-- The keys of one creator, found when their access changes to forget their cached verifications.
CREATE INDEX api_keys_by_creator ON api_keys (created_by, project_id) WHERE revoked_at IS NULL;
