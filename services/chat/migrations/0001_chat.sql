-- The chat service's own database: sessions and their messages (seed 003's chat_sessions and
-- chat_messages, with the project, soft delete, idempotency and search added).

CREATE TABLE chat_sessions (
    id UUID PRIMARY KEY,
    project_id UUID NOT NULL,
    -- Who created it; the identity service owns users, so there is no foreign key.
    user_id UUID NOT NULL,
    -- As the usage catalog names it ("gpt-4o"); a name rather than a catalog id, since the
    -- catalog lives in another service's database.
    model TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    config JSONB NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived')),
    -- Exact, kept by the append transaction; message_count is also the latest sequence.
    message_count BIGINT NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    total_tokens BIGINT NOT NULL DEFAULT 0 CHECK (total_tokens >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Soft delete: both set, or neither.
    deleted_at TIMESTAMPTZ,
    purge_at TIMESTAMPTZ,
    CHECK ((deleted_at IS NULL) = (purge_at IS NULL))
);

-- Lists: a user's or a project's live sessions, newest first; deleted ones apart.
CREATE INDEX chat_sessions_user_idx ON chat_sessions (project_id, user_id, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX chat_sessions_project_idx ON chat_sessions (project_id, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX chat_sessions_deleted_idx ON chat_sessions (project_id, created_at DESC, id DESC)
    WHERE deleted_at IS NOT NULL;
-- The purge task's scan.
CREATE INDEX chat_sessions_purge_idx ON chat_sessions (purge_at) WHERE purge_at IS NOT NULL;

CREATE TABLE chat_messages (
    id UUID PRIMARY KEY,
    session_id UUID NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    -- 1, 2, 3, ...: unique and gap-free per session.
    sequence BIGINT NOT NULL CHECK (sequence > 0),
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content TEXT NOT NULL,
    content_type TEXT NOT NULL DEFAULT 'text',
    metadata JSONB NOT NULL DEFAULT '{}',
    tokens INTEGER NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    parent_message_id UUID,
    client_message_id TEXT,
    -- Files of the files service (another database, so no foreign key).
    attachment_ids UUID[] NOT NULL DEFAULT '{}',
    user_id UUID NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    search TSVECTOR GENERATED ALWAYS AS (to_tsvector('english'::regconfig, content)) STORED,
    UNIQUE (session_id, sequence),
    -- Target of the parent reference below.
    UNIQUE (session_id, id),
    -- A parent is a message of the same session: the database refuses any other.
    CONSTRAINT chat_messages_parent_fkey FOREIGN KEY (session_id, parent_message_id)
        REFERENCES chat_messages (session_id, id) ON DELETE CASCADE
);

-- Idempotent appends: one message per client message id in a session.
CREATE UNIQUE INDEX chat_messages_client_id_idx ON chat_messages (session_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
CREATE INDEX chat_messages_parent_idx ON chat_messages (parent_message_id) WHERE parent_message_id IS NOT NULL;
CREATE INDEX chat_messages_search_idx ON chat_messages USING GIN (search);
