//! The write connection inside one group-commit batch, with the prepared statements the batch
//! has used kept at hand until it ends.
//!
//! `rusqlite`'s statement cache is keyed by the SQL text: every `prepare_cached` copies the text
//! into a new `Arc<str>`, and hashes it twice (to take the statement out and to put it back).
//! The store's step statements are several hundred bytes long, so that bookkeeping cost about a
//! tenth of the writer thread's instructions in W1, two statements per step. A [`Tx`] takes
//! each statement out of the cache once per batch and finds it again by the address of its
//! `&'static str`, a few integer comparisons.

use super::held_chain::HeldChains;
use rusqlite::{CachedStatement, Connection, Statement};
use std::cell::{OnceCell, RefCell, RefMut};
use std::ops::{Deref, DerefMut};

/// Distinct statements a batch keeps; any more go through the connection's own cache.
const HELD_STATEMENTS: usize = 24;

/// One statement kept by a [`Tx`]: the address and length of its SQL text, and the statement.
struct Held<'c> {
    key: (usize, usize),
    statement: RefCell<CachedStatement<'c>>,
}

/// The write connection for the length of one batch (or of one direct commit). It derefs to the
/// [`Connection`], so code written against a connection runs unchanged; only its own
/// [`Tx::prepare_cached`] keeps statements.
pub(crate) struct Tx<'c> {
    conn: &'c Connection,
    held: [OnceCell<Held<'c>>; HELD_STATEMENTS],
    /// The write connection's held chains (none for a connection without them).
    chains: Option<&'c HeldChains>,
}

impl<'c> Tx<'c> {
    /// A transaction view of `conn` that holds no statement yet.
    pub(crate) fn new(conn: &'c Connection) -> Tx<'c> {
        Tx {
            conn,
            held: std::array::from_fn(|_| OnceCell::new()),
            chains: None,
        }
    }

    /// [`Tx::new`] for the write connection, whose held chains it carries.
    pub(crate) fn with_chains(conn: &'c Connection, chains: &'c HeldChains) -> Tx<'c> {
        Tx {
            chains: Some(chains),
            ..Tx::new(conn)
        }
    }

    /// The write connection's held chains, if it keeps them.
    pub(crate) fn chains(&self) -> Option<&'c HeldChains> {
        self.chains
    }

    /// The prepared statement for `sql`, kept until this `Tx` is dropped. `sql` must be a
    /// `&'static str` (it is recognised by its address). A statement already in use further up
    /// the call stack, or one past the first [`HELD_STATEMENTS`], comes from the connection's
    /// cache as usual.
    pub(crate) fn prepare_cached(
        &self,
        sql: &'static str,
    ) -> rusqlite::Result<TxStatement<'_, 'c>> {
        let key = (sql.as_ptr() as usize, sql.len());
        for slot in &self.held {
            match slot.get() {
                Some(held) if held.key == key => {
                    return match held.statement.try_borrow_mut() {
                        Ok(statement) => Ok(TxStatement::Held(statement)),
                        Err(_) => self.conn.prepare_cached(sql).map(TxStatement::Cached),
                    };
                }
                Some(_) => continue,
                None => {
                    let statement = self.conn.prepare_cached(sql)?;
                    let held = slot.get_or_init(|| Held {
                        key,
                        statement: RefCell::new(statement),
                    });
                    return match held.statement.try_borrow_mut() {
                        Ok(statement) => Ok(TxStatement::Held(statement)),
                        Err(_) => self.conn.prepare_cached(sql).map(TxStatement::Cached),
                    };
                }
            }
        }
        self.conn.prepare_cached(sql).map(TxStatement::Cached)
    }
}

impl<'c> Deref for Tx<'c> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// A statement borrowed from a [`Tx`] (or, past its capacity, from the connection's cache).
pub(crate) enum TxStatement<'t, 'c> {
    /// Kept by the `Tx` until the batch ends.
    Held(RefMut<'t, CachedStatement<'c>>),
    /// Back to the connection's cache when dropped.
    Cached(CachedStatement<'c>),
}

impl<'c> Deref for TxStatement<'_, 'c> {
    type Target = Statement<'c>;

    fn deref(&self) -> &Statement<'c> {
        match self {
            TxStatement::Held(s) => s,
            TxStatement::Cached(s) => s,
        }
    }
}

impl<'c> DerefMut for TxStatement<'_, 'c> {
    fn deref_mut(&mut self) -> &mut Statement<'c> {
        match self {
            TxStatement::Held(s) => s,
            TxStatement::Cached(s) => s,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const INSERT: &str = "INSERT INTO t (x) VALUES (?1)";
    const COUNT: &str = "SELECT COUNT(*) FROM t";

    fn table() -> Connection {
        let conn = Connection::open_in_memory().expect("open in memory");
        conn.execute_batch("CREATE TABLE t (x INTEGER)")
            .expect("create table");
        conn
    }

    #[test]
    fn a_statement_is_kept_and_reused_within_the_transaction() {
        let conn = table();
        let tx = Tx::new(&conn);
        for x in 0..3 {
            tx.prepare_cached(INSERT)
                .and_then(|mut s| s.execute([x]))
                .expect("insert");
        }
        assert!(matches!(
            tx.prepare_cached(INSERT).expect("again"),
            TxStatement::Held(_)
        ));
        let count: i64 = tx
            .prepare_cached(COUNT)
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .expect("count");
        assert_eq!(count, 3);
        assert_eq!(tx.held.iter().filter(|s| s.get().is_some()).count(), 2);
    }

    #[test]
    fn a_statement_in_use_is_not_handed_out_twice() {
        let conn = table();
        let tx = Tx::new(&conn);
        let outer = tx.prepare_cached(COUNT).expect("outer");
        let inner = tx.prepare_cached(COUNT).expect("inner");
        assert!(matches!(outer, TxStatement::Held(_)));
        assert!(matches!(inner, TxStatement::Cached(_)));
    }

    #[test]
    fn past_its_capacity_statements_come_from_the_connection_cache() {
        let conn = table();
        let tx = Tx::new(&conn);
        // Distinct texts, leaked so that each is a distinct `&'static str`.
        for i in 0..HELD_STATEMENTS + 2 {
            let sql: &'static str = Box::leak(format!("SELECT {i}").into_boxed_str());
            let got: i64 = tx
                .prepare_cached(sql)
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .expect("select");
            assert_eq!(got, i as i64);
            let held = matches!(tx.prepare_cached(sql).expect("again"), TxStatement::Held(_));
            assert_eq!(held, i < HELD_STATEMENTS, "statement {i}");
        }
    }
}
