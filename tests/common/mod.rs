//! Helpers shared by the root package's integration tests: temporary directories that remove
//! themselves, stores on files inside them, bounded waits, commit observers and history
//! inspection. Every test file includes this module with `mod common;` and uses only part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use retrace::sdk::EventFamily;
use retrace::{
    ClientError, CommitNotice, Event, HistoryEvent, InstanceHandle, SharedStore, SqliteStore,
};
use serde::de::DeserializeOwned;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How long any single wait of a test may take before the test fails. Generous: it bounds hangs,
/// it is not a performance assertion.
pub const WAIT: Duration = Duration::from_secs(60);

/// A fresh directory under the system temp dir, removed (with everything in it) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/retrace-<label>-<pid>-<n>-<nanos>`.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "retrace-{label}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("could not remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Opens (creating) the SQLite store at `path`.
pub fn open_store(path: &Path) -> SharedStore {
    Arc::new(SqliteStore::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())))
}

/// Installs a tracing subscriber that honours `RUST_LOG` (quiet by default), once per process.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// The result of an instance, waited for at most [`WAIT`].
pub async fn result_of<O: DeserializeOwned>(handle: &InstanceHandle<O>) -> Result<O, ClientError> {
    within(&format!("the result of {}", handle.id()), handle.result()).await
}

/// Milliseconds since the Unix epoch, on the clock the runtime uses.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A commit observer for [`retrace::WorkerBuilder::on_commit`] and the receiving end of what it
/// observes.
pub fn commit_channel() -> (
    impl Fn(&CommitNotice) + Send + Sync + 'static,
    mpsc::UnboundedReceiver<CommitNotice>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let observer = move |notice: &CommitNotice| {
        let _ = tx.send(notice.clone());
    };
    (observer, rx)
}

/// Waits for the first notice matching `pred` (discarding the others before it).
pub async fn wait_for_notice(
    rx: &mut mpsc::UnboundedReceiver<CommitNotice>,
    what: &str,
    pred: impl Fn(&CommitNotice) -> bool,
) -> CommitNotice {
    within(what, async {
        loop {
            match rx.recv().await {
                Some(n) if pred(&n) => return n,
                Some(_) => {}
                None => panic!("commit channel closed while waiting for {what}"),
            }
        }
    })
    .await
}

/// Receives one message from `rx`, failing the test after [`WAIT`].
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    within(what, rx.recv())
        .await
        .unwrap_or_else(|| panic!("channel closed while waiting for {what}"))
}

/// The events of a history, without positions and activations.
pub fn events(history: &[HistoryEvent]) -> Vec<Event> {
    history.iter().map(|e| e.event.clone()).collect()
}

/// The kinds of a history's events, in order.
pub fn kinds(history: &[HistoryEvent]) -> Vec<&'static str> {
    history.iter().map(|e| e.event.kind()).collect()
}

/// The activation number of each event, in order.
pub fn activations(history: &[HistoryEvent]) -> Vec<u32> {
    history.iter().map(|e| e.activation).collect()
}

/// The kinds of a history's events grouped by activation (delivery batch), in order. Activation
/// numbers themselves are only promised to be non-decreasing, so tests compare the grouping.
pub fn batches(history: &[HistoryEvent]) -> Vec<Vec<&'static str>> {
    let mut out: Vec<Vec<&'static str>> = Vec::new();
    let mut last = None;
    for e in history {
        if last != Some(e.activation) {
            out.push(Vec::new());
            last = Some(e.activation);
        }
        if let Some(batch) = out.last_mut() {
            batch.push(e.event.kind());
        }
    }
    out
}

/// The activity calls in history, in command order: `(seq, name)`.
pub fn scheduled(history: &[HistoryEvent]) -> Vec<(u32, String)> {
    history
        .iter()
        .filter_map(|e| match &e.event {
            Event::ActivityScheduled { seq, name, .. } => Some((*seq, name.clone())),
            _ => None,
        })
        .collect()
}

/// The names of the activities scheduled, in command order.
pub fn scheduled_names(history: &[HistoryEvent]) -> Vec<String> {
    scheduled(history).into_iter().map(|(_, n)| n).collect()
}

/// How many activity outcomes (completions and final failures) a history holds.
pub fn outcome_count(history: &[HistoryEvent]) -> usize {
    history
        .iter()
        .filter(|e| {
            matches!(
                e.event,
                Event::ActivityCompleted { .. } | Event::ActivityFailed { .. }
            )
        })
        .count()
}

/// The terminal event of a history, if the run ended.
pub fn terminal(history: &[HistoryEvent]) -> Option<&Event> {
    history
        .iter()
        .map(|e| &e.event)
        .find(|e| e.family() == EventFamily::Terminal)
}

/// Checks the structural promises every stored history keeps: positions from 0 without gaps,
/// activations non-decreasing from 0, `InstanceStarted` first, at most one terminal event and
/// only at the end, and exactly one outcome per activity call position at most.
pub fn assert_well_formed(history: &[HistoryEvent]) {
    assert!(!history.is_empty(), "empty history");
    assert!(
        matches!(history[0].event, Event::InstanceStarted { .. }),
        "history does not begin with InstanceStarted: {:?}",
        history[0]
    );
    assert_eq!(history[0].activation, 0, "first activation is not 0");
    for (i, e) in history.iter().enumerate() {
        assert_eq!(e.position, i as u64, "position gap at index {i}");
        if i > 0 {
            assert!(
                e.activation >= history[i - 1].activation,
                "activation decreases at position {i}"
            );
        }
        if e.event.family() == EventFamily::Terminal {
            assert_eq!(i, history.len() - 1, "terminal event before the end");
        }
    }
    let mut outcomes = std::collections::BTreeMap::new();
    for e in history {
        if let Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } = &e.event {
            *outcomes.entry(*seq).or_insert(0) += 1;
        }
    }
    for (seq, n) in outcomes {
        assert_eq!(n, 1, "activity call {seq} has {n} outcomes in history");
    }
}
