//! Gathered WAL writes: the store's write connection hands a commit's WAL frames to the file
//! system in one `pwrite`, not two per frame.
//!
//! SQLite writes every frame of its write-ahead log with two system calls, its 24-byte header
//! and then its page. A W1 group commit writes ~40 pages, so ~80 `pwrite`s into the page cache,
//! each with its own trip through the file system (~78 µs on this project's machine, against
//! ~25 µs for the same bytes in one call). This module registers a VFS, [`VFS_NAME`], that is
//! SQLite's `unix` VFS (the default on Unix) with one difference: the writes to a WAL file that follow each other
//! are gathered in memory and go to the file together, as one write,
//!
//! - before the WAL file is synced, which with `synchronous=FULL` SQLite does at every commit
//!   *before* it publishes the commit in the WAL index (the shared memory through which other
//!   connections, in this process or another, learn which frames they may read);
//! - before anything else is done with the file (a read, a size query, a truncation, a file
//!   control, closing it);
//! - when a write does not follow the last one, or would take what is gathered past
//!   [`WRITE_MAX`] bytes.
//!
//! So a commit is in the file before its sync, the sync makes it durable as before, and no
//! connection can read a frame that is still in memory: until a commit is published, nobody but
//! the writing connection looks past the last published frame, and its own reads of the WAL
//! write the gathered frames first. A crash loses only what was gathered since the last commit,
//! which SQLite discards at recovery anyway (frames after the last commit frame). When writing
//! the gathered frames fails outside `xWrite`, the call fails with an I/O error, which makes
//! SQLite roll the whole transaction back (see `flushed!`).
//!
//! Only stores with [`Durability::Full`](super::sqlite::Durability::Full) use it: with
//! `synchronous=NORMAL` SQLite publishes a commit without syncing the WAL first, so gathered
//! frames could be published before they were written. Nor are a WAL file's writes gathered
//! without SQLite's "powersafe overwrite" (see `may_gather`), where a commit's last bytes come
//! after its sync.
//!
//! Every other file (the database, its journals) is the `unix` VFS's own file, untouched: the
//! VFS only wraps the WAL. This is the project's only `unsafe` code: SQLite's VFS interface is
//! a C interface of raw pointers. Each function says what it relies on.

use rusqlite::ffi;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::OnceLock;

/// The name the VFS is registered under (it is not made the default).
pub(super) const VFS_NAME: &str = "retrace-gathered-wal";
const VFS_NAME_C: &CStr = c"retrace-gathered-wal";

/// The most bytes handed to the `unix` VFS in one write: its `unix` VFS takes at most
/// 128 KiB - 1 in a call (it masks the length with `0x1ffff`, since SQLite itself never writes
/// more than a page and its frame header: a 256 KiB write wrote nothing and reported a full
/// disk). A W1 group commit, ~170 KiB of frames, goes out in two writes.
const WRITE_MAX: usize = 0x1ffff;

/// The VFS's name, once registered; `None` if it cannot be (no `unix` VFS: not a Unix build):
/// the store then opens its write connection on the default VFS, as every other connection.
pub(super) fn vfs() -> Option<&'static str> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    // SAFETY: `register` runs once; it reads SQLite's `unix` VFS and registers a copy of it.
    let registered = *REGISTERED.get_or_init(|| unsafe { register() });
    registered.then_some(VFS_NAME)
}

/// SQLite's `unix` VFS (the default one on Unix), which does all the work.
struct Parent(*mut ffi::sqlite3_vfs);
// SAFETY: a registered VFS is immutable and lives as long as the process; SQLite calls it from
// any thread.
unsafe impl Send for Parent {}
unsafe impl Sync for Parent {}

static PARENT: OnceLock<Parent> = OnceLock::new();

