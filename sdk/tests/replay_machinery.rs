//! The replay machinery without a database: recorded histories replay identically, recorded
//! outcomes are returned instead of re-running activities, divergences are reported as
//! nondeterminism, malformed histories as corruption, and races resolve as in the first run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures::{pin_mut, select_biased, FutureExt};
use retrace_sdk::{
    coordinator_fn, replay_history, Activity, Context, Coordinator, CoordinatorFn, Error, Event,
    EventFamily, Execution, HistoryEvent, Nondeterminism, ReplayError, Saga,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

// ----- definitions shared by the tests -----

const RESERVE_CAR: Activity<String, String> = Activity::new("reserve_car");
const BOOK_HOTEL: Activity<String, String> = Activity::new("book_hotel");
const BOOK_FLIGHT: Activity<String, String> = Activity::new("book_flight");
const UPGRADE_HOTEL: Activity<String, String> = Activity::new("upgrade_hotel");
const RENT_BIKE: Activity<String, String> = Activity::new("rent_bike");
const CANCEL_CAR: Activity<String, ()> = Activity::new("cancel_car");
const CANCEL_HOTEL: Activity<String, ()> = Activity::new("cancel_hotel");
const NOTIFY: Activity<String, ()> = Activity::new("notify");
const RECORD: Activity<String, ()> = Activity::new("record");
const GATE: Activity<(), ()> = Activity::new("gate");
const ADD_ONE: Activity<u64, u64> = Activity::new("add_one");
const A: Activity<u32, u32> = Activity::new("a");
const B: Activity<u32, u32> = Activity::new("b");
const C: Activity<u32, u32> = Activity::new("c");

const TRIP: Coordinator<String, Value> = Coordinator::new("trip");
const PAIR: Coordinator<u32, u32> = Coordinator::new("pair");
const RACE: Coordinator<(), String> = Coordinator::new("race");
const SIGNALS: Coordinator<usize, Value> = Coordinator::new("signals");
const SAGA: Coordinator<String, String> = Coordinator::new("saga");
const EFFECTS: Coordinator<(), Value> = Coordinator::new("effects");
const FAN_OUT: Coordinator<u64, u64> = Coordinator::new("fan_out");
const COUNTDOWN: Coordinator<u32, u32> = Coordinator::new("countdown");
const LOOP: Coordinator<(), u32> = Coordinator::new("approval_loop");

/// now (0), reserve_car (1), book_hotel (2), a 60 s timer (3), book_flight (4).
async fn trip(ctx: Context, who: String) -> Result<Value, Error> {
    ctx.set_status(&"booking")?;
    let booked_at = ctx.now_ms();
    let car = ctx.call(&RESERVE_CAR, &who).await?;
    let hotel = ctx.call(&BOOK_HOTEL, &who).await?;
    ctx.sleep(Duration::from_secs(60)).await?;
    let flight = ctx.call(&BOOK_FLIGHT, &who).await?;
    ctx.set_status(&"booked")?;
    Ok(json!({ "car": car, "hotel": hotel, "flight": flight, "booked_at": booked_at }))
}

fn trip_fn() -> CoordinatorFn {
    coordinator_fn(&TRIP, trip)
}

/// Runs `trip` live to its end.
fn trip_driver() -> Driver {
    let mut d = Driver::new("trip-1", trip_fn());
    let a0 = d.start("trip", json!("ada"));
    assert_eq!(a0.custom_status, Some(json!("booking")));
    assert_eq!(
        a0.events,
        [
            started("trip", json!("ada")),
            pinned(&[]),
            side_effect(0, "now", json!(T0)),
            scheduled(1, "reserve_car", json!("ada"))
        ]
    );
    d.advance(10);
    d.complete(1, json!("car-1"));
    d.advance(10);
    let a2 = d.complete(2, json!("hotel-1"));
    assert_eq!(a2.events[1], timer(3, T0 + 20 + 60_000));
    d.advance(60_000);
    d.fire(3);
    let last = d.complete(4, json!("flight-1"));
    assert_eq!(last.custom_status, Some(json!("booked")));
    d
}

/// `a` and `b` joined (0, 1), then `c` with their sum (2).
async fn pair(ctx: Context, n: u32) -> Result<u32, Error> {
    let (a, b) = futures::join!(ctx.call(&A, &n), ctx.call(&B, &n));
    let sum = a? + b?;
    ctx.call(&C, &sum).await
}

fn nondeterminism(result: Result<impl std::fmt::Debug, ReplayError>) -> Nondeterminism {
    match result {
        Err(ReplayError::Nondeterminism(nd)) => nd,
        other => panic!("expected a nondeterminism error, got {other:?}"),
    }
}

fn assert_corrupt(result: Result<impl std::fmt::Debug, ReplayError>, what: &str) {
    match result {
        Err(e @ ReplayError::CorruptHistory { .. }) => {
            assert!(
                e.to_string().starts_with("corrupt history of instance"),
                "{what}: {e}"
            );
        }
        other => panic!("{what}: expected CorruptHistory, got {other:?}"),
    }
}

fn activity_inputs(events: &[Event]) -> Vec<(String, Value)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ActivityScheduled { name, input, .. } => Some((name.clone(), input.clone())),
            _ => None,
        })
        .collect()
}

// ----- happy path -----

#[test]
fn happy_path_replays_identically() {
    let d = trip_driver();
    assert_eq!(
        d.output(),
        json!({ "car": "car-1", "hotel": "hotel-1", "flight": "flight-1", "booked_at": T0 })
    );
    assert_eq!(
        d.identities(),
        [
            "side effect now",
            "activity reserve_car",
            "activity book_hotel",
            "timer",
            "activity book_flight"
        ]
    );

    // The whole history replays, and the replayed execution knows it is finished.
    let mut replayed = replay_fresh("trip-1", &d.coordinator(), &d.history).unwrap();
    assert!(replayed.is_finished());
    assert_eq!(replayed.next_position(), d.history.len() as u64);
    assert_eq!(replayed.next_activation(), d.execution.next_activation());
    assert_eq!(replayed.custom_status(), Some(json!("booked")));
    // Activating a finished, replayed run issues nothing.
    let after = replayed.activate(vec![], T0 + 5_000_000, 99).unwrap();
    assert!(after.events.is_empty(), "{:?}", after.events);
    replay_history("trip-1", d.coordinator(), &d.history).unwrap();

    // Every activation is reproduced by "replay what precedes it, activate it live".
    check_every_activation_reproduces("trip-1", &d.coordinator(), &d.history).unwrap();

    // A history cut at each activation boundary replays, and activating it with nothing new
    // issues no command at all: everything the code asked for is already in history.
    for group in activations(&d.history) {
        let end = group.last().unwrap().position as usize + 1;
        let mut execution = replay_fresh("trip-1", &d.coordinator(), &d.history[..end]).unwrap();
        let idle = execution.activate(vec![], T0 + 9_999_999, 1234).unwrap();
        assert!(
            idle.events.is_empty(),
            "after position {end}: {:?}",
            idle.events
        );
    }
}

#[test]
fn a_completed_activity_is_never_rescheduled_on_replay() {
    // Recorded by an earlier run: the car was reserved with a result the live code could not
    // produce, and time was recorded as T0 - 1.
    let history = HistoryBuilder::new()
        .activation([
            started("trip", json!("ada")),
            side_effect(0, "now", json!(T0 - 1)),
            scheduled(1, "reserve_car", json!("ada")),
        ])
        .activation([
            completed(1, json!("car-from-history")),
            scheduled(2, "book_hotel", json!("ada")),
        ])
        .build();
    let mut execution = replay_fresh("trip-h", &trip_fn(), &history).unwrap();
    assert_eq!(execution.next_position(), 5);
    assert_eq!(execution.next_activation(), 2);

    let a = execution
        .activate(vec![completed(2, json!("hotel-2"))], T0 + 100, 5)
        .unwrap();
    assert_eq!(a.activation, 2);
    assert_eq!(
        a.events,
        [completed(2, json!("hotel-2")), timer(3, T0 + 100 + 60_000)]
    );
    let a = execution.activate(vec![fired(3)], T0 + 70_000, 6).unwrap();
    assert_eq!(
        a.events,
        [fired(3), scheduled(4, "book_flight", json!("ada"))]
    );
    let a = execution
        .activate(vec![completed(4, json!("flight-2"))], T0 + 80_000, 7)
        .unwrap();
    assert_eq!(
        a.terminal(),
        Some(&instance_completed(json!({
            "car": "car-from-history",
            "hotel": "hotel-2",
            "flight": "flight-2",
            "booked_at": T0 - 1
        })))
    );
    // reserve_car was never scheduled again.
    assert!(activity_inputs(&a.events).is_empty());
}

