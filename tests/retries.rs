//! Stateful retries (DESIGN.md guarantee 6), end to end:
//! - the attempt count of an activity call lives in the store: after a worker is shut down
//!   between attempts, the new worker continues with the next attempt, never from 1, and the
//!   journaled outcome names the attempt that succeeded;
//! - a backoff is a durable timer: the retry's due time is in the task row, no attempt starts
//!   before its backoff has elapsed, even when no worker was alive in between;
//! - error kinds the policy lists as non-retryable (and errors the activity marks so) stop
//!   retries at once;
//! - running out of attempts fails the call with the last attempt's number and error.
//!
//! Timing assertions are lower bounds only (an attempt never starts early), never upper bounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use retrace::{
    Activity, ActivityContext, ActivityError, ActivityFailure, Client, ClientError, CommitNotice,
    Context, Coordinator, Error, Event, InstanceStatus, RetryPolicy, SharedStore, Worker,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One attempt as the activity body saw it.
#[derive(Debug, Clone, PartialEq)]
struct Attempt {
    worker: u8,
    attempt: u32,
    key: String,
    started_ms: u64,
    /// When the body returned its error; `None` if it never returned (abandoned) or succeeded.
    failed_ms: Option<u64>,
}

type Attempts = Arc<Mutex<Vec<Attempt>>>;

const CHARGE: Coordinator<u32, String> = Coordinator::new("charge");

/// Calls `activity` once and returns its output.
async fn charge_with(
    ctx: Context,
    amount: u32,
    activity: Activity<u32, String>,
) -> Result<String, Error> {
    ctx.call(&activity, &amount).await
}

/// A worker for `CHARGE` over `activity`, whose body records each attempt, fails (retryable,
/// kind `unavailable`) on attempts up to `fail_through`, succeeds after, and never answers from
/// attempt `hold_from` on.
#[allow(clippy::too_many_arguments)]
fn charge_worker(
    store: &SharedStore,
    activity: Activity<u32, String>,
    worker_no: u8,
    attempts: &Attempts,
    fail_through: u32,
    hold_from: u32,
    error: fn(u32) -> ActivityError,
    observer: impl Fn(&CommitNotice) + Send + Sync + 'static,
) -> Worker {
    let attempts = attempts.clone();
    Worker::builder(store.clone())
        .coordinator(&CHARGE, move |ctx, amount| {
            charge_with(ctx, amount, activity)
        })
        .activity(&activity, move |ctx: ActivityContext, amount: u32| {
            let attempts = attempts.clone();
            async move {
                let n = ctx.attempt();
                let index = {
                    let mut a = attempts.lock().unwrap();
                    a.push(Attempt {
                        worker: worker_no,
                        attempt: n,
                        key: ctx.idempotency_key(),
                        started_ms: now_ms(),
                        failed_ms: None,
                    });
                    a.len() - 1
                };
                if n >= hold_from {
                    futures::future::pending::<()>().await;
                }
                if n <= fail_through {
                    attempts.lock().unwrap()[index].failed_ms = Some(now_ms());
                    return Err(error(n));
                }
                Ok(format!("charged {amount} on attempt {n}"))
            }
        })
        .on_commit(observer)
        .start()
}

fn unavailable(n: u32) -> ActivityError {
    ActivityError::retryable("unavailable", format!("attempt {n}: service unavailable"))
}

/// Checks that every attempt after a failed one started no earlier than the failure plus the
/// policy's backoff for that attempt.
fn assert_backoffs_respected(attempts: &[Attempt], policy: &RetryPolicy) {
    for pair in attempts.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        assert_eq!(next.attempt, prev.attempt + 1, "attempts out of order");
        if let Some(failed) = prev.failed_ms {
            let backoff = u64::try_from(policy.backoff(prev.attempt).as_millis()).unwrap();
            assert!(
                next.started_ms >= failed + backoff,
                "attempt {} started {} ms after attempt {} failed; its backoff is {backoff} ms",
                next.attempt,
                next.started_ms.saturating_sub(failed),
                prev.attempt
            );
        }
    }
}

/// The retry columns of a task row, read from the file directly: `(attempt, due_at)`.
fn task_row(db: &Path, instance_id: &str, seq: u32) -> Option<(u32, u64)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT attempt, due_at FROM tasks WHERE instance_id = ?1 AND seq = ?2")
        .unwrap();
    let mut rows = stmt
        .query_map(rusqlite::params![instance_id, seq], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .unwrap();
    rows.next().map(|r| r.unwrap())
}