/// Registers the VFS: a copy of the `unix` VFS (same methods, same `pAppData`, which its
/// other methods may read) whose files have room for a header of ours before the `unix`
/// VFS's own, and whose `xOpen` wraps WAL files.
unsafe fn register() -> bool {
    // SAFETY: `sqlite3_vfs_find` initializes SQLite if needed. The `unix` VFS by name: what
    // this module relies on (its write length limit, its file methods) is that VFS's.
    let parent = unsafe { ffi::sqlite3_vfs_find(c"unix".as_ptr()) };
    if parent.is_null() || PARENT.set(Parent(parent)).is_err() {
        return false;
    }
    // SAFETY: non-null, and a registered VFS is never freed.
    let mut ours: ffi::sqlite3_vfs = unsafe { *parent };
    if ours.xOpen.is_none() {
        return false;
    }
    ours.szOsFile += HEADER as c_int;
    ours.zName = VFS_NAME_C.as_ptr();
    ours.pNext = ptr::null_mut();
    ours.xOpen = Some(open);
    // SQLite keeps the pointer for the life of the process.
    let ours: &'static mut ffi::sqlite3_vfs = Box::leak(Box::new(ours));
    // SAFETY: a fully initialized VFS that lives forever, not made the default.
    unsafe { ffi::sqlite3_vfs_register(ours, 0) == ffi::SQLITE_OK }
}

/// The head of a wrapped WAL file: SQLite's file (its methods are ours) and what is gathered.
/// The `unix` VFS's file follows, [`HEADER`] bytes from the start.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    gathered: *mut Gathered,
}

/// Whether a WAL file opened as `name` may gather its writes: only when the file system
/// overwrites safely on power loss (SQLite's "powersafe overwrite", its default). Without it,
/// SQLite pads a commit to a sector boundary and syncs in the middle of the last padding frame,
/// writing the rest after the sync and before it publishes the commit: gathered, that rest
/// would be read before it is in the file. It is off when the database was opened with the URI
/// parameter `psow=0` or SQLite was built with `SQLITE_POWERSAFE_OVERWRITE=0` (the WAL file's
/// own characteristics show the latter).
///
/// # Safety
/// `real` is the `unix` VFS's WAL file, just opened; `name` the name it was opened with.
unsafe fn may_gather(real: *mut ffi::sqlite3_file, name: *const c_char) -> bool {
    // SAFETY: see the function's contract; SQLite's URI functions accept the name a VFS is
    // given for a WAL file (or null).
    unsafe {
        let characteristics = match (*real)
            .pMethods
            .as_ref()
            .and_then(|m| m.xDeviceCharacteristics)
        {
            Some(f) => f(real),
            None => 0,
        };
        characteristics & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE != 0
            && ffi::sqlite3_uri_boolean(name, c"psow".as_ptr(), 1) != 0
    }
}

/// Where the `unix` VFS's file starts in ours (8-byte aligned, as SQLite aligns files).
const HEADER: usize = (std::mem::size_of::<WalFile>() + 7) & !7;

/// WAL writes not yet handed to the file: `bytes`, to go at offset `at`. With `pass` set (see
/// [`may_gather`]) every write is handed on as it comes.
#[derive(Default)]
struct Gathered {
    bytes: Vec<u8>,
    at: i64,
    pass: bool,
}

/// `xOpen`: the `unix` VFS opens every file; a WAL file is opened in the room after our
/// header and gets our methods, any other file is opened in the whole room and keeps its own.
unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(Parent(parent)) = PARENT.get() else {
        return ffi::SQLITE_ERROR;
    };
    let parent = *parent;
    // SAFETY: `parent` is the registered `unix` VFS; `register` checked its `xOpen`.
    let Some(parent_open) = (unsafe { (*parent).xOpen }) else {
        return ffi::SQLITE_ERROR;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // SAFETY: `file` has room for `szOsFile` bytes, more than the `unix` VFS's file.
        return unsafe { parent_open(parent, name, file, flags, out_flags) };
    }
    // SAFETY: `file` has room for our header and the `unix` VFS's file after it.
    unsafe {
        (*file).pMethods = ptr::null();
        let real = real_file(file);
        (*real).pMethods = ptr::null();
        let rc = parent_open(parent, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            // SQLite closes a failed file only through the methods it was left with (none
            // here): the `unix` VFS's, if it set them, must be closed now.
            if let Some(close) = (*real).pMethods.as_ref().and_then(|m| m.xClose) {
                close(real);
            }
            return rc;
        }
        let gathered = Gathered {
            pass: !may_gather(real, name),
            ..Gathered::default()
        };
        (*file.cast::<WalFile>()).gathered = Box::into_raw(Box::new(gathered));
        (*file).pMethods = &METHODS;
    }
    ffi::SQLITE_OK
}