#[test]
fn a_recorded_failure_is_returned_on_replay() {
    let car_or_bike = coordinator_fn(&SAGA, |ctx: Context, who: String| async move {
        match ctx.call(&RESERVE_CAR, &who).await {
            Ok(car) => Ok(car),
            Err(Error::Activity(failure)) => {
                let bike = ctx.call(&RENT_BIKE, &who).await?;
                Ok(format!("{bike} because {failure}"))
            }
            Err(other) => Err(other),
        }
    });
    let history = HistoryBuilder::new()
        .activation([
            started("saga", json!("ada")),
            scheduled(0, "reserve_car", json!("ada")),
        ])
        .activation([
            failed(0, "reserve_car", "refused", "no cars left"),
            scheduled(1, "rent_bike", json!("ada")),
        ])
        .build();
    let mut execution = replay_fresh("bike-1", &car_or_bike, &history).unwrap();
    let a = execution
        .activate(vec![completed(1, json!("bike-7"))], T0, 0)
        .unwrap();
    assert_eq!(
        a.terminal(),
        Some(&instance_completed(json!(
            "bike-7 because activity reserve_car at position 0 failed on attempt 1 \
             (non-retryable): refused: no cars left"
        )))
    );

    // Uncaught, the recorded failure becomes the instance's failure, identically on replay.
    let mut d = Driver::new("trip-f", trip_fn());
    d.start("trip", json!("ada"));
    let a = d.fail(1, "refused", "no cars");
    let Some(Event::InstanceFailed {
        error: Error::Activity(failure),
    }) = a.terminal()
    else {
        panic!("expected an activity failure, got {:?}", a.terminal());
    };
    assert_eq!(
        (failure.activity.as_str(), failure.position),
        ("reserve_car", 1)
    );
    check_every_activation_reproduces("trip-f", &d.coordinator(), &d.history).unwrap();
}

// ----- nondeterminism -----

#[test]
fn a_panicking_coordinator_is_reported_as_an_error_not_propagated() {
    // Panics on its first poll.
    let at_start = coordinator_fn(&PAIR, |_ctx: Context, n: u32| async move {
        if n > 0 {
            panic!("bad input {n}");
        }
        Ok(n)
    });
    let mut d = Driver::new("pair-panics", at_start);
    match d.try_activate(vec![started("pair", json!(7))]) {
        Err(e @ ReplayError::Panicked { position: 0, .. }) => {
            let text = e.to_string();
            for part in ["pair-panics", "panicked", "position 0", "bad input 7"] {
                assert!(text.contains(part), "{text:?} lacks {part:?}");
            }
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert!(
        d.history.is_empty(),
        "nothing of the activation is recorded"
    );

    // Panics after its first call returned (a formatted message), live and on replay.
    let after_call = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let a = ctx.call(&A, &n).await?;
        let parts: Vec<u32> = Vec::new();
        Ok(a + parts[a as usize])
    });
    let mut d = Driver::new("pair-later", after_call.clone());
    d.start("pair", json!(1));
    match d.try_activate(vec![completed(0, json!(2))]) {
        Err(ReplayError::Panicked {
            instance_id,
            message,
            position,
        }) => {
            assert_eq!(instance_id, "pair-later");
            // The activation that delivered the outcome starts after the first one's events.
            assert_eq!(position, d.history.len() as u64);
            assert!(message.contains("index out of bounds"), "{message}");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    let mut history = d.history.clone();
    history.push(HistoryEvent {
        position: history.len() as u64,
        activation: 1,
        recorded_at_ms: T0,
        event: completed(0, json!(2)),
    });
    assert!(matches!(
        replay_history("pair-later", after_call, &history),
        Err(ReplayError::Panicked { .. })
    ));
}

#[test]
fn nondeterminism_when_the_code_calls_another_activity() {
    let d = trip_driver();
    let hotel_first = coordinator_fn(&TRIP, |ctx: Context, who: String| async move {
        let _ = ctx.now_ms();
        let hotel = ctx.call(&BOOK_HOTEL, &who).await?;
        Ok(json!(hotel))
    });
    let before = d.history.clone();
    let nd = nondeterminism(replay_fresh("trip-1", &hotel_first, &d.history));
    assert_eq!(
        nd,
        Nondeterminism {
            instance_id: "trip-1".into(),
            position: 1,
            recorded: "activity reserve_car".into(),
            requested: "activity book_hotel".into(),
        }
    );
    let text = ReplayError::Nondeterminism(nd).to_string();
    for part in [
        "[RETRACE-ND]",
        "trip-1",
        "position 1",
        "activity reserve_car",
        "activity book_hotel",
    ] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
    // Replay reads the history; it never changes it.
    assert_eq!(d.history, before);

    // The same divergence found through the public one-shot replayer.
    assert!(matches!(
        replay_history("trip-1", hotel_first, &d.history),
        Err(ReplayError::Nondeterminism(_))
    ));
}

#[test]
fn nondeterminism_when_a_timer_replaces_an_activity() {
    let d = trip_driver();
    let sleepy = coordinator_fn(&TRIP, |ctx: Context, _who: String| async move {
        let _ = ctx.now_ms();
        ctx.sleep(Duration::from_secs(1)).await?;
        Ok(json!(null))
    });
    let nd = nondeterminism(replay_fresh("trip-1", &sleepy, &d.history));
    assert_eq!(
        (nd.position, nd.recorded.as_str(), nd.requested.as_str()),
        (1, "activity reserve_car", "timer")
    );
}

#[test]
fn nondeterminism_when_the_code_issues_fewer_commands() {
    let mut d = Driver::new("pair-1", coordinator_fn(&PAIR, pair));
    d.start("pair", json!(1));
    d.activate(vec![completed(0, json!(10)), completed(1, json!(20))]);
    d.complete(2, json!(30));
    assert_eq!(d.output(), json!(30));

    // The new code no longer calls `b`.
    let only_a = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let a = ctx.call(&A, &n).await?;
        ctx.call(&C, &a).await
    });
    let nd = nondeterminism(replay_fresh("pair-1", &only_a, &d.history));
    assert_eq!(
        nd,
        Nondeterminism {
            instance_id: "pair-1".into(),
            position: 1,
            recorded: "activity b".into(),
            requested: "nothing".into(),
        }
    );
}

#[test]
fn nondeterminism_when_the_code_returns_early() {
    // a and b joined; the history holds a's completion in its own activation.
    let mut d = Driver::new("pair-2", coordinator_fn(&PAIR, pair));
    d.start("pair", json!(1));
    d.complete(0, json!(10));
    d.complete(1, json!(20));
    d.complete(2, json!(30));

    // The new code returns as soon as `a` is known, where the history went on.
    let returns_early = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let a = ctx.call(&A, &n);
        let _b = ctx.call(&B, &n);
        a.await
    });
    let nd = nondeterminism(replay_fresh("pair-2", &returns_early, &d.history));
    assert_eq!(
        nd,
        Nondeterminism {
            instance_id: "pair-2".into(),
            position: 2,
            recorded: "activity c".into(),
            requested: "the end of the run".into(),
        }
    );

    // Same, at the end of an in-flight history that records no further command.
    let nd = nondeterminism(replay_fresh(
        "pair-2",
        &returns_early,
        through(&d.history, 2),
    ));
    assert_eq!((nd.position, nd.recorded.as_str()), (2, "more activations"));

    // And the converse: the history ended where the new code goes on.
    let goes_on = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let c = pair(ctx.clone(), n).await?;
        ctx.call(&C, &c).await
    });
    let nd = nondeterminism(replay_fresh("pair-2", &goes_on, &d.history));
    assert_eq!(nd.recorded, "the end of the run (instance_completed)");
}

#[test]
fn nondeterminism_when_the_code_issues_more_commands_than_recorded() {
    // The recorded activation 1 holds a's completion and nothing else: the run then waited on
    // the timer started first.
    let v1 = |ctx: Context, n: u32| async move {
        let nap = ctx.sleep(Duration::from_secs(5));
        let a = ctx.call(&A, &n).await?;
        nap.await?;
        Ok(a)
    };
    let mut d = Driver::new("more-1", coordinator_fn(&PAIR, v1));
    d.start("pair", json!(1));
    let a1 = d.complete(1, json!(7));
    assert_eq!(a1.events, [completed(1, json!(7))]);

    // The new code reads the clock after `a`: a command the recorded run did not issue there.
    let v2 = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let nap = ctx.sleep(Duration::from_secs(5));
        let a = ctx.call(&A, &n).await?;
        let _ = ctx.now_ms();
        nap.await?;
        Ok(a)
    });
    let nd = nondeterminism(replay_fresh("more-1", &v2, &d.history));
    assert_eq!(
        nd,
        Nondeterminism {
            instance_id: "more-1".into(),
            position: 2,
            recorded: "nothing".into(),
            requested: "side effect now".into(),
        }
    );
    // Also when the history is fed in two calls.
    let nd = nondeterminism(replay_in_chunks("more-1", &v2, &d.history, &[1]));
    assert_eq!(nd.position, 2);

    // A command issued (and not awaited) just before returning is caught as well, rather than
    // being appended after the terminal event by the next activation.
    d.fire(0);
    let v3 = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let nap = ctx.sleep(Duration::from_secs(5));
        let a = ctx.call(&A, &n).await?;
        nap.await?;
        // Issued (the command exists from the call on), then dropped without being awaited.
        drop(ctx.call(&NOTIFY, &"done".to_string()));
        Ok(a)
    });
    let nd = nondeterminism(replay_fresh("more-1", &v3, &d.history));
    assert_eq!(
        (nd.position, nd.recorded.as_str(), nd.requested.as_str()),
        (
            2,
            "the end of the run (instance_completed)",
            "activity notify"
        )
    );
}

