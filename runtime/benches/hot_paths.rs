//! Micro-benchmarks of the hot paths, so that regressions show (`cargo bench -p
//! retrace-runtime`):
//! - `event/*`: encoding and decoding one journaled event (JSON, as stored);
//! - `append/*`: one activation of N events committed through the SQLite store's group-commit
//!   writer (`synchronous=NORMAL`, so that the figure is the CPU cost, not the disk's fsync);
//! - `replay/*`: a fresh execution replaying an N-activity sequential history, as a worker with
//!   an empty cache does (decoding excluded: see `event/decode`).
//!
//! The end-to-end figures against the disk's limit come from `examples/bench.rs`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use retrace_runtime::store::{ActivationCommit, NewInstance};
use retrace_runtime::{Durability, SqliteOptions, SqliteStore, Store};
use retrace_sdk::{
    coordinator_fn, Activity, Context, Coordinator, Error, Event, Execution, HistoryEvent,
    RetryPolicy,
};
use std::hint::black_box;

const ADD_ONE: Activity<u64, u64> = Activity::new("add_one");
const STEPS: Coordinator<u32, u64> = Coordinator::new("steps");

async fn steps(ctx: Context, n: u32) -> Result<u64, Error> {
    let mut value = 0u64;
    for _ in 0..n {
        value = ctx.call(&ADD_ONE, &value).await?;
    }
    Ok(value)
}

/// The history of a `steps(n)` run, produced by the replay machinery itself: one activation for
/// the start, then one per completion.
fn history(n: u32) -> Vec<HistoryEvent> {
    let mut run = Execution::new("bench", coordinator_fn(&STEPS, steps));
    let mut history = Vec::new();
    let mut push = |activation: u32, events: Vec<Event>| {
        for event in events {
            history.push(HistoryEvent {
                position: history.len() as u64,
                activation,
                recorded_at_ms: 0,
                event,
            });
        }
    };
    let start = Event::InstanceStarted {
        coordinator: "steps".into(),
        input: n.into(),
        parent: None,
    };
    let first = run.activate(vec![start], 0, 0).unwrap();
    push(first.activation, first.events);
    for seq in 0..n {
        let done = Event::ActivityCompleted {
            seq,
            output: (u64::from(seq) + 1).into(),
            attempt: 1,
        };
        let next = run.activate(vec![done], 0, 0).unwrap();
        push(next.activation, next.events);
    }
    assert!(run.is_finished());
    history
}

fn events(c: &mut Criterion) {
    let scheduled = Event::ActivityScheduled {
        seq: 7,
        name: "reserve_car".into(),
        input: serde_json::json!({"trip": 42, "traveller": "Ada"}),
        retry: RetryPolicy::new().spec(),
    };
    let completed = Event::ActivityCompleted {
        seq: 7,
        output: serde_json::json!({"service": "cars", "id": "c-42"}),
        attempt: 1,
    };
    let mut group = c.benchmark_group("event");
    for (name, event) in [("scheduled", &scheduled), ("completed", &completed)] {
        let text = serde_json::to_string(event).unwrap();
        // What the SQLite store encodes with; `encode_generic_` is serde's own way.
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(128);
                black_box(event).write_json(&mut out).unwrap();
                out
            })
        });
        group.bench_function(format!("encode_generic_{name}"), |b| {
            b.iter(|| serde_json::to_string(black_box(event)).unwrap())
        });
        // What the stores decode with; `decode_generic_` is serde's own way, for comparison.
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| Event::from_json(black_box(&text)).unwrap())
        });
        group.bench_function(format!("decode_generic_{name}"), |b| {
            b.iter(|| serde_json::from_str::<Event>(black_box(&text)).unwrap())
        });
    }
    group.finish();
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = SqliteOptions::default();
    options.durability = Durability::Normal;
    let store = SqliteStore::open_with(dir.path().join("append.db"), options).unwrap();
    let owner = "bench-worker";
    let lease_ms = 3_600_000;
    rt.block_on(async {
        store
            .create_instance(NewInstance {
                id: "append".into(),
                coordinator: "steps".into(),
                input: 0.into(),
                parent: None,
            })
            .await
            .unwrap();
        // An inbox message that is never consumed keeps the lease with the committer.
        let signal = Event::SignalReceived {
            name: "keep".into(),
            payload: 0.into(),
        };
        store.deliver("append", signal, None).await.unwrap();
        let claimed = store
            .claim_ready(owner, &["steps".to_string()], 1, lease_ms)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["append".to_string()]);
    });
    let mut position = 0u64;
    let mut activation = 0u32;
    let mut seq = 0u32;
    let mut group = c.benchmark_group("append");
    for n in [1usize, 10, 100] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("activation_of_{n}_events"), |b| {
            b.iter_batched(
                || {
                    let events: Vec<Event> = (0..n)
                        .map(|_| {
                            seq += 1;
                            Event::SideEffect {
                                seq,
                                name: "now".into(),
                                value: 1_700_000_000_000u64.into(),
                            }
                        })
                        .collect();
                    let commit = ActivationCommit::plan(
                        "append",
                        owner,
                        0,
                        position,
                        activation,
                        events,
                        Vec::new(),
                        None,
                        &|_| true,
                        lease_ms,
                    );
                    position += n as u64;
                    activation += 1;
                    commit
                },
                |commit| rt.block_on(store.commit_activation(commit)).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
    store.close();
}

fn replay(c: &mut Criterion) {
    let mut group = c.benchmark_group("replay");
    group.sample_size(20);
    for n in [1_000u32, 10_000] {
        let history = history(n);
        group.throughput(Throughput::Elements(history.len() as u64));
        group.bench_function(format!("sequential_{n}_activities"), |b| {
            b.iter(|| {
                let mut run = Execution::new("bench", coordinator_fn(&STEPS, steps));
                run.replay(black_box(&history)).unwrap();
                assert!(run.is_finished());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, events, append, replay);
criterion_main!(benches);
