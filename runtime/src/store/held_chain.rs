//! Held chains: sequential steps that write their history row and nothing else.
//!
//! A sequential step (the call in an instance's held slot completed, and the activation
//! claims one next call for itself) used to `UPDATE` the instance row: position, activation,
//! held slot. That statement cost more than the history row it went with, and every group
//! commit rewrote the instance table's pages for it (BENCHMARKS.md, seventh and eighth
//! rounds). Here the SQLite store's write connection remembers, for each instance whose held
//! slot it just wrote, what the row says and what the instance's true state is (a [`Chain`]).
//! The next step of that instance, by the same owner, from the position the chain expects,
//! then appends its history row alone: the instance row *lags* behind its history.
//!
//! Why that is safe:
//! - The chain is exact. Every change to an `instances` row or to the inbox through the
//!   write connection drops the chains it may touch (SQLite's update hook), a rolled back
//!   batch drops them all, and so does any commit by another connection or process (SQLite's
//!   `data_version`, read when a batch begins). A step whose chain is gone takes the ordinary
//!   path.
//! - The lag is visible to everyone from the database alone. A lagging row's history goes on
//!   past `next_pos`, and the rows past it are chain steps, each with exactly one
//!   `activity_scheduled` event: the call that took the held slot. [`catch_up`] writes that
//!   state into the row. Every write path that reads the position or the held slot runs it
//!   first; [`settle_info`] gives readers the same view without writing.
//! - Only a row with a held slot lags. A chain begins where a step writes the slot, its steps
//!   leave the row as it is, and every path that empties the slot either runs [`catch_up`]
//!   first or writes the true position with it (a chain's last step). So [`catch_up`] reads
//!   the history's tail only for a row whose slot is set.
//! - A path that missed it could not corrupt the history: a lagging row's `next_pos` is the
//!   position of a history row that exists, so an append there collides with it.

use super::codec::decode_event_json;
use super::sqlite::{db, for_each_event_in_row};
use super::InstanceInfo;
use crate::error::StoreError;
use retrace_sdk::Event;
use rusqlite::{params, Connection, OptionalExtension};
use std::sync::{Arc, Mutex, MutexGuard};

/// Maps keyed by instance ids and rowids, hashed with foldhash: a few lookups per step.
type Map<K, V> = foldhash::HashMap<K, V>;

/// What the write connection knows of one instance in a held chain: the row as written
/// (`row_*`) and the instance as its history says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    /// The instance row's key (its rowid, which the update hook reports).
    pub(crate) rowid: i64,
    /// The run the chain's steps belong to.
    pub(crate) generation: u64,
    /// The true next history position.
    pub(crate) next_pos: u64,
    /// The call in the held slot.
    pub(crate) held_seq: u32,
    /// Who holds it (and runs the instance's steps).
    pub(crate) owner: Arc<str>,
    /// The slot's lease, as the row says (renewals drop the chain).
    pub(crate) held_until: u64,
    /// `next_pos` as the row says.
    pub(crate) row_next_pos: u64,
    /// `held_seq` as the row says.
    pub(crate) row_held_seq: u32,
    /// The chain began with the instance's creation, which left no parent, no timer and no
    /// call but the held one (none can have come since without writing the row).
    pub(crate) fresh: bool,
}

/// A chain and the instance it belongs to.
struct Entry {
    id: Arc<str>,
    chain: Chain,
}

#[derive(Default)]
struct State {
    /// Chains of committed transactions, by rowid.
    chains: Map<i64, Entry>,
    /// Rowid by instance id: where to look in `chains` (the entry found must name the id).
    rows: Map<Arc<str>, i64>,
    /// Chains the open transaction wrote, for when it commits, each with its stamp.
    staged: Vec<(u64, Entry)>,
    /// Rows the update hook saw change while chains were staged, with the stamp of each
    /// change: a staged chain older than a change to its row is dropped at commit.
    changed: Vec<(i64, u64)>,
    /// Counts stagings and changes, to order them.
    stamp: u64,
    /// The rowid of the `instances` row the last statement changed.
    last_row: Option<i64>,
    /// `PRAGMA data_version` when the last batch began.
    data_version: Option<i64>,
}

