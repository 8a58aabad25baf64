//! What SQLite alone costs for the writes of benchmark W1 (1,000 instances of 10 sequential
//! activity calls), with the SQLite store's schema and statements and with alternatives to them.
//! It measures the floor that tuning the store's own code cannot go below, and what each schema
//! change would buy, before anyone builds one (BENCHMARKS.md, seventh round).
//!
//! ```text
//! cargo run --release --example schema_floor -- <variant>
//! valgrind --tool=callgrind target/release/examples/schema_floor <variant>
//! ```
//!
//! Each variant writes, with plain rusqlite into a fresh WAL file (`synchronous=FULL`), what
//! the store's writer thread writes for W1: per instance, its creation with the first call,
//! nine steps (an outcome and the next call, in one history row), and its end. The operations
//! go in W1's order, in transactions of 512 as the group commit forms them. Wall-clock figures
//! move by ±20 % from one run to the next on a shared machine; callgrind's instruction count is
//! the repeatable one.
//!
//! Variants:
//! - `current`: schema 7 and the store's statements (`insert_stepped_instance`,
//!   `step_finishing_held`, `step_ending_held`, `append_row`).
//! - `integer-key`: the instance row gets an integer key; history rows and their index use it.
//! - `hot-table`: as `integer-key`, and the columns a step changes move to a narrow table.
//! - `no-history-index`: `current` without the `(instance_id, pos)` index of the history.
//! - `no-step-update`: `current`, but a step writes only its history row; the instance row is
//!   written at creation and at the end only (the end matches the row by id and status).
//! - `keyed-no-step-update`: both `integer-key` and `no-step-update`: what the store writes
//!   since the eighth round (schema 10, held chains), but for its end-of-run shortcuts.

use rusqlite::{params, Connection};
use std::time::Instant;

const INSTANCES: usize = 1_000;
const STEPS: usize = 10;
const BATCH: usize = 512;
const OWNER: &str = "worker-6b1f2c3d-0000-4000-8000-000000000000";
const LEASE_MS: i64 = 30_000;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Current,
    IntegerKey,
    HotTable,
    NoHistoryIndex,
    NoStepUpdate,
    KeyedNoStepUpdate,
}

impl Variant {
    fn parse(name: &str) -> Option<Variant> {
        Some(match name {
            "current" => Variant::Current,
            "integer-key" => Variant::IntegerKey,
            "hot-table" => Variant::HotTable,
            "no-history-index" => Variant::NoHistoryIndex,
            "no-step-update" => Variant::NoStepUpdate,
            "keyed-no-step-update" => Variant::KeyedNoStepUpdate,
            _ => return None,
        })
    }

    /// Whether history rows name their instance by its integer key.
    fn keyed(self) -> bool {
        matches!(
            self,
            Variant::IntegerKey | Variant::HotTable | Variant::KeyedNoStepUpdate
        )
    }
}

const INSTANCE_COLUMNS: &str = "coordinator TEXT NOT NULL, status TEXT NOT NULL,
    input TEXT NOT NULL, output TEXT, error TEXT, reason TEXT, custom_status TEXT,
    parent_id TEXT, parent_seq INTEGER, generation INTEGER NOT NULL DEFAULT 0,
    next_pos INTEGER NOT NULL DEFAULT 0, next_activation INTEGER NOT NULL DEFAULT 0,
    ready INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, ended_at INTEGER,
    held_seq INTEGER, held_pos INTEGER, held_owner TEXT,
    held_until INTEGER NOT NULL DEFAULT 0, held_at INTEGER";

const INSTANCE_INDEXES: &str = "
CREATE INDEX instances_ready ON instances(lease_until) WHERE ready = 1 AND status = 'running';
CREATE INDEX instances_status ON instances(status, created_at);
CREATE INDEX instances_held ON instances(held_owner) WHERE held_owner IS NOT NULL;";

const OTHER_TABLES: &str = "
CREATE TABLE inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, instance_id TEXT NOT NULL,
    dedupe TEXT, body TEXT NOT NULL, created_at INTEGER NOT NULL, UNIQUE (instance_id, dedupe));
