//! Moving up: an SQLite store's instances, in every state, copied to PostgreSQL with
//! [`migrate_store`] — nothing lost, nothing duplicated, and a second run copies nothing.
//!
//! Runs when `RETRACE_PG_URL` names a server (for example
//! `postgres://postgres@127.0.0.1:5432/test`), in a schema of its own that is dropped at the end;
//! otherwise it says on stderr that it was not run and why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::FutureExt;
use retrace_runtime::store::{ActivationCommit, AttemptOutcome, NewInstance};
use retrace_runtime::{
    migrate_store, PostgresOptions, PostgresStore, SharedStore, SqliteStore, Store, StoreError,
};
use retrace_sdk::{ActivityError, Event, RetrySpec};
use serde_json::json;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LEASE_MS: u64 = 60_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn create(s: &SharedStore, id: &str, parent: Option<(&str, u32)>) {
    s.create_instance(NewInstance {
        id: id.into(),
        coordinator: "c".into(),
        input: json!(id),
        parent: parent.map(|(p, seq)| retrace_sdk::ParentRef {
            instance_id: p.into(),
            seq,
        }),
    })
    .await
    .unwrap();
}

/// Claims `id` for `w` and commits its inbox plus `commands`, as a worker would.
async fn activate(s: &SharedStore, w: &str, id: &str, commands: Vec<Event>) {
    let claimed = s
        .claim_ready(w, &names(&["c"]), 100, LEASE_MS)
        .await
        .unwrap();
    assert!(claimed.contains(&id.to_string()), "{id} not ready");
    let loaded = s.load(id, 0).await.unwrap();
    let mut inbox = loaded.inbox;
    inbox.sort_by_key(|m| !matches!(m.event, Event::InstanceStarted { .. }));
    let consumed = inbox.iter().map(|m| m.id).collect();
    let mut events: Vec<Event> = inbox.into_iter().map(|m| m.event).collect();
    events.extend(commands);
    let commit = ActivationCommit::plan(
        id,
        w,
        loaded.info.generation,
        loaded.info.next_position,
        loaded.info.next_activation,
        events,
        consumed,
        Some(json!({ "step": id })),
        &|_| false,
        LEASE_MS,
    );
    s.commit_activation(commit).await.unwrap();
    // Other instances claimed on the way are handed back.
    s.release_leases(w).await.unwrap();
}

/// Creates `id` and commits its first activation for `w`, which schedules call 0 ("quick")
/// and claims it with the commit (the SQLite store keeps it in the instance's held slot).
async fn start_with_claimed_call(
    s: &SharedStore,
    id: &str,
    w: &str,
    lease_ms: u64,
) -> retrace_runtime::store::ActivityTask {
    create(s, id, None).await;
    let claimed = s
        .claim_ready(w, &names(&["c"]), 100, lease_ms)
        .await
        .unwrap();
    assert!(claimed.contains(&id.to_string()));
    let loaded = s.load(id, 0).await.unwrap();
    let commit = ActivationCommit::plan(
        id,
        w,
        loaded.info.generation,
        loaded.info.next_position,
        loaded.info.next_activation,
        vec![loaded.inbox[0].event.clone(), scheduled(0, "quick")],
        vec![loaded.inbox[0].id],
        None,
        &|_| true,
        lease_ms,
    );
    let mut claimed = s.commit_activation(commit).await.unwrap().claimed_tasks;
    assert_eq!(claimed.len(), 1);
    claimed.remove(0)
}

/// The signal "go" with `payload`.
fn go(payload: u64) -> Event {
    Event::SignalReceived {
        name: "go".into(),
        payload: json!(payload),
    }
}

fn scheduled(seq: u32, name: &str) -> Event {
    Event::ActivityScheduled {
        seq,
        name: name.into(),
        input: json!(seq),
        retry: RetrySpec::default(),
    }
}

