//! An activation is "one poll of the coordinator after a batch of new events" (DESIGN.md): a
//! worker must never commit an activation that delivered nothing.
//!
//! Regression test for a race in the worker: the dispatcher's periodic `claim_ready` re-claims an
//! instance this worker is already activating (its lease is ours and `ready` is still 1 until
//! the activation commits), and `schedule` then asks for one more activation. That activation
//! finds the inbox empty, polls the coordinator anyway and commits an activation with no events:
//! with the cache on the history's activation numbers get gaps; with it off, the same activation
//! number is committed twice (once empty). Each such activation costs a load, a full replay when
//! the cache is off, and a commit. A short poll interval makes the race happen on nearly every
//! step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use retrace::{
    Activity, ActivityContext, ActivityError, Client, CommitNotice, Context, Coordinator, Error,
    Worker,
};
use std::time::Duration;

const STEP: Activity<u32, u32> = Activity::new("step");
const STEPS: Coordinator<u32, u32> = Coordinator::new("steps");

/// `n` activity calls, one after the other: one activation per completion.
async fn steps(ctx: Context, n: u32) -> Result<u32, Error> {
    let mut acc = 0;
    for i in 0..n {
        acc = ctx.call(&STEP, &(acc + i)).await?;
    }
    Ok(acc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_activation_delivers_something() {
    init_tracing();
    let dir = TempDir::new("empty-activations");
    let store = open_store(&dir.file("store.db"));
    let (observer, mut commits) = commit_channel();
    let worker = Worker::builder(store.clone())
        .coordinator(&STEPS, steps)
        .activity(&STEP, |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .poll_interval(Duration::from_millis(1))
        .on_commit(observer)
        .start();
    let client = Client::new(store.clone());
    let handle = client.start(&STEPS, "steps-1", &40).await.unwrap();
    result_of(&handle).await.unwrap();
    // The worker reports a commit once the commit has returned to it: the client can see the
    // instance end first, and `shutdown` does not wait for the report. So the reports are read
    // up to the one of the ending activation before the worker stops, then any that follow.
    let mut committed = Vec::new();
    loop {
        let notice = tokio::time::timeout(Duration::from_secs(30), commits.recv())
            .await
            .expect("no report of the ending activation within 30 s")
            .expect("the worker's observer is alive");
        if let CommitNotice::Activation {
            activation, ended, ..
        } = notice
        {
            committed.push(activation);
            if ended {
                break;
            }
        }
    }
    worker.shutdown().await.unwrap();

    let history = client.history("steps-1").await.unwrap();
    assert_well_formed(&history);
    let mut in_history: Vec<u32> = history.iter().map(|e| e.activation).collect();
    in_history.dedup();
    // One activation for the start, one per completion.
    assert_eq!(in_history.len(), 41);
    while let Ok(n) = commits.try_recv() {
        if let CommitNotice::Activation { activation, .. } = n {
            committed.push(activation);
        }
    }
    assert_eq!(
        committed, in_history,
        "activations were committed that delivered no event"
    );
    assert_eq!(
        in_history,
        (0..41).collect::<Vec<u32>>(),
        "activation numbers have gaps"
    );
}
