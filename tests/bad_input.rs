//! Bad input gets a clear, typed error naming what was wrong and where; the affected instance is
//! marked with the reason, every other instance goes on, and no committed event is lost
//! (DESIGN.md guarantee 8).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use retrace::prelude::*;
use retrace::{ClientError, Event, InstanceStatus, SqliteOptions, StoreError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "retrace-bad-input-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn db(&self) -> PathBuf {
        self.dir.join("store.db")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const ECHO: Activity<u64, u64> = Activity::new("echo");
const WAITER: Coordinator<u64, u64> = Coordinator::new("waiter");

async fn waiter(ctx: Context, n: u64) -> Result<u64, Error> {
    let a = ctx.call(&ECHO, &n).await?;
    let b = ctx.signal::<u64>("go").await?;
    Ok(a + b)
}

fn worker(store: SharedStore) -> Worker {
    Worker::builder(store)
        .coordinator(&WAITER, waiter)
        .activity(&ECHO, |_c: ActivityContext, n: u64| async move { Ok(n) })
        .cache(false)
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_event_stops_only_its_instance_and_loses_nothing() {
    let scratch = Scratch::new("corrupt");
    let store: SharedStore = Arc::new(SqliteStore::open(scratch.db()).unwrap());
    let client = Client::new(store.clone());
    let w = worker(store.clone());
    for id in ["bad", "good"] {
        client.start(&WAITER, id, &1).await.unwrap();
    }
    for id in ["bad", "good"] {
        eventually("the wait for the signal", async || {
            let h = client.history(id).await.ok()?;
            h.iter()
                .any(|e| matches!(e.event, Event::SignalAwaited { .. }))
                .then_some(())
        })
        .await;
    }
    w.shutdown().await.unwrap();
    // Damage one committed event behind the store's back: the one at position 3, in the
    // history row that holds it (a row holds one activation's events, one body per line).
    let raw = rusqlite::Connection::open(scratch.db()).unwrap();
    let (first, body): (i64, String) = raw
        .query_row(
            "SELECT pos, body FROM events WHERE instance_key = (SELECT key FROM instances WHERE id = 'bad') AND pos <= 3
             ORDER BY pos DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mut parts: Vec<&str> = body.split('\n').collect();
    parts[(3 - first) as usize] = r#"{"type":"activity_completed","seq":"oops"}"#;
    raw.execute(
        "UPDATE events SET body = ?1 WHERE instance_key = (SELECT key FROM instances WHERE id = 'bad') AND pos = ?2",
        rusqlite::params![parts.join("\n"), first],
    )
    .unwrap();
    let bad_events = |raw: &rusqlite::Connection| -> Vec<(i64, String)> {
        let mut stmt = raw
            .prepare("SELECT pos, body FROM events WHERE instance_key = (SELECT key FROM instances WHERE id = 'bad') ORDER BY pos")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let before = bad_events(&raw);

    let w = worker(store.clone());
    client.signal("bad", "go", &1).await.unwrap();
    client.signal("good", "go", &1).await.unwrap();
    assert_eq!(client.handle(&WAITER, "good").result().await.unwrap(), 2);
    let info = eventually("the damaged instance to stop", async || {
        let info = client.describe("bad").await.ok()?;
        (info.status == InstanceStatus::Stopped).then_some(info)
    })
    .await;
    let reason = info.reason.unwrap();
    assert!(
        reason.contains("bad") && reason.contains("position 3"),
        "{reason}"
    );
    match client.history("bad").await.unwrap_err() {
        ClientError::Store(StoreError::Corrupt {
            instance_id, what, ..
        }) => {
            assert_eq!(instance_id, "bad");
            assert!(what.contains("position 3"), "{what}");
        }
        other => panic!("expected a corrupt-history error, got {other}"),
    }
    w.shutdown().await.unwrap();
    assert_eq!(
        bad_events(&raw),
        before,
        "no event of the damaged instance was added or changed"
    );
}

const GHOST: Coordinator<u64, u64> = Coordinator::new("ghost");
const NOBODY: Activity<u64, u64> = Activity::new("nobody");
const CALLS_NOBODY: Coordinator<u64, u64> = Coordinator::new("calls_nobody");

async fn calls_nobody(ctx: Context, n: u64) -> Result<u64, Error> {
    ctx.call(&NOBODY, &n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_make_instances_wait_marked_until_a_worker_knows_them() {
    let scratch = Scratch::new("unknown");
    let store: SharedStore = Arc::new(SqliteStore::open(scratch.db()).unwrap());
    let client = Client::new(store.clone());
    let w = Worker::builder(store.clone())
        .coordinator(&WAITER, waiter)
        .coordinator(&CALLS_NOBODY, calls_nobody)
        .activity(&ECHO, |_c: ActivityContext, n: u64| async move { Ok(n) })
        .start();
    client.start(&GHOST, "g-1", &5).await.unwrap();
    client.start(&CALLS_NOBODY, "n-1", &6).await.unwrap();
    client.start(&WAITER, "w-1", &1).await.unwrap();
    client.signal("w-1", "go", &1).await.unwrap();
    assert_eq!(
        client.handle(&WAITER, "w-1").result().await.unwrap(),
        2,
        "others go on"
    );
    for (id, needle) in [("g-1", "coordinator ghost"), ("n-1", "activity nobody")] {
        let info = eventually("the waiting instance to be marked", async || {
            let info = client.describe(id).await.ok()?;
            info.reason
                .as_deref()
                .is_some_and(|r| r.contains(needle))
                .then_some(info)
        })
        .await;
        assert_eq!(
            info.status,
            InstanceStatus::Running,
            "{id} waits; it is not failed"
        );
    }
    // A worker that knows them appears.
    let helper = Worker::builder(store.clone())
        .coordinator(&GHOST, |_ctx: Context, n: u64| async move { Ok(n * 2) })
        .activity(
            &NOBODY,
            |_c: ActivityContext, n: u64| async move { Ok(n * 3) },
        )
        .start();
    assert_eq!(client.handle(&GHOST, "g-1").result().await.unwrap(), 10);
    assert_eq!(
        client.handle(&CALLS_NOBODY, "n-1").result().await.unwrap(),
        18
    );
    assert_eq!(
        client.describe("g-1").await.unwrap().reason,
        None,
        "the mark is cleared"
    );
    helper.shutdown().await.unwrap();
    w.shutdown().await.unwrap();
}

const WANTS_NUMBER: Coordinator<String, u64> = Coordinator::new("waiter");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_that_does_not_decode_fails_the_instance_with_a_payload_error() {
    let scratch = Scratch::new("input");
    let store: SharedStore = Arc::new(SqliteStore::open(scratch.db()).unwrap());
    let client = Client::new(store.clone());
    let w = worker(store.clone());
    // Same coordinator name, wrong input type: the worker's coordinator expects a number.
    let err = client
        .start(&WANTS_NUMBER, "typo", &"forty-two".to_string())
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err();
    match err {
        ClientError::Failed {
            error: Error::Payload { what, .. },
            instance_id,
        } => {
            assert_eq!(instance_id, "typo");
            assert!(what.contains("input of coordinator waiter"), "{what}");
        }
        other => panic!("expected a payload error, got {other}"),
    }
    client.start(&WAITER, "fine", &1).await.unwrap();
    client.signal("fine", "go", &2).await.unwrap();
    assert_eq!(client.handle(&WAITER, "fine").result().await.unwrap(), 3);
    w.shutdown().await.unwrap();
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn files_that_are_not_retrace_stores_or_too_new_are_refused_untouched() {
    let scratch = Scratch::new("files");
    let garbage = scratch.dir.join("garbage.db");
    std::fs::write(
        &garbage,
        b"this is not a database, just some text".repeat(200),
    )
    .unwrap();
    let err = SqliteStore::open(&garbage).unwrap_err();
    assert!(matches!(err, StoreError::NotARetraceStore { .. }), "{err}");
    assert!(err.to_string().contains("garbage.db"), "{err}");

    let other = scratch.dir.join("other.db");
    {
        let c = rusqlite::Connection::open(&other).unwrap();
        c.execute_batch(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY); INSERT INTO customers VALUES (1);",
        )
        .unwrap();
    }
    let before = file_bytes(&other);
    let err = SqliteStore::open(&other).unwrap_err();
    assert!(matches!(err, StoreError::NotARetraceStore { .. }), "{err}");
    assert_eq!(
        file_bytes(&other),
        before,
        "the other program's file is untouched"
    );

    let newer = scratch.db();
    drop(SqliteStore::open(&newer).unwrap());
    {
        let c = rusqlite::Connection::open(&newer).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = SqliteStore::open(&newer).unwrap_err();
    match &err {
        StoreError::NewerSchema {
            found, supported, ..
        } => {
            assert_eq!(*found, 99);
            assert!(*supported < 99);
        }
        other => panic!("expected NewerSchema, got {other}"),
    }
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_beyond_the_busy_timeout_is_a_busy_error() {
    let scratch = Scratch::new("busy");
    let mut options = SqliteOptions::default();
    options.busy_timeout = Duration::from_millis(200);
    let store: SharedStore = Arc::new(SqliteStore::open_with(scratch.db(), options).unwrap());
    let client = Client::new(store.clone());
    client.start(&WAITER, "before", &1).await.unwrap();
    let other = rusqlite::Connection::open(scratch.db()).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = client.start(&WAITER, "during", &1).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Store(StoreError::Busy { .. })),
        "{err}"
    );
    other.execute_batch("COMMIT").unwrap();
    client.start(&WAITER, "after", &1).await.unwrap();
    assert!(matches!(
        client.describe("during").await.unwrap_err(),
        ClientError::NotFound { .. }
    ));
    let w = worker(store.clone());
    for id in ["before", "after"] {
        client.signal(id, "go", &1).await.unwrap();
        assert_eq!(client.handle(&WAITER, id).result().await.unwrap(), 2);
    }
    w.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_the_write_and_keeps_everything_committed() {
    let scratch = Scratch::new("full");
    drop(SqliteStore::open(scratch.db()).unwrap());
    let pages: u64 = {
        let c = rusqlite::Connection::open(scratch.db()).unwrap();
        c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap()
    };
    let mut options = SqliteOptions::default();
    options.max_page_count = Some(pages + 40);
    let store: SharedStore = Arc::new(SqliteStore::open_with(scratch.db(), options).unwrap());
    let client = Client::new(store.clone());
    let w = worker(store.clone());
    client.start(&WAITER, "small", &1).await.unwrap();
    // An input far larger than the 40 free pages.
    let huge: Coordinator<String, u64> = Coordinator::new("waiter");
    let err = client
        .start(&huge, "huge", &"x".repeat(1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Store(StoreError::Full { .. })),
        "{err}"
    );
    client.signal("small", "go", &1).await.unwrap();
    assert_eq!(client.handle(&WAITER, "small").result().await.unwrap(), 2);
    let history = client.history("small").await.unwrap();
    assert!(matches!(
        history.last().map(|e| &e.event),
        Some(Event::InstanceCompleted { .. })
    ));
    assert!(matches!(
        client.describe("huge").await.unwrap_err(),
        ClientError::NotFound { .. }
    ));
    w.shutdown().await.unwrap();
}

const FIRE_AND_RETURN: Coordinator<u64, u64> = Coordinator::new("fire_and_return");

/// Schedules a call nobody here runs, does not await it, and returns.
async fn fire_and_return(ctx: Context, n: u64) -> Result<u64, Error> {
    let _not_awaited = ctx.call(&NOBODY, &n);
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_ended_is_not_marked_as_waiting_for_an_unknown_activity() {
    let scratch = Scratch::new("ended-unknown");
    let store: SharedStore = Arc::new(SqliteStore::open(scratch.db()).unwrap());
    let client = Client::new(store.clone());
    let w = Worker::builder(store.clone())
        .coordinator(&FIRE_AND_RETURN, fire_and_return)
        .start();
    let handle = client.start(&FIRE_AND_RETURN, "f-1", &4).await.unwrap();
    assert_eq!(handle.result().await.unwrap(), 4);
    // What the worker does after the commit runs after the result is visible: give it time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.shutdown().await.unwrap();
    // Read through another handle: this one answers for instances it saw end from memory.
    let other: SharedStore = Arc::new(SqliteStore::open(scratch.db()).unwrap());
    let info = other.describe("f-1").await.unwrap().unwrap();
    assert_eq!(info.status, InstanceStatus::Completed);
    assert_eq!(info.reason, None, "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_that_cannot_name_an_instance_is_refused_and_nothing_is_started() {
    let scratch = Scratch::new("ids");
    let store: SharedStore = Arc::new(SqliteStore::open(scratch.db()).unwrap());
    // Both through the store alone and through a worker's eager start.
    let w = worker(store.clone());
    for client in [Client::new(store.clone()), w.client()] {
        // `order@1` in its first run would give `order@1/{position}` as idempotency keys,
        // the keys of `order` in its run 1 after a continue-as-new.
        for id in ["", "order@1", "a@b@27"] {
            match client.start(&WAITER, id, &1).await {
                Err(ClientError::InvalidId {
                    instance_id,
                    problem,
                }) => {
                    assert_eq!(instance_id, id);
                    assert!(!problem.is_empty());
                }
                other => panic!("expected {id:?} to be refused, got {other:?}"),
            }
            assert!(matches!(
                client.describe(id).await,
                Err(ClientError::NotFound { .. })
            ));
        }
    }
    // An instance that got such an id before ids were checked (here, straight through the
    // store) is still returned by a start, as any existing id is.
    store
        .create_instance(retrace::runtime::store::NewInstance {
            id: "legacy@1".into(),
            coordinator: "waiter".into(),
            input: serde_json::json!(1),
            parent: None,
        })
        .await
        .unwrap();
    let handle = w.client().start(&WAITER, "legacy@1", &1).await.unwrap();
    w.client().signal("legacy@1", "go", &1).await.unwrap();
    assert_eq!(handle.result().await.unwrap(), 2);
    // Ids with `@` elsewhere are fine.
    let client = w.client();
    for id in ["user@example.com", "order@", "order@1b"] {
        client.start(&WAITER, id, &1).await.unwrap();
        client.signal(id, "go", &1).await.unwrap();
        assert_eq!(client.handle(&WAITER, id).result().await.unwrap(), 2);
    }
    w.shutdown().await.unwrap();
}
