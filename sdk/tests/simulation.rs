//! A seeded, deterministic simulation of the replay machinery under hostile schedules.
//!
//! A trip-booking coordinator (a car, then a hotel and a flight joined, an approval signal raced
//! with a one-hour timer, a card charge, and a saga that compensates on any failure) runs against
//! a simulated world whose completion *values* are fixed by a scenario, while the *schedule* is
//! random: completions arrive in random orders and batches, some are delivered twice, the worker
//! "crashes" before committing an activation, the cache is evicted (the execution is rebuilt by
//! replaying its history, in one call or in chunks), and a stale cached execution is caught up
//! from the store's history. Every schedule must end with the outcome of an undisturbed run of
//! the same scenario, and its final history must replay from scratch.
//!
//! `RETRACE_SIM_SEEDS=<n>` runs `n` seeds (default 5000); `RETRACE_SIM_SEED=<s>` re-runs seed `s`
//! alone. A failure names its seed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures::{pin_mut, select_biased, FutureExt};
use retrace_sdk::{
    coordinator_fn, Activity, Context, Coordinator, CoordinatorFn, Error, Event, EventFamily,
    Execution, HistoryEvent, Saga,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const DEFAULT_SEEDS: u64 = 5000;

// ----- the coordinator under test -----

const RESERVE_CAR: Activity<String, String> = Activity::new("reserve_car");
const BOOK_HOTEL: Activity<String, String> = Activity::new("book_hotel");
const BOOK_FLIGHT: Activity<String, String> = Activity::new("book_flight");
const CHARGE_CARD: Activity<String, String> = Activity::new("charge_card");
const CANCEL_CAR: Activity<String, ()> = Activity::new("cancel_car");
const CANCEL_HOTEL: Activity<String, ()> = Activity::new("cancel_hotel");
const CANCEL_FLIGHT: Activity<String, ()> = Activity::new("cancel_flight");
const TRIP: Coordinator<String, String> = Coordinator::new("trip");

/// uuid (0), car (1), hotel and flight joined (2, 3), approval signal (4) raced with a one-hour
/// timer (5), card (6), then compensations in reverse order on any failure.
async fn trip(ctx: Context, who: String) -> Result<String, Error> {
    let trip_id = ctx.uuid();
    ctx.set_status(&"reserving")?;
    let mut saga = Saga::new();
    let car = ctx.call(&RESERVE_CAR, &who).await?;
    saga.add(&CANCEL_CAR, &car)?;
    let (hotel, flight) = futures::join!(ctx.call(&BOOK_HOTEL, &who), ctx.call(&BOOK_FLIGHT, &who));
    if let Ok(hotel) = &hotel {
        saga.add(&CANCEL_HOTEL, hotel)?;
    }
    if let Ok(flight) = &flight {
        saga.add(&CANCEL_FLIGHT, flight)?;
    }
    let (hotel, flight) = match (hotel, flight) {
        (Ok(hotel), Ok(flight)) => (hotel, flight),
        (Err(e), _) | (_, Err(e)) => return Err(saga.fail(&ctx, e).await),
    };
    ctx.set_status(&"awaiting approval")?;
    let approval = {
        let approve = ctx.signal::<bool>("approve").fuse();
        let deadline = ctx.sleep(Duration::from_secs(3600)).fuse();
        pin_mut!(approve, deadline);
        select_biased! {
            a = approve => a.map(Some),
            d = deadline => d.map(|()| None),
        }
    };
    let refusal = match approval {
        Ok(Some(true)) => None,
        Ok(Some(false)) => Some(Error::application("declined", "the traveller declined")),
        Ok(None) => Some(Error::application("timeout", "no approval within the hour")),
        Err(e) => Some(e),
    };
    if let Some(e) = refusal {
        return Err(saga.fail(&ctx, e).await);
    }
    ctx.set_status(&"charging")?;
    let receipt = match ctx.call(&CHARGE_CARD, &who).await {
        Ok(receipt) => receipt,
        Err(e) => return Err(saga.fail(&ctx, e).await),
    };
    ctx.set_status(&"booked")?;
    Ok(format!("{trip_id} {car} {hotel} {flight} {receipt}"))
}

fn trip_fn() -> CoordinatorFn {
    coordinator_fn(&TRIP, trip)
}

// ----- a tiny deterministic RNG -----

/// splitmix64: tiny, good enough, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6A09_E667_F3BC_C909)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

// ----- scenarios: the completion values -----

#[derive(Debug, Clone, Copy, PartialEq)]
enum Approval {
    /// The signal `true` arrives (possibly before it is awaited); the timer may fire after it.
    Approve,
    /// The signal `false` arrives.
    Decline,
    /// The timer fires first; the signal arrives late (after the timer fired) or never.
    Timeout { late_signal: bool },
}

/// What the world answers, whatever the schedule.
#[derive(Debug, Clone)]
struct Scenario {
    who: String,
    /// Activities that fail for good.
    refused: Vec<&'static str>,
    approval: Approval,
}

impl Scenario {
    fn generate(rng: &mut Rng, seed: u64) -> Self {
        let mut refused = Vec::new();
        for (name, percent) in [
            ("reserve_car", 8),
            ("book_hotel", 12),
            ("book_flight", 12),
            ("charge_card", 15),
            ("cancel_car", 10),
            ("cancel_hotel", 10),
            ("cancel_flight", 10),
        ] {
            if rng.chance(percent) {
                refused.push(name);
            }
        }
        let approval = match rng.below(100) {
            0..=49 => Approval::Approve,
            50..=64 => Approval::Decline,
            65..=84 => Approval::Timeout { late_signal: true },
            _ => Approval::Timeout { late_signal: false },
        };
        Scenario {
            who: format!("traveller-{seed}"),
            refused,
            approval,
        }
    }

    /// The final outcome of activity call `seq` named `name` with `input`.
    fn outcome(&self, seq: u32, name: &str, input: &Value) -> Event {
        if self.refused.contains(&name) {
            Event::ActivityFailed {
                seq,
                failure: retrace_sdk::ActivityFailure {
                    activity: name.to_string(),
                    position: seq,
                    attempt: 1 + (name.len() as u32 % 3),
                    kind: "refused".into(),
                    message: format!("{name} refused for {input}"),
                    non_retryable: true,
                },
            }
        } else if name.starts_with("cancel_") {
            completed(seq, Value::Null)
        } else {
            let who = input.as_str().unwrap_or_default();
            Event::ActivityCompleted {
                seq,
                output: json!(format!("{name}#{who}")),
                attempt: 1 + (seq % 2),
            }
        }
    }

    fn signal_payload(&self) -> Option<bool> {
        match self.approval {
            Approval::Approve | Approval::Timeout { late_signal: true } => Some(true),
            Approval::Decline => Some(false),
            Approval::Timeout { late_signal: false } => None,
        }
    }
}

// ----- the simulated world -----

/// How a run is scheduled.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// One event per activation, lowest position first, nothing disturbed.
    Undisturbed,
    /// Random batches and orders, duplicates, crashes, evictions, stale caches.
    Chaos,
}