/// The `unix` VFS's file inside one of our WAL files.
///
/// # Safety
/// `file` is a file of this VFS with room for `HEADER` bytes before the `unix` VFS's file.
unsafe fn real_file(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: within the room SQLite allocated (`szOsFile`).
    unsafe { file.cast::<u8>().add(HEADER).cast() }
}

/// The `unix` VFS's methods of an open WAL file of ours.
///
/// # Safety
/// `file` is an open WAL file of this VFS (its `unix` file was opened successfully).
unsafe fn real_methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: an open file's methods are set and live as long as the `unix` VFS.
    unsafe { &*(*real_file(file)).pMethods }
}

/// What is gathered for an open WAL file of ours.
///
/// # Safety
/// `file` is an open WAL file of this VFS, used by one thread at a time (SQLite's connection
/// mutex, or the store's own lock on the write connection, serializes its calls).
unsafe fn gathered<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Gathered {
    // SAFETY: set by `open`, freed only by `close`.
    unsafe { &mut *(*file.cast::<WalFile>()).gathered }
}

/// Hands what is gathered to the file, as one write.
///
/// # Safety
/// As for [`gathered`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: see the function's contract.
    unsafe { flush_gathered(gathered(file), file) }
}

/// [`flush`], for a caller that already holds what is gathered for `file`.
///
/// # Safety
/// `g` is what is gathered for `file`, an open WAL file of this VFS.
unsafe fn flush_gathered(g: &mut Gathered, file: *mut ffi::sqlite3_file) -> c_int {
    if g.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    // SAFETY: see the function's contract.
    let Some(write) = (unsafe { real_methods(file) }).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let Ok(len) = c_int::try_from(g.bytes.len()) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    #[cfg(test)]
    {
        tests::count_write();
        if tests::fail_this_write() {
            g.bytes.clear();
            return ffi::SQLITE_FULL;
        }
    }
    // SAFETY: the bytes are valid for `len` bytes; the `unix` VFS writes them at `at`.
    let rc = unsafe { write(real_file(file), g.bytes.as_ptr().cast(), len, g.at) };
    // Written or not, they are no longer ours to write: on an error SQLite rolls the
    // transaction back, and its frames are never read.
    g.bytes.clear();
    rc
}

/// Our methods for WAL files: every one writes what is gathered first, then calls the `unix`
/// VFS's, except `xWrite` (gathers) and the locks (a WAL file takes none; passed on as they
/// are).
static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// Calls the `unix` VFS's method `$m` on the file inside `$file` with `$args`, or returns
/// `$missing` when it has none.
macro_rules! pass_on {
    ($file:expr, $m:ident, $missing:expr $(, $arg:expr)*) => {{
        // SAFETY: every caller is one of our methods, called by SQLite on an open WAL file.
        match unsafe { real_methods($file) }.$m {
            Some(f) => unsafe { f(real_file($file) $(, $arg)*) },
            None => $missing,
        }
    }};
}

