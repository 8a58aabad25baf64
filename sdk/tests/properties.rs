//! Property tests: whatever events a (possibly corrupt) history holds, replay reports an error
//! instead of panicking; and every event survives a JSON round trip unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures::{pin_mut, select_biased, FutureExt};
use proptest::prelude::*;
use retrace_sdk::{
    coordinator_fn, Activity, ActivityFailure, Context, Coordinator, CoordinatorFn, Error, Event,
    Execution, HistoryEvent, Nondeterminism, ParentRef, RetryPolicy, RetrySpec, Saga,
};
use serde_json::{json, Value};
use std::time::Duration;

// ----- a coordinator that uses every kind of command -----

const STEP: Activity<u32, u32> = Activity::new("step");
const UNDO: Activity<u32, ()> = Activity::new("undo");
const KID: Coordinator<u32, u32> = Coordinator::new("kid");
const ALL: Coordinator<u32, u32> = Coordinator::new("all");

async fn everything(ctx: Context, n: u32) -> Result<u32, Error> {
    let mut saga = Saga::new();
    let _ = ctx.now_ms();
    let first = ctx.call(&STEP, &n).await?;
    saga.add(&UNDO, &first)?;
    let (a, b) = futures::join!(ctx.call(&STEP, &1), ctx.call(&STEP, &2));
    let raced = {
        let go = ctx.signal::<u32>("go").fuse();
        let nap = ctx.sleep(Duration::from_secs(1)).fuse();
        pin_mut!(go, nap);
        select_biased! {
            g = go => g,
            t = nap => t.map(|()| 0),
        }
    };
    let patched = ctx.patched("p1");
    let kid = ctx.child(&KID, "kid-1", &n).await;
    let _: u32 = ctx.side_effect("pick", || 3)?;
    let _ = ctx.uuid();
    match (a, b, raced, kid) {
        (Ok(a), Ok(b), Ok(r), Ok(k)) => Ok(a + b + r + k + u32::from(patched)),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            Err(saga.fail(&ctx, e).await)
        }
    }
}

fn everything_fn() -> CoordinatorFn {
    coordinator_fn(&ALL, everything)
}

// ----- strategies -----

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("step".to_string()),
        Just("undo".to_string()),
        Just("go".to_string()),
        Just("p1".to_string()),
        Just("now".to_string()),
        "[a-z_]{0,6}",
    ]
}

/// JSON values whose numbers survive a text round trip exactly (see the report on floats).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1_000_000i64..1_000_000).prop_map(|i| Value::from(i as f64 / 1024.0)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,5}|type", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn retry_spec() -> impl Strategy<Value = RetrySpec> {
    let coefficient = prop_oneof![
        (0u32..64).prop_map(|k| f64::from(k) / 4.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(f64::MAX),
    ];
    let timeout = prop::option::of(any::<u64>().prop_map(Duration::from_millis));
    (
        any::<u32>(),
        any::<u64>(),
        coefficient,
        any::<u64>(),
        timeout.clone(),
        timeout,
    )
        .prop_map(|(attempts, initial, c, max, start_to_close, heartbeat)| {
            let mut policy = RetryPolicy::new()
                .max_attempts(attempts)
                .initial_interval(Duration::from_millis(initial))
                .backoff_coefficient(c)
                .max_interval(Duration::from_millis(max))
                .non_retryable(&["refused", "payload"]);
            if let Some(t) = start_to_close {
                policy = policy.start_to_close_timeout(t);
            }
            if let Some(t) = heartbeat {
                policy = policy.heartbeat_timeout(t);
            }
            policy.spec()
        })
}

fn failure() -> impl Strategy<Value = ActivityFailure> {
    (
        name(),
        any::<u32>(),
        any::<u32>(),
        name(),
        ".{0,10}",
        any::<bool>(),
    )
        .prop_map(
            |(activity, position, attempt, kind, message, non_retryable)| ActivityFailure {
                activity,
                position,
                attempt,
                kind,
                message,
                non_retryable,
            },
        )
}