impl State {
    fn row_changed(&mut self, rowid: i64) {
        self.chains.remove(&rowid);
        if !self.staged.is_empty() {
            self.stamp += 1;
            self.changed.push((rowid, self.stamp));
        }
        self.last_row = Some(rowid);
    }

    fn forget_all(&mut self) {
        self.chains.clear();
        self.staged.clear();
        self.changed.clear();
    }
}

/// The held chains of one write connection. Shared with the connection's update hook.
#[derive(Default)]
pub(crate) struct HeldChains {
    state: Mutex<State>,
}

impl HeldChains {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the update hook on `conn` (the write connection) that keeps `chains` exact.
    pub(crate) fn watch(chains: &Arc<HeldChains>, conn: &Connection) {
        let chains = Arc::clone(chains);
        conn.update_hook(Some(
            move |_: rusqlite::hooks::Action, _: &str, table: &str, rowid: i64| match table {
                "instances" => chains.lock().row_changed(rowid),
                // An inbox message may make the instance ready, or be what its next activation
                // must see: chains assume an empty inbox. (Every message also marks its
                // instance's row, which drops that chain alone, but for an activity outcome
                // whose instance is ready and leased already: `finish_task` leaves that row
                // alone only when this hook has seen the message go in.)
                "inbox" => chains.lock().forget_all(),
                _ => {}
            },
        ));
    }

    /// Removes the update hook [`HeldChains::watch`] installed on `conn`, for statements that
    /// change no `instances` row and no inbox message (history rows only).
    pub(crate) fn unwatch(conn: &Connection) {
        conn.update_hook(None::<fn(rusqlite::hooks::Action, &str, &str, i64)>);
    }

    /// When a batch begins (the write lock held): forgets everything if another connection
    /// committed since the last batch.
    pub(crate) fn begin(&self, conn: &Connection) {
        let version = conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .ok();
        let mut s = self.lock();
        if version.is_none() || version != s.data_version {
            s.forget_all();
        }
        s.data_version = version;
        s.last_row = None;
    }

    /// The batch committed: what it staged holds from now on, but for chains whose row
    /// changed after they were staged.
    pub(crate) fn committed(&self) {
        let mut s = self.lock();
        // Drained, not taken: the lists keep their room for the next batch (taken, each batch
        // grew them again from nothing, ~8 reallocations and copies of up to 50 KB).
        let State {
            staged,
            changed,
            chains,
            ..
        } = &mut *s;
        if staged.is_empty() {
            changed.clear();
        } else {
            let last_change: Map<i64, u64> = changed.drain(..).collect();
            for (stamp, entry) in staged.drain(..) {
                if last_change
                    .get(&entry.chain.rowid)
                    .is_none_or(|&at| at < stamp)
                {
                    chains.insert(entry.chain.rowid, entry);
                }
            }
        }
        // `rows` only points into `chains`: trim what points nowhere once it is much larger.
        if s.rows.len() > 4 * s.chains.len() + 4096 {
            let State { rows, chains, .. } = &mut *s;
            rows.retain(|_, rowid| chains.contains_key(rowid));
        }
    }

    /// Some of the batch was undone: nothing is known any more.
    pub(crate) fn undone(&self) {
        self.lock().forget_all();
    }

    /// The committed chain of `id`.
    pub(crate) fn get(&self, id: &str) -> Option<Chain> {
        let s = self.lock();
        let rowid = s.rows.get(id)?;
        let entry = s.chains.get(rowid)?;
        (*entry.id == *id).then(|| entry.chain.clone())
    }

    /// The rowid of the `instances` row the last statement changed, taken.
    pub(crate) fn take_last_row(&self) -> Option<i64> {
        self.lock().last_row.take()
    }

    /// Records `chain` for `id`, once the open transaction commits.
    pub(crate) fn stage(&self, id: &str, chain: Chain) {
        let mut s = self.lock();
        let id = match s.rows.get_key_value(id) {
            Some((key, &rowid)) if rowid == chain.rowid => Arc::clone(key),
            _ => {
                let key: Arc<str> = id.into();
                s.rows.insert(Arc::clone(&key), chain.rowid);
                key
            }
        };
        s.stamp += 1;
        let stamp = s.stamp;
        s.staged.push((stamp, Entry { id, chain }));
    }

