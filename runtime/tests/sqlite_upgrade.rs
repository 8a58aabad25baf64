//! Upgrading an SQLite store to schema 5 (the held slot) is refused while a worker of another
//! process still uses it: an older build would go on without knowing of the slot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use retrace_runtime::store::sqlite::SCHEMA_VERSION;
use retrace_runtime::{SqliteStore, StoreError};

fn user_version(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn schema_5_waits_for_older_workers_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    SqliteStore::open(&db).unwrap().close();
    // Back to schema 4, as an older build left it.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "DROP INDEX instances_held; ALTER TABLE instances DROP COLUMN held_seq;
             ALTER TABLE instances DROP COLUMN held_pos; ALTER TABLE instances DROP COLUMN held_owner;
             ALTER TABLE instances DROP COLUMN held_until; ALTER TABLE instances DROP COLUMN held_at;
             PRAGMA user_version = 4;",
        )
        .unwrap();
    // A live worker of that build: its lock file, locked.
    let workers = dir.path().join("store.db.workers");
    std::fs::create_dir_all(&workers).unwrap();
    let lock = std::fs::File::create(workers.join("old-worker.lock")).unwrap();
    lock.try_lock().unwrap();
    match SqliteStore::open(&db) {
        Err(StoreError::Busy { operation, detail }) => {
            assert_eq!(operation, "upgrade store schema");
            assert!(detail.contains("stop every process"), "{detail}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(user_version(&db), 4, "nothing changed");
    // The worker stops (its lock goes with it): the upgrade goes through.
    drop(lock);
    SqliteStore::open(&db).unwrap().close();
    assert_eq!(user_version(&db), SCHEMA_VERSION);
}
