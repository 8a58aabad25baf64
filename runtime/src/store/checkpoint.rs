//! Checkpointing the SQLite store's WAL on a thread of its own, off the writer's path.
//!
//! SQLite's automatic checkpoint runs inside the `COMMIT` that takes the WAL past 1,000
//! frames, on the committing thread: it copies those pages into the database file and syncs
//! it, which took the writer 1–4 ms on this project's machine while every operation queued
//! behind it waited (W1 ran ~12 % faster with no checkpoint at all). Here the write connection
//! reports the WAL's length after each commit (SQLite's WAL hook, which also turns the
//! automatic checkpoint off for that connection), and once it reaches [`CHECKPOINT_FRAMES`] the
//! writer asks a checkpointer thread, with a connection of its own, to run a `PASSIVE`
//! checkpoint, while it goes on committing: a checkpoint copies frames already committed and
//! never blocks the writer. The writer restarts the WAL from its beginning once a checkpoint
//! has copied all of it, as before; with the checkpointer gone, it checkpoints itself, as
//! SQLite would have.
//!
//! The thread runs at the lowest priority (Linux), so that it takes the time the writer and
//! the workers leave, not theirs. If that is not enough and the WAL reaches
//! [`CHECKPOINT_INLINE_FRAMES`], the writer interrupts the thread's checkpoint, if one is
//! running, and checkpoints itself: on a machine whose cores stay busy, the thread may hold the
//! checkpoint lock until it is next given a core, and the WAL grows meanwhile (by what is
//! committed in one scheduling period of a lowest-priority thread, tens of milliseconds).
//!
//! Durability is unchanged: a checkpoint only copies what the WAL already holds durably, and
//! syncs the WAL before and the database after as SQLite's own does.

use rusqlite::hooks::Wal;
use rusqlite::Connection;
use std::cell::Cell;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// The WAL length (frames) at which the checkpointer is asked to copy it into the database:
/// SQLite's own default for its automatic checkpoint.
pub(super) const CHECKPOINT_FRAMES: i32 = 1_000;

/// The WAL length at which the writer checkpoints itself.
pub(super) const CHECKPOINT_INLINE_FRAMES: i32 = 2 * CHECKPOINT_FRAMES;

thread_local! {
    /// The WAL's length after the last commit on this thread's connection (0: none since read).
    static WAL_FRAMES: Cell<c_int> = const { Cell::new(0) };
}

/// The WAL hook of the write connection: notes the WAL's length for [`take_wal_frames`].
/// (Installing it turns SQLite's automatic checkpoint off for the connection.)
fn note_wal_frames(_: &Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|f| f.set(frames));
    Ok(())
}

/// Reports the WAL's length after each commit of `conn` to [`take_wal_frames`] on the thread
/// that commits, instead of checkpointing in the commit.
pub(super) fn watch_wal(conn: &Connection) {
    conn.wal_hook(Some(note_wal_frames));
}

/// The WAL's length after the last commit this thread made on a watched connection since the
/// last call (0 if none).
pub(super) fn take_wal_frames() -> i32 {
    WAL_FRAMES.with(|f| f.replace(0))
}

/// Runs a `PASSIVE` checkpoint on `conn`: copies what it can of the WAL into the database
/// without waiting for any lock. Returns (WAL frames, frames copied).
pub(super) fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    })
}

