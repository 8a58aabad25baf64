//! Nondeterminism detection, end to end: an instance waits (an activity is in flight), its
//! worker is shut down, and a new worker runs changed coordinator code whose command at
//! position 1 differs from the history (another activity, or another kind of command). The
//! instance must stop with a reason naming the instance, the position, what history holds and
//! what the code requested; its history must be left exactly as it was; other instances on the
//! same store must go on; and after the code is fixed, `Client::resume` must let it complete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use retrace::{
    Activity, ActivityContext, ActivityError, Client, ClientError, Context, Coordinator, Error,
    Event, InstanceStatus, SharedStore, Worker,
};
use std::time::Duration;
use tokio::sync::mpsc;

const STEP_A: Activity<u32, u32> = Activity::new("step_a");
const STEP_B: Activity<u32, u32> = Activity::new("step_b");
const STEP_X: Activity<u32, u32> = Activity::new("step_x");
const STEP_C: Activity<u32, u32> = Activity::new("step_c");

const FLOW: Coordinator<u32, u32> = Coordinator::new("flow");
const OTHER: Coordinator<u32, u32> = Coordinator::new("other");

/// The code the instance started with: a, b, c.
async fn flow_v1(ctx: Context, n: u32) -> Result<u32, Error> {
    let a = ctx.call(&STEP_A, &n).await?;
    let b = ctx.call(&STEP_B, &a).await?;
    ctx.call(&STEP_C, &b).await
}

/// A change that calls another activity at position 1.
async fn flow_other_activity(ctx: Context, n: u32) -> Result<u32, Error> {
    let a = ctx.call(&STEP_A, &n).await?;
    let x = ctx.call(&STEP_X, &a).await?;
    ctx.call(&STEP_C, &x).await
}

/// A change that starts a timer at position 1.
async fn flow_timer(ctx: Context, n: u32) -> Result<u32, Error> {
    let a = ctx.call(&STEP_A, &n).await?;
    ctx.sleep(Duration::from_secs(3600)).await?;
    ctx.call(&STEP_C, &a).await
}

/// Another coordinator, unaffected by the change.
async fn other(ctx: Context, n: u32) -> Result<u32, Error> {
    let a = ctx.call(&STEP_A, &n).await?;
    ctx.call(&STEP_C, &a).await
}

#[derive(Clone, Copy)]
enum Code {
    V1,
    OtherActivity,
    Timer,
}

/// A worker running `code` for `flow` (and `other`). When `hold_b` is set, `step_b` reports its
/// start on `b_started` and never answers.
fn worker(
    store: &SharedStore,
    code: Code,
    hold_b: bool,
    b_started: Option<mpsc::UnboundedSender<()>>,
) -> Worker {
    let builder = Worker::builder(store.clone());
    let builder = match code {
        Code::V1 => builder.coordinator(&FLOW, flow_v1),
        Code::OtherActivity => builder.coordinator(&FLOW, flow_other_activity),
        Code::Timer => builder.coordinator(&FLOW, flow_timer),
    };
    builder
        .coordinator(&OTHER, other)
        .activity(&STEP_A, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .activity(&STEP_B, move |_ctx: ActivityContext, n: u32| {
            let started = b_started.clone();
            async move {
                if let Some(tx) = started {
                    let _ = tx.send(());
                }
                if hold_b {
                    futures::future::pending::<()>().await;
                }
                Ok::<_, ActivityError>(n * 10)
            }
        })
        .activity(&STEP_X, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n * 100)
        })
        .activity(&STEP_C, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 7)
        })
        .start()
}

