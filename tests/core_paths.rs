//! The core paths of a coordinator over the SQLite event log, end to end through a worker and
//! a client:
//! - the happy path journals exactly the expected typed events, in order and in activations, and
//!   `describe` reports the completed instance with its timestamps;
//! - the compensation path (a non-retryable failure) runs the saga's compensations in reverse
//!   order, each as a journaled activity call;
//! - starting an existing id returns that instance and never starts a second run; another
//!   coordinator name for that id is a `CoordinatorMismatch`;
//! - a coordinator awaiting two activities with `futures::join!` completes, its history replays
//!   without a database, and replay re-delivers the completions in their recorded arrival order
//!   (a history with that order swapped is reported as nondeterministic);
//! - a completed activity is never executed again when a new worker resumes the instance;
//! - every attempt of an activity call gets the same idempotency key `"{instance_id}/{position}"`.
//!
//! All of it holds with the coordinator cache on and off (`RETRACE_COORDINATOR_CACHE=off`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use retrace::sdk::coordinator_fn;
use retrace::{
    replay_history, Activity, ActivityContext, ActivityError, Client, ClientError, CommitNotice,
    Context, Coordinator, Error, Event, HistoryEvent, InstanceStatus, ListFilter, ReplayError,
    RetryPolicy, Saga, SharedStore, Worker,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

// ----- the trip saga -----------------------------------------------------------------------------

const QUICK: RetryPolicy = RetryPolicy::new()
    .max_attempts(5)
    .initial_interval(Duration::from_millis(10))
    .non_retryable(&["refused"]);

const RESERVE_CAR: Activity<String, String> = Activity::new("reserve_car").with_retry(QUICK);
const BOOK_HOTEL: Activity<String, String> = Activity::new("book_hotel").with_retry(QUICK);
const BOOK_FLIGHT: Activity<String, String> = Activity::new("book_flight").with_retry(QUICK);
const CANCEL_CAR: Activity<String, ()> = Activity::new("cancel_car").with_retry(QUICK);
const CANCEL_HOTEL: Activity<String, ()> = Activity::new("cancel_hotel").with_retry(QUICK);

const TRIP: Coordinator<String, String> = Coordinator::new("trip");
const NOT_TRIP: Coordinator<String, String> = Coordinator::new("not_trip");

/// Books car, hotel and flight; a flight refused for good cancels hotel, then car.
async fn trip(ctx: Context, who: String) -> Result<String, Error> {
    let mut saga = Saga::new();
    let car = ctx.call(&RESERVE_CAR, &who).await?;
    saga.add(&CANCEL_CAR, &car)?;
    let hotel = match ctx.call(&BOOK_HOTEL, &who).await {
        Ok(h) => h,
        Err(e) => return Err(saga.fail(&ctx, e).await),
    };
    saga.add(&CANCEL_HOTEL, &hotel)?;
    match ctx.call(&BOOK_FLIGHT, &who).await {
        Ok(flight) => Ok(format!("{car}+{hotel}+{flight}")),
        Err(e) => Err(saga.fail(&ctx, e).await),
    }
}

/// Every activity execution, as `"name(input)"`, in execution order.
type ExecLog = Arc<Mutex<Vec<String>>>;

fn log(log: &ExecLog, name: &str, input: &str) {
    log.lock().unwrap().push(format!("{name}({input})"));
}

/// A worker running the trip saga. The airline refuses travellers whose name starts with
/// `refused`.
fn trip_worker(store: &SharedStore, exec: &ExecLog) -> Worker {
    let (l1, l2, l3, l4, l5) = (
        exec.clone(),
        exec.clone(),
        exec.clone(),
        exec.clone(),
        exec.clone(),
    );
    Worker::builder(store.clone())
        .coordinator(&TRIP, trip)
        .activity(&RESERVE_CAR, move |_ctx: ActivityContext, who: String| {
            let l = l1.clone();
            async move {
                log(&l, "reserve_car", &who);
                Ok::<_, ActivityError>(format!("car:{who}"))
            }
        })
        .activity(&BOOK_HOTEL, move |_ctx: ActivityContext, who: String| {
            let l = l2.clone();
            async move {
                log(&l, "book_hotel", &who);
                Ok::<_, ActivityError>(format!("hotel:{who}"))
            }
        })
        .activity(&BOOK_FLIGHT, move |_ctx: ActivityContext, who: String| {
            let l = l3.clone();
            async move {
                log(&l, "book_flight", &who);
                if who.starts_with("refused") {
                    return Err(ActivityError::non_retryable(
                        "refused",
                        format!("no seats for {who}"),
                    ));
                }
                Ok(format!("flight:{who}"))
            }
        })
        .activity(&CANCEL_CAR, move |_ctx: ActivityContext, car: String| {
            let l = l4.clone();
            async move {
                log(&l, "cancel_car", &car);
                Ok::<_, ActivityError>(())
            }
        })
        .activity(
            &CANCEL_HOTEL,
            move |_ctx: ActivityContext, hotel: String| {
                let l = l5.clone();
                async move {
                    log(&l, "cancel_hotel", &hotel);
                    Ok::<_, ActivityError>(())
                }
            },
        )
        .start()
}

fn scheduled_event(seq: u32, def: &Activity<String, String>, input: &str) -> Event {
    Event::ActivityScheduled {
        seq,
        name: def.name().to_string(),
        input: input.into(),
        retry: def.retry().spec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_journals_the_expected_events_and_describes_the_instance() {
    init_tracing();
    let dir = TempDir::new("happy");
    let store = open_store(&dir.file("store.db"));
    let exec = ExecLog::default();
    let worker = trip_worker(&store, &exec);
    let client = Client::new(store.clone());

    let before = now_ms();
    let handle = client
        .start(&TRIP, "trip-alice", &"alice".to_string())
        .await
        .unwrap();
    let output = result_of(&handle).await.unwrap();
    let after = now_ms();
    assert_eq!(output, "car:alice+hotel:alice+flight:alice");

    let history = client.history("trip-alice").await.unwrap();
    assert_well_formed(&history);
    let expected = vec![
        Event::InstanceStarted {
            coordinator: "trip".into(),
            input: "alice".into(),
            parent: None,
        },
        // The coordinator declares no patches; the run pins that at its start.
        Event::PatchesPinned { patches: vec![] },
        scheduled_event(0, &RESERVE_CAR, "alice"),
        Event::ActivityCompleted {
            seq: 0,
            output: "car:alice".into(),
            attempt: 1,
        },
        scheduled_event(1, &BOOK_HOTEL, "alice"),
        Event::ActivityCompleted {
            seq: 1,
            output: "hotel:alice".into(),
            attempt: 1,
        },
        scheduled_event(2, &BOOK_FLIGHT, "alice"),
        Event::ActivityCompleted {
            seq: 2,
            output: "flight:alice".into(),
            attempt: 1,
        },
        Event::InstanceCompleted {
            output: "car:alice+hotel:alice+flight:alice".into(),
        },
    ];
    assert_eq!(events(&history), expected);
    // One activation per delivered batch: the start, then each activity's completion.
    assert_eq!(
        batches(&history),
        vec![
            vec!["instance_started", "patches_pinned", "activity_scheduled"],
            vec!["activity_completed", "activity_scheduled"],
            vec!["activity_completed", "activity_scheduled"],
            vec!["activity_completed", "instance_completed"],
        ]
    );
    for e in &history {
        assert!(
            (before..=after).contains(&e.recorded_at_ms),
            "event {} recorded at {} outside [{before}, {after}]",
            e.position,
            e.recorded_at_ms
        );
    }

    let info = client.describe("trip-alice").await.unwrap();
    assert_eq!(info.id, "trip-alice");
    assert_eq!(info.coordinator, "trip");
    assert_eq!(info.status, InstanceStatus::Completed);
    assert_eq!(info.input, serde_json::json!("alice"));
    assert_eq!(
        info.output,
        Some(serde_json::json!("car:alice+hotel:alice+flight:alice"))
    );
    assert_eq!(info.error, None);
    assert_eq!(info.next_position, history.len() as u64);
    assert!(info.next_activation > history.last().unwrap().activation);
    let ended = info
        .ended_at_ms
        .expect("a completed instance has an end time");
    assert!(
        before <= info.created_at_ms,
        "created before the start call"
    );
    assert!(info.created_at_ms <= ended, "ended before it was created");
    assert!(info.created_at_ms <= info.updated_at_ms);
    assert!(ended <= after, "ended after the result was seen");
    assert!(info.updated_at_ms <= after);

    assert_eq!(
        *exec.lock().unwrap(),
        vec![
            "reserve_car(alice)",
            "book_hotel(alice)",
            "book_flight(alice)"
        ]
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_failure_compensates_in_reverse_order() {
    init_tracing();
    let dir = TempDir::new("compensate");
    let store = open_store(&dir.file("store.db"));
    let exec = ExecLog::default();
    let worker = trip_worker(&store, &exec);
    let client = Client::new(store.clone());

    let handle = client
        .start(&TRIP, "trip-bob", &"refused-bob".to_string())
        .await
        .unwrap();
    let err = result_of(&handle).await.unwrap_err();
    let failure = match err {
        ClientError::Failed {
            instance_id,
            error: Error::Activity(failure),
        } => {
            assert_eq!(instance_id, "trip-bob");
            failure
        }
        other => panic!("expected the flight's failure, got {other:?}"),
    };
    assert_eq!(failure.activity, "book_flight");
    assert_eq!(failure.position, 2);
    assert_eq!(failure.attempt, 1, "a non-retryable error is not retried");
    assert_eq!(failure.kind, "refused");
    assert_eq!(failure.message, "no seats for refused-bob");
    assert!(failure.non_retryable);

    let history = client.history("trip-bob").await.unwrap();
    assert_well_formed(&history);
    assert_eq!(
        scheduled(&history),
        vec![
            (0, "reserve_car".to_string()),
            (1, "book_hotel".to_string()),
            (2, "book_flight".to_string()),
            (4, "cancel_hotel".to_string()),
            (5, "cancel_car".to_string()),
        ],
        "compensations run in reverse order: hotel, then car"
    );
    // Position 3 marks them shielded from a cancellation (see `Saga::compensate`).
    assert!(history.iter().any(|e| matches!(
        &e.event,
        Event::PatchMarker { seq: 3, patch } if patch == "retrace.shielded-compensations"
    )));
    // Each compensation undoes what its step returned.
    let inputs: Vec<(String, serde_json::Value)> = history
        .iter()
        .filter_map(|e| match &e.event {
            Event::ActivityScheduled {
                seq, name, input, ..
            } if *seq >= 3 => Some((name.clone(), input.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        inputs,
        vec![
            (
                "cancel_hotel".to_string(),
                serde_json::json!("hotel:refused-bob")
            ),
            (
                "cancel_car".to_string(),
                serde_json::json!("car:refused-bob")
            ),
        ]
    );
    // The compensations ran (and completed) after the failure was journaled.
    let failed_at = history
        .iter()
        .position(|e| matches!(e.event, Event::ActivityFailed { seq: 2, .. }))
        .expect("the flight's failure is journaled");
    let hotel_cancel_at = history
        .iter()
        .position(|e| matches!(e.event, Event::ActivityScheduled { seq: 4, .. }))
        .unwrap();
    assert!(failed_at < hotel_cancel_at);
    for seq in [4, 5] {
        assert!(
            history.iter().any(|e| matches!(
                e.event,
                Event::ActivityCompleted { seq: s, attempt: 1, .. } if s == seq
            )),
            "compensation {seq} completed"
        );
    }
    assert_eq!(
        terminal(&history),
        Some(&Event::InstanceFailed {
            error: Error::Activity(failure.clone())
        })
    );

    let info = client.describe("trip-bob").await.unwrap();
    assert_eq!(info.status, InstanceStatus::Failed);
    assert_eq!(info.error, Some(Error::Activity(failure)));
    assert_eq!(info.output, None);
    assert!(info.ended_at_ms.is_some());

    assert_eq!(
        *exec.lock().unwrap(),
        vec![
            "reserve_car(refused-bob)",
            "book_hotel(refused-bob)",
            "book_flight(refused-bob)",
            "cancel_hotel(hotel:refused-bob)",
            "cancel_car(car:refused-bob)",
        ]
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_an_existing_id_returns_that_instance_and_never_runs_twice() {
    init_tracing();
    let dir = TempDir::new("idempotent-start");
    let store = open_store(&dir.file("store.db"));
    let exec = ExecLog::default();
    let worker = trip_worker(&store, &exec);
    let client = Client::new(store.clone());

    // Twice in a row, the second time with another input: the first input stands.
    let first = client
        .start(&TRIP, "trip-carol", &"carol".to_string())
        .await
        .unwrap();
    let second = client
        .start(&TRIP, "trip-carol", &"mallory".to_string())
        .await
        .unwrap();
    assert_eq!(first.id(), second.id());
    let expected = "car:carol+hotel:carol+flight:carol".to_string();
    assert_eq!(result_of(&first).await.unwrap(), expected);
    assert_eq!(result_of(&second).await.unwrap(), expected);

    // Once more after it completed: the completed instance, not a new run.
    let third = client
        .start(&TRIP, "trip-carol", &"carol".to_string())
        .await
        .unwrap();
    assert_eq!(result_of(&third).await.unwrap(), expected);

    // Two concurrent starts of a new id: one instance.
    let dave = "dave".to_string();
    let (a, b) = futures::join!(
        client.start(&TRIP, "trip-dave", &dave),
        client.start(&TRIP, "trip-dave", &dave),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(result_of(&a).await.unwrap(), result_of(&b).await.unwrap());

    // Another coordinator under an existing id is refused, and changes nothing.
    let history_before = client.history("trip-carol").await.unwrap();
    match client
        .start(&NOT_TRIP, "trip-carol", &"carol".to_string())
        .await
    {
        Err(ClientError::CoordinatorMismatch {
            instance_id,
            expected,
            found,
        }) => {
            assert_eq!(instance_id, "trip-carol");
            assert_eq!(expected, "not_trip");
            assert_eq!(found, "trip");
        }
        other => panic!("expected CoordinatorMismatch, got {other:?}"),
    }
    assert_eq!(client.history("trip-carol").await.unwrap(), history_before);

    for id in ["trip-carol", "trip-dave"] {
        let history = client.history(id).await.unwrap();
        assert_well_formed(&history);
        let starts = history
            .iter()
            .filter(|e| matches!(e.event, Event::InstanceStarted { .. }))
            .count();
        assert_eq!(starts, 1, "{id} was started once");
    }
    assert_eq!(
        client.describe("trip-carol").await.unwrap().input,
        serde_json::json!("carol")
    );
    let all = client.list(&ListFilter::default()).await.unwrap();
    let mut ids: Vec<&str> = all.iter().map(|i| i.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["trip-carol", "trip-dave"]);

    // Each activity ran once per instance: one run each.
    let mut ran = exec.lock().unwrap().clone();
    ran.sort();
    assert_eq!(
        ran,
        vec![
            "book_flight(carol)",
            "book_flight(dave)",
            "book_hotel(carol)",
            "book_hotel(dave)",
            "reserve_car(carol)",
            "reserve_car(dave)",
        ]
    );
    worker.shutdown().await.unwrap();
}

// ----- join! ---------------------------------------------------------------------------------------

const LEFT: Activity<u32, u32> = Activity::new("left");
const RIGHT: Activity<u32, u32> = Activity::new("right");
const FINISH_LEFT_FIRST: Activity<Vec<String>, String> = Activity::new("finish_left_first");
const FINISH_RIGHT_FIRST: Activity<Vec<String>, String> = Activity::new("finish_right_first");
const FORK: Coordinator<u32, String> = Coordinator::new("fork");

/// What each run of the coordinator saw: the order in which the two branches of its `join!`
/// resolved (one entry per run that reached the end).
type Seen = Arc<Mutex<Vec<Vec<String>>>>;

/// Awaits two activities with `join!`. Which activity it calls next depends on which branch
/// resolved first, so that a replay delivering the completions in another order diverges.
async fn fork(ctx: Context, n: u32, seen: Seen) -> Result<String, Error> {
    let order = Mutex::new(Vec::<String>::new());
    let left = async {
        let v = ctx.call(&LEFT, &n).await?;
        order.lock().unwrap().push("left".to_string());
        Ok::<u32, Error>(v)
    };
    let right = async {
        let v = ctx.call(&RIGHT, &n).await?;
        order.lock().unwrap().push("right".to_string());
        Ok::<u32, Error>(v)
    };
    let (l, r) = futures::join!(left, right);
    let (l, r) = (l?, r?);
    let order = order.into_inner().unwrap();
    let finish = if order.first().map(String::as_str) == Some("left") {
        &FINISH_LEFT_FIRST
    } else {
        &FINISH_RIGHT_FIRST
    };
    let tag = ctx.call(finish, &order).await?;
    seen.lock().unwrap().push(order);
    Ok(format!("{tag}:{}", l + r))
}

fn fork_fn(seen: &Seen) -> retrace::sdk::CoordinatorFn {
    let seen = seen.clone();
    coordinator_fn(&FORK, move |ctx, n| fork(ctx, n, seen.clone()))
}

/// A worker for `fork` whose `left` (or `right`, when `gate_left` is false) activity waits for
/// `gate` before answering.
fn fork_worker(
    store: &SharedStore,
    seen: &Seen,
    gate: &Arc<Notify>,
    gate_left: bool,
    observer: impl Fn(&CommitNotice) + Send + Sync + 'static,
) -> Worker {
    let seen = seen.clone();
    let (g1, g2) = (gate.clone(), gate.clone());
    Worker::builder(store.clone())
        .coordinator(&FORK, move |ctx, n| fork(ctx, n, seen.clone()))
        .activity(&LEFT, move |_ctx: ActivityContext, n: u32| {
            let g = g1.clone();
            async move {
                if gate_left {
                    g.notified().await;
                }
                Ok::<_, ActivityError>(n + 1)
            }
        })
        .activity(&RIGHT, move |_ctx: ActivityContext, n: u32| {
            let g = g2.clone();
            async move {
                if !gate_left {
                    g.notified().await;
                }
                Ok::<_, ActivityError>(n * 10)
            }
        })
        .activity(
            &FINISH_LEFT_FIRST,
            |_ctx: ActivityContext, _o: Vec<String>| async {
                Ok::<_, ActivityError>("left-first".to_string())
            },
        )
        .activity(
            &FINISH_RIGHT_FIRST,
            |_ctx: ActivityContext, _o: Vec<String>| async {
                Ok::<_, ActivityError>("right-first".to_string())
            },
        )
        .on_commit(observer)
        .start()
}

/// Runs `fork` with one branch held back until the other's completion was delivered in its own
/// activation, and returns the recorded history.
async fn run_fork(id: &str, gate_left: bool) -> (Vec<HistoryEvent>, String, Vec<Vec<String>>) {
    let dir = TempDir::new("join");
    let store = open_store(&dir.file("store.db"));
    let seen = Seen::default();
    let gate = Arc::new(Notify::new());
    let (observer, mut commits) = commit_channel();
    let worker = fork_worker(&store, &seen, &gate, gate_left, observer);
    let client = Client::new(store.clone());

    let handle = client.start(&FORK, id, &4).await.unwrap();
    // Hold the gated branch back until the free branch's completion is in history.
    loop {
        let history = client.history(id).await.unwrap();
        if history
            .iter()
            .any(|e| matches!(e.event, Event::ActivityCompleted { .. }))
        {
            break;
        }
        wait_for_notice(&mut commits, "an activation", |n| {
            matches!(n, CommitNotice::Activation { .. })
        })
        .await;
    }
    gate.notify_one();
    let output = result_of(&handle).await.unwrap();
    let history = client.history(id).await.unwrap();
    worker.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    (history, output, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_of_two_activities_completes_and_replays_in_recorded_arrival_order() {
    init_tracing();
    for (gate_left, first, second, finish, output) in [
        (
            true,
            "right",
            "left",
            "finish_right_first",
            "right-first:45",
        ),
        (false, "left", "right", "finish_left_first", "left-first:45"),
    ] {
        let id = format!("fork-{first}-first");
        let (history, out, seen_live) = run_fork(&id, gate_left).await;
        assert_eq!(out, output);
        assert_well_formed(&history);
        assert!(!seen_live.is_empty());
        for order in &seen_live {
            assert_eq!(order, &vec![first.to_string(), second.to_string()]);
        }

        // Both calls are issued in program order in the first activation; the completions
        // arrive in separate activations, in the order they happened.
        let first_seq = if first == "left" { 0 } else { 1 };
        let second_seq = 1 - first_seq;
        assert_eq!(
            batches(&history),
            vec![
                vec![
                    "instance_started",
                    "patches_pinned",
                    "activity_scheduled",
                    "activity_scheduled"
                ],
                vec!["activity_completed"],
                vec!["activity_completed", "activity_scheduled"],
                vec!["activity_completed", "instance_completed"],
            ]
        );
        assert_eq!(
            scheduled_names(&history),
            vec!["left".to_string(), "right".to_string(), finish.to_string()]
        );
        let completions: Vec<usize> = history
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                matches!(e.event, Event::ActivityCompleted { seq, .. } if seq == 0 || seq == 1)
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(completions.len(), 2);
        let (i, j) = (completions[0], completions[1]);
        assert_eq!(history[i].event.seq(), Some(first_seq));
        assert_eq!(history[j].event.seq(), Some(second_seq));

        // Replay without a database: the same commands, and the branches resolve in the
        // recorded order.
        let seen_replay = Seen::default();
        replay_history(&id, fork_fn(&seen_replay), &history)
            .unwrap_or_else(|e| panic!("{id} does not replay: {e}"));
        assert_eq!(
            *seen_replay.lock().unwrap(),
            vec![vec![first.to_string(), second.to_string()]],
            "replay resolves the join in the recorded arrival order"
        );

        // The same history with the arrival order swapped makes the code take the other path:
        // replay follows the history's order, not the order the futures were created in.
        let mut swapped = history.clone();
        let (a, b) = (swapped[i].event.clone(), swapped[j].event.clone());
        swapped[i].event = b;
        swapped[j].event = a;
        match replay_history(&id, fork_fn(&Seen::default()), &swapped) {
            Err(ReplayError::Nondeterminism(nd)) => {
                assert_eq!(nd.instance_id, id);
                assert_eq!(nd.position, 2);
                assert_eq!(nd.recorded, format!("activity {finish}"));
                assert_ne!(nd.requested, nd.recorded);
            }
            other => panic!("a swapped arrival order must diverge, got {other:?}"),
        }
    }
}

// ----- resuming on a new worker ----------------------------------------------------------------

const FIRST: Activity<String, String> = Activity::new("first");
const SECOND: Activity<String, String> = Activity::new("second");
const TWO_STEPS: Coordinator<String, String> = Coordinator::new("two_steps");

async fn two_steps(ctx: Context, input: String) -> Result<String, Error> {
    let a = ctx.call(&FIRST, &input).await?;
    ctx.call(&SECOND, &a).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_activity_is_not_executed_again_by_a_new_worker() {
    init_tracing();
    let dir = TempDir::new("resume");
    let path = dir.file("store.db");
    let first_runs = Arc::new(AtomicUsize::new(0));

    // Worker 1 completes `first`, then starts `second`, which never answers.
    let store1 = open_store(&path);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let runs = first_runs.clone();
    let worker1 = Worker::builder(store1.clone())
        .coordinator(&TWO_STEPS, two_steps)
        .activity(&FIRST, move |_ctx: ActivityContext, s: String| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ActivityError>(format!("first({s})"))
            }
        })
        .activity(&SECOND, move |ctx: ActivityContext, _s: String| {
            let tx = started_tx.clone();
            async move {
                let _ = tx.send(ctx.attempt());
                futures::future::pending::<Result<String, ActivityError>>().await
            }
        })
        .start();
    Client::new(store1.clone())
        .start(&TWO_STEPS, "steps-1", &"x".to_string())
        .await
        .unwrap();
    assert_eq!(recv(&mut started, "second's first attempt").await, 1);
    worker1.shutdown().await.unwrap();
    assert_eq!(first_runs.load(Ordering::SeqCst), 1);

    // Worker 2, on a store opened anew (as a new process would), resumes by replay.
    let store2 = open_store(&path);
    let runs = first_runs.clone();
    let (attempt_tx, mut attempts) = mpsc::unbounded_channel();
    let worker2 = Worker::builder(store2.clone())
        .coordinator(&TWO_STEPS, two_steps)
        .activity(&FIRST, move |_ctx: ActivityContext, s: String| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ActivityError>(format!("first({s})"))
            }
        })
        .activity(&SECOND, move |ctx: ActivityContext, s: String| {
            let tx = attempt_tx.clone();
            async move {
                let _ = tx.send(ctx.attempt());
                Ok::<_, ActivityError>(format!("second({s})"))
            }
        })
        .start();
    let client2 = Client::new(store2.clone());
    let output = result_of(&client2.handle(&TWO_STEPS, "steps-1"))
        .await
        .unwrap();
    assert_eq!(output, "second(first(x))");
    assert_eq!(
        first_runs.load(Ordering::SeqCst),
        1,
        "the completed activity ran again"
    );
    // The abandoned attempt of `second` counts: the new worker runs attempt 2.
    assert_eq!(recv(&mut attempts, "second's attempt on worker 2").await, 2);

    let history = client2.history("steps-1").await.unwrap();
    assert_well_formed(&history);
    assert_eq!(scheduled_names(&history), vec!["first", "second"]);
    let completions: Vec<(u32, u32)> = history
        .iter()
        .filter_map(|e| match e.event {
            Event::ActivityCompleted { seq, attempt, .. } => Some((seq, attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(completions, vec![(0, 1), (1, 2)]);
    worker2.shutdown().await.unwrap();
}

// ----- idempotency key ---------------------------------------------------------------------------

const PREPARE: Activity<u32, u32> = Activity::new("prepare");
const CHARGE: Activity<u32, String> = Activity::new("charge").with_retry(
    RetryPolicy::new()
        .max_attempts(5)
        .initial_interval(Duration::from_millis(10))
        .backoff_coefficient(1.0),
);
const PAY: Coordinator<u32, String> = Coordinator::new("pay");

async fn pay(ctx: Context, amount: u32) -> Result<String, Error> {
    let amount = ctx.call(&PREPARE, &amount).await?;
    ctx.call(&CHARGE, &amount).await
}

/// What an attempt of `charge` saw: attempt, idempotency key, instance id, position.
type KeySeen = (u32, String, String, u32);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_gets_the_same_idempotency_key() {
    init_tracing();
    let dir = TempDir::new("idempotency-key");
    let store = open_store(&dir.file("store.db"));
    let seen: Arc<Mutex<Vec<KeySeen>>> = Arc::default();
    let s = seen.clone();
    let worker = Worker::builder(store.clone())
        .coordinator(&PAY, pay)
        .activity(&PREPARE, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n)
        })
        .activity(&CHARGE, move |ctx: ActivityContext, n: u32| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push((
                    ctx.attempt(),
                    ctx.idempotency_key(),
                    ctx.instance_id().to_string(),
                    ctx.position(),
                ));
                if ctx.attempt() < 3 {
                    return Err(ActivityError::retryable("timeout", "no answer"));
                }
                Ok(format!("charged {n} under {}", ctx.idempotency_key()))
            }
        })
        .start();
    let client = Client::new(store.clone());
    let handle = client.start(&PAY, "pay-7", &70).await.unwrap();
    assert_eq!(
        result_of(&handle).await.unwrap(),
        "charged 70 under pay-7/1"
    );

    let seen = seen.lock().unwrap().clone();
    let key = "pay-7/1".to_string();
    assert_eq!(
        seen,
        vec![
            (1, key.clone(), "pay-7".to_string(), 1),
            (2, key.clone(), "pay-7".to_string(), 1),
            (3, key, "pay-7".to_string(), 1),
        ]
    );
    let history = client.history("pay-7").await.unwrap();
    assert!(history.iter().any(|e| matches!(
        e.event,
        Event::ActivityCompleted {
            seq: 1,
            attempt: 3,
            ..
        }
    )));
    worker.shutdown().await.unwrap();
}

// ----- a restarted worker of the same name -----------------------------------------------------

const STALL: Activity<u32, u32> = Activity::new("stall");
const STALLING: Coordinator<u32, u32> = Coordinator::new("stalling");

async fn stalling(ctx: Context, n: u32) -> Result<u32, Error> {
    ctx.call(&STALL, &n).await
}

/// Calls of `stall` so far: the first never answers (its worker "crashes" meanwhile).
static STALL_CALLS: AtomicUsize = AtomicUsize::new(0);

fn named_worker(store: SharedStore) -> Worker {
    Worker::builder(store)
        .worker_id("main")
        .lease(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(20))
        .coordinator(&STALLING, stalling)
        .activity(&STALL, |_ctx: ActivityContext, n: u32| async move {
            if STALL_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
                futures::future::pending::<()>().await;
            }
            Ok::<_, ActivityError>(n + 1)
        })
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_under_its_name_takes_over_what_its_crashed_run_held() {
    init_tracing();
    let dir = TempDir::new("same-name");
    let store = open_store(&dir.file("store.db"));
    let client = Client::new(store.clone());
    let first = named_worker(store.clone());
    let handle = client.start(&STALLING, "stalled", &1).await.unwrap();
    within("the first attempt to start", async {
        while STALL_CALLS.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The first run stops without handing its leases back, as a crash would.
    let first_id = first.id().to_string();
    drop(first);

    // Same name, new run: it must not renew the crashed run's lease on the call as its own.
    let second = named_worker(store.clone());
    assert!(second.id().starts_with("main-"), "{}", second.id());
    assert_ne!(second.id(), first_id);
    assert_eq!(result_of(&handle).await.unwrap(), 2);
    assert_eq!(
        STALL_CALLS.load(Ordering::SeqCst),
        2,
        "one retry after the lease expired"
    );
    second.shutdown().await.unwrap();
}