/// The checkpointer thread of one store (see the module's documentation).
pub(super) struct Checkpointer {
    /// Where requests go; `None` once closed.
    requests: Mutex<Option<mpsc::SyncSender<()>>>,
    /// A request is queued or running: more are not needed until it is done.
    requested: Arc<AtomicBool>,
    /// Checkpoints the thread has run.
    runs: Arc<AtomicU64>,
    /// Stops the checkpoint the thread's connection is running (set once it has one).
    interrupt: Arc<Mutex<Option<rusqlite::InterruptHandle>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Checkpointer {
    /// Starts the thread; `open` makes its connection (on the thread, at its first request).
    pub(super) fn start(
        open: impl FnOnce() -> Result<Connection, String> + Send + 'static,
    ) -> std::io::Result<Checkpointer> {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let requested = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicU64::new(0));
        let interrupt = Arc::new(Mutex::new(None));
        let thread = {
            let requested = Arc::clone(&requested);
            let runs = Arc::clone(&runs);
            let interrupt = Arc::clone(&interrupt);
            std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || checkpointer_loop(open, &rx, &requested, &runs, &interrupt))?
        };
        Ok(Checkpointer {
            requests: Mutex::new(Some(tx)),
            requested,
            runs,
            interrupt,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for a checkpoint; does nothing if one is already asked for or running. Returns
    /// false when the checkpointer is gone (closed, or its connection could not be opened).
    pub(super) fn request(&self) -> bool {
        if self.requested.swap(true, Ordering::AcqRel) {
            return true;
        }
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match requests.as_ref().map(|tx| tx.try_send(())) {
            Some(Ok(())) | Some(Err(mpsc::TrySendError::Full(()))) => true,
            Some(Err(mpsc::TrySendError::Disconnected(()))) | None => {
                self.requested.store(false, Ordering::Release);
                false
            }
        }
    }

    /// Stops the checkpoint the thread is running, if any, at its next page: it holds the
    /// database's checkpoint lock meanwhile, which the writer needs to checkpoint itself. (At
    /// the lowest priority on a machine whose cores are all busy, the thread may be given a
    /// core only now and then; it lets go of the lock the next time it runs.)
    pub(super) fn interrupt(&self) {
        if let Some(handle) = &*self.interrupt.lock().unwrap_or_else(|p| p.into_inner()) {
            handle.interrupt();
        }
    }

    /// How many checkpoints the thread has run.
    pub(super) fn runs(&self) -> u64 {
        self.runs.load(Ordering::Acquire)
    }

    /// Stops the thread (after the checkpoint it is running, if any).
    pub(super) fn close(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
            tracing::debug!(checkpoints = self.runs(), "WAL checkpointer stopped");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.close();
    }
}

/// The checkpointer thread's name (15 bytes: what Linux keeps of it).
const THREAD_NAME: &str = "retrace-checkpt";

/// The checkpointer's nice value: the lowest priority. It then runs on a core the writer and
/// the workers leave idle (the fsyncs of the writer leave some), instead of taking turns with
/// them: W1, 29 of 34 interleaved pairs faster than at the default priority.
const CHECKPOINTER_NICE: i32 = 19;

/// Lowers the calling thread's priority to [`CHECKPOINTER_NICE`] (Linux: the nice value is a
/// thread's own; elsewhere it would be the whole process's, so nothing is done). Best effort.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(thread), CHECKPOINTER_NICE) {
            tracing::debug!(error = %e, "the WAL checkpointer keeps its priority");
        }
    }
}