/// What a run ends with, for comparison between schedules.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    terminal: Event,
    /// Activity calls (name, input), in position order: compensations included.
    calls: Vec<(String, Value)>,
    custom_status: Option<Value>,
}

/// A finished run.
#[derive(Debug, PartialEq)]
struct Run {
    outcome: Outcome,
    history: Vec<HistoryEvent>,
    stats: BTreeMap<&'static str, usize>,
}

struct World<'a> {
    scenario: &'a Scenario,
    rng: Rng,
    mode: Mode,
    execution: Execution,
    /// A stale execution kept aside, as a cache of another worker would hold it.
    parked: Option<Execution>,
    history: Vec<HistoryEvent>,
    now_ms: u64,
    /// What happened, for failure reports.
    log: Vec<String>,
    /// How often each kind of disturbance happened.
    stats: BTreeMap<&'static str, usize>,
}

const INSTANCE: &str = "trip-sim";

impl<'a> World<'a> {
    fn new(scenario: &'a Scenario, seed: u64, mode: Mode) -> Self {
        World {
            scenario,
            rng: Rng::new(seed.wrapping_mul(31).wrapping_add(7)),
            mode,
            execution: Execution::new(INSTANCE, trip_fn()),
            parked: None,
            history: Vec::new(),
            now_ms: T0,
            log: Vec::new(),
            stats: BTreeMap::new(),
        }
    }

    fn note(&mut self, tag: &'static str, detail: String) {
        *self.stats.entry(tag).or_default() += 1;
        self.log.push(format!("{tag}: {detail}"));
    }

    /// Counts the kinds of batch the machinery had to digest.
    fn note_batch(&mut self, batch: &[Event]) {
        let signal = batch
            .iter()
            .any(|e| matches!(e, Event::SignalReceived { .. }));
        let timer = batch.iter().any(|e| matches!(e, Event::TimerFired { .. }));
        let awaited = self.has(|e| matches!(e, Event::SignalAwaited { .. }));
        if batch.len() > 1 {
            *self.stats.entry("batch of several").or_default() += 1;
        }
        if signal && !awaited {
            *self.stats.entry("signal before its wait").or_default() += 1;
        }
        if signal && timer && !self.timer_fired() {
            *self.stats.entry("signal with the timer").or_default() += 1;
        }
        if signal && self.timer_fired() {
            *self.stats.entry("signal after the timer").or_default() += 1;
        }
    }