    /// Drops what is known of `id` (its chain step could not be written).
    pub(crate) fn forget(&self, id: &str) {
        let mut s = self.lock();
        if let Some(&rowid) = s.rows.get(id) {
            s.chains.remove(&rowid);
        }
        s.staged.retain(|(_, e)| *e.id != *id);
    }
}

/// The last history row of an instance, when it goes past the row's `next_pos`.
struct Tail {
    pos: i64,
    len: i64,
    activation: i64,
    recorded_at: i64,
    kind: String,
    body: String,
}

/// `id`'s last history row, if it goes past `next_pos` (the row's). Reads only.
fn tail(conn: &Connection, id: &str, next_pos: i64) -> Result<Option<Tail>, StoreError> {
    // Rows the write connection keeps aside for the end of its batch are part of the history.
    super::deferred_rows::flush_for(conn, id).map_err(db("read history tail"))?;
    let tail = conn
        .prepare_cached(
            "SELECT pos, len, activation, recorded_at, kind, body FROM events
             WHERE instance_key = (SELECT key FROM instances WHERE id = ?1)
             ORDER BY pos DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([id], |r| {
                Ok(Tail {
                    pos: r.get(0)?,
                    len: r.get(1)?,
                    activation: r.get(2)?,
                    recorded_at: r.get(3)?,
                    kind: r.get(4)?,
                    body: r.get(5)?,
                })
            })
            .optional()
        })
        .map_err(db("read history tail"))?;
    Ok(tail.filter(|t| t.pos + t.len > next_pos))
}

/// Where a lagging row's history ends: its true next position, next activation and last
/// change. Reads only, and decodes nothing.
pub(crate) struct TailEnd {
    /// The true next position.
    pub(crate) next_pos: i64,
    /// The true next activation.
    pub(crate) next_activation: i64,
    /// When the chain's last step was written.
    pub(crate) recorded_at: i64,
}

/// [`TailEnd`] of `id`, if its row (at `next_pos`) lags behind its history.
pub(crate) fn tail_end(
    conn: &Connection,
    id: &str,
    next_pos: i64,
) -> Result<Option<TailEnd>, StoreError> {
    Ok(tail(conn, id, next_pos)?.map(|t| TailEnd {
        next_pos: t.pos + t.len,
        next_activation: t.activation + 1,
        recorded_at: t.recorded_at,
    }))
}

/// The call in a lagging row's held slot: the one `activity_scheduled` of its last history
/// row (seq, position).
fn held_call(id: &str, tail: &Tail) -> Result<(u32, i64), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        instance_id: id.to_string(),
        what: format!("history row at position {}", tail.pos),
        detail,
    };
    let mut scheduled = tail
        .kind
        .split(',')
        .enumerate()
        .filter(|(_, k)| *k == "activity_scheduled");
    let (Some((at, _)), None) = (scheduled.next(), scheduled.next()) else {
        return Err(corrupt(format!(
            "it goes past the instance row's position but does not schedule exactly one call \
             ({})",
            tail.kind
        )));
    };
    let held_pos = tail.pos + at as i64;
    let mut held_seq = None;
    for_each_event_in_row(id, tail.pos, tail.len, &tail.body, |p, part| {
        if p == held_pos {
            if let Event::ActivityScheduled { seq, .. } = decode_event_json(id, p, part)? {
                held_seq = Some(seq);
            }
        }
        Ok(())
    })?;
    let held_seq =
        held_seq.ok_or_else(|| corrupt(format!("position {held_pos} schedules no call")))?;
    Ok((held_seq, held_pos))
}

/// The state the history of a lagging row gives it.
pub(crate) struct Lag {
    /// Where the history ends.
    pub(crate) end: TailEnd,
    /// The call in the held slot.
    pub(crate) held_seq: u32,
    /// The position of its `activity_scheduled` event.
    pub(crate) held_pos: i64,
}

