-- The files service's own database (seed 003, `files`), with per-project deduplication: a
-- file row names its content by SHA-256; the content is one object per (project, sha256),
-- counted by the live files that use it.

-- One stored object per distinct content of a project. `refs` counts live files using it;
-- at zero it is `orphaned_at` and the garbage collector deletes the object and the row.
CREATE TABLE blobs (
    project_id  UUID NOT NULL,
    sha256      BYTEA NOT NULL,
    size_bytes  BIGINT NOT NULL CHECK (size_bytes >= 0),
    storage_key TEXT NOT NULL,
    refs        BIGINT NOT NULL CHECK (refs >= 0),
    orphaned_at TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, sha256)
);
CREATE INDEX blobs_orphaned ON blobs (orphaned_at) WHERE refs = 0;

CREATE TABLE files (
    id               UUID PRIMARY KEY,
    project_id       UUID NOT NULL,
    user_id          UUID NOT NULL,
    display_name     TEXT NOT NULL,
    original_name    TEXT NOT NULL,
    safe_name        TEXT NOT NULL,
    mime_type        TEXT NOT NULL,
    -- The MIME family (image, text, application, ...), the seed's file_type.
    file_type        TEXT NOT NULL,
    size_bytes       BIGINT NOT NULL CHECK (size_bytes >= 0),
    sha256           BYTEA NOT NULL,
    storage_provider TEXT NOT NULL,
    purpose          TEXT NOT NULL CHECK (purpose IN ('library', 'attachment')),
    metadata         JSONB NOT NULL DEFAULT '{}',
    status           TEXT NOT NULL DEFAULT 'uploaded' CHECK (status IN ('uploaded', 'deleted')),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at       TIMESTAMPTZ
);
CREATE INDEX files_project_live ON files (project_id, created_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX files_checksum ON files (project_id, sha256);
CREATE INDEX files_user ON files (project_id, user_id) WHERE deleted_at IS NULL;

-- Files linked to chat sessions (chat keeps the ids in its messages; these links are how a
-- purged session releases its files).
CREATE TABLE file_attachments (
    file_id    UUID NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    session_id UUID NOT NULL,
    project_id UUID NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (file_id, session_id)
);
CREATE INDEX file_attachments_session ON file_attachments (session_id);

-- What a project stores; the row lock serialises quota decisions of concurrent uploads.
CREATE TABLE project_storage (
    project_id   UUID PRIMARY KEY,
    -- Sum of the sizes of live files: what the quota counts.
    used_bytes   BIGINT NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
    file_count   BIGINT NOT NULL DEFAULT 0 CHECK (file_count >= 0),
    -- Bytes of the project's objects after deduplication.
    stored_bytes BIGINT NOT NULL DEFAULT 0 CHECK (stored_bytes >= 0)
);

-- Objects being written. A row exists from before the first byte until the upload commits or
-- is cleaned up, so an object left by a crashed process is found and deleted.
CREATE TABLE pending_uploads (
    storage_key TEXT PRIMARY KEY,
    project_id  UUID NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX pending_uploads_started ON pending_uploads (started_at);
