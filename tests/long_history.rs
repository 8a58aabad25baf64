//! Long histories, loaded cold (`Store::load_and_replay`: the SQLite store replays events into
//! the execution while it is still reading them; past 512 history rows, rows are read on one
//! thread and decoded on two others, which `store::sqlite`'s unit tests cover row by row).
//! - a coordinator of 400 sequential calls (803 events) runs to the right result with the cache
//!   off, so that every activation is a cold load and replay of the history so far;
//! - a cold `load_and_replay` of the finished history ends where a plain `load` and a replay of
//!   the same events end;
//! - a divergence deep in the history is reported with its position, not as a store error;
//! - a factory that makes no execution gets the row and the inbox, and no history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use retrace::runtime::ExecutionFactory;
use retrace::sdk::{coordinator_fn, Execution};
use retrace::{
    Activity, ActivityContext, Client, Context, Coordinator, Error, ReplayError, Worker,
};

const ADD: Activity<u64, u64> = Activity::new("add");
const OTHER: Activity<u64, u64> = Activity::new("other");
const CHAIN: Coordinator<u32, u64> = Coordinator::new("chain");

/// Adds one, `n` times, one call after another.
async fn chain(ctx: Context, n: u32) -> Result<u64, Error> {
    let mut value = 0;
    for _ in 0..n {
        value = ctx.call(&ADD, &value).await?;
    }
    Ok(value)
}

/// The same, except that its call at position 300 is of another activity.
async fn changed_chain(ctx: Context, n: u32) -> Result<u64, Error> {
    let mut value = 0;
    for i in 0..n {
        let activity = if i == 300 { &OTHER } else { &ADD };
        value = ctx.call(activity, &value).await?;
    }
    Ok(value)
}

async fn add(_ctx: ActivityContext, x: u64) -> Result<u64, retrace::ActivityError> {
    Ok(x + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_loads_and_replays_cold() {
    init_tracing();
    let dir = TempDir::new("long-history");
    let store = open_store(&dir.file("store.sqlite"));
    let worker = Worker::builder(store.clone())
        .coordinator(&CHAIN, chain)
        .activity(&ADD, add)
        .cache(false)
        .start();
    let client = Client::new(store.clone());
    let handle = client.start(&CHAIN, "chain-1", &400).await.unwrap();
    assert_eq!(within("chain-1", handle.result()).await.unwrap(), 400);
    worker.shutdown().await.unwrap();

    let loaded = store.load("chain-1", 0).await.unwrap();
    assert_eq!(
        loaded.events.len(),
        803,
        "start, pinned patches, 400 calls, end"
    );
    let mut reference = Execution::new("chain-1", coordinator_fn(&CHAIN, chain));
    reference.replay(&loaded.events).unwrap();
    assert!(reference.is_finished());

    let start: ExecutionFactory =
        Box::new(|info, _| Some(Execution::new(&info.id, coordinator_fn(&CHAIN, chain))));
    let cold = store.load_and_replay("chain-1", start).await.unwrap();
    cold.replay.unwrap();
    assert_eq!(cold.events, 803);
    assert!(cold.loaded.events.is_empty());
    assert_eq!(cold.loaded.info.next_position, 803);
    let execution = cold.execution.unwrap();
    assert!(execution.is_finished());
    assert_eq!(execution.next_position(), reference.next_position());

    // Code that calls another activity at position 300 diverges there.
    let start: ExecutionFactory = Box::new(|info, _| {
        Some(Execution::new(
            &info.id,
            coordinator_fn(&CHAIN, changed_chain),
        ))
    });
    let diverged = store.load_and_replay("chain-1", start).await.unwrap();
    assert_eq!(diverged.events, 803, "the whole history was still read");
    match diverged.replay {
        Err(ReplayError::Nondeterminism(nd)) => {
            assert_eq!(nd.position, 300, "{nd:?}");
            assert!(nd.requested.contains("other"), "{nd:?}");
        }
        other => panic!("expected a divergence at 300, got {other:?}"),
    }

    // No execution: the row and the inbox only.
    let none: ExecutionFactory = Box::new(|_, _| None);
    let bare = store.load_and_replay("chain-1", none).await.unwrap();
    assert!(bare.execution.is_none());
    assert_eq!(bare.events, 0);
    assert!(bare.loaded.events.is_empty());
    assert_eq!(bare.loaded.info.id, "chain-1");
}