fn checkpointer_loop(
    open: impl FnOnce() -> Result<Connection, String>,
    rx: &mpsc::Receiver<()>,
    requested: &AtomicBool,
    runs: &AtomicU64,
    interrupt: &Mutex<Option<rusqlite::InterruptHandle>>,
) {
    let mut open = Some(open);
    let mut conn: Option<Connection> = None;
    lower_priority();
    while rx.recv().is_ok() {
        if conn.is_none() {
            match open.take().map(|open| open()) {
                Some(Ok(c)) => {
                    *interrupt.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(c.get_interrupt_handle());
                    conn = Some(c);
                }
                Some(Err(e)) => {
                    // Gone: the writer's next request finds no one to take it and checkpoints
                    // itself, as SQLite did.
                    tracing::warn!(error = %e, "the WAL checkpointer could not open its connection");
                    requested.store(false, Ordering::Release);
                    return;
                }
                None => {
                    requested.store(false, Ordering::Release);
                    return;
                }
            }
        }
        if let Some(conn) = &conn {
            match checkpoint(conn) {
                Ok((frames, copied)) => {
                    tracing::trace!(frames, copied, "WAL checkpointed");
                }
                Err(e) => tracing::debug!(error = %e, "WAL checkpoint not done; asked again later"),
            }
            runs.fetch_add(1, Ordering::AcqRel);
        }
        requested.store(false, Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) mod tests {
    use super::*;

    fn wal_db(dir: &std::path::Path) -> (std::path::PathBuf, Connection) {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("db.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        (path, conn)
    }

    fn wal_len(path: &std::path::Path) -> u64 {
        std::fs::metadata(path.with_extension("sqlite-wal"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    #[test]
    fn a_watched_connection_reports_its_wal_instead_of_checkpointing() {
        let dir = std::env::temp_dir().join(format!("retrace-ckpt-{}", std::process::id()));
        let (path, conn) = wal_db(&dir);
        watch_wal(&conn);
        assert_eq!(take_wal_frames(), 0);
        let mut last = 0;
        for _ in 0..(CHECKPOINT_FRAMES + 200) / 2 {
            conn.execute("INSERT INTO t VALUES (zeroblob(3000))", [])
                .unwrap();
            let frames = take_wal_frames();
            assert!(frames > last, "{frames} after {last}");
            last = frames;
        }
        // Past SQLite's own checkpoint length, nothing was copied: the WAL only grew.
        assert!(last > CHECKPOINT_FRAMES, "{last}");
        assert_eq!(take_wal_frames(), 0, "taken");
        let (frames, copied) = checkpoint(&conn).unwrap();
        assert_eq!((frames, copied), (i64::from(last), i64::from(last)));
        // The WAL restarts from its beginning at the next commit: its file stays as long.
        let len = wal_len(&path);
        conn.execute("INSERT INTO t VALUES (zeroblob(10))", [])
            .unwrap();
        assert!(take_wal_frames() < 5);
        assert_eq!(wal_len(&path), len);
        drop(conn);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Waits (up to a minute: at the lowest priority, on a loaded machine) until `checkpointer`
    /// has run a checkpoint.
    pub(in crate::store) fn wait_for_a_run(checkpointer: &Checkpointer) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while checkpointer.runs() == 0 {
            assert!(std::time::Instant::now() < deadline, "no checkpoint ran");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The nice values of this process's checkpointer threads (other tests' too), from `/proc`.
    #[cfg(target_os = "linux")]
    fn checkpointer_nices() -> Vec<i32> {
        let mut nices = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == THREAD_NAME {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // Fields after the command name, which ends with ')': state is field 3, nice 19.
                let nice = stat
                    .rfind(')')
                    .and_then(|end| stat.get(end + 2..))
                    .and_then(|after| after.split_whitespace().nth(16))
                    .and_then(|n| n.parse::<i32>().ok());
                nices.extend(nice);
            }
        }
        nices
    }

    #[test]
    fn a_checkpointer_without_a_connection_says_so_and_the_writer_takes_over() {
        let checkpointer = Checkpointer::start(|| Err("no file".into())).unwrap();
        // The first request reaches the thread, which finds no connection and stops.
        assert!(checkpointer.request());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while checkpointer.request() {
            assert!(
                std::time::Instant::now() < deadline,
                "still taking requests"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(checkpointer.runs(), 0);
    }

    #[test]
    fn the_checkpointer_copies_the_wal_on_request_once_at_a_time() {
        let dir = std::env::temp_dir().join(format!("retrace-ckpter-{}", std::process::id()));
        let (path, conn) = wal_db(&dir);
        watch_wal(&conn);
        for _ in 0..50 {
            conn.execute("INSERT INTO t VALUES (zeroblob(3000))", [])
                .unwrap();
        }
        let frames = take_wal_frames();
        let opened = path.clone();
        let checkpointer =
            Checkpointer::start(move || Connection::open(&opened).map_err(|e| e.to_string()))
                .unwrap();
        assert!(checkpointer.request());
        // Asked again while queued or running: one checkpoint does for both.
        assert!(checkpointer.request());
        wait_for_a_run(&checkpointer);
        // It copied the whole WAL: the next commit starts it again from its beginning.
        conn.execute("INSERT INTO t VALUES (zeroblob(10))", [])
            .unwrap();
        assert!(take_wal_frames() < 5);
        assert!(checkpointer.runs() <= 2);
        // Interrupted while idle: the next checkpoint is not affected.
        checkpointer.interrupt();
        for _ in 0..50 {
            conn.execute("INSERT INTO t VALUES (zeroblob(3000))", [])
                .unwrap();
        }
        let before = checkpointer.runs();
        assert!(checkpointer.request());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while checkpointer.runs() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no second checkpoint ran"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        conn.execute("INSERT INTO t VALUES (zeroblob(10))", [])
            .unwrap();
        assert!(
            take_wal_frames() < 5,
            "the second checkpoint copied the WAL"
        );
        // Having run, it has lowered its priority (another test's, just started, may not have
        // yet).
        #[cfg(target_os = "linux")]
        assert!(
            checkpointer_nices().contains(&CHECKPOINTER_NICE),
            "{:?}",
            checkpointer_nices()
        );
        checkpointer.close();
        assert!(checkpointer.runs() >= 1);
        assert!(!checkpointer.request(), "gone once closed");
        assert!(frames >= 50);
        drop(conn);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