CREATE TABLE tasks (instance_id TEXT NOT NULL, seq INTEGER NOT NULL, generation INTEGER NOT NULL,
    name TEXT NOT NULL, input TEXT NOT NULL, retry TEXT NOT NULL, attempt INTEGER NOT NULL,
    due_at INTEGER NOT NULL, lease_owner TEXT, last_error TEXT, created_at INTEGER NOT NULL,
    claimed_at INTEGER, PRIMARY KEY (instance_id, seq));
CREATE INDEX tasks_due ON tasks(due_at);
CREATE TABLE timers (instance_id TEXT NOT NULL, seq INTEGER NOT NULL,
    generation INTEGER NOT NULL, fire_at INTEGER NOT NULL, PRIMARY KEY (instance_id, seq));
CREATE INDEX timers_due ON timers(fire_at);";

fn schema(v: Variant) -> String {
    let (instance_key, history_key) = if v.keyed() {
        (
            "key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE",
            "instance_key INTEGER",
        )
    } else {
        ("id TEXT PRIMARY KEY", "instance_id TEXT")
    };
    let history_index = match v {
        Variant::NoHistoryIndex => "",
        _ if v.keyed() => "CREATE UNIQUE INDEX events_at ON events(instance_key, pos);",
        _ => "CREATE UNIQUE INDEX events_at ON events(instance_id, pos);",
    };
    let runs = if v == Variant::HotTable {
        "CREATE TABLE runs (key INTEGER PRIMARY KEY, running INTEGER NOT NULL,
            generation INTEGER NOT NULL, next_pos INTEGER NOT NULL,
            next_activation INTEGER NOT NULL, ready INTEGER NOT NULL, lease_owner TEXT,
            lease_until INTEGER NOT NULL, updated_at INTEGER NOT NULL, held_seq INTEGER,
            held_pos INTEGER, held_owner TEXT, held_until INTEGER NOT NULL, held_at INTEGER);"
    } else {
        ""
    };
    format!(
        "CREATE TABLE instances ({instance_key}, {INSTANCE_COLUMNS});
{INSTANCE_INDEXES}
{runs}
CREATE TABLE events ({history_key} NOT NULL, pos INTEGER NOT NULL, activation INTEGER NOT NULL,
    kind TEXT NOT NULL, recorded_at INTEGER NOT NULL, body TEXT NOT NULL,
    len INTEGER NOT NULL DEFAULT 1);
{history_index}
{OTHER_TABLES}"
    )
}

const CREATE: &str = "INSERT INTO instances (id, coordinator, status, input, parent_id, parent_seq,
        ready, lease_owner, lease_until, created_at, updated_at, next_pos, next_activation,
        held_seq, held_pos, held_owner, held_until, held_at)
    VALUES (?1, 'steps', 'running', '10', NULL, NULL, 0, NULL, 0, ?2, ?2, 2, 1, 0, 1, ?3, ?4, ?2)
    ON CONFLICT (id) DO NOTHING";

const CREATE_RUN: &str =
    "INSERT INTO runs VALUES (?1, 1, 0, 2, 1, 0, NULL, 0, ?2, 0, 1, ?3, ?4, ?2)";

/// The store's `step_finishing_held` statement; `{key}` is the row's key column.
const STEP: &str = "UPDATE instances SET next_pos = ?2, next_activation = ?3, ready = 0,
        lease_owner = NULL, lease_until = 0, updated_at = ?4, reason = NULL,
        held_seq = ?8, held_pos = ?9, held_until = ?10, held_at = ?4
    WHERE {key} = ?1 AND status = 'running' AND generation = ?5 AND next_pos = ?6
      AND held_seq = ?11 AND held_owner = ?7
      AND (lease_owner IS NULL OR lease_owner = ?7 OR lease_until < ?4)
      AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?12)";

const STEP_RUN: &str = "UPDATE runs SET next_pos = ?2, next_activation = ?3, ready = 0,
        lease_owner = NULL, lease_until = 0, updated_at = ?4,
        held_seq = ?8, held_pos = ?9, held_until = ?10, held_at = ?4
    WHERE key = ?1 AND running = 1 AND generation = ?5 AND next_pos = ?6
      AND held_seq = ?11 AND held_owner = ?7
      AND (lease_owner IS NULL OR lease_owner = ?7 OR lease_until < ?4)
      AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?12)";