/// A source store with instances in every state a running store has.
async fn populate(s: &SharedStore) {
    let far = now_ms() + 3_600_000;
    // Just started: only the start in its inbox.
    create(s, "fresh", None).await;
    // Completed.
    create(s, "done", None).await;
    activate(
        s,
        "w",
        "done",
        vec![Event::InstanceCompleted { output: json!(1) }],
    )
    .await;
    // Waiting on a task with one failed attempt (retry due later), a timer, and a signal in its
    // inbox with a dedupe key.
    create(s, "waiting", None).await;
    activate(
        s,
        "w",
        "waiting",
        vec![
            scheduled(0, "slow"),
            Event::TimerStarted {
                seq: 1,
                fire_at_ms: far,
            },
        ],
    )
    .await;
    let t = s
        .claim_tasks("w", &names(&["slow"]), 10, LEASE_MS)
        .await
        .unwrap()
        .remove(0);
    s.finish_task(
        "w",
        &t,
        AttemptOutcome::Retry {
            next_attempt_at_ms: far,
            error: ActivityError::retryable("flaky", "later"),
        },
        LEASE_MS,
    )
    .await
    .unwrap();
    s.deliver("waiting", go(7), Some("signal:k")).await.unwrap();
    // A task whose attempt was interrupted by a crash (its lease has expired).
    create(s, "crashed", None).await;
    activate(s, "w", "crashed", vec![scheduled(0, "quick")]).await;
    let t = s
        .claim_tasks("w-dead", &names(&["quick"]), 10, 1)
        .await
        .unwrap();
    assert_eq!(t.len(), 1);
    // A call claimed with the activation that scheduled it (the SQLite store keeps it on the
    // instance row), by a worker that crashed (its lease has expired).
    start_with_claimed_call(s, "held", "w-dead", 1).await;
    s.release_leases("w").await.unwrap();
    // A held chain cut short: its worker took sequential steps (the SQLite store wrote their
    // history rows only: the instance row lags behind them) and died; its lease has expired.
    let lease_ms = 300;
    let mut task = start_with_claimed_call(s, "chained", "w-chain", lease_ms).await;
    for seq in 0..3u32 {
        let info = s.describe("chained").await.unwrap().unwrap();
        let commit = ActivationCommit::plan(
            "chained",
            "w-chain",
            info.generation,
            info.next_position,
            info.next_activation,
            vec![
                Event::ActivityCompleted {
                    seq,
                    output: json!(seq),
                    attempt: 1,
                },
                scheduled(seq + 1, "quick"),
            ],
            vec![],
            None,
            &|_| true,
            lease_ms,
        );
        match s.finish_and_activate(&task, commit).await.unwrap() {
            retrace_runtime::store::DirectFinish::Activated(mut r) => {
                task = r.claimed_tasks.remove(0)
            }
            other => panic!("chained step {seq}: {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(lease_ms + 20)).await;
    // A parent waiting on a child.
    create(s, "parent", None).await;
    activate(
        s,
        "w",
        "parent",
        vec![Event::ChildStarted {
            seq: 0,
            instance_id: "child".into(),
            coordinator: "c".into(),
            input: json!("child"),
            detached: false,
        }],
    )
    .await;
    // Continued as new: generation 1, a fresh start in its inbox.
    create(s, "continued", None).await;
    activate(
        s,
        "w",
        "continued",
        vec![Event::ContinuedAsNew { input: json!(2) }],
    )
    .await;
    s.release_leases("w").await.unwrap();
    // Terminated.
    create(s, "ended", None).await;
    s.terminate("ended", "by hand").await.unwrap();
    // A signal with an id, delivered and consumed: only the store's memory of its id is left.
    create(s, "signalled", None).await;
    activate(s, "w", "signalled", vec![]).await;
    assert!(s
        .deliver("signalled", go(1), Some("signal:s"),)
        .await
        .unwrap());
    activate(s, "w", "signalled", vec![]).await;
    // A call claimed with its scheduling and completed on the direct path: the SQLite store
    // keeps no attempt row for it (it derives the attempt from the history).
    let task = start_with_claimed_call(s, "stepped", "w", LEASE_MS).await;
    let info = s.describe("stepped").await.unwrap().unwrap();
    let commit = ActivationCommit::plan(
        "stepped",
        "w",
        info.generation,
        info.next_position,
        info.next_activation,
        vec![Event::ActivityCompleted {
            seq: 0,
            output: json!(1),
            attempt: 1,
        }],
        vec![],
        None,
        &|_| true,
        LEASE_MS,
    );
    assert!(matches!(
        s.finish_and_activate(&task, commit).await.unwrap(),
        retrace_runtime::store::DirectFinish::Activated(_)
    ));
    assert_eq!(s.attempts("stepped").await.unwrap().len(), 1);
    // Other instances claimed on the way are handed back.
    s.release_leases("w").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn inbox_events(s: &SharedStore, id: &str) -> Vec<Event> {
    s.load(id, 0)
        .await
        .unwrap()
        .inbox
        .into_iter()
        .map(|m| m.event)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_moves_to_postgres() {
    let Ok(url) = std::env::var("RETRACE_PG_URL") else {
        // Past the harness's output capture, so that it shows even though the test passes.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "migrate_to_postgres: NOT RUN: RETRACE_PG_URL is not set; set it to a server, \
             e.g. RETRACE_PG_URL=postgres://postgres@127.0.0.1:5432/test"
        );
        return;
    };
    let schema = format!(
        "retrace_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = AssertUnwindSafe(run(&url, &schema)).catch_unwind().await;
    admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn run(url: &str, schema: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("source.db");
    let source: SharedStore = Arc::new(SqliteStore::open(&path).unwrap());
    populate(&source).await;
    let row_position: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT next_pos FROM instances WHERE id = 'chained'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let chained = source.describe("chained").await.unwrap().unwrap();
    assert!(
        (row_position as u64) < chained.next_position,
        "the chain's steps wrote the instance row"
    );
    let target_store =
        PostgresStore::connect_with(url, PostgresOptions::default().with_schema(schema))
            .await
            .unwrap();
    // An instance of the same id, different, already in the target.
    target_store
        .create_instance(NewInstance {
            id: "clash".into(),
            coordinator: "other".into(),
            input: json!(0),
            parent: None,
        })
        .await
        .unwrap();
    create(&source, "clash", None).await;

    // A live lease on the source: refused, nothing copied.
    assert_eq!(
        source
            .claim_ready("live", &names(&["c"]), 1, LEASE_MS)
            .await
            .unwrap()
            .len(),
        1
    );
    match migrate_store(&path, &target_store).await {
        Err(StoreError::Busy { detail, .. }) => assert!(detail.contains("live lease"), "{detail}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(target_store.describe("fresh").await.unwrap().is_none());
    source.release_leases("live").await.unwrap();

    let report = migrate_store(&path, &target_store).await.unwrap();
    let ids = [
        "fresh",
        "done",
        "waiting",
        "crashed",
        "held",
        "parent",
        "child",
        "continued",
        "ended",
        "signalled",
        "stepped",
        "chained",
    ];
    assert_eq!(report.copied, ids.len() as u64, "{report:?}");
    assert_eq!(report.different, vec!["clash".to_string()]);
    assert_eq!(report.already_there, 0);
    let target: SharedStore = Arc::new(target_store);

    let mut events = 0;
    for id in ids {
        let a = source.describe(id).await.unwrap().unwrap();
        let b = target.describe(id).await.unwrap().unwrap();
        assert_eq!(a, b, "{id}: instance row");
        let ha = source.history(id).await.unwrap();
        assert_eq!(ha, target.history(id).await.unwrap(), "{id}: history");
        events += ha.len() as u64;
        assert_eq!(
            inbox_events(&source, id).await,
            inbox_events(&target, id).await,
            "{id}: inbox"
        );
        assert_eq!(
            source.attempts(id).await.unwrap(),
            target.attempts(id).await.unwrap(),
            "{id}: attempts"
        );
    }
    assert_eq!(target.attempts("waiting").await.unwrap().len(), 1);
    assert_eq!(target.attempts("stepped").await.unwrap().len(), 1);
    assert_eq!(report.events, events);
    // The interrupted attempt lost its lease in the copy: it is due at once.
    assert!(target.next_due().await.unwrap().unwrap() <= now_ms());
    assert_eq!(
        target
            .describe("continued")
            .await
            .unwrap()
            .unwrap()
            .generation,
        1
    );

    // Dedupe keys came along: the same signal id is still ignored.
    assert!(!target
        .deliver("waiting", go(7), Some("signal:k"),)
        .await
        .unwrap());
    // So did the ids of messages already delivered.
    assert!(!target
        .deliver("signalled", go(1), Some("signal:s"),)
        .await
        .unwrap());
    // Attempt counts came along, and no lease: the interrupted attempt is taken over at once as
    // attempt 2; the retry due later stays invisible.
    let tasks = target
        .claim_tasks("w2", &names(&["quick", "slow"]), 10, LEASE_MS)
        .await
        .unwrap();
    let mut taken: Vec<(&str, u32)> = tasks
        .iter()
        .map(|t| (t.instance_id.as_str(), t.attempt))
        .collect();
    taken.sort();
    assert_eq!(taken, vec![("chained", 2), ("crashed", 2), ("held", 2)]);
    // The chain's call is its last one, not the one its row last named.
    assert!(tasks
        .iter()
        .any(|t| t.instance_id == "chained" && t.seq == 3));
    // Ready instances are claimable at once; a child still reports to its parent.
    let mut ready = target
        .claim_ready("w2", &names(&["c"]), 100, LEASE_MS)
        .await
        .unwrap();
    ready.sort();
    assert_eq!(ready, vec!["child", "continued", "fresh", "waiting"]);
    target.terminate("child", "stop").await.unwrap();
    assert!(matches!(
        inbox_events(&target, "parent").await.as_slice(),
        [Event::ChildCompleted {
            seq: 0,
            result: Err(_)
        }]
    ));
    target.release_leases("w2").await.unwrap();

    // A second run copies nothing and duplicates nothing.
    let store = PostgresStore::connect_with(url, PostgresOptions::default().with_schema(schema))
        .await
        .unwrap();
    let again = migrate_store(&path, &store).await.unwrap();
    assert_eq!(again.copied, 0, "{again:?}");
    assert_eq!(again.events, 0);
    // "child" changed in the target since (terminated): reported, not overwritten.
    assert_eq!(
        again.different,
        vec!["child".to_string(), "clash".to_string()]
    );
    assert_eq!(again.already_there, ids.len() as u64 - 1, "{again:?}");
    assert_eq!(
        target.history("waiting").await.unwrap(),
        source.history("waiting").await.unwrap()
    );
    assert_eq!(
        target.describe("child").await.unwrap().unwrap().status,
        retrace_runtime::InstanceStatus::Terminated
    );

    // Not a store at all: refused.
    assert!(matches!(
        migrate_store(dir.path().join("missing.db"), &store).await,
        Err(StoreError::NotARetraceStore { .. })
    ));
}
