//! Takes an SQLite store of the current schema back to version 9's tables (instances keyed by
//! their text id alone, history rows naming their instance by that id), for the tests that
//! build older stores from a fresh one.

/// SQL that turns a file of the current schema into a version 9 one (and says so in
/// `user_version`).
pub(crate) const TO_SCHEMA_9: &str = "
CREATE TABLE instances_v9 (
    id              TEXT PRIMARY KEY,
    coordinator     TEXT NOT NULL,
    status          TEXT NOT NULL,
    input           TEXT NOT NULL,
    output          TEXT,
    error           TEXT,
    reason          TEXT,
    custom_status   TEXT,
    parent_id       TEXT,
    parent_seq      INTEGER,
    generation      INTEGER NOT NULL DEFAULT 0,
    next_pos        INTEGER NOT NULL DEFAULT 0,
    next_activation INTEGER NOT NULL DEFAULT 0,
    ready           INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    ended_at        INTEGER,
    held_seq INTEGER, held_pos INTEGER, held_owner TEXT, held_until INTEGER NOT NULL DEFAULT 0,
    held_at INTEGER
);
INSERT INTO instances_v9 (rowid, id, coordinator, status, input, output, error, reason,
        custom_status, parent_id, parent_seq, generation, next_pos, next_activation, ready,
        lease_owner, lease_until, created_at, updated_at, ended_at, held_seq, held_pos,
        held_owner, held_until, held_at)
    SELECT key, id, coordinator, status, input, output, error, reason, custom_status,
        parent_id, parent_seq, generation, next_pos, next_activation, ready, lease_owner,
        lease_until, created_at, updated_at, ended_at, held_seq, held_pos, held_owner,
        held_until, held_at
    FROM instances;
CREATE TABLE events_v9 (
    instance_id TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    activation  INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    body        TEXT NOT NULL,
    len INTEGER NOT NULL DEFAULT 1
);
INSERT INTO events_v9 (instance_id, pos, activation, kind, recorded_at, body, len)
    SELECT i.id, e.pos, e.activation, e.kind, e.recorded_at, e.body, e.len
    FROM events e JOIN instances i ON i.key = e.instance_key ORDER BY e.rowid;
DROP TABLE events;
DROP TABLE instances;
ALTER TABLE instances_v9 RENAME TO instances;
ALTER TABLE events_v9 RENAME TO events;
CREATE UNIQUE INDEX events_at ON events(instance_id, pos);
CREATE INDEX instances_ready ON instances(lease_until) WHERE ready = 1 AND status = 'running';
CREATE INDEX instances_status ON instances(status, created_at);
CREATE INDEX instances_held ON instances(held_owner) WHERE held_owner IS NOT NULL;
CREATE INDEX instances_parent ON instances(parent_id) WHERE parent_id IS NOT NULL;
PRAGMA user_version = 9;
";