/// The store's `step_ending_held` statement; `{key}` is the row's key column.
const END: &str = "UPDATE instances SET status = 'completed', output = '10', error = NULL,
        next_pos = ?2, next_activation = ?3, ready = 0, lease_owner = NULL, lease_until = 0,
        updated_at = ?4, ended_at = ?4, reason = NULL,
        held_seq = NULL, held_pos = NULL, held_owner = NULL, held_until = 0
    WHERE {key} = ?1 AND status = 'running' AND generation = 0 AND next_pos = ?5
      AND held_seq = ?6 AND held_owner = ?7
      AND (lease_owner IS NULL OR lease_owner = ?7 OR lease_until < ?4)
      AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?8)";

/// [`END`] for `no-step-update` and `hot-table`, whose instance row still says what its
/// creation wrote; `{key}` is the row's key column.
const END_UNSTEPPED: &str = "UPDATE instances SET status = 'completed', output = '10',
        error = NULL, next_pos = ?2, next_activation = ?3, ready = 0, lease_owner = NULL,
        lease_until = 0, updated_at = ?4, ended_at = ?4, reason = NULL,
        held_seq = NULL, held_pos = NULL, held_owner = NULL, held_until = 0
    WHERE {key} = ?1 AND status = 'running' AND generation = 0 AND ?5 >= 0 AND ?6 >= 0
      AND held_owner = ?7 AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?8)";

/// `hot-table`'s end of the narrow row, before [`END_UNSTEPPED`] ends the instance row.
const END_RUN: &str = "UPDATE runs SET running = 0, next_pos = ?2, next_activation = ?3,
        ready = 0, lease_owner = NULL, lease_until = 0, updated_at = ?4,
        held_seq = NULL, held_pos = NULL, held_owner = NULL, held_until = 0
    WHERE key = ?1 AND running = 1 AND generation = 0 AND next_pos = ?5
      AND held_seq = ?6 AND held_owner = ?7
      AND (lease_owner IS NULL OR lease_owner = ?7 OR lease_until < ?4)
      AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?8)";

const APPEND: &str = "INSERT INTO events ({key}, pos, activation, kind, recorded_at, body, len)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, 2)";

/// What one operation writes: instance `i`'s creation (`step` 0), a step, or its end (`STEPS`).
struct Writer<'c> {
    conn: &'c Connection,
    variant: Variant,
    step_sql: String,
    end_sql: String,
    append_sql: String,
    now: i64,
}

