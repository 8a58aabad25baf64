//! Upgrading an SQLite store past a schema an older build cannot go on with (5: the held slot;
//! 7: history rows of several events; 9: instance rows behind their held chains; 10: history
//! rows naming their instance by an integer key) is refused
//! while a worker of another process still uses it: that older build would go on with a store
//! it misreads. An upgrade that older builds can go on with (11: an index dropped) is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/schema9.rs"]
mod schema9;

use retrace_runtime::store::sqlite::SCHEMA_VERSION;
use retrace_runtime::{SqliteStore, StoreError};

fn user_version(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// A live worker of an older build beside `dir/store.db`: its lock file, locked (until the
/// returned file is dropped).
fn older_worker(dir: &std::path::Path) -> std::fs::File {
    let workers = dir.join("store.db.workers");
    std::fs::create_dir_all(&workers).unwrap();
    let lock = std::fs::File::create(workers.join("old-worker.lock")).unwrap();
    lock.try_lock().unwrap();
    lock
}

/// Takes a fresh store back to `version` with `downgrade` (from version 9), then checks that the upgrade waits
/// for a live worker of that older build to stop, and goes through once it has.
fn upgrade_waits_for_older_workers(version: i64, downgrade: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    SqliteStore::open(&db).unwrap().close();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(&format!(
            "{} {downgrade} PRAGMA user_version = {version};",
            schema9::TO_SCHEMA_9
        ))
        .unwrap();
    let lock = older_worker(dir.path());
    match SqliteStore::open(&db) {
        Err(StoreError::Busy { operation, detail }) => {
            assert_eq!(operation, "upgrade store schema");
            assert!(detail.contains("stop every process"), "{detail}");
        }
        other => panic!("schema {version}: expected a refusal, got {other:?}"),
    }
    assert_eq!(user_version(&db), version, "nothing changed");
    // The worker stops (its lock goes with it): the upgrade goes through.
    drop(lock);
    SqliteStore::open(&db).unwrap().close();
    assert_eq!(user_version(&db), SCHEMA_VERSION);
}

#[test]
fn schema_5_waits_for_older_workers_to_stop() {
    upgrade_waits_for_older_workers(
        4,
        "DROP INDEX instances_held; ALTER TABLE instances DROP COLUMN held_seq;
         ALTER TABLE instances DROP COLUMN held_pos; ALTER TABLE instances DROP COLUMN held_owner;
         ALTER TABLE instances DROP COLUMN held_until; ALTER TABLE instances DROP COLUMN held_at;
         ALTER TABLE events DROP COLUMN len;",
    );
}

#[test]
fn schema_7_waits_for_older_workers_to_stop() {
    upgrade_waits_for_older_workers(6, "ALTER TABLE events DROP COLUMN len;");
}

#[test]
fn schema_9_waits_for_older_workers_to_stop() {
    upgrade_waits_for_older_workers(8, "");
}

#[test]
fn schema_10_waits_for_older_workers_to_stop() {
    upgrade_waits_for_older_workers(9, "");
}

/// Version 11 only drops the `(status, created_at)` index, which no build's statements need: a
/// live worker of version 10 does not hold the upgrade back, and the rows are as they were.
#[test]
fn schema_11_goes_ahead_beside_older_workers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = SqliteStore::open(&db).unwrap();
    rt.block_on(async {
        use retrace_runtime::Store;
        store
            .create_instance(retrace_runtime::store::NewInstance {
                id: "kept".into(),
                coordinator: "c".into(),
                input: serde_json::json!(1),
                parent: None,
            })
            .await
            .unwrap();
    });
    store.close();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE INDEX instances_status ON instances(status, created_at);
             PRAGMA user_version = 10;",
        )
        .unwrap();
    let lock = older_worker(dir.path());
    let store = SqliteStore::open(&db).unwrap();
    assert_eq!(user_version(&db), SCHEMA_VERSION);
    let indexes: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'instances_status'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 0);
    let info = rt.block_on(async {
        use retrace_runtime::Store;
        store.describe("kept").await.unwrap()
    });
    assert_eq!(info.map(|i| i.id), Some("kept".to_string()));
    store.close();
    drop(lock);
}
