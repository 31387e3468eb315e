"""The database schema as numbered migrations, tracked in `PRAGMA user_version`."""

from __future__ import annotations

# Each entry upgrades the schema from version N to N+1. Never edit a released migration:
# append a new one.
MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema.
    """
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY,      -- assigned by the writer, contiguous
        received_at REAL    NOT NULL,         -- unix time, seconds
        conn_id     INTEGER,                  -- connections.id it arrived on (NULL: local)
        kind        TEXT    NOT NULL,         -- 'event' (from the backend) or 'link'
        type        TEXT    NOT NULL,
        session_id  INTEGER,
        invalid     TEXT,                     -- why a known type failed validation
        body        TEXT    NOT NULL          -- the frame as received (secrets redacted)
    );
    CREATE INDEX events_by_session ON events (session_id, seq) WHERE session_id IS NOT NULL;
    CREATE INDEX events_by_type ON events (type, seq);

    CREATE TABLE rejected_frames (
        id          INTEGER PRIMARY KEY,
        received_at REAL    NOT NULL,
        conn_id     INTEGER,
        reason      TEXT    NOT NULL,
        detail      TEXT    NOT NULL,
        excerpt     TEXT    NOT NULL
    );

    CREATE TABLE sessions (
        id          INTEGER PRIMARY KEY,      -- the backend's session id
        state       TEXT    NOT NULL,         -- JSON: state.SessionState.to_dict()
        updated_seq INTEGER NOT NULL
    );

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    CREATE TABLE outbox (
        id           INTEGER PRIMARY KEY,     -- FIFO order
        type         TEXT    NOT NULL,
        body         TEXT    NOT NULL,
        size         INTEGER NOT NULL,
        state        TEXT    NOT NULL,        -- queued, sent, delivered, expired, dead, cancelled
        attempts     INTEGER NOT NULL DEFAULT 0,
        last_error   TEXT,
        created_at   REAL    NOT NULL,
        updated_at   REAL    NOT NULL,
        sent_at      REAL,
        delivered_at REAL,
        expires_at   REAL,
        conn_id      INTEGER,                 -- connection of the last send
        caller_uid   INTEGER,
        idem_key     TEXT UNIQUE,
        idem_hash    TEXT
    );
    CREATE INDEX outbox_pending ON outbox (id) WHERE state IN ('queued', 'sent');
    CREATE INDEX outbox_by_state ON outbox (state, id);

    CREATE TABLE connections (
        id           INTEGER PRIMARY KEY,
        url          TEXT    NOT NULL,
        opened_at    REAL    NOT NULL,
        closed_at    REAL,
        close_code   INTEGER,
        close_reason TEXT,
        error        TEXT,
        frames_in    INTEGER NOT NULL DEFAULT 0,
        frames_out   INTEGER NOT NULL DEFAULT 0
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
# Marks a database as ours, so a random SQLite file is never migrated over.
APPLICATION_ID = 0x4B53594E  # "KSYN"
