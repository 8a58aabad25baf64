//! A worker's client (`Worker::client`) creates an instance together with its first activation,
//! run in the starting process, in one commit (as Temporal's eager workflow start). These tests
//! check that it behaves as a plain `Client::new` start does: same histories, idempotent ids,
//! coordinators the worker does not run, starts after shutdown, instances that end at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use retrace::{
    Activity, ActivityContext, ActivityError, Client, ClientError, Context, Coordinator, Error,
    InstanceStatus, Worker,
};
use std::sync::Arc;
use tokio::sync::Notify;

const STEP: Activity<u32, u32> = Activity::new("step");
const STEPS: Coordinator<u32, u32> = Coordinator::new("steps");
const GATED: Activity<u32, u32> = Activity::new("gated");
const ONE_GATED: Coordinator<u32, u32> = Coordinator::new("one-gated");
const AT_ONCE: Coordinator<u32, u32> = Coordinator::new("at-once");
const OTHER: Coordinator<u32, u32> = Coordinator::new("other");

async fn steps(ctx: Context, n: u32) -> Result<u32, Error> {
    let mut acc = 0;
    for _ in 0..n {
        acc = ctx.call(&STEP, &acc).await?;
    }
    Ok(acc)
}

async fn one_gated(ctx: Context, n: u32) -> Result<u32, Error> {
    ctx.call(&GATED, &n).await
}

async fn at_once(_ctx: Context, n: u32) -> Result<u32, Error> {
    Ok(n * 2)
}