    fn has(&self, f: impl Fn(&Event) -> bool) -> bool {
        self.history.iter().any(|e| f(&e.event))
    }

    fn signal_delivered(&self) -> bool {
        self.has(|e| matches!(e, Event::SignalReceived { .. }))
    }

    fn timer_fired(&self) -> bool {
        self.has(|e| matches!(e, Event::TimerFired { .. }))
    }

    /// Events the world may deliver now, each with the position it answers (for ordering).
    fn deliverable(&self) -> Vec<(u32, Event)> {
        if self.history.is_empty() {
            // The start stays in the inbox until an activation holding it commits.
            return vec![(0, started("trip", json!(self.scenario.who)))];
        }
        let mut out = Vec::new();
        for seq in open_activities(&self.history) {
            if let Some(Event::ActivityScheduled { name, input, .. }) = self.command(seq) {
                out.push((seq, self.scenario.outcome(seq, &name, &input)));
            }
        }
        let awaited = self.history.iter().find_map(|e| match e.event {
            Event::SignalAwaited { seq, .. } => Some(seq),
            _ => None,
        });
        if let Some(payload) = self.scenario.signal_payload() {
            let allowed = match self.scenario.approval {
                // Before the wait it is buffered; an undisturbed run sends it when awaited.
                Approval::Approve | Approval::Decline => {
                    self.mode == Mode::Chaos || awaited.is_some()
                }
                Approval::Timeout { .. } => self.timer_fired(),
            };
            if allowed && !self.signal_delivered() && !self.history.is_empty() {
                out.push((awaited.unwrap_or(4), signal("approve", json!(payload))));
            }
        }
        for seq in open_timers(&self.history) {
            // With an approval, the timer never fires before the signal (it may fire with it).
            let before_signal = matches!(
                self.scenario.approval,
                Approval::Approve | Approval::Decline
            ) && !self.signal_delivered();
            if !before_signal || self.mode == Mode::Chaos {
                out.push((seq, fired(seq)));
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        out
    }

    fn command(&self, seq: u32) -> Option<Event> {
        self.history
            .iter()
            .map(|e| &e.event)
            .find(|e| e.family() == EventFamily::Command && e.seq() == Some(seq))
            .cloned()
    }

    /// The next batch of inbound events.
    fn next_batch(&mut self, deliverable: Vec<(u32, Event)>) -> Vec<Event> {
        if self.mode == Mode::Undisturbed {
            return vec![deliverable[0].1.clone()];
        }
        let mut events: Vec<Event> = deliverable.into_iter().map(|(_, e)| e).collect();
        self.rng.shuffle(&mut events);
        let widest = if self.rng.chance(70) { 2 } else { 5 };
        let size = 1 + self.rng.below(events.len().min(widest));
        let mut batch: Vec<Event> = events[..size].to_vec();
        // The timer may not beat an approval: if it is in the batch, so is the signal.
        let approval = matches!(
            self.scenario.approval,
            Approval::Approve | Approval::Decline
        );
        if approval && !self.signal_delivered() {
            let has_timer = batch.iter().any(|e| matches!(e, Event::TimerFired { .. }));
            let has_signal = batch
                .iter()
                .any(|e| matches!(e, Event::SignalReceived { .. }));
            if has_timer && !has_signal {
                let sig = events
                    .iter()
                    .find(|e| matches!(e, Event::SignalReceived { .. }));
                let sig = sig
                    .cloned()
                    .expect("the signal is deliverable with the timer");
                let at = self.rng.below(batch.len() + 1);
                batch.insert(at, sig);
            }
        }
        // Duplicate deliveries of outcomes (never of signals: a second signal is a new signal).
        if self.rng.chance(20) {
            let recorded: Vec<Event> = self
                .history
                .iter()
                .map(|e| e.event.clone())
                .chain(batch.iter().cloned())
                .filter(|e| {
                    matches!(
                        e,
                        Event::ActivityCompleted { .. }
                            | Event::ActivityFailed { .. }
                            | Event::TimerFired { .. }
                    )
                })
                .collect();
            if !recorded.is_empty() {
                let dup = recorded[self.rng.below(recorded.len())].clone();
                *self.stats.entry("duplicate").or_default() += 1;
                let at = self.rng.below(batch.len() + 1);
                batch.insert(at, dup);
            }
        }
        batch
    }

    /// A fresh execution rebuilt from the history, in one call or in chunks.
    fn rebuild(&mut self) -> Result<Execution, String> {
        let groups = activations(&self.history).len();
        let cuts: Vec<usize> = if groups > 1 && self.rng.chance(50) {
            (0..1 + self.rng.below(3))
                .map(|_| 1 + self.rng.below(groups - 1))
                .collect()
        } else {
            Vec::new()
        };
        let tag = if cuts.is_empty() {
            "rebuild in one call"
        } else {
            "rebuild in chunks"
        };
        self.note(tag, format!("cuts {cuts:?}"));
        replay_in_chunks(INSTANCE, &trip_fn(), &self.history, &cuts)
            .map_err(|e| format!("replay after {} events failed: {e}", self.history.len()))
    }

    fn activate(&mut self, batch: Vec<Event>) -> Result<(), String> {
        let number = self.execution.next_activation();
        // The first activation draws the trip id: its seed is fixed so that every schedule of
        // the scenario books the same trip. Later seeds are random: nothing may depend on them.
        let seed = if number == 0 {
            seed_of(0)
        } else {
            self.rng.next_u64()
        };
        self.now_ms += 1 + self.rng.below(5_000) as u64;
        let crash = self.mode == Mode::Chaos && self.rng.chance(6);
        let result = self
            .execution
            .activate(batch.clone(), self.now_ms, seed)
            .map_err(|e| format!("activation {number} with {batch:?} failed: {e}"))?;
        if result.events[..batch.len()] != batch[..] {
            return Err(format!(
                "activation {number} did not start with its batch: {result:?}"
            ));
        }
        if crash {
            // The worker dies before the commit: nothing of this activation is recorded.
            self.note("crash", format!("before committing {batch:?}"));
            self.execution = self.rebuild()?;
            return Ok(());
        }
        self.note_batch(&batch);
        self.log
            .push(format!("activation {number}: {:?}", result.events));
        append_activation(
            &mut self.history,
            result.activation,
            self.now_ms,
            &result.events,
        );
        if self.mode == Mode::Chaos {
            match self.rng.below(100) {
                // Cache eviction: rebuilt from the store.
                0..=9 => self.execution = self.rebuild()?,
                // Another worker takes over while this one keeps a stale copy.
                10..=15 if self.parked.is_none() => {
                    let fresh = self.rebuild()?;
                    self.parked = Some(std::mem::replace(&mut self.execution, fresh));
                    self.note("parked", String::new());
                }
                // The stale copy comes back and catches up from the store.
                16..=24 => {
                    if let Some(mut stale) = self.parked.take() {
                        let from = stale.next_position() as usize;
                        stale.replay(&self.history[from..]).map_err(|e| {
                            format!("catching a cached copy up from position {from} failed: {e}")
                        })?;
                        self.note("caught up", format!("from position {from}"));
                        self.execution = stale;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<Run, String> {
        for _ in 0..400 {
            if let Some(terminal) = self
                .history
                .iter()
                .map(|e| &e.event)
                .find(|e| e.family() == EventFamily::Terminal)
            {
                let outcome = Outcome {
                    terminal: terminal.clone(),
                    calls: self
                        .history
                        .iter()
                        .filter_map(|e| match &e.event {
                            Event::ActivityScheduled { name, input, .. } => {
                                Some((name.clone(), input.clone()))
                            }
                            _ => None,
                        })
                        .collect(),
                    custom_status: self.execution.custom_status(),
                };
                return Ok(Run {
                    outcome,
                    history: self.history,
                    stats: self.stats,
                });
            }
            let deliverable = self.deliverable();
            if deliverable.is_empty() {
                return Err(format!(
                    "stuck: the coordinator waits for nothing the world can deliver\n{}",
                    self.log.join("\n")
                ));
            }
            let batch = self.next_batch(deliverable);
            if let Err(e) = self.activate(batch) {
                return Err(format!("{e}\n{}", self.log.join("\n")));
            }
        }
        Err("no end after 400 activations".into())
    }
}

/// Runs one seed: an undisturbed reference run and a chaotic run of the same scenario.
fn run_seed(seed: u64) -> Result<(String, BTreeMap<&'static str, usize>), String> {
    let scenario = Scenario::generate(&mut Rng::new(seed), seed);
    let Run {
        outcome: reference,
        history: reference_history,
        ..
    } = World::new(&scenario, seed, Mode::Undisturbed)
        .run()
        .map_err(|e| format!("undisturbed run of {scenario:?}: {e}"))?;
    let Run {
        outcome,
        history,
        stats,
    } = World::new(&scenario, seed, Mode::Chaos)
        .run()
        .map_err(|e| format!("chaotic run of {scenario:?}: {e}"))?;
    let describe = || format!("scenario {scenario:?}\nhistory {:#?}", events_of(&history));
    if outcome != reference {
        return Err(format!(
            "outcomes differ:\n undisturbed {reference:?}\n chaotic     {outcome:?}\n{}",
            describe()
        ));
    }
    // The final histories replay from scratch, and their last activation is reproduced live.
    for (what, h) in [("undisturbed", &reference_history), ("chaotic", &history)] {
        let replayed = replay_fresh(INSTANCE, &trip_fn(), h)
            .map_err(|e| format!("{what} history does not replay: {e}\n{}", describe()))?;
        if !replayed.is_finished() || replayed.custom_status() != reference.custom_status {
            return Err(format!(
                "{what} history replays to another state\n{}",
                describe()
            ));
        }
        let groups = activations(h);
        let last = groups
            .iter()
            .rposition(|g| g.iter().any(|e| e.event.family() == EventFamily::Terminal));
        let last = last.expect("a terminal event");
        let before: usize = groups[..last].iter().map(|g| g.len()).sum();
        let mut execution = replay_fresh(INSTANCE, &trip_fn(), &h[..before])
            .map_err(|e| format!("{what} history prefix does not replay: {e}"))?;
        let live = execution
            .activate(inbound_of(groups[last]), T0, seed)
            .map_err(|e| format!("{what} last activation fails live: {e}"))?;
        if live.events != events_of(groups[last]) {
            return Err(format!(
                "{what} last activation differs live: {:?} vs {:?}",
                live.events,
                events_of(groups[last])
            ));
        }
    }
    Ok((outcome_kind(&reference.terminal), stats))
}

/// A short name of how a run ended, to check that the seeds explore every ending.
fn outcome_kind(terminal: &Event) -> String {
    match terminal {
        Event::InstanceCompleted { .. } => "completed".into(),
        Event::InstanceFailed {
            error: Error::Activity(f),
        } => format!("failed: {}", f.activity),
        Event::InstanceFailed {
            error: Error::Application { kind, .. },
        } => format!("failed: {kind}"),
        other => format!("{other:?}"),
    }
}

fn run_seed_catching(seed: u64) -> Result<(String, BTreeMap<&'static str, usize>), String> {
    match std::panic::catch_unwind(|| run_seed(seed)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {message}"))
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

#[test]
fn random_schedules_end_like_the_undisturbed_run() {
    let seeds: Vec<u64> = match env_u64("RETRACE_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("RETRACE_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let mut endings: BTreeMap<String, usize> = BTreeMap::new();
    let mut disturbances: BTreeMap<&'static str, usize> = BTreeMap::new();
    for &seed in &seeds {
        match run_seed_catching(seed) {
            Ok((kind, stats)) => {
                *endings.entry(kind).or_default() += 1;
                for (tag, n) in stats {
                    *disturbances.entry(tag).or_default() += n;
                }
            }
            Err(message) => panic!(
                "simulation seed {seed} failed (re-run with RETRACE_SIM_SEED={seed}): {message}"
            ),
        }
    }
    if seeds.len() >= 1000 {
        // The scenarios reach every ending.
        for kind in [
            "completed",
            "failed: reserve_car",
            "failed: book_hotel",
            "failed: book_flight",
            "failed: charge_card",
            "failed: declined",
            "failed: timeout",
        ] {
            assert!(
                endings.contains_key(kind),
                "no seed ended with {kind}: {endings:?}"
            );
        }
        // And the schedules reach every kind of disturbance.
        for tag in [
            "crash",
            "rebuild in one call",
            "rebuild in chunks",
            "parked",
            "caught up",
            "duplicate",
            "batch of several",
            "signal before its wait",
            "signal with the timer",
            "signal after the timer",
        ] {
            assert!(
                disturbances.get(tag).copied().unwrap_or(0) > 0,
                "no schedule had a {tag}: {disturbances:?}"
            );
        }
    }
}

#[test]
fn the_simulator_is_deterministic() {
    for seed in [0, 1, 42, 4242] {
        let scenario = Scenario::generate(&mut Rng::new(seed), seed);
        let a = World::new(&scenario, seed, Mode::Chaos).run().unwrap();
        let b = World::new(&scenario, seed, Mode::Chaos).run().unwrap();
        assert_eq!(a, b, "seed {seed}");
    }
}
