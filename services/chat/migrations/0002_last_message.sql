-- The session's latest message, kept by the append statement: a new message's default parent.
-- An append is one statement (its own transaction), so its snapshot is taken before it waits
-- for the session row's lock and cannot see the message its predecessor just committed; the
-- locked row's newest version can, so the previous message's id travels on that row.
ALTER TABLE chat_sessions ADD COLUMN last_message_id UUID;

UPDATE chat_sessions s
SET last_message_id = (SELECT m.id FROM chat_messages m WHERE m.session_id = s.id ORDER BY m.sequence DESC LIMIT 1)
WHERE s.message_count > 0;
