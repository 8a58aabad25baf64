//! The SQLite store extends its WAL file ahead when it opens (so that early commits overwrite
//! allocated blocks). The zeros past the last frame must never be taken for frames: commits
//! made before and after survive reopening, by another handle and after an unclean end. And a
//! write waits for another connection's write lock without holding up its tokio worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use retrace_runtime::store::{CreateOutcome, NewInstance};
use retrace_runtime::{ListFilter, SqliteStore, Store};
use serde_json::json;
use std::path::Path;

fn wal_len(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

fn new(id: &str) -> NewInstance {
    NewInstance {
        id: id.to_string(),
        coordinator: "c".into(),
        input: json!(id),
        parent: None,
    }
}

async fn count(store: &SqliteStore) -> usize {
    store
        .list_instances(&ListFilter::default())
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_extended_ahead_holds_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let first = SqliteStore::open(&db).unwrap();
    // Room for at least a thousand 4 KiB frames, before anything was written.
    assert!(
        wal_len(&db) > 1_000 * 4_096,
        "WAL is {} bytes",
        wal_len(&db)
    );
    for i in 0..50 {
        let created = first.create_instance(new(&format!("a{i}"))).await.unwrap();
        assert_eq!(created, CreateOutcome::Created);
    }
    // A second handle (another process, say) opening the same store, with a live WAL: it must
    // not extend over frames already there, and sees every commit.
    let second = SqliteStore::open(&db).unwrap();
    assert_eq!(count(&second).await, 50);
    for i in 0..50 {
        second.create_instance(new(&format!("b{i}"))).await.unwrap();
    }
    assert_eq!(count(&first).await, 100);
    // An unclean end: the handles are leaked, nothing is checkpointed or closed; a fresh handle
    // recovers from the WAL (frames, then zeros) as after a crash.
    std::mem::forget(first);
    std::mem::forget(second);
    let third = SqliteStore::open(&db).unwrap();
    assert_eq!(count(&third).await, 100);
    third.create_instance(new("c0")).await.unwrap();
    third.close();
    drop(third);
    let check = rusqlite::Connection::open(&db).unwrap();
    let ok: String = check
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let n: i64 = check
        .query_row("SELECT COUNT(*) FROM instances", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_opening_a_store_writes_no_room_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    store.create_instance(new("a")).await.unwrap();
    store.close();
    drop(store);
    // The last connection closed: SQLite checkpointed and removed the WAL.
    assert_eq!(wal_len(&db), 0);
    let tool = SqliteStore::open_existing(&db).unwrap();
    assert_eq!(count(&tool).await, 1);
    assert!(wal_len(&db) < 1 << 20, "WAL is {} bytes", wal_len(&db));
}

/// A write from inside `spawn_blocking` (a caller blocking on the runtime from a blocking
/// thread) works: the store commits it directly or through its writer, whichever applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_a_blocking_thread_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let store = std::sync::Arc::new(SqliteStore::open(&db).unwrap());
    let s = std::sync::Arc::clone(&store);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        for i in 0..5 {
            handle
                .block_on(s.create_instance(new(&format!("b{i}"))))
                .unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(count(&store).await, 5);
}

/// While another connection (another process, the CLI) holds the write lock, a write neither
/// fails nor holds up its tokio worker: a caller that would commit directly leaves the waiting
/// to the writer thread, and the task it just spawned (in the worker's own slot, which other
/// workers do not take) runs meanwhile. The write commits once the lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_for_another_connections_lock_without_blocking_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let store = std::sync::Arc::new(SqliteStore::open(&db).unwrap());
    store.create_instance(new("before")).await.unwrap();

    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();

    let (ran, ran_rx) = tokio::sync::oneshot::channel::<()>();
    let s = std::sync::Arc::clone(&store);
    let write = tokio::spawn(async move {
        tokio::spawn(async move {
            let _ = ran.send(());
        });
        s.create_instance(new("during")).await
    });
    // The spawned task runs while the lock is still held.
    tokio::time::timeout(std::time::Duration::from_secs(2), ran_rx)
        .await
        .expect("the task spawned next to the write ran while the write waited")
        .unwrap();
    assert!(!write.is_finished(), "the write waits for the lock");

    other.execute_batch("COMMIT").unwrap();
    let created = write.await.unwrap().unwrap();
    assert_eq!(created, CreateOutcome::Created);
    assert_eq!(count(&store).await, 2);
}
