-- Who made each reservation: only that principal (or a project admin) may release or settle it.
-- A key's reservation is the key's (api_key_id); one made with a login session is its person's,
-- maker_user_id. Reservations made before this column existed were made by their user_id: a
-- login session reserved only for itself, and a key's are judged by api_key_id.
ALTER TABLE quota_reservations ADD COLUMN maker_user_id UUID;
UPDATE quota_reservations SET maker_user_id = user_id;
ALTER TABLE quota_reservations ALTER COLUMN maker_user_id SET NOT NULL;