// ----- joins and races -----

#[test]
fn wake_ups_raised_inside_the_coordinator_are_served_in_the_same_activation() {
    // Two branches of a join talk through a channel: when `a` completes, the producer sends,
    // which wakes the consumer (polled first) during the same activation.
    let relay = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let (tx, rx) = futures::channel::oneshot::channel::<u32>();
        let consumer = async {
            let v = rx
                .await
                .map_err(|_| Error::application("closed", "the producer went away"))?;
            ctx.call(&B, &v).await
        };
        let producer = async {
            let a = ctx.call(&A, &n).await?;
            let _ = tx.send(a);
            Ok::<u32, Error>(a)
        };
        let (b, a) = futures::join!(consumer, producer);
        Ok(a? + b?)
    });
    let mut d = Driver::new("relay-1", relay);
    d.start("pair", json!(1));
    let a = d.complete(0, json!(5));
    assert_eq!(
        a.events,
        [completed(0, json!(5)), scheduled(1, "b", json!(5))]
    );
    d.complete(1, json!(6));
    assert_eq!(d.output(), json!(11));
    check_every_activation_reproduces("relay-1", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn a_join_replays_identically_whether_completions_arrive_in_one_batch_or_two() {
    let mut one = Driver::new("join-1", coordinator_fn(&PAIR, pair));
    one.start("pair", json!(2));
    let a = one.activate(vec![completed(1, json!(20)), completed(0, json!(10))]);
    assert_eq!(a.events[2], scheduled(2, "c", json!(30)));
    one.complete(2, json!(31));

    let mut two = Driver::new("join-1", coordinator_fn(&PAIR, pair));
    two.start("pair", json!(2));
    let a = two.complete(1, json!(20));
    assert_eq!(
        a.events.len(),
        1,
        "b alone does not finish the join: {:?}",
        a.events
    );
    let a = two.complete(0, json!(10));
    assert_eq!(a.events[1], scheduled(2, "c", json!(30)));
    two.complete(2, json!(31));

    assert_eq!(one.output(), json!(31));
    assert_eq!(two.output(), json!(31));
    assert_eq!(one.commands(), two.commands());
    for d in [&one, &two] {
        let replayed = replay_fresh("join-1", &d.coordinator(), &d.history).unwrap();
        assert!(replayed.is_finished());
        check_every_activation_reproduces("join-1", &d.coordinator(), &d.history).unwrap();
        for cut in 1..activations(&d.history).len() {
            let chunked = replay_in_chunks("join-1", &d.coordinator(), &d.history, &[cut]).unwrap();
            assert!(chunked.is_finished());
        }
    }
}

/// A signal raced with a one-hour timer; the winner is then recorded by an activity.
fn race_fn(biased: bool) -> CoordinatorFn {
    coordinator_fn(&RACE, move |ctx: Context, ()| async move {
        let winner = {
            let approval = ctx.signal::<String>("approve").fuse();
            let timeout = ctx.sleep(Duration::from_secs(3600)).fuse();
            pin_mut!(approval, timeout);
            if biased {
                select_biased! {
                    s = approval => format!("signal {}", s?),
                    t = timeout => { t?; "timer".to_string() }
                }
            } else {
                futures::select! {
                    s = approval => format!("signal {}", s?),
                    t = timeout => { t?; "timer".to_string() }
                }
            }
        };
        ctx.call(&RECORD, &winner).await?;
        Ok(winner)
    })
}

#[test]
fn a_race_replays_with_its_first_run_winner_in_either_arrival_order() {
    for biased in [true, false] {
        // History A: the signal arrives, then (in a later activation) the timer fires.
        let mut a = Driver::new("race-a", race_fn(biased));
        let a0 = a.start("race", json!(null));
        assert_eq!(
            a0.events[2..],
            [awaited(0, "approve"), timer(1, T0 + 3_600_000)]
        );
        let won = a.signal("approve", json!("yes"));
        assert_eq!(won.events[1], scheduled(2, "record", json!("signal yes")));
        let late = a.fire(1);
        assert_eq!(late.events, [fired(1)], "a late timer changes nothing");
        a.complete(2, json!(null));
        assert_eq!(a.output(), json!("signal yes"));

        // History B: the same two events, arriving in the reverse order.
        let mut b = Driver::new("race-b", race_fn(biased));
        b.start("race", json!(null));
        let won = b.fire(1);
        assert_eq!(won.events[1], scheduled(2, "record", json!("timer")));
        let late = b.signal("approve", json!("yes"));
        assert_eq!(late.events, [signal("approve", json!("yes"))]);
        b.complete(2, json!(null));
        assert_eq!(b.output(), json!("timer"));

        // Each history replays deterministically to its own winner, many times over.
        for _ in 0..20 {
            for d in [&a, &b] {
                let replayed = replay_fresh(&d.instance_id, &d.coordinator(), &d.history).unwrap();
                assert!(replayed.is_finished());
                check_every_activation_reproduces(&d.instance_id, &d.coordinator(), &d.history)
                    .unwrap();
            }
        }
        // Replaying A's first two activations and delivering B's winner live picks B's winner:
        // nothing but arrival order decides.
        let mut mixed = replay_fresh("race-a", &race_fn(biased), through(&a.history, 1)).unwrap();
        let live = mixed.activate(vec![fired(1)], T0, 0).unwrap();
        assert_eq!(live.events[1], scheduled(2, "record", json!("timer")));
    }
}

#[test]
fn a_biased_race_resolves_simultaneous_arrivals_by_branch_order() {
    for batch in [
        vec![signal("approve", json!("yes")), fired(1)],
        vec![fired(1), signal("approve", json!("yes"))],
    ] {
        let mut d = Driver::new("race-same", race_fn(true));
        d.start("race", json!(null));
        let a = d.activate(batch);
        assert_eq!(a.events[2], scheduled(2, "record", json!("signal yes")));
        d.complete(2, json!(null));
        for _ in 0..20 {
            check_every_activation_reproduces("race-same", &d.coordinator(), &d.history).unwrap();
        }
    }
}

#[test]
fn signals_buffered_before_the_wait_are_served_in_arrival_order() {
    // Waits for the gate, then for `n` signals "item" and one signal "other".
    let collect = coordinator_fn(&SIGNALS, |ctx: Context, n: usize| async move {
        ctx.call(&GATE, &()).await?;
        let mut items = Vec::new();
        for _ in 0..n {
            items.push(ctx.signal::<Value>("item").await?);
        }
        let other = ctx.signal::<Value>("other").await?;
        Ok(json!({ "items": items, "other": other }))
    });
    let mut d = Driver::new("sig-1", collect);
    d.start("signals", json!(4));
    d.signal("item", json!(1));
    d.activate(vec![
        signal("item", json!(2)),
        signal("other", json!("x")),
        signal("item", json!(3)),
    ]);
    d.signal("other", json!("y"));
    // Three items are buffered: the fourth wait blocks until the fourth item arrives.
    let a = d.complete(0, json!(null));
    assert_eq!(
        a.events[1..],
        [
            awaited(1, "item"),
            awaited(2, "item"),
            awaited(3, "item"),
            awaited(4, "item")
        ]
    );
    let a = d.signal("item", json!(4));
    assert_eq!(a.events[1], awaited(5, "other"));
    assert_eq!(d.output(), json!({ "items": [1, 2, 3, 4], "other": "x" }));
    check_every_activation_reproduces("sig-1", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn concurrent_waits_of_one_signal_are_served_in_the_order_they_were_issued() {
    let both = coordinator_fn(&SIGNALS, |ctx: Context, _n: usize| async move {
        let (first, second) =
            futures::join!(ctx.signal::<Value>("item"), ctx.signal::<Value>("item"));
        Ok(json!([first?, second?]))
    });
    for batches in [
        vec![
            vec![signal("item", json!(1))],
            vec![signal("item", json!(2))],
        ],
        vec![vec![signal("item", json!(1)), signal("item", json!(2))]],
    ] {
        let mut d = Driver::new("sig-2", both.clone());
        d.start("signals", json!(2));
        for batch in batches {
            d.activate(batch);
        }
        assert_eq!(d.output(), json!([1, 2]));
        check_every_activation_reproduces("sig-2", &d.coordinator(), &d.history).unwrap();
    }
}

/// Waits for approval, sending a reminder every hour until it comes.
fn approval_loop(timer_first: bool) -> CoordinatorFn {
    coordinator_fn(&LOOP, move |ctx: Context, ()| async move {
        let mut reminders = 0u32;
        loop {
            let approval = ctx.signal::<bool>("approve").fuse();
            let hour = ctx.sleep(Duration::from_secs(3600)).fuse();
            pin_mut!(approval, hour);
            let approved = if timer_first {
                select_biased! {
                    t = hour => { t?; None },
                    s = approval => Some(s?),
                }
            } else {
                select_biased! {
                    s = approval => Some(s?),
                    t = hour => { t?; None },
                }
            };
            if approved.is_some() {
                return Ok(reminders);
            }
            reminders += 1;
            ctx.call(&NOTIFY, &format!("reminder {reminders}")).await?;
        }
    })
}

#[test]
fn a_signal_arriving_after_its_wait_lost_a_race_reaches_the_next_wait() {
    let mut d = Driver::new("loop-1", approval_loop(false));
    d.start("approval_loop", json!(null));
    let a = d.fire(1);
    assert_eq!(a.events[1], scheduled(2, "notify", json!("reminder 1")));
    let a = d.complete(2, json!(null));
    assert_eq!(
        a.events[1..],
        [awaited(3, "approve"), timer(4, T0 + 3_600_000)]
    );
    // The wait at position 0 was dropped when the timer won; the signal belongs to the wait at
    // position 3.
    let a = d.signal("approve", json!(true));
    assert_eq!(a.terminal(), Some(&instance_completed(json!(1))));
    check_every_activation_reproduces("loop-1", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn a_signal_delivered_to_a_wait_that_lost_a_race_is_not_lost() {
    // The timer branch comes first: when both arrive together, the timer wins and the signal,
    // already handed to the losing wait, must go back to the buffer for the next wait.
    let mut d = Driver::new("loop-2", approval_loop(true));
    d.start("approval_loop", json!(null));
    let a = d.activate(vec![signal("approve", json!(true)), fired(1)]);
    assert_eq!(a.events[2], scheduled(2, "notify", json!("reminder 1")));
    let a = d.complete(2, json!(null));
    assert_eq!(
        a.terminal(),
        Some(&instance_completed(json!(1))),
        "{:?}",
        a.events
    );
    check_every_activation_reproduces("loop-2", &d.coordinator(), &d.history).unwrap();
}

// ----- cancellation and sagas -----

/// car (0), hotel (1), then waits for a payment signal (2) and a one-day timer (3) together.
/// Compensates on any failure, cancellation included.
fn booking_saga(statuses: Arc<Mutex<Vec<String>>>) -> CoordinatorFn {
    coordinator_fn(&SAGA, move |ctx: Context, who: String| {
        let statuses = Arc::clone(&statuses);
        async move {
            let mut saga = Saga::new();
            let car = match ctx.call(&RESERVE_CAR, &who).await {
                Ok(car) => car,
                Err(e) => return Err(saga.fail(&ctx, e).await),
            };
            saga.add(&CANCEL_CAR, &car)?;
            let hotel = match ctx.call(&BOOK_HOTEL, &who).await {
                Ok(hotel) => hotel,
                Err(e) => return Err(saga.fail(&ctx, e).await),
            };
            saga.add(&CANCEL_HOTEL, &hotel)?;
            let (paid, waited) = futures::join!(
                ctx.signal::<String>("paid"),
                ctx.sleep(Duration::from_secs(86_400))
            );
            let again = ctx.signal::<String>("paid").await;
            statuses.lock().unwrap().extend([
                format!("paid: {paid:?}"),
                format!("timer: {waited:?}"),
                format!("cancelled: {}", ctx.is_cancelled()),
                format!("again: {again:?}"),
            ]);
            match paid {
                Ok(receipt) => Ok(format!("{car}+{hotel} paid {receipt}")),
                Err(e) => Err(saga.fail(&ctx, e).await),
            }
        }
    })
}

#[test]
fn cancellation_resolves_pending_waits_and_compensations_still_run() {
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let mut d = Driver::new("saga-1", booking_saga(Arc::clone(&statuses)));
    d.start("saga", json!("ada"));
    d.complete(0, json!("car-1"));
    let a = d.complete(1, json!("hotel-1"));
    assert_eq!(
        a.events[1..],
        [awaited(2, "paid"), timer(3, T0 + 86_400_000)]
    );

    let a = d.cancel("plans changed");
    let cancelled = Error::Cancelled {
        reason: "plans changed".into(),
    };
    assert_eq!(
        *statuses.lock().unwrap(),
        [
            format!("paid: {:?}", Err::<String, _>(cancelled.clone())),
            format!("timer: {:?}", Err::<(), _>(cancelled.clone())),
            "cancelled: true".to_string(),
            format!("again: {:?}", Err::<String, _>(cancelled.clone())),
        ]
    );
    // The compensations are issued after the cancellation and wait normally, in reverse order
    // (the marker says they are shielded from cancellation).
    assert_eq!(
        a.events,
        [
            cancel("plans changed"),
            awaited(4, "paid"),
            marker(5, "retrace.shielded-compensations"),
            scheduled(6, "cancel_hotel", json!("hotel-1"))
        ]
    );
    // Late arrivals for the cancelled waits change nothing.
    assert_eq!(d.fire(3).events, [fired(3)]);
    assert_eq!(d.signal("paid", json!("r-1")).events.len(), 1);
    // A failing compensation does not stop the next one.
    let a = d.fail(6, "unavailable", "hotel service down");
    assert_eq!(a.events[1], scheduled(7, "cancel_car", json!("car-1")));
    let a = d.complete(7, json!(null));
    assert_eq!(
        a.terminal(),
        Some(&Event::InstanceCancelled {
            reason: "plans changed".into()
        })
    );

    // The whole story replays, cancellation included.
    statuses.lock().unwrap().clear();
    let replayed = replay_fresh("saga-1", &d.coordinator(), &d.history).unwrap();
    assert!(replayed.is_finished());
    assert_eq!(statuses.lock().unwrap().len(), 4);
    check_every_activation_reproduces("saga-1", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn cancellation_while_an_activity_runs_compensates_the_earlier_steps() {
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let mut d = Driver::new("saga-2", booking_saga(statuses));
    d.start("saga", json!("ada"));
    d.complete(0, json!("car-1"));
    let a = d.cancel("no longer needed");
    assert_eq!(a.events[2], scheduled(3, "cancel_car", json!("car-1")));
    // The hotel booked meanwhile is not compensated: the call at position 1 already failed.
    assert_eq!(d.complete(1, json!("hotel-1")).events.len(), 1);
    // A second cancellation is recorded and ignored: the compensation still waits.
    assert_eq!(d.cancel("again").events.len(), 1);
    let a = d.complete(3, json!(null));
    assert_eq!(
        a.terminal(),
        Some(&Event::InstanceCancelled {
            reason: "no longer needed".into()
        })
    );
    check_every_activation_reproduces("saga-2", &d.coordinator(), &d.history).unwrap();
}

/// car (0), hotel (1), flight (2); when the flight fails, the saga compensates: hotel, then car.
fn flight_saga() -> CoordinatorFn {
    coordinator_fn(&SAGA, |ctx: Context, who: String| async move {
        let mut saga = Saga::new();
        let car = ctx.call(&RESERVE_CAR, &who).await?;
        saga.add(&CANCEL_CAR, &car)?;
        let hotel = ctx.call(&BOOK_HOTEL, &who).await?;
        saga.add(&CANCEL_HOTEL, &hotel)?;
        match ctx.call(&BOOK_FLIGHT, &who).await {
            Ok(flight) => Ok(format!("{car}+{hotel}+{flight}")),
            Err(e) => Err(saga.fail(&ctx, e).await),
        }
    })
}

#[test]
fn a_cancellation_waits_for_the_compensation_under_way_and_the_rest_run_in_order() {
    let mut d = Driver::new("saga-3", flight_saga());
    d.start("saga", json!("ada"));
    d.complete(0, json!("car-1"));
    d.complete(1, json!("hotel-1"));
    let a = d.fail(2, "sold_out", "no seats");
    assert_eq!(
        a.events[1..],
        [
            marker(3, "retrace.shielded-compensations"),
            scheduled(4, "cancel_hotel", json!("hotel-1"))
        ]
    );
    // The cancel arrives while the hotel is being cancelled: nothing moves on.
    let a = d.cancel("customer gave up");
    assert_eq!(a.events, [cancel("customer gave up")]);
    assert_eq!(d.open_activities(), [4]);
    // Once the hotel's cancellation is done, the car's runs, and the saga ends with its cause.
    let a = d.complete(4, json!(null));
    assert_eq!(a.events[1..], [scheduled(5, "cancel_car", json!("car-1"))]);
    let a = d.complete(5, json!(null));
    assert!(
        matches!(a.terminal(), Some(Event::InstanceFailed { error }) if error.to_string().contains("no seats")),
        "{:?}",
        a.terminal()
    );
    check_every_activation_reproduces("saga-3", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn shielding_survives_a_restart_between_the_compensation_and_the_cancel() {
    let mut d = Driver::new("saga-4", flight_saga());
    d.start("saga", json!("ada"));
    d.complete(0, json!("car-1"));
    d.complete(1, json!("hotel-1"));
    d.fail(2, "sold_out", "no seats");
    // A fresh execution (another worker, or the cache evicted) replays up to here...
    d.restart().unwrap();
    // ...and still waits for the compensation under way when the cancel arrives.
    assert_eq!(d.cancel("customer gave up").events.len(), 1);
    assert_eq!(d.open_activities(), [4]);
    let a = d.complete(4, json!(null));
    assert_eq!(a.events[1..], [scheduled(5, "cancel_car", json!("car-1"))]);
    check_every_activation_reproduces("saga-4", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn a_history_that_compensated_before_shielding_existed_replays_as_it_ran() {
    // Recorded by the earlier rule: no marker, and the cancel failed the compensation under
    // way, so the car's was issued in the cancel's own activation.
    let history = HistoryBuilder::new()
        .activation([
            started("saga", json!("ada")),
            pinned(&[]),
            scheduled(0, "reserve_car", json!("ada")),
        ])
        .activation([
            completed(0, json!("car-1")),
            scheduled(1, "book_hotel", json!("ada")),
        ])
        .activation([
            completed(1, json!("hotel-1")),
            scheduled(2, "book_flight", json!("ada")),
        ])
        .activation([
            failed(2, "book_flight", "sold_out", "no seats"),
            scheduled(3, "cancel_hotel", json!("hotel-1")),
        ])
        .activation([
            cancel("customer gave up"),
            scheduled(4, "cancel_car", json!("car-1")),
        ])
        .build();
    let coordinator = flight_saga();
    // (Replayed as a worker or the replayer does, the whole history known. Run live now, the
    // fourth activation would begin with the marker instead: that is the new rule, for runs
    // that reach their compensations from now on.)
    let mut execution = replay_fresh("saga-old", &coordinator, &history).unwrap();
    assert!(!execution.is_finished());
    retrace_sdk::check_replay("saga-old", coordinator.clone(), &history).unwrap();
    // It goes on by the same rule: the hotel's late outcome is ignored, the car's ends it.
    let a = execution
        .activate(vec![completed(3, json!(null))], T0, seed_of(5))
        .unwrap();
    assert_eq!(a.events, [completed(3, json!(null))]);
    let a = execution
        .activate(vec![completed(4, json!(null))], T0, seed_of(6))
        .unwrap();
    assert!(matches!(
        a.events.last(),
        Some(Event::InstanceFailed { .. })
    ));
}

/// Cancels the car, shielded or not, and reports how the call ended.
fn refund(shielded: bool) -> CoordinatorFn {
    coordinator_fn(&SAGA, move |ctx: Context, _who: String| async move {
        let call = ctx.call(&CANCEL_CAR, &"car-1".to_string());
        let outcome = if shielded {
            call.shielded().await
        } else {
            call.await
        };
        Ok(format!("{outcome:?}"))
    })
}

#[test]
fn a_shielded_call_is_waited_for_through_a_cancel() {
    let mut d = Driver::new("refund-1", refund(true));
    let a = d.start("saga", json!("ada"));
    assert_eq!(
        a.events[2..],
        [
            scheduled(0, "cancel_car", json!("car-1")),
            marker(1, "retrace.shielded-call")
        ]
    );
    assert_eq!(d.cancel("customer gave up").events.len(), 1);
    assert_eq!(d.open_activities(), [0]);
    let a = d.complete(0, json!(null));
    assert_eq!(
        a.terminal(),
        Some(&Event::InstanceCompleted {
            output: json!("Ok(())")
        })
    );
    check_every_activation_reproduces("refund-1", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn a_call_shielded_after_its_history_was_recorded_replays_as_it_ran() {
    // Recorded by code that did not shield the call: the cancel failed it.
    let mut d = Driver::new("refund-2", refund(false));
    d.start("saga", json!("ada"));
    let a = d.cancel("customer gave up");
    assert!(matches!(
        a.terminal(),
        Some(Event::InstanceCompleted { output }) if output.as_str().is_some_and(|o| o.contains("Cancelled"))
    ));
    // The code now shields it: the recorded history still replays, by its own rule.
    let replayed = replay_fresh("refund-2", &refund(true), &d.history).unwrap();
    assert!(replayed.is_finished());
}

#[test]
fn shielded_acts_only_on_the_call_just_made() {
    // Two calls made, then both shielded: only the last one made can be, with its marker
    // right after it; the first is left as it was (and a second shielded() does nothing).
    let pair = coordinator_fn(&SAGA, |ctx: Context, _who: String| async move {
        let a = ctx.call(&CANCEL_CAR, &"car-1".to_string());
        let b = ctx.call(&CANCEL_HOTEL, &"hotel-1".to_string());
        let (a, b) = (a.shielded(), b.shielded().shielded());
        let (a, b) = futures::join!(a, b);
        Ok(format!("a={} b={}", a.is_ok(), b.is_ok()))
    });
    let mut d = Driver::new("refund-3", pair);
    let a = d.start("saga", json!("ada"));
    assert_eq!(
        a.events[2..],
        [
            scheduled(0, "cancel_car", json!("car-1")),
            scheduled(1, "cancel_hotel", json!("hotel-1")),
            marker(2, "retrace.shielded-call")
        ]
    );
    // The cancel fails `a` and leaves `b` waiting: the run goes on.
    assert_eq!(d.cancel("customer gave up").terminal(), None);
    let a = d.complete(1, json!(null));
    assert_eq!(
        a.terminal(),
        Some(&Event::InstanceCompleted {
            output: json!("a=false b=true")
        })
    );
    check_every_activation_reproduces("refund-3", &d.coordinator(), &d.history).unwrap();
}

#[test]
fn a_call_recorded_with_another_command_after_it_is_not_shielded_on_replay() {
    // Recorded by code that made a second call right after the first, unshielded.
    let old = coordinator_fn(&SAGA, |ctx: Context, _who: String| async move {
        let a = ctx.call(&CANCEL_CAR, &"car-1".to_string());
        let b = ctx.call(&CANCEL_HOTEL, &"hotel-1".to_string());
        let (a, b) = futures::join!(a, b);
        Ok(format!("a={} b={}", a.is_ok(), b.is_ok()))
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_code = Arc::clone(&seen);
    let new = coordinator_fn(&SAGA, move |ctx: Context, _who: String| {
        let seen = Arc::clone(&seen_by_code);
        async move {
            let a = ctx.call(&CANCEL_CAR, &"car-1".to_string()).shielded();
            let b = ctx.call(&CANCEL_HOTEL, &"hotel-1".to_string());
            let (a, b) = futures::join!(a, b);
            let out = format!("a={} b={}", a.is_ok(), b.is_ok());
            seen.lock().unwrap().push(out.clone());
            Ok(out)
        }
    });
    let mut d = Driver::new("refund-4", old);
    d.start("saga", json!("ada"));
    let a = d.cancel("customer gave up");
    assert_eq!(
        a.terminal(),
        Some(&Event::InstanceCompleted {
            output: json!("a=false b=false")
        })
    );
    let replayed = replay_fresh("refund-4", &new, &d.history).unwrap();
    assert!(replayed.is_finished());
    assert_eq!(*seen.lock().unwrap(), ["a=false b=false"]);
}

// ----- versioning -----

fn hotel_v1() -> CoordinatorFn {
    coordinator_fn(&TRIP, |ctx: Context, who: String| async move {
        let car = ctx.call(&RESERVE_CAR, &who).await?;
        let hotel = ctx.call(&BOOK_HOTEL, &who).await?;
        Ok(json!([car, hotel]))
    })
}

/// The patch v2 declares.
const FIRST_CLASS: &[&str] = &["first-class"];

/// v2 of `hotel_v1`: the patch "first-class" upgrades the hotel.
fn hotel_v2(seen: Arc<Mutex<Vec<bool>>>) -> CoordinatorFn {
    coordinator_fn(&TRIP, move |ctx: Context, who: String| {
        let seen = Arc::clone(&seen);
        async move {
            let car = ctx.call(&RESERVE_CAR, &who).await?;
            let patched = ctx.patched("first-class");
            seen.lock().unwrap().push(patched);
            let hotel = if patched {
                ctx.call(&UPGRADE_HOTEL, &who).await?
            } else {
                ctx.call(&BOOK_HOTEL, &who).await?
            };
            Ok(json!([car, hotel]))
        }
    })
}

#[test]
fn patched_is_true_live_and_when_its_marker_is_recorded() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut d = Driver::new("v2-1", hotel_v2(Arc::clone(&seen))).with_patches(FIRST_CLASS);
    let a0 = d.start("trip", json!("ada"));
    assert_eq!(a0.events[1], pinned(FIRST_CLASS));
    let a = d.complete(0, json!("car"));
    assert_eq!(
        a.events[1..],
        [
            marker(1, "first-class"),
            scheduled(2, "upgrade_hotel", json!("ada"))
        ]
    );
    d.complete(2, json!("suite"));
    assert_eq!(d.output(), json!(["car", "suite"]));
    assert_eq!(*seen.lock().unwrap(), [true]);

    seen.lock().unwrap().clear();
    let replayed = replay_fresh("v2-1", &d.coordinator(), &d.history).unwrap();
    assert!(replayed.is_finished());
    assert_eq!(*seen.lock().unwrap(), [true]);
    d.check_reproduces().unwrap();

    // The recorded marker decides on replay, whatever the replaying code declares.
    seen.lock().unwrap().clear();
    let mut execution = replay_fresh("v2-1", &d.coordinator(), through(&d.history, 1)).unwrap();
    let a = execution
        .activate(vec![completed(0, json!("car"))], T0, 0)
        .unwrap();
    assert_eq!(a.events[1], marker(1, "first-class"));
    assert_eq!(*seen.lock().unwrap(), [true]);
}

#[test]
fn patched_is_false_in_a_run_that_did_not_pin_the_patch() {
    // Started by code that did not declare the patch: the old path, live and on replay.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut d = Driver::new("v2-0", hotel_v2(Arc::clone(&seen)));
    let a0 = d.start("trip", json!("ada"));
    assert_eq!(a0.events[1], pinned(&[]));
    let a = d.complete(0, json!("car"));
    assert_eq!(a.events[1], scheduled(1, "book_hotel", json!("ada")));
    d.complete(1, json!("room"));
    assert_eq!(d.output(), json!(["car", "room"]));
    assert_eq!(*seen.lock().unwrap(), [false]);
    d.check_reproduces().unwrap();
    // Code that declares the patch replays the run on its old path, then continues there.
    seen.lock().unwrap().clear();
    let v2 = Driver::new("v2-0", hotel_v2(Arc::clone(&seen))).with_patches(FIRST_CLASS);
    let mut execution = v2.fresh();
    execution.replay(through(&d.history, 1)).unwrap();
    let a = execution
        .activate(vec![completed(0, json!("car"))], T0, 0)
        .unwrap();
    assert_eq!(a.events[1], scheduled(1, "book_hotel", json!("ada")));
    assert_eq!(*seen.lock().unwrap(), [false]);
}

#[test]
fn patched_is_false_when_replaying_a_history_recorded_before_the_patch() {
    let mut old = Driver::new("v1-1", hotel_v1());
    old.start("trip", json!("ada"));
    old.complete(0, json!("car"));
    // In flight on v1: book_hotel is scheduled at position 1. The new code replays it.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut execution = replay_fresh("v1-1", &hotel_v2(Arc::clone(&seen)), &old.history).unwrap();
    assert_eq!(*seen.lock().unwrap(), [false]);
    let a = execution
        .activate(vec![completed(1, json!("room"))], T0, 0)
        .unwrap();
    assert_eq!(
        a.events,
        [
            completed(1, json!("room")),
            instance_completed(json!(["car", "room"]))
        ]
    );

    // A finished v1 history also replays on v2.
    old.complete(1, json!("room"));
    seen.lock().unwrap().clear();
    replay_fresh("v1-1", &hotel_v2(Arc::clone(&seen)), &old.history).unwrap();
    assert_eq!(*seen.lock().unwrap(), [false]);

    // A v1 run that reaches the patch point only after the deploy stays on the old path: it
    // did not pin the patch when it started (nor does a history recorded before pinning).
    let before_pinning = HistoryBuilder::new()
        .activation([
            started("trip", json!("ada")),
            scheduled(0, "reserve_car", json!("ada")),
        ])
        .build();
    for history in [through(&old.history, 1), &before_pinning[..]] {
        seen.lock().unwrap().clear();
        let v2 = Driver::new("v1-1", hotel_v2(Arc::clone(&seen))).with_patches(FIRST_CLASS);
        let mut execution = v2.fresh();
        execution.replay(history).unwrap();
        let a = execution
            .activate(vec![completed(0, json!("car"))], T0, 0)
            .unwrap();
        assert_eq!(a.events[1..], [scheduled(1, "book_hotel", json!("ada"))]);
        assert_eq!(*seen.lock().unwrap(), [false]);
    }

    // A marker of another patch at that position is a divergence, not a silent old path.
    let other = HistoryBuilder::new()
        .activation([
            started("trip", json!("ada")),
            scheduled(0, "reserve_car", json!("ada")),
        ])
        .activation([
            completed(0, json!("car")),
            marker(1, "other"),
            scheduled(2, "book_hotel", json!("ada")),
        ])
        .build();
    let nd = nondeterminism(replay_fresh("v1-2", &hotel_v2(seen), &other));
    assert_eq!(
        (nd.position, nd.recorded.as_str()),
        (1, "patch marker other")
    );
}

#[test]
fn patched_is_false_at_a_point_the_recorded_run_passed_without_commands() {
    // v1: starts a timer, calls a, waits for the timer. Activation 1 records a's completion and
    // no command: the run went past the point where v2 adds a notification. v1 already declared
    // the patch id (so the run pinned it), but did not check it there yet.
    let v1 = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        let nap = ctx.sleep(Duration::from_secs(5));
        let a = ctx.call(&A, &n).await?;
        nap.await?;
        Ok(a)
    });
    let mut old = Driver::new("v1-3", v1).with_patches(&["notify"]);
    old.start("pair", json!(1));
    old.complete(1, json!(7));

    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_in = Arc::clone(&seen);
    let v2 = coordinator_fn(&PAIR, move |ctx: Context, n: u32| {
        let seen = Arc::clone(&seen_in);
        async move {
            let nap = ctx.sleep(Duration::from_secs(5));
            let a = ctx.call(&A, &n).await?;
            let patched = ctx.patched("notify");
            seen.lock().unwrap().push(patched);
            if patched {
                ctx.call(&NOTIFY, &a.to_string()).await?;
            }
            nap.await?;
            Ok(a)
        }
    });
    let mut execution = Execution::new("v1-3", v2).with_patches(&["notify"]);
    execution.replay(&old.history).unwrap();
    assert_eq!(*seen.lock().unwrap(), [false]);
    // The in-flight v1 instance finishes on v1's path.
    let a = execution.activate(vec![fired(0)], T0 + 5_000, 0).unwrap();
    assert_eq!(a.events, [fired(0), instance_completed(json!(7))]);
}

// ----- time, randomness, side effects -----

#[test]
fn time_randomness_and_side_effects_return_recorded_values_on_replay() {
    let runs = Arc::new(AtomicUsize::new(0));
    let runs_in = Arc::clone(&runs);
    let effects = coordinator_fn(&EFFECTS, move |ctx: Context, ()| {
        let runs = Arc::clone(&runs_in);
        async move {
            let now_ms = ctx.now_ms();
            let now = ctx.now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
            let ids = [ctx.uuid(), ctx.uuid()];
            let r = ctx.random();
            let bits = ctx.random_u64();
            let ticket: u64 = ctx.side_effect("ticket", || {
                runs.fetch_add(1, Ordering::SeqCst);
                4242
            })?;
            ctx.call(&GATE, &()).await?;
            // Read again after a live activation: a new value from that activation.
            let later = ctx.now_ms();
            Ok(json!({
                "now_ms": now_ms, "now": now, "ids": ids, "random": r, "bits": bits,
                "ticket": ticket, "later": later, "replaying": ctx.is_replaying()
            }))
        }
    });
    let mut d = Driver::new("fx-1", effects);
    let a0 = d.start("effects", json!(null));
    assert_eq!(
        a0.events[1..]
            .iter()
            .filter_map(Event::command_identity)
            .collect::<Vec<_>>(),
        [
            "side effect now",
            "side effect now",
            "side effect uuid",
            "side effect uuid",
            "side effect random",
            "side effect random",
            "side effect ticket",
            "activity gate"
        ]
    );
    d.advance(1_000);
    d.complete(7, json!(null));
    let live = d.output();
    assert_eq!(live["now_ms"], json!(T0));
    assert_eq!(live["now"], json!(T0));
    assert_eq!(live["later"], json!(T0 + 1_000));
    assert_eq!(live["replaying"], json!(false));
    let ids: Vec<String> = serde_json::from_value(live["ids"].clone()).unwrap();
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert_eq!(id.as_bytes()[14], b'4', "{id} is not a version 4 layout");
        assert!(
            matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "{id}"
        );
    }
    let r = live["random"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&r));
    assert_eq!(live["ticket"], json!(4242));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Replay the first activation, then run the second live with another clock and seed: every
    // value read in the first activation is the recorded one, and the side effect does not run.
    let mut execution = replay_fresh("fx-1", &d.coordinator(), through(&d.history, 1)).unwrap();
    let a = execution
        .activate(vec![completed(7, json!(null))], T0 + 777_777, 0xFFFF)
        .unwrap();
    let Some(Event::InstanceCompleted { output }) = a.terminal() else {
        panic!("{a:?}")
    };
    for key in [
        "now_ms",
        "now",
        "ids",
        "random",
        "bits",
        "ticket",
        "replaying",
    ] {
        assert_eq!(output[key], live[key], "{key}");
    }
    assert_eq!(output["later"], json!(T0 + 777_777));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the side effect ran again on replay"
    );

    // A full replay reproduces the run without running the side effect either.
    let replayed = replay_fresh("fx-1", &d.coordinator(), &d.history).unwrap();
    assert!(replayed.is_finished());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn is_replaying_is_true_only_while_replaying() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_in = Arc::clone(&seen);
    let coordinator = coordinator_fn(&PAIR, move |ctx: Context, n: u32| {
        let seen = Arc::clone(&seen_in);
        async move {
            seen.lock().unwrap().push(ctx.is_replaying());
            let a = ctx.call(&A, &n).await?;
            seen.lock().unwrap().push(ctx.is_replaying());
            let b = ctx.call(&B, &a).await?;
            seen.lock().unwrap().push(ctx.is_replaying());
            Ok(b)
        }
    });
    let mut d = Driver::new("rp-1", coordinator);
    d.start("pair", json!(1));
    d.complete(0, json!(2));
    assert_eq!(*seen.lock().unwrap(), [false, false]);
    seen.lock().unwrap().clear();
    d.restart().unwrap();
    d.complete(1, json!(3));
    assert_eq!(*seen.lock().unwrap(), [true, true, false]);
}

// ----- scale -----

fn fan_out_fn() -> CoordinatorFn {
    coordinator_fn(&FAN_OUT, |ctx: Context, n: u64| async move {
        let calls: Vec<_> = (0..n).map(|i| ctx.call(&ADD_ONE, &i)).collect();
        let results = futures::future::join_all(calls).await;
        results.into_iter().sum::<Result<u64, Error>>()
    })
}

#[test]
fn join_all_over_500_activities_replays_and_completes() {
    let n = 500u64;
    let mut d = Driver::new("fan-500", fan_out_fn());
    let a0 = d.start("fan_out", json!(n));
    assert_eq!(a0.events.len(), 2 + n as usize);
    // Completions arrive in a scrambled order, in batches of 1 to 13.
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut x = 12345u64;
    for i in (1..order.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    let mut size = 1;
    for batch in order.chunks(13) {
        for part in batch.chunks(size) {
            d.activate(
                part.iter()
                    .map(|&s| completed(s, json!(u64::from(s) + 1)))
                    .collect(),
            );
        }
        size = size % 13 + 1;
    }
    assert_eq!(d.output(), json!(n * (n + 1) / 2));
    let replayed = replay_fresh("fan-500", &d.coordinator(), &d.history).unwrap();
    assert!(replayed.is_finished());
    let last = activations(&d.history).len() - 1;
    let chunked = replay_in_chunks(
        "fan-500",
        &d.coordinator(),
        &d.history,
        &[1, last / 2, last],
    )
    .unwrap();
    assert!(chunked.is_finished());
}

#[test]
fn join_all_over_2000_activities_in_2000_activations_replays() {
    let n = 2000u64;
    let mut d = Driver::new("fan-2000", fan_out_fn());
    d.start("fan_out", json!(n));
    for s in (0..n as u32).rev() {
        d.complete(s, json!(1));
    }
    assert_eq!(d.output(), json!(n));
    assert_eq!(d.history.len(), 2 + 2 * n as usize + 1);
    let replayed = replay_fresh("fan-2000", &d.coordinator(), &d.history).unwrap();
    assert!(replayed.is_finished());
    assert_eq!(replayed.next_activation(), 1 + n as u32);
}

// ----- status, continue-as-new, children -----

#[test]
fn custom_status_is_reported_when_it_changes_and_restored_by_replay() {
    let coordinator = coordinator_fn(&PAIR, |ctx: Context, n: u32| async move {
        ctx.set_status(&json!({ "step": "a" }))?;
        let a = ctx.call(&A, &n).await?;
        ctx.set_status(&json!({ "step": "b" }))?;
        let b = ctx.call(&B, &a).await?;
        ctx.set_status(&json!({ "step": "b" }))?;
        Ok(b)
    });
    let mut d = Driver::new("st-1", coordinator);
    assert_eq!(d.execution.custom_status(), None);
    assert_eq!(
        d.start("pair", json!(1)).custom_status,
        Some(json!({ "step": "a" }))
    );
    assert_eq!(
        d.complete(0, json!(2)).custom_status,
        Some(json!({ "step": "b" }))
    );
    assert_eq!(
        d.complete(1, json!(3)).custom_status,
        None,
        "unchanged status is not reported"
    );
    assert_eq!(d.execution.custom_status(), Some(json!({ "step": "b" })));
    let replayed = replay_fresh("st-1", &d.coordinator(), through(&d.history, 2)).unwrap();
    assert_eq!(replayed.custom_status(), Some(json!({ "step": "b" })));
}

#[test]
fn continue_as_new_ends_the_history_with_continued_as_new() {
    let tick = |ctx: Context, n: u32| async move {
        ctx.call(&A, &n).await?;
        if n == 0 {
            return Ok(0);
        }
        Err(ctx.continue_as_new(&(n - 1))?)
    };
    let mut input = json!(2);
    let mut runs = 0;
    loop {
        runs += 1;
        let mut d = Driver::new("cd-1", coordinator_fn(&COUNTDOWN, tick));
        d.start("countdown", input.clone());
        let a = d.complete(0, json!(0));
        check_every_activation_reproduces("cd-1", &d.coordinator(), &d.history).unwrap();
        match a.terminal() {
            Some(Event::ContinuedAsNew { input: next }) => input = next.clone(),
            Some(Event::InstanceCompleted { output }) => {
                assert_eq!(*output, json!(0));
                break;
            }
            other => panic!("unexpected end {other:?}"),
        }
    }
    assert_eq!(runs, 3);
}

#[test]
fn a_child_failure_names_the_child() {
    const PARENT: Coordinator<(), String> = Coordinator::new("parent");
    const CHILD: Coordinator<u32, u32> = Coordinator::new("child");
    let parent = coordinator_fn(&PARENT, |ctx: Context, ()| async move {
        let ok = ctx.child(&CHILD, "kid-1", &1).await?;
        match ctx.child(&CHILD, "kid-2", &2).await {
            Ok(v) => Ok(format!("{ok} {v}")),
            Err(e) => Ok(format!("{ok} {e}")),
        }
    });
    let mut d = Driver::new("parent-1", parent);
    let a = d.start("parent", json!(null));
    assert_eq!(
        a.events[2].command_identity().as_deref(),
        Some("child child (kid-1)")
    );
    d.activate(vec![child_completed(0, Ok(json!(10)))]);
    let a = d.activate(vec![child_completed(
        1,
        Err(Error::application("boom", "it broke")),
    )]);
    assert_eq!(
        a.terminal(),
        Some(&instance_completed(json!(
            "10 child instance kid-2 ended without success: boom: it broke"
        )))
    );
    check_every_activation_reproduces("parent-1", &d.coordinator(), &d.history).unwrap();
}

// ----- duplicates -----

#[test]
fn duplicate_deliveries_are_recorded_and_ignored() {
    let mut d = Driver::new("dup-1", coordinator_fn(&PAIR, pair));
    d.start("pair", json!(1));
    let a = d.activate(vec![completed(0, json!(1)), completed(0, json!(999))]);
    assert_eq!(a.events.len(), 2, "{:?}", a.events);
    d.activate(vec![
        completed(0, json!(1)),
        completed(1, json!(2)),
        completed(1, json!(2)),
    ]);
    d.complete(2, json!(3));
    d.activate(vec![completed(2, json!(3))]);
    assert_eq!(d.output(), json!(3));
    assert_eq!(
        activity_inputs(&d.commands())[2],
        ("c".to_string(), json!(3))
    );
    check_every_activation_reproduces("dup-1", &d.coordinator(), &d.history).unwrap();
}

// ----- corrupt histories -----

fn valid_pair_history() -> Vec<HistoryEvent> {
    let mut d = Driver::new("bad-1", coordinator_fn(&PAIR, pair));
    d.start("pair", json!(1));
    d.complete(0, json!(1));
    d.complete(1, json!(2));
    d.complete(2, json!(3));
    d.history
}

#[test]
fn corrupt_histories_are_reported_and_never_panic() {
    let good = valid_pair_history();
    replay_fresh("bad-1", &coordinator_fn(&PAIR, pair), &good).unwrap();

    let mut cases: Vec<(&str, Vec<HistoryEvent>)> = Vec::new();
    // The first event of the third activation.
    let third = good.iter().position(|e| e.activation == 2).unwrap();
    let mut gap = good.clone();
    gap.remove(third);
    cases.push(("gap in positions", gap));
    let mut duplicate_position = good.clone();
    duplicate_position[third].position -= 1;
    cases.push(("repeated position", duplicate_position));
    let mut decreasing = good.clone();
    decreasing[third].activation = 0;
    cases.push(("decreasing activation", decreasing));
    cases.push((
        "command seq skipping",
        HistoryBuilder::new()
            .activation([
                started("pair", json!(1)),
                scheduled(0, "a", json!(1)),
                scheduled(2, "b", json!(1)),
            ])
            .build(),
    ));
    cases.push((
        "first command not at seq 0",
        HistoryBuilder::new()
            .activation([started("pair", json!(1)), scheduled(1, "a", json!(1))])
            .build(),
    ));
    cases.push((
        "no InstanceStarted",
        HistoryBuilder::new()
            .activation([completed(0, json!(1))])
            .build(),
    ));
    cases.push((
        "commands without InstanceStarted",
        HistoryBuilder::new()
            .activation([scheduled(0, "a", json!(1))])
            .build(),
    ));
    cases.push((
        "started twice",
        HistoryBuilder::new()
            .activation([
                started("pair", json!(1)),
                scheduled(0, "a", json!(1)),
                scheduled(1, "b", json!(1)),
            ])
            .activation([started("pair", json!(1))])
            .build(),
    ));
    cases.push((
        "started twice in one activation",
        HistoryBuilder::new()
            .activation([started("pair", json!(1)), started("pair", json!(2))])
            .build(),
    ));
    let mut first_not_zero = good.clone();
    for e in &mut first_not_zero {
        e.position += 1;
    }
    cases.push(("history not starting at position 0", first_not_zero));
    let mut huge_activation = through(&good, 1).to_vec();
    for e in &mut huge_activation {
        e.activation = u32::MAX;
    }
    cases.push(("activation number overflowing", huge_activation));

    for (what, history) in cases {
        for cuts in [vec![], vec![1]] {
            let result = std::panic::catch_unwind(|| {
                replay_in_chunks("bad-1", &coordinator_fn(&PAIR, pair), &history, &cuts).map(|_| ())
            });
            let Ok(result) = result else {
                panic!("{what}: replay panicked")
            };
            assert_corrupt(result, what);
        }
    }
}

#[test]
fn incremental_replay_rejects_misplaced_chunks() {
    let good = valid_pair_history();
    let groups = activations(&good);
    let coordinator = coordinator_fn(&PAIR, pair);

    // A chunk that does not continue at the next position.
    let mut execution = replay_fresh("bad-2", &coordinator, groups[0]).unwrap();
    assert_corrupt(
        execution.replay(groups[2]),
        "chunk skipping an activation's positions",
    );
    // A chunk replaying an activation already applied (renumbered to follow on).
    let mut execution = replay_fresh("bad-2", &coordinator, groups[0]).unwrap();
    let mut again = groups[1].to_vec();
    for e in &mut again {
        e.activation = 0;
    }
    assert_corrupt(execution.replay(&again), "activation already applied");
    // A chunk replaying the same events again.
    let mut execution = replay_fresh("bad-2", &coordinator, groups[0]).unwrap();
    assert_corrupt(execution.replay(groups[0]), "same chunk twice");

    // After a live activation, history read back with a different command at an issued seq.
    let mut execution = Execution::new("bad-2", coordinator.clone());
    let a = execution
        .activate(vec![started("pair", json!(1))], T0, 0)
        .unwrap();
    assert_eq!(a.events.len(), 4);
    let forged = HistoryBuilder::new()
        .activation([])
        .activation([completed(0, json!(1)), scheduled(1, "not_b", json!(1))])
        .build()
        .into_iter()
        .map(|mut e| {
            e.position += 4;
            e
        })
        .collect::<Vec<_>>();
    assert_corrupt(
        execution.replay(&forged),
        "command differing from the one issued",
    );
}

#[test]
fn empty_replays_and_idle_activations_are_harmless() {
    let coordinator = coordinator_fn(&PAIR, pair);
    let mut execution = Execution::new("idle-1", coordinator.clone());
    execution.replay(&[]).unwrap();
    assert_eq!(execution.next_position(), 0);
    // Activating before the instance is started is reported, not a panic.
    assert_corrupt(
        execution.activate(vec![completed(0, json!(1))], T0, 0),
        "not started",
    );

    let mut d = Driver::new("idle-2", coordinator);
    d.start("pair", json!(1));
    // Events of other families passed as inbound are dropped.
    let a = d.activate(vec![
        scheduled(7, "x", json!(1)),
        instance_completed(json!(1)),
    ]);
    assert!(a.events.is_empty());
    // Outcomes for positions nobody waits for are recorded and ignored.
    let a = d.activate(vec![
        completed(42, json!(1)),
        fired(5),
        Event::TimerFired { seq: 9 },
    ]);
    assert!(a.events.iter().all(|e| e.family() == EventFamily::Inbound));
    d.activate(vec![completed(0, json!(1)), completed(1, json!(2))]);
    d.complete(2, json!(3));
    check_every_activation_reproduces("idle-2", &d.coordinator(), &d.history).unwrap();
}

// ----- incremental replay -----

#[test]
fn incremental_replay_equals_replay_in_one_call() {
    let d = trip_driver();
    let n = activations(&d.history).len();
    let cut_sets: Vec<Vec<usize>> = (1..n)
        .map(|c| vec![c])
        .chain([(1..n).collect(), vec![1, 3], vec![2, n - 1]])
        .collect();
    for end_group in 1..=n {
        let end = activations(&d.history)[..end_group]
            .iter()
            .map(|g| g.len())
            .sum::<usize>();
        let prefix = &d.history[..end];
        let mut whole = replay_fresh("trip-1", &d.coordinator(), prefix).unwrap();
        for cuts in &cut_sets {
            let mut chunked = replay_in_chunks("trip-1", &d.coordinator(), prefix, cuts).unwrap();
            assert_eq!(chunked.next_position(), whole.next_position());
            assert_eq!(chunked.next_activation(), whole.next_activation());
            assert_eq!(chunked.is_finished(), whole.is_finished());
            assert_eq!(chunked.custom_status(), whole.custom_status());
            // The next live activation is the same too.
            if let Some(next) = activations(&d.history).get(end_group) {
                let inbound = inbound_of(next);
                let x = whole.activate(inbound.clone(), T0 + 1, 1).unwrap();
                let y = chunked.activate(inbound, T0 + 1, 1).unwrap();
                assert_eq!(x, y, "cuts {cuts:?} after {end_group} activations");
                whole = replay_fresh("trip-1", &d.coordinator(), prefix).unwrap();
            }
        }
    }

    // A divergence is found the same way in one call or in chunks.
    let hotel_first = coordinator_fn(&TRIP, |ctx: Context, who: String| async move {
        let _ = ctx.now_ms();
        ctx.call(&BOOK_HOTEL, &who).await?;
        Ok(json!(null))
    });
    let once = nondeterminism(replay_fresh("trip-1", &hotel_first, &d.history));
    for cuts in &cut_sets {
        let chunked = nondeterminism(replay_in_chunks("trip-1", &hotel_first, &d.history, cuts));
        assert_eq!(chunked, once);
    }
}