/// The state `id`'s history gives its row, if the row (at `next_pos`) lags behind it. Reads
/// only. [`StoreError::Corrupt`] when the last row's held call cannot be read.
pub(crate) fn lag(conn: &Connection, id: &str, next_pos: i64) -> Result<Option<Lag>, StoreError> {
    let Some(tail) = tail(conn, id, next_pos)? else {
        return Ok(None);
    };
    let (held_seq, held_pos) = held_call(id, &tail)?;
    Ok(Some(Lag {
        end: TailEnd {
            next_pos: tail.pos + tail.len,
            next_activation: tail.activation + 1,
            recorded_at: tail.recorded_at,
        },
        held_seq,
        held_pos,
    }))
}

/// Writes into `id`'s row what its held chain left in the history only (see the module
/// docs). Every write path that reads the row's position, activation or held slot runs it
/// first. Does nothing for a row that does not lag, or one that does not exist.
///
/// When the held call cannot be read from the history (damaged behind the store's back), the
/// row still gets its position, and a running instance is stopped with the reason, its slot
/// emptied: as for any unreadable history, that instance waits for an operator and everything
/// else goes on (terminating it, among others).
pub(crate) fn catch_up(conn: &Connection, id: &str) -> Result<(), StoreError> {
    let row: Option<(i64, bool)> = conn
        .prepare_cached("SELECT next_pos, held_seq IS NOT NULL FROM instances WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db("read instance"))?;
    // Only a row with a held slot can lag (module docs): the history's tail is not read for
    // the others. That read costs more than the rest of a fan-out call's end (W3), as the
    // tail row holds every call the fan-out scheduled.
    let Some((next_pos, true)) = row else {
        return Ok(());
    };
    let Some(tail) = tail(conn, id, next_pos)? else {
        return Ok(());
    };
    let (next_pos, next_activation) = (tail.pos + tail.len, tail.activation + 1);
    match held_call(id, &tail) {
        Ok((held_seq, held_pos)) => conn
            .prepare_cached(
                "UPDATE instances SET next_pos = ?2, next_activation = ?3, updated_at = ?4,
                        held_seq = ?5, held_pos = ?6, held_at = ?4
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    next_pos,
                    next_activation,
                    tail.recorded_at,
                    held_seq,
                    held_pos
                ])
            })
            .map_err(db("catch up instance"))?,
        Err(e @ StoreError::Corrupt { .. }) => {
            tracing::error!(instance_id = %id, error = %e, "cannot read the call a held chain left running; stopping the instance");
            conn.prepare_cached(
                "UPDATE instances SET next_pos = ?2, next_activation = ?3, updated_at = ?4,
                        held_seq = NULL, held_pos = NULL, held_owner = NULL, held_until = 0,
                        ready = CASE WHEN status = 'running' THEN 0 ELSE ready END,
                        lease_owner = CASE WHEN status = 'running' THEN NULL ELSE lease_owner END,
                        lease_until = CASE WHEN status = 'running' THEN 0 ELSE lease_until END,
                        reason = CASE WHEN status = 'running' THEN ?5 ELSE reason END,
                        status = CASE WHEN status = 'running' THEN 'stopped' ELSE status END
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    next_pos,
                    next_activation,
                    tail.recorded_at,
                    e.to_string()
                ])
            })
            .map_err(db("catch up instance"))?
        }
        Err(e) => return Err(e),
    };
    Ok(())
}

/// `info` as its history says, for a reader: a running instance's position, activation and
/// last change past what its lagging row says (see the module docs). Run it in the read
/// transaction that read `info`.
pub(crate) fn settle_info(conn: &Connection, info: &mut InstanceInfo) -> Result<(), StoreError> {
    if info.status.is_final() {
        return Ok(());
    }
    if let Some(end) = tail_end(conn, &info.id, info.next_position as i64)? {
        info.next_position = end.next_pos as u64;
        info.next_activation = end.next_activation as u32;
        info.updated_at_ms = info.updated_at_ms.max(end.recorded_at as u64);
    }
    Ok(())
}