/// Runs `flow` on the original code until `step_b` is in flight, switches to `changed` code, and
/// checks the stop, the untouched history, the other instances, and the resume after a fix.
async fn diverge_then_fix(label: &str, changed: Code, requested: &str) {
    init_tracing();
    let dir = TempDir::new(label);
    let store = open_store(&dir.file("store.db"));
    let client = Client::new(store.clone());
    let id = format!("flow-{label}");

    // 1. The original code runs until the instance waits on `step_b`.
    let (b_tx, mut b_started) = mpsc::unbounded_channel();
    let w1 = worker(&store, Code::V1, true, Some(b_tx));
    let handle = client.start(&FLOW, &id, &1).await.unwrap();
    recv(&mut b_started, "step_b to start").await;
    w1.shutdown().await.unwrap();
    let before = client.history(&id).await.unwrap();
    assert_well_formed(&before);
    assert_eq!(scheduled_names(&before), vec!["step_a", "step_b"]);
    let before_bytes = serde_json::to_string(&before).unwrap();

    // 2. New code: `step_b` finishes on the new worker, the instance is activated, its replay
    //    diverges at position 1 and it stops.
    let w2 = worker(&store, changed, false, None);
    let info = within("the instance to stop", client.wait(&id))
        .await
        .unwrap();
    assert_eq!(info.status, InstanceStatus::Stopped, "{info:?}");
    let reason = info.reason.clone().expect("a stopped instance says why");
    for needle in [
        id.as_str(),
        "position 1",
        "activity step_b",
        requested,
        "nondeterminism",
    ] {
        assert!(
            reason.contains(needle),
            "reason {reason:?} does not mention {needle:?}"
        );
    }
    match result_of(&handle).await {
        Err(ClientError::Stopped {
            instance_id,
            reason: r,
        }) => {
            assert_eq!(instance_id, id);
            assert_eq!(r, reason);
        }
        other => panic!("expected Stopped, got {other:?}"),
    }

    // The history is untouched, to the byte.
    let after = client.history(&id).await.unwrap();
    assert_eq!(after, before);
    assert_eq!(serde_json::to_string(&after).unwrap(), before_bytes);

    // 3. Another instance, of another coordinator, on the same store and worker, completes.
    let other_handle = client.start(&OTHER, "other-1", &5).await.unwrap();
    assert_eq!(result_of(&other_handle).await.unwrap(), 13);
    // ... and the stopped one stayed stopped and untouched meanwhile.
    let info = client.describe(&id).await.unwrap();
    assert_eq!(info.status, InstanceStatus::Stopped);
    assert_eq!(info.reason.as_deref(), Some(reason.as_str()));
    assert_eq!(
        serde_json::to_string(&client.history(&id).await.unwrap()).unwrap(),
        before_bytes
    );
    w2.shutdown().await.unwrap();

    // 4. The code is fixed (the original is deployed again) and the instance resumed.
    let w3 = worker(&store, Code::V1, false, None);
    client.resume(&id).await.unwrap();
    assert_eq!(result_of(&handle).await.unwrap(), (1 + 1) * 10 + 7);
    let done = client.history(&id).await.unwrap();
    assert_well_formed(&done);
    assert_eq!(
        &done[..before.len()],
        &before[..],
        "resuming rewrote recorded events"
    );
    assert_eq!(scheduled_names(&done), vec!["step_a", "step_b", "step_c"]);
    assert!(matches!(
        terminal(&done),
        Some(Event::InstanceCompleted { .. })
    ));
    let info = client.describe(&id).await.unwrap();
    assert_eq!(info.status, InstanceStatus::Completed);
    assert_eq!(info.reason, None);
    w3.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_activity_at_a_recorded_position_stops_the_instance_until_fixed() {
    diverge_then_fix("activity", Code::OtherActivity, "activity step_x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_command_kind_at_a_recorded_position_stops_the_instance_until_fixed() {
    diverge_then_fix("kind", Code::Timer, "timer").await;
}

const FRAGILE: Coordinator<u32, u32> = Coordinator::new("fragile");

/// Whether `fragile` panics once `step_a` has answered (a bug, then its fix).
static FRAGILE_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

async fn fragile(ctx: Context, n: u32) -> Result<u32, Error> {
    let a = ctx.call(&STEP_A, &n).await?;
    if FRAGILE_BROKEN.load(std::sync::atomic::Ordering::SeqCst) {
        panic!("fragile broke on {a}");
    }
    ctx.call(&STEP_C, &a).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_coordinator_stops_its_instance_until_fixed() {
    init_tracing();
    let dir = TempDir::new("coordinator-panic");
    let store = open_store(&dir.file("store.db"));
    let client = Client::new(store.clone());
    let w = Worker::builder(store.clone())
        .coordinator(&FRAGILE, fragile)
        .coordinator(&OTHER, other)
        .activity(&STEP_A, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .activity(&STEP_C, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 7)
        })
        .start();

    // The panic stops the instance, with the panic as its reason, instead of killing the task
    // that ran it (which left the instance leased and never run again).
    let handle = client.start(&FRAGILE, "fragile-1", &1).await.unwrap();
    let info = within("the instance to stop", client.wait("fragile-1"))
        .await
        .unwrap();
    assert_eq!(info.status, InstanceStatus::Stopped, "{info:?}");
    let reason = info.reason.clone().expect("a stopped instance says why");
    // The first activation recorded positions 0 to 2; the panic came in the next one.
    for needle in [
        "fragile-1",
        "panicked",
        "history position 3",
        "fragile broke on 2",
    ] {
        assert!(
            reason.contains(needle),
            "reason {reason:?} lacks {needle:?}"
        );
    }
    let before = client.history("fragile-1").await.unwrap();
    assert_well_formed(&before);
    assert_eq!(scheduled_names(&before), vec!["step_a"]);

    // Other instances on the same worker go on.
    let other_handle = client.start(&OTHER, "other-panic", &5).await.unwrap();
    assert_eq!(result_of(&other_handle).await.unwrap(), 13);

    // Fixed, and resumed: it completes on the history it had.
    FRAGILE_BROKEN.store(false, std::sync::atomic::Ordering::SeqCst);
    client.resume("fragile-1").await.unwrap();
    assert_eq!(result_of(&handle).await.unwrap(), 1 + 1 + 7);
    let done = client.history("fragile-1").await.unwrap();
    assert_well_formed(&done);
    assert_eq!(&done[..before.len()], &before[..]);
    w.shutdown().await.unwrap();
}

const WAITER: Coordinator<u32, u32> = Coordinator::new("waiter");

/// The code a forked instance started with: a call, then a signal.
async fn waiter_v1(ctx: Context, n: u32) -> Result<u32, Error> {
    let a = ctx.call(&STEP_A, &n).await?;
    let go: u32 = ctx.signal("go").await?;
    Ok(a + go)
}

/// A change that calls another activity first.
async fn waiter_v2(ctx: Context, n: u32) -> Result<u32, Error> {
    let x = ctx.call(&STEP_X, &n).await?;
    let go: u32 = ctx.signal("go").await?;
    Ok(x + go)
}

fn waiter_worker(store: &SharedStore, v2: bool) -> Worker {
    let builder = Worker::builder(store.clone()).poll_interval(Duration::from_millis(20));
    let builder = if v2 {
        builder.coordinator(&WAITER, waiter_v2)
    } else {
        builder.coordinator(&WAITER, waiter_v1)
    };
    builder
        .activity(&STEP_A, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .activity(&STEP_X, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n * 100)
        })
        .start()
}

/// A forked (or imported) running instance has nothing in its inbox; it is created ready so
/// that the first worker replays its history at once: code that no longer matches stops it
/// then, and code that does hands it back, no longer ready, until a message comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_instance_is_replayed_at_once_then_waits() {
    init_tracing();
    let dir = TempDir::new("fork-replayed");
    let store = open_store(&dir.file("store.db"));
    let client = Client::new(store.clone());
    let w1 = waiter_worker(&store, false);
    client.start(&WAITER, "source", &1).await.unwrap();
    within("the source to wait for its signal", async {
        loop {
            let history = client.history("source").await.unwrap();
            if kinds(&history).contains(&"signal_awaited") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    w1.shutdown().await.unwrap();
    let end = client.history("source").await.unwrap().len() as u64;
    store.fork_instance("source", end, "fork-v2").await.unwrap();

    // Changed code: the fork is stopped by its first replay, without any message.
    let w2 = waiter_worker(&store, true);
    let info = within("the fork to stop", async {
        loop {
            let info = client.describe("fork-v2").await.unwrap();
            if info.status != InstanceStatus::Running {
                break info;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(info.status, InstanceStatus::Stopped, "{info:?}");
    assert!(
        info.reason
            .as_deref()
            .unwrap_or("")
            .contains("nondeterminism"),
        "{info:?}"
    );
    w2.shutdown().await.unwrap();

    // The same code: replayed, handed back and no longer ready (nothing to claim), until its
    // signal comes.
    store.fork_instance("source", end, "fork-v1").await.unwrap();
    let w3 = waiter_worker(&store, false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    w3.shutdown().await.unwrap();
    let claimable = store
        .claim_ready("probe", &["waiter".to_string()], 10, 1_000)
        .await
        .unwrap();
    assert!(claimable.is_empty(), "still ready: {claimable:?}");
    let w4 = waiter_worker(&store, false);
    client.signal("fork-v1", "go", &5).await.unwrap();
    assert_eq!(
        result_of(&client.handle(&WAITER, "fork-v1")).await.unwrap(),
        2 + 5
    );
    assert_eq!(
        client.describe("source").await.unwrap().status,
        InstanceStatus::Running,
        "the source waits on"
    );
    w4.shutdown().await.unwrap();
}