fn error() -> impl Strategy<Value = Error> {
    prop_oneof![
        failure().prop_map(Error::Activity),
        ".{0,8}".prop_map(|reason| Error::Cancelled { reason }),
        (name(), any::<u32>(), name(), name()).prop_map(
            |(instance_id, position, recorded, requested)| {
                Error::Nondeterminism(Nondeterminism {
                    instance_id,
                    position,
                    recorded,
                    requested,
                })
            }
        ),
        (name(), name(), ".{0,8}").prop_map(|(action, what, message)| Error::Payload {
            action,
            what,
            message
        }),
        (name(), ".{0,8}").prop_map(|(instance_id, message)| Error::Child {
            instance_id,
            message
        }),
        (name(), ".{0,8}").prop_map(|(kind, message)| Error::application(kind, message)),
        json_value().prop_map(|input| Error::ContinueAsNew { input }),
    ]
}

/// Any event, with command positions in a small range so that generated histories often line up
/// with what the coordinator asks for.
fn event() -> impl Strategy<Value = Event> {
    let seq = 0u32..12;
    let parent = prop::option::of(
        (name(), any::<u32>()).prop_map(|(instance_id, seq)| ParentRef { instance_id, seq }),
    );
    prop_oneof![
        (name(), json_value(), parent).prop_map(|(coordinator, input, parent)| {
            Event::InstanceStarted {
                coordinator,
                input,
                parent,
            }
        }),
        (seq.clone(), json_value(), any::<u32>()).prop_map(|(seq, output, attempt)| {
            Event::ActivityCompleted {
                seq,
                output,
                attempt,
            }
        }),
        (seq.clone(), failure()).prop_map(|(seq, failure)| Event::ActivityFailed { seq, failure }),
        seq.clone().prop_map(|seq| Event::TimerFired { seq }),
        (name(), json_value()).prop_map(|(name, payload)| Event::SignalReceived { name, payload }),
        (seq.clone(), prop::result::maybe_ok(json_value(), error()))
            .prop_map(|(seq, result)| Event::ChildCompleted { seq, result }),
        prop::collection::vec(name(), 0..3).prop_map(|patches| Event::PatchesPinned { patches }),
        ".{0,8}".prop_map(|reason| Event::CancelRequested { reason }),
        (seq.clone(), name(), json_value(), retry_spec()).prop_map(|(seq, name, input, retry)| {
            Event::ActivityScheduled {
                seq,
                name,
                input,
                retry,
            }
        }),
        (seq.clone(), any::<u64>())
            .prop_map(|(seq, fire_at_ms)| Event::TimerStarted { seq, fire_at_ms }),
        (seq.clone(), name()).prop_map(|(seq, name)| Event::SignalAwaited { seq, name }),
        (seq.clone(), name(), name(), json_value(), any::<bool>()).prop_map(
            |(seq, instance_id, coordinator, input, detached)| Event::ChildStarted {
                seq,
                instance_id,
                coordinator,
                input,
                detached,
            }
        ),
        (seq.clone(), name(), json_value()).prop_map(|(seq, name, value)| Event::SideEffect {
            seq,
            name,
            value
        }),
        (seq, name()).prop_map(|(seq, patch)| Event::PatchMarker { seq, patch }),
        json_value().prop_map(|output| Event::InstanceCompleted { output }),
        error().prop_map(|error| Event::InstanceFailed { error }),
        ".{0,8}".prop_map(|reason| Event::InstanceCancelled { reason }),
        ".{0,8}".prop_map(|reason| Event::InstanceTerminated { reason }),
        json_value().prop_map(|input| Event::ContinuedAsNew { input }),
    ]
}

/// A history of `events`, mostly well shaped: each event either stays in the current activation
/// or opens the next one; now and then a position or an activation number is off.
fn history() -> impl Strategy<Value = Vec<HistoryEvent>> {
    let start = prop_oneof![
        2 => (0u32..3).prop_map(|n| vec![started("all", json!(n))]),
        2 => (0u32..3, any::<bool>()).prop_map(|(n, p)| {
            vec![started("all", json!(n)), pinned(if p { &["p1"] } else { &[] })]
        }),
        1 => Just(Vec::new()),
    ];
    let step = (event(), 0u8..100, any::<u64>(), any::<u32>());
    (start, prop::collection::vec(step, 0..40)).prop_map(|(start, steps)| {
        let mut out: Vec<HistoryEvent> = Vec::new();
        let mut activation = 0u32;
        for (i, event) in start.into_iter().enumerate() {
            out.push(HistoryEvent {
                position: i as u64,
                activation,
                recorded_at_ms: 0,
                event,
            });
        }
        for (event, dice, noise, wild) in steps {
            if dice < 35 {
                activation = activation.saturating_add(1);
            }
            let mut position = out.len() as u64;
            let mut number = activation;
            match dice {
                0 => position = noise,
                1 => position = position.saturating_sub(1),
                2 => number = wild,
                3 => number = number.saturating_sub(1),
                4 => number = u32::MAX,
                _ => {}
            }
            out.push(HistoryEvent {
                position,
                activation: number,
                recorded_at_ms: noise,
                event,
            });
        }
        out
    })
}