fn step_worker(store: &retrace::SharedStore) -> Worker {
    Worker::builder(store.clone())
        .coordinator(&STEPS, steps)
        .coordinator(&AT_ONCE, at_once)
        .activity(&STEP, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .start()
}

/// Waits (at most [`WAIT`]) until `count` instances of `store` have completed.
async fn wait_completed(store: &retrace::SharedStore, count: usize) {
    let completed = retrace::ListFilter {
        status: Some(InstanceStatus::Completed),
        ..retrace::ListFilter::default()
    };
    within(&format!("{count} instances completed"), async {
        while store.list_instances(&completed).await.unwrap().len() < count {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_are_those_of_a_plain_start() {
    init_tracing();
    let dir = TempDir::new("eager-same");
    let store = open_store(&dir.file("store.db"));
    let worker = step_worker(&store);
    let eager = worker.client();
    let plain = Client::new(store.clone());
    let a = eager.start(&STEPS, "eager", &5).await.unwrap();
    let b = plain.start(&STEPS, "plain", &5).await.unwrap();
    assert_eq!(within("eager result", result_of(&a)).await.unwrap(), 5);
    assert_eq!(within("plain result", result_of(&b)).await.unwrap(), 5);
    let ha = plain.history("eager").await.unwrap();
    let hb = plain.history("plain").await.unwrap();
    assert_well_formed(&ha);
    assert_eq!(batches(&ha), batches(&hb));
    assert_eq!(activations(&ha), activations(&hb));
    // The end of an instance as this handle remembers it is the row in the file.
    let other = Client::new(open_store(&dir.file("store.db")));
    for id in ["eager", "plain"] {
        let here = plain.describe(id).await.unwrap();
        assert_eq!(here.status, InstanceStatus::Completed);
        assert_eq!(here, other.describe(id).await.unwrap());
    }
    worker.shutdown().await.unwrap();
    assert_rows_match_their_bodies(&dir.file("store.db"), 12);
}

/// Each history row's `kind` and `len` columns agree with the events in its body, whichever
/// statement wrote it (a held chain's sequential step has them as literals).
fn assert_rows_match_their_bodies(file: &std::path::Path, expected_rows: usize) {
    let raw = rusqlite::Connection::open(file).unwrap();
    let mut stmt = raw.prepare("SELECT kind, len, body FROM events").unwrap();
    let rows: Vec<(String, i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), expected_rows, "one row per activation");
    for (kind, len, body) in rows {
        let types: Vec<String> = body
            .split('\n')
            .map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).unwrap();
                event["type"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(kind, types.join(","), "kind column of {body}");
        assert_eq!(len, types.len() as i64, "len column of {body}");
    }
}

/// Ends nobody asked about while they ran (their final row is then not read in the ending
/// transaction) read back as the file has them, from this handle and from another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_nobody_waited_for_read_back_from_the_file() {
    init_tracing();
    let dir = TempDir::new("eager-unwatched");
    let store = open_store(&dir.file("store.db"));
    let worker = step_worker(&store);
    let client = worker.client();
    let ids: Vec<String> = (0..8).map(|i| format!("quiet-{i}")).collect();
    for id in &ids {
        client.start(&STEPS, id, &4).await.unwrap();
    }
    wait_completed(&store, ids.len()).await;
    let other = Client::new(open_store(&dir.file("store.db")));
    for id in &ids {
        let here = client.describe(id).await.unwrap();
        assert_eq!(here.status, InstanceStatus::Completed, "{id}");
        assert_eq!(here.output, Some(serde_json::json!(4)), "{id}");
        assert_eq!(here, other.describe(id).await.unwrap(), "{id}");
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_returns_with_the_first_call_committed() {
    init_tracing();
    let dir = TempDir::new("eager-first");
    let store = open_store(&dir.file("store.db"));
    let gate = Arc::new(Notify::new());
    let g = Arc::clone(&gate);
    let worker = Worker::builder(store.clone())
        .coordinator(&ONE_GATED, one_gated)
        .activity(&GATED, move |_ctx: ActivityContext, n: u32| {
            let g = Arc::clone(&g);
            async move {
                g.notified().await;
                Ok::<_, ActivityError>(n + 1)
            }
        })
        .start();
    let client = worker.client();
    let handle = client.start(&ONE_GATED, "g", &41).await.unwrap();
    // Already committed when `start` returns: the start delivered, the call scheduled (a plain
    // start leaves `InstanceStarted` in the inbox for a worker to claim).
    let history = client.history("g").await.unwrap();
    assert_eq!(
        kinds(&history),
        vec!["instance_started", "patches_pinned", "activity_scheduled"]
    );
    assert_eq!(activations(&history), vec![0, 0, 0]);
    let info = client.describe("g").await.unwrap();
    assert_eq!(info.status, InstanceStatus::Running);
    assert_eq!(info.next_position, 3);
    gate.notify_one();
    assert_eq!(within("result", result_of(&handle)).await.unwrap(), 42);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_id_is_not_started_again() {
    init_tracing();
    let dir = TempDir::new("eager-idempotent");
    let store = open_store(&dir.file("store.db"));
    let worker = step_worker(&store);
    let client = worker.client();
    let first = client.start(&STEPS, "same", &3).await.unwrap();
    let second = client.start(&STEPS, "same", &7).await.unwrap();
    assert_eq!(within("first", result_of(&first)).await.unwrap(), 3);
    assert_eq!(within("second", result_of(&second)).await.unwrap(), 3);
    // Once more after it ended, and concurrently: still the one instance.
    let again = futures::future::join_all((0..4).map(|_| client.start(&STEPS, "same", &9))).await;
    for handle in again {
        assert_eq!(result_of(&handle.unwrap()).await.unwrap(), 3);
    }
    let history = client.history("same").await.unwrap();
    assert_eq!(
        kinds(&history)
            .iter()
            .filter(|k| **k == "instance_started")
            .count(),
        1
    );
    match client.start(&AT_ONCE, "same", &1).await {
        Err(ClientError::CoordinatorMismatch { found, .. }) => assert_eq!(found, "steps"),
        other => panic!("expected a coordinator mismatch, got {other:?}"),
    }
    // Racing eager starts of a new id: one instance, one start event.
    let racing = futures::future::join_all((0..6).map(|_| client.start(&STEPS, "race", &2))).await;
    for handle in racing {
        assert_eq!(result_of(&handle.unwrap()).await.unwrap(), 2);
    }
    let history = client.history("race").await.unwrap();
    assert_well_formed(&history);
    assert_eq!(kinds(&history)[0], "instance_started");
    assert_eq!(
        kinds(&history)
            .iter()
            .filter(|k| **k == "instance_started")
            .count(),
        1
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_ends_at_once_ends_in_the_creating_commit() {
    init_tracing();
    let dir = TempDir::new("eager-at-once");
    let store = open_store(&dir.file("store.db"));
    let worker = step_worker(&store);
    let client = worker.client();
    let handle = client.start(&AT_ONCE, "now", &21).await.unwrap();
    let info = client.describe("now").await.unwrap();
    assert_eq!(info.status, InstanceStatus::Completed);
    assert_eq!(result_of(&handle).await.unwrap(), 42);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_the_worker_does_not_run_is_only_created() {
    init_tracing();
    let dir = TempDir::new("eager-unknown");
    let store = open_store(&dir.file("store.db"));
    // This worker runs the activity but not the coordinator.
    let activities_only = Worker::builder(store.clone())
        .activity(&STEP, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .start();
    let client = activities_only.client();
    let handle = client.start(&STEPS, "elsewhere", &4).await.unwrap();
    let info = client.describe("elsewhere").await.unwrap();
    assert_eq!(
        info.next_position, 0,
        "nothing activated where the coordinator is unknown"
    );
    let runs_it = Worker::builder(store.clone())
        .coordinator(&STEPS, steps)
        .start();
    assert_eq!(within("result", result_of(&handle)).await.unwrap(), 4);
    // A coordinator no worker here runs at all is created and waits.
    client.start(&OTHER, "nobody", &1).await.unwrap();
    assert_eq!(
        client.describe("nobody").await.unwrap().status,
        InstanceStatus::Running
    );
    runs_it.shutdown().await.unwrap();
    activities_only.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_the_client_only_creates() {
    init_tracing();
    let dir = TempDir::new("eager-shutdown");
    let store = open_store(&dir.file("store.db"));
    let worker = step_worker(&store);
    let client = worker.client();
    worker.shutdown().await.unwrap();
    let handle = client.start(&STEPS, "later", &3).await.unwrap();
    assert_eq!(client.describe("later").await.unwrap().next_position, 0);
    let next = step_worker(&store);
    assert_eq!(within("result", result_of(&handle)).await.unwrap(), 3);
    next.shutdown().await.unwrap();
}

/// A start dropped by its caller once it began (a timeout, a `select!`) still creates its
/// instance and runs it to the end on the worker, which goes on living: the first call its
/// creation claimed for this worker is not left leased to it (and renewed) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_dropped_midway_still_run_to_the_end() {
    init_tracing();
    let dir = TempDir::new("eager-dropped");
    let store = open_store(&dir.file("store.db"));
    let worker = step_worker(&store);
    let client = worker.client();
    let ids: Vec<String> = (0..64).map(|i| format!("dropped-{i}")).collect();
    {
        // Each polled once, all together (so that most run beside another start and hand their
        // creation to the writer's queue), then dropped.
        let mut starts: Vec<_> = ids
            .iter()
            .map(|id| Box::pin(client.start(&STEPS, id, &3)))
            .collect();
        for start in &mut starts {
            let _ = futures::poll!(start.as_mut());
        }
    }
    wait_completed(&store, ids.len()).await;
    for id in &ids {
        let info = client.describe(id).await.unwrap();
        assert_eq!(info.output, Some(serde_json::json!(3)), "{id}");
    }
    worker.shutdown().await.unwrap();
}