impl Writer<'_> {
    fn run(&self, id: &str, key: &mut i64, step: usize) -> Res<()> {
        let v = self.variant;
        let now = self.now;
        let pos = 2 * step as i64;
        let s = step as i64;
        if step == 0 {
            self.conn
                .prepare_cached(CREATE)?
                .execute(params![id, now, OWNER, now + LEASE_MS])?;
            *key = self.conn.last_insert_rowid();
            if v == Variant::HotTable {
                self.conn.prepare_cached(CREATE_RUN)?.execute(params![
                    *key,
                    now,
                    OWNER,
                    now + LEASE_MS
                ])?;
            }
            let body = "{\"type\":\"instance_started\",\"coordinator\":\"steps\",\"input\":10}\n\
                        {\"type\":\"activity_scheduled\",\"seq\":0,\"name\":\"step\",\"input\":0}";
            return self.append(id, *key, 0, 0, "instance_started,activity_scheduled", body);
        }
        let row_key = if v.keyed() {
            rusqlite::types::Value::Integer(*key)
        } else {
            rusqlite::types::Value::Text(id.to_string())
        };
        let completed = format!(
            "{{\"type\":\"activity_completed\",\"seq\":{},\"result\":{s}}}",
            s - 1
        );
        if step < STEPS {
            if !matches!(v, Variant::NoStepUpdate | Variant::KeyedNoStepUpdate) {
                let changed = self.conn.prepare_cached(&self.step_sql)?.execute(params![
                    row_key,
                    pos + 2,
                    s + 1,
                    now,
                    0i64,
                    pos,
                    OWNER,
                    s,
                    pos + 1,
                    now + LEASE_MS,
                    s - 1,
                    id
                ])?;
                if changed != 1 {
                    return Err(format!("step {step} of {id} matched {changed} rows").into());
                }
            }
            let body = format!(
                "{completed}\n{{\"type\":\"activity_scheduled\",\"seq\":{s},\"name\":\"step\",\
                 \"input\":{s}}}"
            );
            self.append(
                id,
                *key,
                pos,
                s,
                "activity_completed,activity_scheduled",
                &body,
            )
        } else {
            let end_params = params![row_key, pos + 2, s + 1, now, pos, s - 1, OWNER, id];
            if v == Variant::HotTable {
                let changed = self.conn.prepare_cached(END_RUN)?.execute(end_params)?;
                if changed != 1 {
                    return Err(format!("the end of {id}'s run matched {changed} rows").into());
                }
            }
            let changed = self
                .conn
                .prepare_cached(&self.end_sql)?
                .execute(end_params)?;
            if changed != 1 {
                return Err(format!("the end of {id} matched {changed} rows").into());
            }
            let body = format!("{completed}\n{{\"type\":\"instance_completed\",\"output\":10}}");
            self.append(
                id,
                *key,
                pos,
                s,
                "activity_completed,instance_completed",
                &body,
            )
        }
    }

    fn append(
        &self,
        id: &str,
        key: i64,
        pos: i64,
        activation: i64,
        kind: &str,
        body: &str,
    ) -> Res<()> {
        let mut stmt = self.conn.prepare_cached(&self.append_sql)?;
        if self.variant.keyed() {
            stmt.execute(params![key, pos, activation, kind, self.now, body])?;
        } else {
            stmt.execute(params![id, pos, activation, kind, self.now, body])?;
        }
        Ok(())
    }
}

fn main() -> Res<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "current".into());
    let variant = Variant::parse(&name).ok_or_else(|| {
        format!(
            "unknown variant {name:?}: current, integer-key, hot-table, no-history-index, \
             no-step-update or keyed-no-step-update"
        )
    })?;
    let dir = std::env::temp_dir().join(format!("retrace-schema-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(variant, &name, &dir.join("floor.sqlite"));
    std::fs::remove_dir_all(&dir)?;
    result
}

fn run(variant: Variant, name: &str, path: &std::path::Path) -> Res<()> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(32);
    conn.execute_batch(&schema(variant))?;
    let key_column = if variant.keyed() { "key" } else { "id" };
    let writer = Writer {
        conn: &conn,
        variant,
        step_sql: if variant == Variant::HotTable {
            STEP_RUN.to_string()
        } else {
            STEP.replace("{key}", key_column)
        },
        end_sql: if matches!(
            variant,
            Variant::NoStepUpdate | Variant::HotTable | Variant::KeyedNoStepUpdate
        ) {
            END_UNSTEPPED.replace("{key}", key_column)
        } else {
            END.replace("{key}", key_column)
        },
        append_sql: APPEND.replace(
            "{key}",
            if variant.keyed() {
                "instance_key"
            } else {
                "instance_id"
            },
        ),
        now: 1_790_000_000_000,
    };
    let ids: Vec<String> = (0..INSTANCES).map(|i| format!("w1-{i}")).collect();
    let mut keys = vec![0i64; INSTANCES];
    let operations: Vec<(usize, usize)> = (0..=STEPS)
        .flat_map(|step| (0..INSTANCES).map(move |i| (i, step)))
        .collect();
    let started = Instant::now();
    for batch in operations.chunks(BATCH) {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        for &(i, step) in batch {
            writer.run(&ids[i], &mut keys[i], step)?;
        }
        conn.execute_batch("COMMIT")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "schema_floor variant={name} operations={} wall_ms={:.1} us_per_operation={:.2}",
        operations.len(),
        elapsed * 1e3,
        elapsed * 1e6 / operations.len() as f64
    );
    Ok(())
}
