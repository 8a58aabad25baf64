//! Coordinator primitives (issue 3): durable timers, signals, races, fan-out, children,
//! cancellation and termination, activity timeouts and heartbeats, versioning, continue-as-new,
//! deterministic helpers and custom status. Every wait is interrupted by a worker restart (a new
//! store handle and a new worker on the same file), so each primitive is shown to be durable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::{select, Either};
use retrace::prelude::*;
use retrace::{ClientError, Event, HistoryEvent, InstanceStatus};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A store file in a fresh folder, removed at the end.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "retrace-primitives-{name}-{}-{}",
            std::process::id(),
            uuid_like()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn store(&self) -> SharedStore {
        Arc::new(SqliteStore::open(self.dir.join("store.db")).unwrap())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uuid_like() -> u128 {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    t ^ u128::from(N.fetch_add(1, Ordering::SeqCst))
}

/// Polls the history until `pred` holds (the wait we restart in the middle of).
async fn until_history(client: &Client, id: &str, pred: impl Fn(&[HistoryEvent]) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(h) = client.history(id).await {
            if pred(&h) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting on the history of {id}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn has(kind: &'static str) -> impl Fn(&[HistoryEvent]) -> bool {
    move |h| h.iter().any(|e| e.event.kind() == kind)
}

fn count(h: &[HistoryEvent], kind: &str) -> usize {
    h.iter().filter(|e| e.event.kind() == kind).count()
}

fn scheduled_names(h: &[HistoryEvent]) -> Vec<String> {
    h.iter()
        .filter_map(|e| match &e.event {
            Event::ActivityScheduled { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

// ----- timers ---------------------------------------------------------------------------------

const NAP: Coordinator<u64, String> = Coordinator::new("nap");

async fn nap(ctx: Context, ms: u64) -> Result<String, Error> {
    ctx.sleep(Duration::from_millis(ms)).await?;
    Ok("rested".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_timer_fires_after_a_restart_in_the_middle_of_the_wait() {
    let scratch = Scratch::new("timer");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&NAP, nap)
        .start();
    let started = Instant::now();
    let handle = client.start(&NAP, "nap-1", &400).await.unwrap();
    // A 30-day sleep is a row too: nothing of it lives in memory once committed.
    client
        .start(&NAP, "nap-30-days", &(30 * 24 * 3600 * 1000))
        .await
        .unwrap();
    until_history(&client, "nap-1", has("timer_started")).await;
    until_history(&client, "nap-30-days", has("timer_started")).await;
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&NAP, nap)
        .cache(false)
        .start();
    let handle = client.handle(&NAP, handle.id());
    assert_eq!(handle.result().await.unwrap(), "rested");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "fired early"
    );
    assert_eq!(worker.cached_executions(), 0);
    let long = client.describe("nap-30-days").await.unwrap();
    assert_eq!(long.status, InstanceStatus::Running);
    worker.shutdown().await.unwrap();
}

// ----- signals --------------------------------------------------------------------------------

const COLLECT: Coordinator<usize, Vec<String>> = Coordinator::new("collect");

async fn collect(ctx: Context, n: usize) -> Result<Vec<String>, Error> {
    let mut items = Vec::new();
    for _ in 0..n {
        ctx.set_status(&format!("waiting for item {}", items.len() + 1))?;
        items.push(ctx.signal::<String>("item").await?);
    }
    Ok(items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_buffered_in_order_deduplicated_and_survive_a_restart() {
    let scratch = Scratch::new("signals");
    let store = scratch.store();
    let client = Client::new(store.clone());
    client.start(&COLLECT, "c-1", &4).await.unwrap();
    // Two signals arrive before any worker runs the coordinator: buffered, in order.
    client.signal("c-1", "item", &"a").await.unwrap();
    assert!(client
        .signal_once("c-1", "item", &"b", "sig-b")
        .await
        .unwrap());
    assert!(
        !client
            .signal_once("c-1", "item", &"b", "sig-b")
            .await
            .unwrap(),
        "a duplicate id is ignored"
    );
    let worker = Worker::builder(store.clone())
        .coordinator(&COLLECT, collect)
        .start();
    until_history(&client, "c-1", |h| count(h, "signal_awaited") == 3).await;
    let info = client.describe("c-1").await.unwrap();
    assert_eq!(
        info.custom_status,
        Some(serde_json::json!("waiting for item 3"))
    );
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    client.signal("c-1", "item", &"c").await.unwrap();
    let worker = Worker::builder(store.clone())
        .coordinator(&COLLECT, collect)
        .start();
    assert!(client
        .signal_once("c-1", "item", &"d", "sig-d")
        .await
        .unwrap());
    let out = client.handle(&COLLECT, "c-1").result().await.unwrap();
    assert_eq!(out, vec!["a", "b", "c", "d"]);
    let err = client.signal("missing", "item", &"x").await.unwrap_err();
    assert!(matches!(err, ClientError::NotFound { .. }), "{err}");
    worker.shutdown().await.unwrap();
}

// ----- racing a signal against a timer ---------------------------------------------------------

const PAY_OR_CANCEL: Coordinator<u64, String> = Coordinator::new("pay_or_cancel");

async fn pay_or_cancel(ctx: Context, timeout_ms: u64) -> Result<String, Error> {
    let payment = ctx.signal::<u64>("payment");
    let deadline = ctx.sleep(Duration::from_millis(timeout_ms));
    match select(payment, deadline).await {
        Either::Left((paid, _)) => Ok(format!("paid {}", paid?)),
        Either::Right(_) => Ok("cancelled: no payment".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_races_a_timer_across_a_restart() {
    let scratch = Scratch::new("race");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&PAY_OR_CANCEL, pay_or_cancel)
        .start();
    client.start(&PAY_OR_CANCEL, "paid", &60_000).await.unwrap();
    client.start(&PAY_OR_CANCEL, "unpaid", &300).await.unwrap();
    until_history(&client, "paid", has("timer_started")).await;
    until_history(&client, "unpaid", has("timer_started")).await;
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&PAY_OR_CANCEL, pay_or_cancel)
        .cache(false)
        .start();
    client.signal("paid", "payment", &120).await.unwrap();
    assert_eq!(
        client
            .handle(&PAY_OR_CANCEL, "paid")
            .result()
            .await
            .unwrap(),
        "paid 120"
    );
    assert_eq!(
        client
            .handle(&PAY_OR_CANCEL, "unpaid")
            .result()
            .await
            .unwrap(),
        "cancelled: no payment"
    );
    // Replaying either recorded history gives the same winner, with no database.
    for id in ["paid", "unpaid"] {
        let history = client.history(id).await.unwrap();
        let code = retrace::sdk::coordinator_fn(&PAY_OR_CANCEL, pay_or_cancel);
        retrace::replay_history(id, code, &history).unwrap();
    }
    worker.shutdown().await.unwrap();
}

// ----- fan-out --------------------------------------------------------------------------------

const SQUARE: Activity<u64, u64> = Activity::new("square");
const FAN_OUT: Coordinator<u64, u64> = Coordinator::new("fan_out");

async fn fan_out(ctx: Context, n: u64) -> Result<u64, Error> {
    let calls: Vec<_> = (0..n).map(|i| ctx.call(&SQUARE, &i)).collect();
    let results = futures::future::join_all(calls).await;
    results.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_over_hundreds_of_activities_survives_a_restart_and_replays() {
    let scratch = Scratch::new("fanout");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::new(AtomicU32::new(0));
    let (g, d) = (Arc::clone(&gate), Arc::clone(&done));
    // The first worker completes only 100 of the 300 calls before it stops.
    let worker = Worker::builder(store.clone())
        .coordinator(&FAN_OUT, fan_out)
        .activity(&SQUARE, move |_ctx: ActivityContext, i: u64| {
            let (g, d) = (Arc::clone(&g), Arc::clone(&d));
            async move {
                let _permit = g
                    .acquire()
                    .await
                    .map_err(|_| ActivityError::retryable("closed", "gate"))?;
                d.fetch_add(1, Ordering::SeqCst);
                Ok(i * i)
            }
        })
        .start();
    client.start(&FAN_OUT, "fan", &300).await.unwrap();
    until_history(&client, "fan", |h| count(h, "activity_scheduled") == 300).await;
    gate.add_permits(100);
    until_history(&client, "fan", |h| count(h, "activity_completed") >= 100).await;
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&FAN_OUT, fan_out)
        .activity(
            &SQUARE,
            |_ctx: ActivityContext, i: u64| async move { Ok(i * i) },
        )
        .start();
    let sum = client.handle(&FAN_OUT, "fan").result().await.unwrap();
    assert_eq!(sum, (0..300u64).map(|i| i * i).sum::<u64>());
    let history = client.history("fan").await.unwrap();
    assert_eq!(
        count(&history, "activity_completed"),
        300,
        "one outcome per call"
    );
    let code = retrace::sdk::coordinator_fn(&FAN_OUT, fan_out);
    retrace::replay_history("fan", code, &history).unwrap();
    worker.shutdown().await.unwrap();
}

// ----- children -------------------------------------------------------------------------------

const CHILD: Coordinator<u64, u64> = Coordinator::new("child");
const PARENT: Coordinator<u64, u64> = Coordinator::new("parent");

async fn child(ctx: Context, n: u64) -> Result<u64, Error> {
    let bonus = ctx.signal::<u64>("bonus").await?;
    Ok(n * 10 + bonus)
}

async fn parent(ctx: Context, n: u64) -> Result<u64, Error> {
    ctx.start_child(&CHILD, "orphan", &0)?;
    let a = ctx.child(&CHILD, "kid-a", &n).await?;
    Ok(a + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_awaits_its_child_across_a_restart() {
    let scratch = Scratch::new("children");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&PARENT, parent)
        .coordinator(&CHILD, child)
        .start();
    client.start(&PARENT, "mom", &4).await.unwrap();
    until_history(&client, "kid-a", has("signal_awaited")).await;
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&PARENT, parent)
        .coordinator(&CHILD, child)
        .start();
    client.signal("kid-a", "bonus", &2).await.unwrap();
    assert_eq!(client.handle(&PARENT, "mom").result().await.unwrap(), 43);
    let mom = client.history("mom").await.unwrap();
    assert_eq!(count(&mom, "child_started"), 2);
    assert_eq!(
        count(&mom, "child_completed"),
        1,
        "the detached child reports nothing"
    );
    let kid = client.describe("kid-a").await.unwrap();
    assert_eq!(kid.status, InstanceStatus::Completed);
    assert_eq!(
        kid.parent.as_ref().map(|p| p.instance_id.as_str()),
        Some("mom")
    );
    // The detached child lives on after its parent ended.
    let orphan = client.describe("orphan").await.unwrap();
    assert_eq!(orphan.status, InstanceStatus::Running);
    assert!(orphan.parent.is_none());
    client.signal("orphan", "bonus", &7).await.unwrap();
    assert_eq!(client.handle(&CHILD, "orphan").result().await.unwrap(), 7);
    worker.shutdown().await.unwrap();
}

// ----- cancellation and termination ------------------------------------------------------------

const BOOK: Activity<String, String> = Activity::new("book");
const UNBOOK: Activity<String, ()> = Activity::new("unbook");
const HOLD: Coordinator<(), String> = Coordinator::new("hold");

async fn hold(ctx: Context, _: ()) -> Result<String, Error> {
    let mut saga = Saga::new();
    let room = ctx.call(&BOOK, &"room".to_string()).await?;
    saga.add(&UNBOOK, &room)?;
    match ctx.signal::<String>("confirm").await {
        Ok(who) => Ok(format!("{room} for {who}")),
        Err(e) => Err(saga.fail(&ctx, e).await),
    }
}

fn booking_worker(store: SharedStore, log: Arc<Mutex<Vec<String>>>) -> Worker {
    let l2 = Arc::clone(&log);
    Worker::builder(store)
        .coordinator(&HOLD, hold)
        .activity(&BOOK, move |_ctx: ActivityContext, what: String| {
            let log = Arc::clone(&log);
            async move {
                log.lock().unwrap().push(format!("book {what}"));
                Ok(what)
            }
        })
        .activity(&UNBOOK, move |_ctx: ActivityContext, what: String| {
            let log = Arc::clone(&l2);
            async move {
                log.lock().unwrap().push(format!("unbook {what}"));
                Ok(())
            }
        })
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_runs_compensations_and_terminate_ends_at_once() {
    let scratch = Scratch::new("cancel");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let log = Arc::new(Mutex::new(Vec::new()));
    let worker = booking_worker(store.clone(), Arc::clone(&log));
    client.start(&HOLD, "h-cancel", &()).await.unwrap();
    client.start(&HOLD, "h-terminate", &()).await.unwrap();
    until_history(&client, "h-cancel", has("signal_awaited")).await;
    until_history(&client, "h-terminate", has("signal_awaited")).await;
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = booking_worker(store.clone(), Arc::clone(&log));
    client
        .cancel("h-cancel", "customer changed plans")
        .await
        .unwrap();
    let err = client.handle(&HOLD, "h-cancel").result().await.unwrap_err();
    match err {
        ClientError::Failed { error, .. } => assert!(error.is_cancelled(), "{error}"),
        other => panic!("expected a cancellation, got {other}"),
    }
    let info = client.describe("h-cancel").await.unwrap();
    assert_eq!(info.status, InstanceStatus::Cancelled);
    let history = client.history("h-cancel").await.unwrap();
    assert_eq!(
        scheduled_names(&history),
        vec!["book", "unbook"],
        "the saga ran on cancel"
    );
    assert!(matches!(
        history.last().map(|e| &e.event),
        Some(Event::InstanceCancelled { .. })
    ));

    client
        .terminate("h-terminate", "operator: duplicate order")
        .await
        .unwrap();
    let err = client
        .handle(&HOLD, "h-terminate")
        .result()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Terminated { ref reason, .. } if reason.contains("duplicate")),
        "{err}"
    );
    let history = client.history("h-terminate").await.unwrap();
    assert_eq!(
        scheduled_names(&history),
        vec!["book"],
        "terminate runs no more code"
    );
    assert!(matches!(
        history.last().map(|e| &e.event),
        Some(Event::InstanceTerminated { reason }) if reason == "operator: duplicate order"
    ));
    // A second terminate says it had ended, and keeps the first reason.
    let again = client.terminate("h-terminate", "operator: again").await;
    assert!(
        matches!(
            again,
            Err(ClientError::Ended {
                status: InstanceStatus::Terminated,
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(
        client
            .describe("h-terminate")
            .await
            .unwrap()
            .reason
            .as_deref(),
        Some("operator: duplicate order")
    );
    let log = log.lock().unwrap().clone();
    assert_eq!(log.iter().filter(|l| *l == "unbook room").count(), 1);
    worker.shutdown().await.unwrap();
}

const UNDO: Activity<String, ()> = Activity::new("undo");
const UNWIND: Coordinator<(), String> = Coordinator::new("unwind");

/// Books two things, then fails for good and compensates: undo `second`, then undo `first`.
async fn unwind(ctx: Context, _: ()) -> Result<String, Error> {
    let mut saga = Saga::new();
    let first = ctx.call(&BOOK, &"first".to_string()).await?;
    saga.add(&UNDO, &first)?;
    let second = ctx.call(&BOOK, &"second".to_string()).await?;
    saga.add(&UNDO, &second)?;
    match ctx.call(&REFUSE, &"third".to_string()).await {
        Ok(third) => Ok(third),
        Err(e) => Err(saga.fail(&ctx, e).await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_compensation_waits_for_it_and_the_rest_run_in_order() {
    let scratch = Scratch::new("shielded");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    // The first compensation holds until the test lets it go.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (l1, l2, g) = (Arc::clone(&log), Arc::clone(&log), Arc::clone(&gate));
    let worker = Worker::builder(store.clone())
        .coordinator(&UNWIND, unwind)
        .activity(&BOOK, move |_c: ActivityContext, what: String| {
            let log = Arc::clone(&l1);
            async move {
                log.lock().unwrap().push(format!("book {what}"));
                Ok(what)
            }
        })
        .activity(&REFUSE, |_c: ActivityContext, _w: String| async move {
            Err::<String, _>(ActivityError::non_retryable("refused", "sold out"))
        })
        .activity(&UNDO, move |_c: ActivityContext, what: String| {
            let (log, gate) = (Arc::clone(&l2), Arc::clone(&g));
            async move {
                log.lock().unwrap().push(format!("undo {what} begins"));
                if what == "second" {
                    gate.acquire().await.unwrap().forget();
                }
                log.lock().unwrap().push(format!("undo {what} ends"));
                Ok(())
            }
        })
        .start();
    client.start(&UNWIND, "u-1", &()).await.unwrap();
    let begun = || {
        log.lock()
            .unwrap()
            .contains(&"undo second begins".to_string())
    };
    let deadline = Instant::now() + WAIT;
    while !begun() {
        assert!(
            Instant::now() < deadline,
            "the first compensation never began"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Cancelled while "second" is being undone: the cancel is journaled, and nothing moves on.
    client.cancel("u-1", "customer gave up").await.unwrap();
    until_history(&client, "u-1", has("cancel_requested")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let history = client.history("u-1").await.unwrap();
    let undos = |h: &[HistoryEvent]| {
        h.iter()
            .filter(|e| matches!(&e.event, Event::ActivityScheduled { name, .. } if name == "undo"))
            .count()
    };
    assert_eq!(
        undos(&history),
        1,
        "the next compensation waits for the first"
    );
    assert_eq!(
        client.describe("u-1").await.unwrap().status,
        InstanceStatus::Running
    );

    gate.add_permits(1);
    let err = client.handle(&UNWIND, "u-1").result().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Failed { error: Error::Activity(f), .. } if f.kind == "refused"),
        "the saga ends with its cause: {err}"
    );
    assert_eq!(
        *log.lock().unwrap(),
        [
            "book first",
            "book second",
            "undo second begins",
            "undo second ends",
            "undo first begins",
            "undo first ends"
        ],
        "each compensation ran once, in reverse order, the second after the first had ended"
    );
    let history = client.history("u-1").await.unwrap();
    assert_eq!(undos(&history), 2);
    let position_of = |pred: &dyn Fn(&Event) -> bool| {
        history
            .iter()
            .find(|e| pred(&e.event))
            .map(|e| e.position)
            .unwrap()
    };
    let second_undone = position_of(&|e| matches!(e, Event::ActivityCompleted { seq: 4, .. }));
    let first_undo_issued = position_of(&|e| matches!(e, Event::ActivityScheduled { seq: 5, .. }));
    assert!(second_undone < first_undo_issued, "{history:#?}");
    worker.shutdown().await.unwrap();
}

// ----- activity timeouts and heartbeats --------------------------------------------------------

const SLOW: Activity<u64, u32> = Activity::new("slow").with_retry(
    RetryPolicy::new()
        .max_attempts(5)
        .initial_interval(Duration::from_millis(10))
        .start_to_close_timeout(Duration::from_millis(200)),
);
const LONG: Activity<u64, u32> = Activity::new("long").with_retry(
    RetryPolicy::new()
        .max_attempts(5)
        .initial_interval(Duration::from_millis(10))
        .heartbeat_timeout(Duration::from_millis(200)),
);
const TIMED: Coordinator<(), (u32, u32)> = Coordinator::new("timed");

async fn timed(ctx: Context, _: ()) -> Result<(u32, u32), Error> {
    let a = ctx.call(&SLOW, &0).await?;
    let b = ctx.call(&LONG, &0).await?;
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_attempts_and_missed_heartbeats_are_retried() {
    let scratch = Scratch::new("timeouts");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&TIMED, timed)
        // Attempt 1 hangs past its start-to-close timeout; attempt 2 answers.
        .activity(&SLOW, |ctx: ActivityContext, _: u64| async move {
            if ctx.attempt() == 1 {
                futures::future::pending::<()>().await;
            }
            Ok(ctx.attempt())
        })
        // Attempt 1 stops heartbeating; attempt 2 heartbeats while it works for longer than the
        // heartbeat timeout in total.
        .activity(&LONG, |ctx: ActivityContext, _: u64| async move {
            if ctx.attempt() == 1 {
                futures::future::pending::<()>().await;
            }
            for _ in 0..6 {
                ctx.heartbeat(None);
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            Ok(ctx.attempt())
        })
        .start();
    let out = client
        .start(&TIMED, "t-1", &())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(out, (2, 2));
    worker.shutdown().await.unwrap();
}

/// Panics on its first attempt (no deadline: the attempt is awaited bare).
const PANICS_ONCE: Activity<u64, u32> = Activity::new("panics_once").with_retry(
    RetryPolicy::new()
        .max_attempts(3)
        .initial_interval(Duration::from_millis(10)),
);
/// Panics on its only attempt (no deadline), with a `&str` message.
const PANICS_BARE: Activity<u64, u32> =
    Activity::new("panics_bare").with_retry(RetryPolicy::new().max_attempts(1));
/// Panics on its only attempt (a deadline: the attempt races its timer), with a `String`.
const PANICS_TIMED: Activity<u64, u32> = Activity::new("panics_timed").with_retry(
    RetryPolicy::new()
        .max_attempts(1)
        .start_to_close_timeout(Duration::from_secs(30)),
);
const PANICKY: Coordinator<(), (u32, bool, bool)> = Coordinator::new("panicky");

async fn panicky(ctx: Context, _: ()) -> Result<(u32, bool, bool), Error> {
    let attempt = ctx.call(&PANICS_ONCE, &0).await?;
    let bare_failed = ctx.call(&PANICS_BARE, &0).await.is_err();
    let timed_failed = ctx.call(&PANICS_TIMED, &0).await.is_err();
    Ok((attempt, bare_failed, timed_failed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_attempt_is_a_retryable_failure_with_its_message() {
    let scratch = Scratch::new("panics");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&PANICKY, panicky)
        .activity(&PANICS_ONCE, |ctx: ActivityContext, _: u64| async move {
            if ctx.attempt() == 1 {
                panic!("boom on attempt 1");
            }
            Ok(ctx.attempt())
        })
        .activity(&PANICS_BARE, |ctx: ActivityContext, _: u64| async move {
            if ctx.attempt() > 0 {
                panic!("bare boom");
            }
            Ok(0)
        })
        .activity(&PANICS_TIMED, |ctx: ActivityContext, _: u64| async move {
            if ctx.attempt() > 0 {
                panic!("{} on attempt {}", "boom", ctx.attempt());
            }
            Ok(0)
        })
        .start();
    let out = client
        .start(&PANICKY, "p-1", &())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(
        out,
        (2, true, true),
        "the first call retried, the others failed"
    );
    let history = client.history("p-1").await.unwrap();
    let failures: Vec<_> = history
        .iter()
        .filter_map(|e| match &e.event {
            Event::ActivityFailed { failure, .. } => Some(failure.clone()),
            _ => None,
        })
        .collect();
    let seen: Vec<_> = failures
        .iter()
        .map(|f| (f.activity.as_str(), f.kind.as_str(), f.message.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("panics_bare", "panic", "bare boom"),
            ("panics_timed", "panic", "boom on attempt 1")
        ],
        "{history:#?}"
    );
    assert!(
        failures.iter().all(|f| !f.non_retryable),
        "a panic is retryable"
    );
    worker.shutdown().await.unwrap();
}

// ----- versioning -----------------------------------------------------------------------------

const RESERVE: Activity<String, String> = Activity::new("reserve");
const CANCEL: Activity<String, ()> = Activity::new("cancel");
const REFUSE: Activity<String, String> =
    Activity::new("refuse").with_retry(RetryPolicy::new().non_retryable(&["refused"]));

const TRIP_V1: Coordinator<(), ()> = Coordinator::new("versioned_trip");
const TRIP_V2: Coordinator<(), ()> =
    Coordinator::new("versioned_trip").with_patches(&["cancel-car-first"]);

/// Shared by both versions: the order of cancellation depends on the patch.
async fn versioned_trip(ctx: Context, _: ()) -> Result<(), Error> {
    let mut saga = Saga::new();
    let car = ctx.call(&RESERVE, &"car".to_string()).await?;
    saga.add(&CANCEL, &car)?;
    let hotel = ctx.call(&RESERVE, &"hotel".to_string()).await?;
    saga.add(&CANCEL, &hotel)?;
    match ctx.call(&REFUSE, &"flight".to_string()).await {
        Ok(_) => Ok(()),
        Err(e) => {
            if ctx.patched("cancel-car-first") {
                // Cancel the car first: reorder by re-registering only it last.
                let mut first = Saga::new();
                first.add(&CANCEL, &hotel)?;
                first.add(&CANCEL, &car)?;
                return Err(first.fail(&ctx, e).await);
            }
            Err(saga.fail(&ctx, e).await)
        }
    }
}

fn cancel_order(h: &[HistoryEvent]) -> Vec<String> {
    h.iter()
        .filter_map(|e| match &e.event {
            Event::ActivityScheduled { name, input, .. } if name == "cancel" => {
                input.as_str().map(str::to_string)
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_flight_before_a_patch_finish_on_the_old_path() {
    let scratch = Scratch::new("versioning");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let flight_gate = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = Arc::clone(&flight_gate);
    let worker = Worker::builder(store.clone())
        .coordinator(&TRIP_V1, versioned_trip)
        .activity(&RESERVE, |_c: ActivityContext, what: String| async move {
            Ok(what)
        })
        .activity(
            &CANCEL,
            |_c: ActivityContext, _w: String| async move { Ok(()) },
        )
        .activity(&REFUSE, move |_c: ActivityContext, _w: String| {
            let gate = Arc::clone(&gate);
            async move {
                let _p = gate
                    .acquire()
                    .await
                    .map_err(|_| ActivityError::retryable("closed", "gate"))?;
                Err::<String, _>(ActivityError::non_retryable("refused", "no seats"))
            }
        })
        .start();
    // Started on the old code; waiting on the flight when the new code is deployed.
    client.start(&TRIP_V1, "old-trip", &()).await.unwrap();
    until_history(&client, "old-trip", |h| {
        scheduled_names(h).contains(&"refuse".to_string())
    })
    .await;
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&TRIP_V2, versioned_trip)
        .activity(&RESERVE, |_c: ActivityContext, what: String| async move {
            Ok(what)
        })
        .activity(
            &CANCEL,
            |_c: ActivityContext, _w: String| async move { Ok(()) },
        )
        .activity(&REFUSE, |_c: ActivityContext, _w: String| async move {
            Err::<String, _>(ActivityError::non_retryable("refused", "no seats"))
        })
        .start();
    client.start(&TRIP_V2, "new-trip", &()).await.unwrap();
    for id in ["old-trip", "new-trip"] {
        let err = client.handle(&TRIP_V2, id).result().await.unwrap_err();
        assert!(matches!(err, ClientError::Failed { .. }), "{err}");
    }
    let old = client.history("old-trip").await.unwrap();
    let new = client.history("new-trip").await.unwrap();
    assert_eq!(
        cancel_order(&old),
        vec!["hotel", "car"],
        "the old run keeps the old order"
    );
    assert_eq!(
        cancel_order(&new),
        vec!["car", "hotel"],
        "a new run takes the new order"
    );
    let marks_patch = |h: &[HistoryEvent]| {
        h.iter().any(
            |e| matches!(&e.event, Event::PatchMarker { patch, .. } if patch == "cancel-car-first"),
        )
    };
    assert!(!marks_patch(&old));
    assert!(marks_patch(&new));
    // Both histories replay against the new code.
    for (id, h) in [("old-trip", &old), ("new-trip", &new)] {
        let code = retrace::sdk::coordinator_fn(&TRIP_V2, versioned_trip);
        let run = retrace::sdk::Execution::new(id, code).with_patches(TRIP_V2.patches());
        let mut run = run;
        run.replay(h).unwrap();
    }
    worker.shutdown().await.unwrap();
}

// The trip example's coordinator, replayed against histories recorded before its two patches
// (payment step, cancel car first) were made.
#[path = "../examples/trip_booking/coordinator.rs"]
#[allow(dead_code)]
mod trip;

#[test]
fn trip_histories_recorded_before_the_patches_replay_on_the_old_path() {
    for name in ["booked", "compensated"] {
        let path = format!(
            "{}/tests/fixtures/trip_{name}_before_patches.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let history: Vec<HistoryEvent> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let code = retrace::sdk::coordinator_fn(&trip::BOOK_TRIP, trip::book_trip);
        retrace::replay_history(name, code, &history)
            .unwrap_or_else(|e| panic!("{name} no longer replays: {e}"));
    }
}

// ----- continue-as-new ------------------------------------------------------------------------

const TICK: Activity<u64, u64> = Activity::new("tick");
const COUNTER: Coordinator<(u64, u64), u64> = Coordinator::new("counter");

async fn counter(ctx: Context, (i, n): (u64, u64)) -> Result<u64, Error> {
    let i = ctx.call(&TICK, &i).await?;
    if i >= n {
        return Ok(i);
    }
    if i == n / 2 {
        // Wait here once, so the test can restart the worker mid-way.
        ctx.signal::<()>("go-on").await?;
    }
    Err(ctx.continue_as_new(&(i, n))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_as_new_keeps_the_id_and_bounds_the_history() {
    let scratch = Scratch::new("continue");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let keys = Arc::new(Mutex::new(Vec::new()));
    let k = Arc::clone(&keys);
    let tick = move |ctx: ActivityContext, i: u64| {
        let k = Arc::clone(&k);
        async move {
            k.lock().unwrap().push(ctx.idempotency_key());
            Ok(i + 1)
        }
    };
    let worker = Worker::builder(store.clone())
        .coordinator(&COUNTER, counter)
        .activity(&TICK, tick.clone())
        .start();
    client.start(&COUNTER, "renewals", &(0, 20)).await.unwrap();
    until_history(&client, "renewals", has("signal_awaited")).await;
    let mid = client.describe("renewals").await.unwrap();
    assert_eq!(mid.generation, 9);
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&COUNTER, counter)
        .activity(&TICK, tick)
        .start();
    client.signal("renewals", "go-on", &()).await.unwrap();
    assert_eq!(
        client.handle(&COUNTER, "renewals").result().await.unwrap(),
        20
    );
    let info = client.describe("renewals").await.unwrap();
    assert_eq!(info.generation, 19);
    let history = client.history("renewals").await.unwrap();
    assert!(
        history.len() <= 6,
        "history holds one run only: {} events",
        history.len()
    );
    let keys = keys.lock().unwrap().clone();
    let unique: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(
        unique.len(),
        20,
        "each run's calls get their own idempotency keys: {keys:?}"
    );
    worker.shutdown().await.unwrap();
}

// ----- deterministic helpers and custom status -------------------------------------------------

const NOISE: Coordinator<(), Noise> = Coordinator::new("noise");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Noise {
    before: (u64, String, u64, u64),
    after: (u64, String, u64, u64),
}

async fn noise(ctx: Context, _: ()) -> Result<Noise, Error> {
    let read = |ctx: &Context| -> Result<(u64, String, u64, u64), Error> {
        let external = ctx.side_effect("external", || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })?;
        Ok((ctx.now_ms(), ctx.uuid(), ctx.random_u64(), external))
    };
    let before = read(&ctx)?;
    ctx.set_status(&"halfway")?;
    ctx.signal::<()>("continue").await?;
    // With the cache off, the activation after the wait replays `read` above: `before` then holds
    // the recorded values, not new ones.
    let after = read(&ctx)?;
    Ok(Noise { before, after })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_randomness_and_side_effects_are_recorded_once() {
    let scratch = Scratch::new("helpers");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&NOISE, noise)
        .cache(false)
        .start();
    client.start(&NOISE, "n-1", &()).await.unwrap();
    until_history(&client, "n-1", has("signal_awaited")).await;
    assert_eq!(
        client.describe("n-1").await.unwrap().custom_status,
        Some(serde_json::json!("halfway"))
    );
    worker.shutdown().await.unwrap();
    drop(store);

    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .coordinator(&NOISE, noise)
        .cache(false)
        .start();
    client.signal("n-1", "continue", &()).await.unwrap();
    let out = client.handle(&NOISE, "n-1").result().await.unwrap();
    let history = client.history("n-1").await.unwrap();
    let recorded: Vec<serde_json::Value> = history
        .iter()
        .filter_map(|e| match &e.event {
            Event::SideEffect { value, .. } => Some(value.clone()),
            _ => None,
        })
        .collect();
    // `read` records the external value first, then time, uuid and randomness.
    assert_eq!(recorded[0], serde_json::json!(out.before.3));
    assert_eq!(recorded[1], serde_json::json!(out.before.0));
    assert_eq!(recorded[2], serde_json::json!(out.before.1));
    assert_eq!(recorded[3], serde_json::json!(out.before.2));
    assert_ne!(out.before.1, out.after.1, "a new uuid after the wait");
    assert!(out.after.0 >= out.before.0);
    worker.shutdown().await.unwrap();
}

// ----- a timer too far to keep ----------------------------------------------------------------

const FOREVER: Coordinator<(), String> = Coordinator::new("forever");

/// Sleeps "forever" unless a signal comes first.
async fn forever(ctx: Context, _: ()) -> Result<String, Error> {
    let nap = Box::pin(ctx.sleep(Duration::MAX));
    let wake = Box::pin(ctx.signal::<String>("wake"));
    match select(nap, wake).await {
        Either::Left(_) => Ok("the timer fired".to_string()),
        Either::Right((woken, _)) => woken,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_beyond_the_stores_clock_never_fires() {
    let scratch = Scratch::new("forever");
    let store = scratch.store();
    let client = Client::new(store.clone());
    let worker = Worker::builder(store.clone())
        .poll_interval(Duration::from_millis(20))
        .coordinator(&FOREVER, forever)
        .start();
    client.start(&FOREVER, "f", &()).await.unwrap();
    until_history(&client, "f", has("timer_started")).await;
    // Several timer passes: a due time stored as a negative number would fire at the first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&client.history("f").await.unwrap(), "timer_fired"), 0);
    client
        .signal("f", "wake", &"signal".to_string())
        .await
        .unwrap();
    assert_eq!(
        client.handle(&FOREVER, "f").result().await.unwrap(),
        "signal"
    );
    // It has ended: what is sent now is refused, not silently dropped.
    for refused in [
        client.signal("f", "wake", &"late".to_string()).await,
        client
            .signal_once("f", "wake", &"late".to_string(), "id-1")
            .await
            .map(|_| ()),
        client.cancel("f", "too late").await,
        // Ended by itself, perhaps just after the caller looked: nothing to end or resume.
        client.terminate("f", "too late").await,
        client.resume("f").await,
    ] {
        assert!(
            matches!(
                refused,
                Err(ClientError::Ended {
                    status: InstanceStatus::Completed,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    let info = client.describe("f").await.unwrap();
    assert_eq!(info.status, InstanceStatus::Completed);
    assert_eq!(
        count(&client.history("f").await.unwrap(), "instance_terminated"),
        0
    );
    worker.shutdown().await.unwrap();
}