/// A valid recorded history of [`everything`], driven live with arbitrary outcomes.
fn recorded_history(outcomes: &[(bool, u32)]) -> Vec<HistoryEvent> {
    let mut d = Driver::new("prop-rec", everything_fn()).with_patches(&["p1"]);
    d.start("all", json!(1));
    for &(ok, value) in outcomes {
        if d.terminal().is_some() {
            break;
        }
        let inbound = if let Some(&seq) = d.open_activities().first() {
            if ok {
                completed(seq, json!(value))
            } else {
                failed(seq, "step", "refused", "no")
            }
        } else if let Some(&seq) = d.open_timers().first() {
            if ok {
                fired(seq)
            } else {
                signal("go", json!(value))
            }
        } else if let Some(Event::ChildStarted { seq, .. }) = d
            .commands()
            .into_iter()
            .rev()
            .find(|e| matches!(e, Event::ChildStarted { .. }))
        {
            child_completed(
                seq,
                if ok {
                    Ok(json!(value))
                } else {
                    Err(Error::application("k", "m"))
                },
            )
        } else {
            signal("go", json!(value))
        };
        d.activate(vec![inbound]);
    }
    d.history
}

/// `cases` cases (or `PROPTEST_CASES` when set); failures are reported with their minimal input,
/// not written to files.
fn config(cases: u32) -> ProptestConfig {
    let defaults = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            defaults.cases
        } else {
            cases
        },
        failure_persistence: None,
        ..defaults
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Replay of any history returns `Ok` or an error; it never panics, whether the history comes
    /// in one call or in two, and a live activation after a successful replay does not panic
    /// either.
    #[test]
    fn replay_of_arbitrary_events_never_panics(history in history(), cut in 0usize..40) {
        let coordinator = everything_fn();
        let mut whole = Execution::new("prop-1", coordinator.clone());
        let whole_result = whole.replay(&history);

        let cut = cut.min(history.len());
        let mut split = Execution::new("prop-1", coordinator);
        let split_result = split.replay(&history[..cut]).and_then(|()| split.replay(&history[cut..]));
        if whole_result.is_ok() {
            let next = vec![completed(0, json!(1)), fired(3), signal("go", json!(2)), cancel("c")];
            let _ = whole.activate(next, T0, 1);
            let _ = whole.activate(vec![], T0, 2);
            // A well-shaped history that replays in one call replays in two.
            prop_assert!(split_result.is_ok() || history[..cut].last().map(|e| e.activation)
                == history.get(cut).map(|e| e.activation),
                "one call: ok, two calls: {:?}", split_result);
        }
    }

    /// Live activations with arbitrary inbound events never panic, and what they record replays.
    #[test]
    fn live_activations_with_arbitrary_events_record_replayable_histories(
        batches in prop::collection::vec(prop::collection::vec(event(), 0..5), 0..12),
        n in 0u32..3,
    ) {
        let patches: &'static [&'static str] = if n == 1 { &["p1"] } else { &[] };
        let mut d = Driver::new("prop-2", everything_fn()).with_patches(patches);
        d.start("all", json!(n));
        for batch in batches {
            let batch: Vec<Event> =
                batch.into_iter().filter(|e| !matches!(e, Event::InstanceStarted { .. })).collect();
            if d.try_activate(batch).is_err() {
                return Ok(());
            }
        }
        let replayed = replay_fresh("prop-2", &d.coordinator(), &d.history);
        prop_assert!(replayed.is_ok(), "{:?}", replayed.err());
        let replayed = replayed.unwrap();
        prop_assert_eq!(replayed.is_finished(), d.execution.is_finished());
        prop_assert_eq!(replayed.next_position(), d.execution.next_position());
    }

    /// A valid history with one event dropped, duplicated, moved or altered replays to `Ok` or an
    /// error, never a panic.
    #[test]
    fn mutated_recorded_histories_never_panic(
        outcomes in prop::collection::vec((any::<bool>(), 0u32..5), 1..12),
        at in any::<prop::sample::Index>(),
        to in any::<prop::sample::Index>(),
        replacement in event(),
        how in 0u8..5,
    ) {
        let mut history = recorded_history(&outcomes);
        let i = at.index(history.len());
        match how {
            0 => { history.remove(i); }
            1 => { let e = history[i].clone(); history.insert(i, e); }
            2 => { let e = history.remove(i); let j = to.index(history.len() + 1); history.insert(j, e); }
            3 => history[i].event = replacement,
            _ => history[i].activation = history[i].activation.wrapping_add(1),
        }
        // Renumber positions half of the time, so that the mutation reaches the replay itself.
        if how % 2 == 0 {
            for (p, e) in history.iter_mut().enumerate() {
                e.position = p as u64;
            }
        }
        let _ = replay_fresh("prop-rec", &everything_fn(), &history);
    }

    /// Every event, and every stored event, decodes from its JSON encoding to an equal value.
    #[test]
    fn events_round_trip_through_json(event in event(), position in any::<u64>(), activation in any::<u32>(), at in any::<u64>()) {
        let text = serde_json::to_string(&event).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &event, "{}", text);
        let value = serde_json::to_value(&event).unwrap();
        prop_assert_eq!(value["type"].as_str(), Some(event.kind()));
        let stored = HistoryEvent { position, activation, recorded_at_ms: at, event };
        let text = serde_json::to_string(&stored).unwrap();
        let back: HistoryEvent = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(back, stored);
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// `Event::from_json` (which takes a faster way to the commonest events) decodes every
    /// event's JSON form as serde does, and texts edited at random to the same result as serde
    /// (the same event, or an error).
    #[test]
    fn the_fast_event_encoder_writes_what_serde_writes(
        event in event(),
        standard in any::<bool>(),
        odd_name in ".{0,8}",
        prefix in "[a-z]{0,3}",
    ) {
        let mut event = event;
        // Half the scheduled calls with the standard policy (the encoder's own way), named
        // with any characters (quotes, backslashes, control characters); half the starts of
        // coordinators so named.
        match &mut event {
            Event::ActivityScheduled { retry, name, .. } if standard => {
                *retry = RetryPolicy::new().spec();
                *name = odd_name;
            }
            Event::InstanceStarted { coordinator, .. } if standard => *coordinator = odd_name,
            _ => {}
        }
        let mut fast = prefix.clone().into_bytes();
        event.write_json(&mut fast).unwrap();
        let mut serde = prefix.into_bytes();
        serde_json::to_writer(&mut serde, &event).unwrap();
        prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(serde).unwrap());
    }

    #[test]
    fn the_fast_event_decoder_agrees_with_serde(
        event in event(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, prop::sample::select(vec!['"', '\\', ',', ':', '}', '{', '[', '0', '1', '9', ' ', 'a', '\n'])), 0..3),
    ) {
        let text = serde_json::to_string(&event).unwrap();
        prop_assert_eq!(Event::from_json(&text).unwrap(), event);
        let mut chars: Vec<char> = text.chars().collect();
        for (at, how, c) in edits {
            let i = at.index(chars.len() + 1);
            match how {
                0 => chars.insert(i, c),
                1 if i < chars.len() => { chars.remove(i); }
                _ if i < chars.len() => chars[i] = c,
                _ => chars.push(c),
            }
        }
        let edited: String = chars.into_iter().collect();
        let fast = Event::from_json(&edited);
        let serde = serde_json::from_str::<Event>(&edited);
        match (fast, serde) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{}", edited),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "{}: from_json {:?}, serde {:?}", edited, a, b),
        }
    }
}

#[test]
fn a_non_finite_backoff_coefficient_still_journals_valid_json() {
    for c in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let retry = RetryPolicy::new().backoff_coefficient(c).spec();
        let event = Event::ActivityScheduled {
            seq: 0,
            name: "a".into(),
            input: json!(1),
            retry,
        };
        let text = serde_json::to_string(&event).unwrap();
        let back: Result<Event, _> = serde_json::from_str(&text);
        assert_eq!(back.as_ref().ok(), Some(&event), "{c}: {text} -> {back:?}");
    }
    let spec = RetryPolicy::new().backoff_coefficient(f64::INFINITY).spec();
    assert_eq!(spec.backoff(1), Duration::from_millis(100));
    assert_eq!(spec.backoff(2), Duration::from_secs(10));
    assert_eq!(
        RetryPolicy::new()
            .backoff_coefficient(f64::NAN)
            .spec()
            .backoff_coefficient,
        1.0
    );
}
