//! History rows of a batch, inserted many to a statement just before the batch commits.
//!
//! A step in a held chain (see `held_chain`) writes one history row and nothing else; an
//! instance created with its first activation, and a chain's last step, write one row each
//! beside their instance row. Inserted one statement per row, SQLite ran the statement's whole
//! frame for each (the program started and halted, cursors opened and closed, the table's last
//! row found again): W1's writer spent ~8,400 instructions per row, ~6,400 now. Here the
//! writer keeps those rows aside while its batch runs (when it knows the instance's key) and
//! inserts them just before the batch commits, up to [`CHUNKS`]`[0]` to a statement.
//!
//! Why that is safe:
//! - Nothing in the batch can miss a kept row. Every statement of the write path that reads or
//!   deletes an instance's history first inserts what is kept, if any of it is that instance's
//!   ([`flush_for`]). Rows of other instances change nothing such a statement sees.
//! - A kept row collides where its own `INSERT` would have: the unique index on
//!   `(instance_key, pos)` checks it when it goes in. It then goes in with `OR ROLLBACK` at the
//!   end of the batch, which undoes the whole transaction without the statement journal a
//!   multi-row `INSERT` otherwise keeps; in the middle of an operation, with the default
//!   `ABORT`, which undoes the statement only (the operation goes on inside its transaction,
//!   never in autocommit). Either way [`failed`] tells the batch, which then runs again with a
//!   savepoint per operation and nothing kept aside: each step then meets its collision itself,
//!   as it always did.
//! - Only the optimistic pass of a batch keeps rows, on the thread and connection running it
//!   ([`Keeping`] ends it, also on a panic); everything else inserts at once.

use super::sqlite::{PreparedCommit, STEP_KINDS};
use super::transaction::Tx;
use rusqlite::{Connection, Statement};
use std::cell::RefCell;
use std::ops::DerefMut;
use std::sync::{Arc, OnceLock};

/// Rows per multi-row `INSERT`, largest first: any number of rows goes in as a sum of these.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// One history row kept aside: its instance's key, its time, and the commit that holds the
/// rest (position, activation, encoded events).
pub(crate) struct DeferredRow {
    pub(crate) key: i64,
    pub(crate) recorded_at: i64,
    pub(crate) commit: Arc<PreparedCommit>,
}

/// The rows kept aside on this thread, for the connection (by address) whose batch keeps them.
#[derive(Default)]
struct Kept {
    conn: Option<usize>,
    rows: Vec<DeferredRow>,
    failed: bool,
}

thread_local! {
    static KEPT: RefCell<Kept> = RefCell::new(Kept::default());
}

fn address(conn: &Connection) -> usize {
    conn as *const Connection as usize
}

/// Rows are kept aside for `conn` until this is dropped (then dropped with it, unwritten).
pub(crate) struct Keeping(());

/// From now on, history rows written on `conn` by this thread through [`defer`] are kept
/// aside.
pub(crate) fn keep(conn: &Connection) -> Keeping {
    KEPT.with_borrow_mut(|k| {
        k.conn = Some(address(conn));
        k.rows.clear();
        k.failed = false;
    });
    Keeping(())
}

impl Drop for Keeping {
    fn drop(&mut self) {
        KEPT.with_borrow_mut(|k| {
            k.conn = None;
            k.rows.clear();
            k.failed = false;
        });
    }
}

/// Keeps `row` aside, if rows written on `conn` are kept; otherwise hands it back.
pub(crate) fn defer(conn: &Connection, row: DeferredRow) -> Result<(), DeferredRow> {
    KEPT.with_borrow_mut(|k| {
        if k.conn == Some(address(conn)) && !k.failed {
            k.rows.push(row);
            Ok(())
        } else {
            Err(row)
        }
    })
}

/// Whether inserting kept rows failed (the batch must run again, keeping nothing).
pub(crate) fn failed() -> bool {
    KEPT.with_borrow(|k| k.failed)
}

/// Before a statement reads or deletes instance `id`'s history on `conn`: inserts the kept
/// rows if any is `id`'s (with `ABORT`: only the statement is undone if one collides).
pub(crate) fn flush_for(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    let mine = KEPT.with_borrow(|k| {
        k.conn == Some(address(conn)) && k.rows.iter().any(|r| r.commit.instance_id == id)
    });
    if mine {
        flush(conn)
    } else {
        Ok(())
    }
}

