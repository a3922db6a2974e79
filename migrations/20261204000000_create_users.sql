-- Users served by user-rpc. `id` is the key every strategy looks up; `email` is unique so that
-- seeding and inserts cannot create look-alike duplicates.
CREATE TABLE IF NOT EXISTS users (
    id         BIGSERIAL   PRIMARY KEY,
    name       TEXT        NOT NULL,
    email      TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT users_email_key UNIQUE (email)
);