/// First writes what is gathered; if that fails, the calling method fails with
/// `SQLITE_IOERR_WRITE`, whatever the write's own error. The gathered frames are gone, and an
/// I/O error is what makes SQLite roll the whole transaction back: an `SQLITE_FULL` returned
/// by a read (say) rolls back only the statement, and the transaction would go on to commit
/// frames that were never written (the review of this module reproduced it).
macro_rules! flushed {
    ($file:expr) => {{
        // SAFETY: as in `pass_on!`.
        if unsafe { flush($file) } != ffi::SQLITE_OK {
            return ffi::SQLITE_IOERR_WRITE;
        }
    }};
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // SAFETY: SQLite calls this on an open WAL file of ours, one call at a time.
    let g = unsafe { gathered(file) };
    if g.pass {
        return pass_on!(file, xWrite, ffi::SQLITE_IOERR_WRITE, data, amount, offset);
    }
    let follows = g.at + g.bytes.len() as i64 == offset;
    if !g.bytes.is_empty() && (!follows || g.bytes.len() + len > WRITE_MAX) {
        // SAFETY: `g` is `file`'s.
        let rc = unsafe { flush_gathered(g, file) };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if len > WRITE_MAX {
        // Larger than any write SQLite makes: handed on as it came.
        return pass_on!(file, xWrite, ffi::SQLITE_IOERR_WRITE, data, amount, offset);
    }
    if g.bytes.is_empty() {
        g.at = offset;
    }
    // SAFETY: SQLite passes `amount` readable bytes.
    g.bytes
        .extend_from_slice(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) });
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes an open WAL file of ours once; nothing uses it after.
    let flushed = unsafe { flush(file) };
    let closed = pass_on!(file, xClose, ffi::SQLITE_OK);
    unsafe {
        drop(Box::from_raw((*file.cast::<WalFile>()).gathered));
        (*file.cast::<WalFile>()).gathered = ptr::null_mut();
        (*file).pMethods = ptr::null();
    }
    if flushed != ffi::SQLITE_OK {
        ffi::SQLITE_IOERR_WRITE
    } else {
        closed
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    flushed!(file);
    pass_on!(file, xRead, ffi::SQLITE_IOERR_READ, data, amount, offset)
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    flushed!(file);
    pass_on!(file, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size)
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    flushed!(file);
    pass_on!(file, xSync, ffi::SQLITE_IOERR_FSYNC, flags)
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    flushed!(file);
    pass_on!(file, xFileSize, ffi::SQLITE_IOERR_FSTAT, size)
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    pass_on!(file, xLock, ffi::SQLITE_OK, level)
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    pass_on!(file, xUnlock, ffi::SQLITE_OK, level)
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    pass_on!(file, xCheckReservedLock, ffi::SQLITE_OK, out)
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    flushed!(file);
    pass_on!(file, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    pass_on!(file, xSectorSize, 4096)
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    pass_on!(file, xDeviceCharacteristics, 0)
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    page_size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    pass_on!(
        file,
        xShmMap,
        ffi::SQLITE_IOERR_SHMMAP,
        page,
        page_size,
        extend,
        out
    )
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    pass_on!(file, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags)
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    pass_on!(file, xShmBarrier, ())
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    pass_on!(file, xShmUnmap, ffi::SQLITE_OK, delete)
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    flushed!(file);
    match unsafe { real_methods(file) }.xFetch {
        Some(f) => unsafe { f(real_file(file), offset, amount, out) },
        None => {
            // No memory mapping: SQLite reads instead.
            unsafe { *out = ptr::null_mut() };
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    page: *mut c_void,
) -> c_int {
    pass_on!(file, xUnfetch, ffi::SQLITE_OK, offset, page)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};
    use std::cell::Cell;

    thread_local! {
        /// Writes this thread handed to the `unix` VFS through gathered WAL files.
        static WRITES: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn count_write() {
        WRITES.with(|w| w.set(w.get() + 1));
    }

    thread_local! {
        /// Makes the next gathered write on this thread fail as if the disk were full.
        static FAIL_NEXT: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn fail_this_write() -> bool {
        FAIL_NEXT.with(|f| f.replace(false))
    }

    /// Gathered writes this thread has handed to the `unix` VFS so far.
    pub(in crate::store) fn writes() -> u64 {
        WRITES.with(|w| w.get())
    }

    /// A fresh directory of its own for `name` (left for the system's temporary files' cleanup).
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "retrace-{name}-{}-{}",
            std::process::id(),
            crate::clock::now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A WAL database written through the VFS (`synchronous=FULL`), and a plain connection.
    fn pair(dir: &std::path::Path) -> (Connection, Connection) {
        pair_opened_as(dir, &dir.join("db.sqlite").display().to_string())
    }

    /// [`pair`], the VFS's connection opened as `name` (the file's path, or a URI naming it).
    fn pair_opened_as(dir: &std::path::Path, name: &str) -> (Connection, Connection) {
        let path = dir.join("db.sqlite");
        let ours = Connection::open_with_flags_and_vfs(name, OpenFlags::default(), vfs().unwrap())
            .unwrap();
        ours.pragma_update(None, "journal_mode", "WAL").unwrap();
        ours.pragma_update(None, "synchronous", "FULL").unwrap();
        ours.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY, body BLOB NOT NULL)")
            .unwrap();
        let plain = Connection::open(&path).unwrap();
        (ours, plain)
    }

    /// Inserts rows `numbers` into `t`, each with the body `body` (an SQL expression).
    fn insert(conn: &Connection, numbers: impl IntoIterator<Item = i64>, body: &str) {
        let sql = format!("INSERT INTO t VALUES (?1, {body})");
        for n in numbers {
            conn.execute(&sql, [n]).unwrap();
        }
    }

    fn assert_intact(conn: &Connection) {
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }

    fn rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn every_commit_is_seen_at_once_by_another_connection() {
        let dir = scratch("wal-writes-seen");
        let (ours, plain) = pair(&dir);
        for n in 0..50i64 {
            ours.execute("INSERT INTO t VALUES (?1, zeroblob(3000))", [n])
                .unwrap();
            assert_eq!(rows(&plain), n + 1);
        }
        assert_intact(&plain);
    }

    #[test]
    fn a_commit_of_many_pages_is_one_write() {
        let dir = scratch("wal-writes-one");
        let (ours, plain) = pair(&dir);
        let before = writes();
        ours.execute_batch("BEGIN").unwrap();
        insert(&ours, 1..=40, "zeroblob(2000)");
        ours.execute_batch("COMMIT").unwrap();
        assert_eq!(rows(&plain), 40);
        // ~22 pages and their frame headers (~90 KiB): one write, before the commit's sync.
        assert_eq!(writes() - before, 1);
    }

    #[test]
    fn a_transaction_larger_than_the_cache_reads_back_what_it_spilled() {
        let dir = scratch("wal-writes-spill");
        let (ours, plain) = pair(&dir);
        ours.pragma_update(None, "cache_size", 10).unwrap();
        ours.execute_batch("BEGIN").unwrap();
        insert(&ours, 0..400i64, "randomblob(3000)");
        // The pages spilled to the WAL are read back (through the VFS) by this count.
        let sum: i64 = ours
            .query_row("SELECT sum(length(body)) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sum, 400 * 3000);
        assert_eq!(rows(&plain), 0, "nothing is seen before the commit");
        ours.execute_batch("ROLLBACK").unwrap();
        assert_eq!(rows(&ours), 0);
        assert_eq!(rows(&plain), 0);
        ours.execute_batch("BEGIN").unwrap();
        insert(&ours, 0..400i64, "randomblob(3000)");
        ours.execute_batch("COMMIT").unwrap();
        assert_eq!(rows(&plain), 400);
    }

    #[test]
    fn the_wal_restarts_and_the_file_reopens_whole() {
        let dir = scratch("wal-writes-restart");
        let path = dir.join("db.sqlite");
        {
            let (ours, plain) = pair(&dir);
            for round in 0..3i64 {
                for n in 0..100i64 {
                    ours.execute(
                        "INSERT INTO t VALUES (?1, randomblob(500))",
                        [round * 100 + n],
                    )
                    .unwrap();
                }
                // Copies the WAL into the database and starts it again from its beginning.
                ours.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                    .unwrap();
                assert_eq!(rows(&plain), (round + 1) * 100);
            }
            ours.execute("INSERT INTO t VALUES (1000, x'00')", [])
                .unwrap();
        }
        let again = Connection::open(&path).unwrap();
        assert_eq!(rows(&again), 301);
        assert_intact(&again);
    }

    #[test]
    fn writes_that_go_back_land_where_they_belong() {
        let dir = scratch("wal-writes-rewrite");
        let path = dir.join("db.sqlite");
        {
            let (ours, plain) = pair(&dir);
            ours.pragma_update(None, "cache_size", 10).unwrap();
            // Spilled frames, then a rollback: the next transaction writes from the same
            // place again.
            ours.execute_batch("BEGIN").unwrap();
            insert(&ours, 0..300i64, "randomblob(2000)");
            ours.execute_batch("ROLLBACK").unwrap();
            // Spilled pages changed again in the same transaction: SQLite rewrites their
            // frames in place, far behind the end of the WAL.
            ours.execute_batch("BEGIN").unwrap();
            insert(&ours, 0..300i64, "zeroblob(2000)");
            for n in (0..300i64).step_by(7) {
                ours.execute("UPDATE t SET body = zeroblob(1000) WHERE n = ?1", [n])
                    .unwrap();
            }
            ours.execute_batch("COMMIT").unwrap();
            let expected = 300 * 2000 - 43 * 1000;
            let sum: i64 = plain
                .query_row("SELECT sum(length(body)) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(sum, expected);
            assert_intact(&plain);
        }
        let again = Connection::open(&path).unwrap();
        assert_eq!(rows(&again), 300);
    }

    #[test]
    fn a_write_that_fails_late_rolls_the_whole_transaction_back() {
        let dir = scratch("wal-writes-late-failure");
        let (ours, plain) = pair(&dir);
        ours.execute("INSERT INTO t VALUES (-1, x'00')", [])
            .unwrap();
        ours.pragma_update(None, "cache_size", 10).unwrap();
        ours.execute_batch("BEGIN IMMEDIATE").unwrap();
        insert(&ours, 0..400i64, "randomblob(3000)");
        // As the store's batches do: an operation in a savepoint. Its statement reads pages
        // spilled to the WAL, so what is gathered is written first, and that write fails.
        ours.execute_batch("SAVEPOINT op").unwrap();
        FAIL_NEXT.with(|f| f.set(true));
        let failed = ours.execute("UPDATE t SET body = x'01' WHERE n BETWEEN 0 AND 5", []);
        assert!(failed.is_err());
        assert!(
            ours.is_autocommit(),
            "the transaction must be gone, not just the statement"
        );
        assert_eq!(rows(&plain), 1);
        assert_eq!(rows(&ours), 1);
        assert_intact(&plain);
        // And the connection goes on.
        ours.execute("INSERT INTO t VALUES (1, x'00')", []).unwrap();
        assert_eq!(rows(&plain), 2);
    }

    #[test]
    fn without_powersafe_overwrite_writes_are_not_gathered() {
        let dir = scratch("wal-writes-psow");
        let uri = format!("file:{}?psow=0", dir.join("db.sqlite").display());
        let (ours, plain) = pair_opened_as(&dir, &uri);
        for n in 0..50i64 {
            insert(&ours, [n], "randomblob(3000)");
            let (count, bytes): (i64, i64) = plain
                .query_row("SELECT count(*), sum(length(body)) FROM t", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap();
            assert_eq!((count, bytes), (n + 1, (n + 1) * 3000));
        }
    }
}