/// Inserts every kept row on `conn`, in the middle of an operation (with `ABORT`: a collision
/// undoes this statement only). A failure is remembered for [`failed`].
fn flush(conn: &Connection) -> rusqlite::Result<()> {
    let rows = take(conn);
    let inserted = insert(|sql| conn.prepare_cached(sql), &rows, false);
    put_back(rows, &inserted);
    inserted
}

/// Inserts every kept row at the end of the batch on `tx`, when no operation runs (with
/// `OR ROLLBACK`: a collision undoes the whole transaction). A failure is remembered for
/// [`failed`].
pub(crate) fn flush_at_commit(tx: &Tx<'_>) -> rusqlite::Result<()> {
    let rows = take(tx);
    let inserted = insert(|sql| tx.prepare_cached(sql), &rows, true);
    put_back(rows, &inserted);
    inserted
}

fn take(conn: &Connection) -> Vec<DeferredRow> {
    KEPT.with_borrow_mut(|k| {
        if k.conn == Some(address(conn)) {
            std::mem::take(&mut k.rows)
        } else {
            Vec::new()
        }
    })
}

/// Notes a failure, and gives the list's room back for the next rows.
fn put_back(mut rows: Vec<DeferredRow>, inserted: &rusqlite::Result<()>) {
    rows.clear();
    KEPT.with_borrow_mut(|k| {
        if inserted.is_err() {
            k.failed = true;
        }
        if k.rows.is_empty() {
            k.rows = rows;
        }
    });
}

/// The statements kept rows go in by: `[at_commit][step form][chunk]`.
type Statements = [[[String; CHUNKS.len()]; 2]; 2];

fn insert<'c, S>(
    mut prepare: impl FnMut(&'static str) -> rusqlite::Result<S>,
    rows: &[DeferredRow],
    at_commit: bool,
) -> rusqlite::Result<()>
where
    S: DerefMut<Target = Statement<'c>>,
{
    static SQL: OnceLock<Statements> = OnceLock::new();
    let sql = SQL.get_or_init(|| {
        [false, true].map(|at_commit| {
            [false, true].map(|step| CHUNKS.map(|rows| statement(rows, at_commit, step)))
        })
    });
    let (steps, others): (Vec<&DeferredRow>, Vec<&DeferredRow>) =
        rows.iter().partition(|r| r.commit.row.is_step());
    for (step, rows) in [(true, steps), (false, others)] {
        let mut rest = &rows[..];
        for (size, sql) in CHUNKS
            .iter()
            .zip(&sql[usize::from(at_commit)][usize::from(step)])
        {
            while rest.len() >= *size {
                let (chunk, tail) = rest.split_at(*size);
                rest = tail;
                let mut stmt = prepare(sql.as_str())?;
                let mut at = 0;
                for row in chunk {
                    let c = &row.commit;
                    let mut bind = |value: &dyn rusqlite::ToSql| {
                        at += 1;
                        stmt.raw_bind_parameter(at, value)
                    };
                    bind(&row.key)?;
                    bind(&(c.expected_position as i64))?;
                    bind(&c.activation)?;
                    if !step {
                        bind(&c.row.kind())?;
                    }
                    bind(&row.recorded_at)?;
                    bind(&c.row.body.as_str())?;
                    if !step {
                        bind(&(c.row.len() as i64))?;
                    }
                }
                stmt.raw_execute()?;
            }
        }
    }
    Ok(())
}

/// The `INSERT` of `rows` history rows; `step`: rows of a sequential step (an outcome and the
/// next call), whose kind and length are in the statement.
fn statement(rows: usize, at_commit: bool, step: bool) -> String {
    let verb = if at_commit {
        "INSERT OR ROLLBACK"
    } else {
        "INSERT"
    };
    let values = if step {
        format!("(?,?,?,'{STEP_KINDS}',?,?,2)")
    } else {
        "(?,?,?,?,?,?,?)".to_string()
    };
    let mut sql = format!(
        "{verb} INTO events (instance_key, pos, activation, kind, recorded_at, body, len) VALUES "
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&values);
    }
    sql
}