const RESTART_POLICY: RetryPolicy = RetryPolicy::new()
    .max_attempts(10)
    .initial_interval(Duration::from_millis(600))
    .backoff_coefficient(1.0);
const FLAKY: Activity<u32, String> = Activity::new("flaky").with_retry(RESTART_POLICY);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_count_survives_a_worker_restart() {
    init_tracing();
    let dir = TempDir::new("retry-restart");
    let path = dir.file("store.db");
    let store = open_store(&path);
    let client = Client::new(store.clone());
    let attempts = Attempts::default();

    // Worker 1 runs attempts 1 and 2 (both fail). Should it reach attempt 3 before it is shut
    // down, it never answers it.
    let (observer, mut commits) = commit_channel();
    let w1 = charge_worker(&store, FLAKY, 1, &attempts, 3, 3, unavailable, observer);
    let handle = client.start(&CHARGE, "pay-1", &50).await.unwrap();
    wait_for_notice(&mut commits, "attempt 2's failure to be recorded", |n| {
        matches!(
            n,
            CommitNotice::ActivityOutcome {
                attempt: 2,
                is_final: false,
                ..
            }
        )
    })
    .await;
    w1.shutdown().await.unwrap();

    // Worker 2 (a new store handle, as a new process would have) carries on.
    let store2 = open_store(&path);
    let w2 = charge_worker(
        &store2,
        FLAKY,
        2,
        &attempts,
        3,
        u32::MAX,
        unavailable,
        |_: &CommitNotice| {},
    );
    let output = result_of(&handle).await.unwrap();

    // Worker 1 ran attempts 1 and 2, worker 2 went on from there: normally 3 (fails) and 4
    // (succeeds). Should worker 1 have claimed attempt 3 before it was shut down, that attempt
    // is abandoned and the count still goes on, never back.
    let seen = attempts.lock().unwrap().clone();
    let numbers: Vec<u32> = seen.iter().map(|a| a.attempt).collect();
    assert_eq!(&numbers[..2], &[1, 2], "{seen:?}");
    assert_eq!((seen[0].worker, seen[1].worker), (1, 1));
    assert!(
        numbers.windows(2).all(|w| w[1] > w[0]),
        "the attempt count went back: {seen:?}"
    );
    let on_w2: Vec<u32> = seen
        .iter()
        .filter(|a| a.worker == 2)
        .map(|a| a.attempt)
        .collect();
    assert!(
        !on_w2.is_empty() && on_w2[0] >= 3,
        "worker 2 restarted the count: {seen:?}"
    );
    let last = *numbers.last().unwrap();
    assert!(last >= 4, "attempts 1 to 3 fail: {seen:?}");
    assert_eq!(on_w2.last(), Some(&last));
    assert_eq!(output, format!("charged 50 on attempt {last}"));
    for a in &seen {
        assert_eq!(
            a.key, "pay-1/0",
            "the idempotency key changed across attempts"
        );
    }
    assert_backoffs_respected(&seen, &RESTART_POLICY);

    let history = Client::new(store2.clone()).history("pay-1").await.unwrap();
    assert_well_formed(&history);
    let completed: Vec<u32> = history
        .iter()
        .filter_map(|e| match e.event {
            Event::ActivityCompleted {
                seq: 0, attempt, ..
            } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(completed, vec![last]);
    // Failed attempts that were retried leave no trace in history: one call, one outcome.
    assert_eq!(outcome_count(&history), 1);
    w2.shutdown().await.unwrap();
}

const DURABLE_POLICY: RetryPolicy = RetryPolicy::new()
    .max_attempts(3)
    .initial_interval(Duration::from_millis(1500))
    .backoff_coefficient(1.0);
const SLOW_RETRY: Activity<u32, String> = Activity::new("slow_retry").with_retry(DURABLE_POLICY);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backoff_is_a_durable_timer_not_a_sleep_in_a_live_task() {
    init_tracing();
    let dir = TempDir::new("retry-durable");
    let path = dir.file("store.db");
    let store = open_store(&path);
    let client = Client::new(store.clone());
    let attempts = Attempts::default();

    let (observer, mut commits) = commit_channel();
    let w1 = charge_worker(
        &store,
        SLOW_RETRY,
        1,
        &attempts,
        1,
        2,
        unavailable,
        observer,
    );
    let handle = client.start(&CHARGE, "pay-2", &20).await.unwrap();
    wait_for_notice(&mut commits, "attempt 1's failure to be recorded", |n| {
        matches!(
            n,
            CommitNotice::ActivityOutcome {
                attempt: 1,
                is_final: false,
                ..
            }
        )
    })
    .await;
    // No worker is alive from here until worker 2 starts: nothing holds the backoff in memory.
    w1.shutdown().await.unwrap();
    let failed_ms = attempts.lock().unwrap()[0]
        .failed_ms
        .expect("attempt 1 failed");
    let backoff_ms = u64::try_from(DURABLE_POLICY.backoff(1).as_millis()).unwrap();

    // The retry's due time is in the task row (unless worker 1 already claimed attempt 2 in the
    // meantime, which the row then shows).
    let (attempt, due_at) = task_row(&path, "pay-2", 0).expect("the task row exists");
    if attempt == 1 {
        assert!(
            due_at >= failed_ms + backoff_ms,
            "retry due at {due_at}, less than {backoff_ms} ms after the failure at {failed_ms}"
        );
        assert_eq!(store.next_due().await.unwrap(), Some(due_at));
    }

    let w2 = charge_worker(
        &store,
        SLOW_RETRY,
        2,
        &attempts,
        1,
        u32::MAX,
        unavailable,
        |_: &CommitNotice| {},
    );
    let output = result_of(&handle).await.unwrap();
    let seen = attempts.lock().unwrap().clone();
    let last = seen.last().unwrap().clone();
    assert_eq!(last.worker, 2, "{seen:?}");
    assert_eq!(output, format!("charged 20 on attempt {}", last.attempt));
    assert!(
        last.started_ms >= failed_ms + backoff_ms,
        "attempt {} started before the backoff elapsed: {seen:?}",
        last.attempt
    );
    if attempt == 1 {
        // Nobody claimed the retry before worker 1 went away: worker 2 ran attempt 2, when due.
        assert_eq!(last.attempt, 2, "{seen:?}");
        assert!(last.started_ms >= due_at);
    }
    w2.shutdown().await.unwrap();
}

const NON_RETRYABLE_KINDS: RetryPolicy = RetryPolicy::new()
    .max_attempts(5)
    .initial_interval(Duration::from_millis(10))
    .non_retryable(&["declined"]);
const DECLINING: Activity<u32, String> = Activity::new("declining").with_retry(NON_RETRYABLE_KINDS);
const REFUSING: Activity<u32, String> = Activity::new("refusing").with_retry(NON_RETRYABLE_KINDS);

fn declined(n: u32) -> ActivityError {
    // Retryable as far as the activity knows; the policy says otherwise.
    ActivityError::retryable("declined", format!("card declined on attempt {n}"))
}

fn refused(n: u32) -> ActivityError {
    ActivityError::non_retryable("refused", format!("refused on attempt {n}"))
}

async fn expect_activity_failure(
    store: &SharedStore,
    activity: Activity<u32, String>,
    error: fn(u32) -> ActivityError,
    id: &str,
) -> (ActivityFailure, Vec<Attempt>) {
    let attempts = Attempts::default();
    let worker = charge_worker(
        store,
        activity,
        1,
        &attempts,
        u32::MAX,
        u32::MAX,
        error,
        |_: &CommitNotice| {},
    );
    let client = Client::new(store.clone());
    let handle = client.start(&CHARGE, id, &1).await.unwrap();
    let failure = match result_of(&handle).await {
        Err(ClientError::Failed {
            error: Error::Activity(f),
            ..
        }) => f,
        other => panic!("{id}: expected an activity failure, got {other:?}"),
    };
    let history = client.history(id).await.unwrap();
    assert_well_formed(&history);
    assert_eq!(
        kinds(&history)
            .into_iter()
            .filter(|k| *k != "patches_pinned")
            .collect::<Vec<_>>(),
        vec![
            "instance_started",
            "activity_scheduled",
            "activity_failed",
            "instance_failed"
        ]
    );
    assert!(history.iter().any(|e| e.event
        == Event::ActivityFailed {
            seq: 0,
            failure: failure.clone()
        }));
    let info = client.describe(id).await.unwrap();
    assert_eq!(info.status, InstanceStatus::Failed);
    assert_eq!(info.error, Some(Error::Activity(failure.clone())));
    worker.shutdown().await.unwrap();
    let seen = attempts.lock().unwrap().clone();
    (failure, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_errors_stop_retries_at_once() {
    init_tracing();
    let dir = TempDir::new("retry-non-retryable");
    let store = open_store(&dir.file("store.db"));

    // A kind the policy lists as non-retryable, though the activity says it may be retried.
    let (failure, seen) =
        expect_activity_failure(&store, DECLINING, declined, "pay-declined").await;
    assert_eq!(seen.iter().map(|a| a.attempt).collect::<Vec<_>>(), vec![1]);
    assert_eq!(
        failure,
        ActivityFailure {
            activity: "declining".into(),
            position: 0,
            attempt: 1,
            kind: "declined".into(),
            message: "card declined on attempt 1".into(),
            non_retryable: true,
        }
    );
    let text = failure.to_string();
    assert!(
        text.contains("attempt 1") && text.contains("non-retryable"),
        "{text}"
    );

    // An error the activity itself marks non-retryable.
    let (failure, seen) = expect_activity_failure(&store, REFUSING, refused, "pay-refused").await;
    assert_eq!(seen.iter().map(|a| a.attempt).collect::<Vec<_>>(), vec![1]);
    assert_eq!(failure.attempt, 1);
    assert_eq!(failure.kind, "refused");
    assert!(failure.non_retryable);
}

const THREE_TRIES: RetryPolicy = RetryPolicy::new()
    .max_attempts(3)
    .initial_interval(Duration::from_millis(20))
    .backoff_coefficient(2.0);
const ALWAYS_DOWN: Activity<u32, String> = Activity::new("always_down").with_retry(THREE_TRIES);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausting_max_attempts_fails_with_the_last_attempt_and_its_error() {
    init_tracing();
    let dir = TempDir::new("retry-exhausted");
    let store = open_store(&dir.file("store.db"));
    let (failure, seen) =
        expect_activity_failure(&store, ALWAYS_DOWN, unavailable, "pay-exhausted").await;
    assert_eq!(
        seen.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_backoffs_respected(&seen, &THREE_TRIES);
    assert_eq!(
        failure,
        ActivityFailure {
            activity: "always_down".into(),
            position: 0,
            attempt: 3,
            kind: "unavailable".into(),
            message: "attempt 3: service unavailable".into(),
            non_retryable: false,
        }
    );
    let text = failure.to_string();
    assert!(
        text.contains("always_down")
            && text.contains("attempt 3")
            && text.contains("attempts exhausted")
            && text.contains("service unavailable"),
        "the error does not say which attempt failed and why: {text}"
    );
}

const FOREVER_POLICY: RetryPolicy = RetryPolicy::new()
    .max_attempts(3)
    .initial_interval(Duration::MAX)
    .max_interval(Duration::MAX);
const PATIENT: Activity<u32, String> = Activity::new("patient").with_retry(FOREVER_POLICY);

/// A backoff too large for a millisecond clock is "much later": the retry's due time is the
/// latest the store can hold, not a wrapped one that is due at once (nor a panic that would
/// leave the call leased for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enormous_backoff_waits_instead_of_retrying_at_once() {
    let dir = TempDir::new("retry-enormous");
    let db = dir.file("store.db");
    let store = open_store(&db);
    let client = Client::new(store.clone());
    let attempts = Attempts::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let w = charge_worker(
        &store,
        PATIENT,
        1,
        &attempts,
        1,
        u32::MAX,
        unavailable,
        move |n| {
            if let CommitNotice::ActivityOutcome {
                is_final: false, ..
            } = n
            {
                let _ = tx.send(());
            }
        },
    );
    client.start(&CHARGE, "enormous", &1).await.unwrap();
    recv(&mut rx, "the failed attempt to be recorded").await;
    let (attempt, due_at) = task_row(&db, "enormous", 0).expect("the call waits in its row");
    assert_eq!(attempt, 1);
    assert!(
        due_at > now_ms() + 1_000 * 3600 * 24 * 365,
        "due at {due_at}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(attempts.lock().unwrap().len(), 1, "retried at once");
    w.shutdown().await.unwrap();
}
