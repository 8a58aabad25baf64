//! Workers: run coordinators and activities from a store.
//!
//! A worker has four loops and two kinds of short-lived tasks:
//! - the **dispatcher** claims instances whose inbox holds undelivered events (woken by the
//!   store's change channel, or by polling for other processes' writes);
//! - the **poller** fires due timers and claims visible activity tasks (new ones, retries whose
//!   backoff has passed, and tasks whose lease expired on a dead worker);
//! - the **renewer** keeps this worker's leases alive;
//! - an **activation** task loads one instance, replays it (or takes it from the cache),
//!   delivers its inbox batch, and commits the resulting events in one transaction;
//! - an **activity** task runs one attempt of one activity call and records its outcome.
//!
//! Fast path: an activation that schedules an activity this worker runs claims the task in the
//! same commit and starts it at once; an activity outcome that finds the instance free claims
//! the instance in the same commit and activates it at once. Polling is only for work that
//! other processes create.
//!
//! # Invariant
//! Correctness never depends on the cache: a cached execution is used only when the stored
//! history continues exactly where it stopped; otherwise it is rebuilt by replay.

use crate::client::{Client, LocalStart};
use crate::clock::now_ms;
use crate::error::StoreError;
use crate::instance_slots::InstanceSlots;
use crate::limits::{
    ACTIVITIES_CONCURRENT_MAX, CACHE_CAPACITY_DEFAULT, CACHE_TIMER_HORIZON_MS, CLAIM_BATCH_MAX,
    EAGER_STARTS_MAX, LEASE_DEFAULT, POLL_INTERVAL_DEFAULT,
};
use crate::store::{
    ActivationCommit, ActivityTask, AttemptOutcome, CommitReceipt, CreateOutcome, DirectFinish,
    ExecutionFactory, InstanceStatus, NewInstance, SharedStore,
};
use futures::FutureExt;
use retrace_sdk::{
    activity_handler, coordinator_fn, Activation, Activity, ActivityContext, ActivityError,
    ActivityFailure, ActivityHandler, Context, Coordinator, CoordinatorFn, Error, Event, Execution,
    RetrySpec,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
/// The worker's maps, looked up by name and instance id at every step: foldhash, seeded per
/// process, costs a fraction of the standard library's SipHash.
type HashMap<K, V> = foldhash::HashMap<K, V>;
use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Environment variable that turns the coordinator cache off (`off`, `0` or `false`) for every
/// worker that does not set it explicitly. CI runs the test suite with it.
pub const CACHE_ENV: &str = "RETRACE_COORDINATOR_CACHE";

/// The outcome of an attempt whose body panicked: a retryable failure with the panic's message.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> Result<serde_json::Value, ActivityError> {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "activity panicked".to_string());
    Err(ActivityError::retryable("panic", message))
}

/// Runs one attempt within its start-to-close and heartbeat timeouts. A panic, an expired
/// timeout or a missed heartbeat is a failed (retryable) attempt; the abandoned body is dropped.
async fn bounded_attempt<F>(
    body: F,
    retry: &RetrySpec,
    started: tokio::time::Instant,
    last_beat_ms: &AtomicU64,
) -> Result<serde_json::Value, ActivityError>
where
    F: Future<Output = std::thread::Result<Result<serde_json::Value, ActivityError>>>,
{
    // A zero timeout is none (as `RetryPolicy` writes it; a journaled spec may hold one).
    let close_at = retry
        .start_to_close_timeout_ms
        .filter(|ms| *ms > 0)
        .map(|ms| started + Duration::from_millis(ms));
    let beat_deadline = || {
        retry.heartbeat_timeout_ms.filter(|ms| *ms > 0).map(|ms| {
            started + Duration::from_millis(last_beat_ms.load(Ordering::Relaxed).saturating_add(ms))
        })
    };
    // No deadline at all (the default policy): the attempt is its body, with no timer and no
    // `select!` around it at every step.
    if close_at.is_none() && beat_deadline().is_none() {
        return body.await.unwrap_or_else(panicked);
    }
    tokio::pin!(body);
    loop {
        let wake = match (close_at, beat_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timer = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => futures::future::pending::<()>().await,
            }
        };
        tokio::select! {
            // The body first: an attempt that has finished is never reported as timed out.
            biased;
            outcome = &mut body => return outcome.unwrap_or_else(panicked),
            () = timer => {
                let now = tokio::time::Instant::now();
                if let (Some(at), Some(ms)) = (close_at, retry.start_to_close_timeout_ms) {
                    if now >= at {
                        return Err(ActivityError::retryable(
                            "timeout",
                            format!("attempt exceeded its start-to-close timeout of {ms} ms"),
                        ));
                    }
                }
                // A heartbeat may have moved the deadline while the timer slept.
                if let (Some(at), Some(ms)) = (beat_deadline(), retry.heartbeat_timeout_ms) {
                    if now >= at {
                        return Err(ActivityError::retryable(
                            "heartbeat_timeout",
                            format!("no heartbeat for {ms} ms"),
                        ));
                    }
                }
            }
        }
    }
}

/// An activation just committed, as [`Inner::after_commit`] needs it.
struct Committed {
    generation: u64,
    activation: u32,
    ended: bool,
    timers_due: Vec<u64>,
}

/// An activation's commit, planned, with what [`Inner::after_commit`] needs of it.
struct Planned {
    commit: ActivationCommit,
    committed: Committed,
    /// An activity it calls that this worker does not run (the call waits for another worker).
    unknown_activity: Option<String>,
}

/// Which of the activity tasks claimed by a commit [`Inner::after_commit`] spawns.
#[derive(Clone, Copy)]
enum Start {
    /// None: the caller starts them once the instance is no longer marked as activating.
    None,
    /// All, except a single one, which the caller runs itself (the next sequential step).
    AllButOne,
}

/// How long a ready instance of a coordinator no worker here knows waits before it is marked.
const UNCLAIMED_AFTER_MS: u64 = 2_000;

/// How often a worker looks for crashed workers whose work it can take over at once.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Something a worker committed, reported to an observer (see [`WorkerBuilder::on_commit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitNotice {
    /// An activation was committed.
    Activation {
        /// The instance.
        instance_id: String,
        /// The activation number.
        activation: u32,
        /// Whether the run ended with it.
        ended: bool,
    },
    /// The outcome of an activity attempt was committed.
    ActivityOutcome {
        /// The calling instance.
        instance_id: String,
        /// The call position.
        seq: u32,
        /// The attempt.
        attempt: u32,
        /// Whether it was the call's final outcome (not a retry).
        is_final: bool,
    },
}

type Observer = Arc<dyn Fn(&CommitNotice) + Send + Sync>;

impl CommitNotice {
    /// The notice's copy of the instance id, for the next notice made on this thread.
    fn into_instance_id(self) -> String {
        match self {
            CommitNotice::Activation { instance_id, .. }
            | CommitNotice::ActivityOutcome { instance_id, .. } => instance_id,
        }
    }
}

thread_local! {
    /// The string the last notice made on this thread held its instance id in (see `notify`).
    static NOTICE_ID: Cell<String> = const { Cell::new(String::new()) };
}

/// `buffer` (empty) holding `id`.
fn copied(mut buffer: String, id: &str) -> String {
    buffer.push_str(id);
    buffer
}

/// Builds a [`Worker`]: register coordinators and activities, then [`WorkerBuilder::start`].
pub struct WorkerBuilder {
    store: SharedStore,
    coordinators: HashMap<String, (CoordinatorFn, &'static [&'static str])>,
    activities: HashMap<String, ActivityHandler>,
    cache: Option<bool>,
    cache_capacity: usize,
    lease: Duration,
    poll_interval: Duration,
    max_concurrent_activities: usize,
    id: Option<String>,
    observer: Option<Observer>,
}

impl WorkerBuilder {
    /// Registers a coordinator under its definition's name.
    pub fn coordinator<I, O, F, Fut>(mut self, def: &Coordinator<I, O>, body: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Context, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, Error>> + Send + 'static,
    {
        self.coordinators.insert(
            def.name().to_string(),
            (coordinator_fn(def, body), def.patches()),
        );
        self
    }

    /// Registers an activity body under its definition's name.
    pub fn activity<I, O, F, Fut>(mut self, def: &Activity<I, O>, body: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, ActivityError>> + Send + 'static,
    {
        self.activities
            .insert(def.name().to_string(), activity_handler(def, body));
        self
    }

    /// Keeps executions of waiting instances in memory between activations (default: on,
    /// unless the `RETRACE_COORDINATOR_CACHE` environment variable says `off`). With it off,
    /// every activation replays the instance's history from the store.
    pub fn cache(mut self, enabled: bool) -> Self {
        self.cache = Some(enabled);
        self
    }

    /// At most this many executions in the cache.
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity.max(1);
        self
    }

    /// How long a claim lasts without renewal; after a crash, another worker takes over the
    /// crashed worker's work once this has passed.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(50));
        self
    }

    /// How often to look for work written by other processes and for due timers.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// At most this many activity bodies running at once.
    pub fn max_concurrent_activities(mut self, n: usize) -> Self {
        self.max_concurrent_activities = n.max(1);
        self
    }

    /// Names this worker. Its id (in the leases it holds, its lock file and its logs) is then
    /// `{id}-{suffix}`, with a suffix new to each start; without a name it is
    /// `worker-{uuid}`. Each start gets an id of its own so that a worker restarted under
    /// the same name never renews, as its own, the leases of the run that crashed before it:
    /// those expire (or are reaped) and their work is taken over.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Calls `observer` after each commit this worker makes (for tests, metrics, crash
    /// injection). It runs on the worker's tasks: keep it short.
    pub fn on_commit(mut self, observer: impl Fn(&CommitNotice) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Starts the worker's loops on the current tokio runtime.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn start(self) -> Worker {
        let cache = self.cache.unwrap_or_else(|| {
            !matches!(
                std::env::var(CACHE_ENV)
                    .ok()
                    .as_deref()
                    .map(str::to_ascii_lowercase)
                    .as_deref(),
                Some("off" | "0" | "false" | "no")
            )
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut coordinator_names: Vec<String> = self.coordinators.keys().cloned().collect();
        coordinator_names.sort();
        let mut activity_names: Vec<String> = self.activities.keys().cloned().collect();
        activity_names.sort();
        let inner = Arc::new(Inner {
            store: self.store,
            owner: match self.id {
                Some(name) => {
                    let run = uuid::Uuid::new_v4().simple().to_string();
                    Arc::from(format!("{name}-{}", &run[..12]))
                }
                None => Arc::from(format!("worker-{}", uuid::Uuid::new_v4())),
            },
            coordinators: self.coordinators,
            activities: self
                .activities
                .into_iter()
                .map(|(name, handler)| {
                    let shared = Arc::from(name.as_str());
                    (
                        name,
                        RegisteredActivity {
                            name: shared,
                            handler,
                        },
                    )
                })
                .collect(),
            coordinator_names,
            activity_names,
            cache_enabled: cache,
            cache_capacity: self.cache_capacity,
            lease: self.lease,
            poll_interval: self.poll_interval,
            slots: Mutex::new(InstanceSlots::default()),
            activity_slots: Arc::new(Semaphore::new(self.max_concurrent_activities)),
            eager_starts: Semaphore::new(EAGER_STARTS_MAX),
            starts_in_flight: AtomicUsize::new(0),
            poller_wake: Notify::new(),
            observer: self.observer,
            shutdown: shutdown_rx,
            seeds: Mutex::new(SeedPool::default()),
        });
        let loops = vec![
            tokio::spawn(Arc::clone(&inner).dispatcher()),
            tokio::spawn(Arc::clone(&inner).poller()),
            tokio::spawn(Arc::clone(&inner).renewer()),
        ];
        Worker {
            inner,
            loops,
            shutdown: shutdown_tx,
        }
    }
}

/// A running worker. Dropping it stops its loops without handing back its leases; prefer
/// [`Worker::shutdown`].
pub struct Worker {
    inner: Arc<Inner>,
    loops: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.inner.owner)
            .finish()
    }
}

impl Worker {
    /// Starts building a worker on `store`.
    pub fn builder(store: SharedStore) -> WorkerBuilder {
        WorkerBuilder {
            store,
            coordinators: HashMap::default(),
            activities: HashMap::default(),
            cache: None,
            cache_capacity: CACHE_CAPACITY_DEFAULT,
            lease: LEASE_DEFAULT,
            poll_interval: POLL_INTERVAL_DEFAULT,
            max_concurrent_activities: ACTIVITIES_CONCURRENT_MAX,
            id: None,
            observer: None,
        }
    }

    /// This worker's id, as written in the leases it holds.
    pub fn id(&self) -> &str {
        &self.inner.owner
    }

    /// A client of this worker's store whose [`Client::start`] runs a new instance's first
    /// activation here, in the process that starts it, and commits it together with the
    /// instance's creation (as Temporal's eager workflow start does): the start of an instance
    /// costs one commit instead of three (create, claim, first activation), and its first
    /// activity calls start at once on this worker. Everything else is as with
    /// [`Client::new`]: instances of coordinators this worker does not run, and starts once it
    /// is shutting down, are only created, for any worker to pick up. A start that its caller
    /// drops once it has begun (a timeout, a `select!`) still goes on to its end on the
    /// runtime: whether the instance was created is then learnt with [`Client::describe`].
    pub fn client(&self) -> Client {
        let local: Arc<dyn LocalStart> = Arc::new(EagerStart {
            worker: Arc::downgrade(&self.inner),
            store: Arc::clone(&self.inner.store),
        });
        Client::with_local_start(Arc::clone(&self.inner.store), local)
    }

    /// Whether the coordinator cache is on.
    pub fn cache_enabled(&self) -> bool {
        self.inner.cache_enabled
    }

    /// How many executions are cached now.
    pub fn cached_executions(&self) -> usize {
        lock(&self.inner.slots).cached_len()
    }

    /// Stops the loops and hands back every lease at once, so that other workers can take over
    /// without waiting for expiry. Activity attempts still running are abandoned; their calls
    /// are retried elsewhere (activities run at least once).
    ///
    /// # Errors
    /// The store error if the leases could not be released (they then expire).
    pub async fn shutdown(self) -> Result<(), StoreError> {
        let _ = self.shutdown.send(true);
        for l in &self.loops {
            l.abort();
        }
        self.inner.store.release_leases(&self.inner.owner).await?;
        self.inner.store.unregister_worker(&self.inner.owner).await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for l in &self.loops {
            l.abort();
        }
    }
}

/// A worker's side of [`Worker::client`]; holds the worker weakly, so that a client kept after
/// the worker is gone only creates instances.
struct EagerStart {
    worker: std::sync::Weak<Inner>,
    store: SharedStore,
}

#[async_trait::async_trait]
impl LocalStart for EagerStart {
    async fn create(&self, new: NewInstance) -> Result<CreateOutcome, StoreError> {
        match self.worker.upgrade() {
            Some(inner) => inner.start_from_client(new).await,
            None => self.store.create_instance(new).await,
        }
    }
}

/// The current tokio runtime, if there is one and it is multi-threaded.
fn multi_threaded_runtime() -> Option<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .ok()
        .filter(|runtime| runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Runs `start` (a start through a worker's client) as a task of `runtime` at once, so that
/// dropping the caller does not cancel it; the future waits for its answer. The task keeps the
/// caller's span as its parent, and the caller's tracing subscriber. A panic in it goes on in
/// the caller, as it would have inline. (Not an `async fn`: the caller's future then holds only
/// the task's handle, not `start` too.)
fn detach<F>(
    runtime: &tokio::runtime::Handle,
    start: F,
) -> impl Future<Output = Result<CreateOutcome, StoreError>>
where
    F: Future<Output = Result<CreateOutcome, StoreError>> + Send + 'static,
{
    use tracing::instrument::WithSubscriber;
    let task = runtime.spawn(
        start
            .instrument(tracing::Span::current())
            .with_current_subscriber(),
    );
    async move {
        match task.await {
            Ok(answer) => answer,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StoreError::Database {
                operation: "start instance".into(),
                detail: format!("the start's task ended without an answer: {e}"),
            }),
        }
    }
}

/// A start (its first activation, its creation, and what follows), finished even if the
/// caller drops it: dropped once polled (its creation may be on its way to the store), it goes
/// on as a task of the runtime, answering nobody. Cut short, a start could commit the instance
/// with its first calls claimed by this worker and never run them, while the renewer kept
/// their leases alive. A start that its caller waits for costs no task, only the box it was
/// kept in anyway; without a runtime to go on in, dropping it drops it.
struct FinishOnDrop<F: Future + Send + 'static> {
    start: Option<std::pin::Pin<Box<F>>>,
    polled: bool,
}

impl<F: Future + Send + 'static> FinishOnDrop<F> {
    fn new(start: F) -> Self {
        FinishOnDrop {
            start: Some(Box::pin(start)),
            polled: false,
        }
    }
}

impl<F: Future + Send + 'static> Future for FinishOnDrop<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        // `FinishOnDrop` is `Unpin` (it holds the start boxed).
        let this = &mut *self;
        this.polled = true;
        let Some(start) = this.start.as_mut() else {
            return std::task::Poll::Pending;
        };
        let done = start.as_mut().poll(cx);
        if done.is_ready() {
            this.start = None;
        }
        done
    }
}

impl<F: Future + Send + 'static> Drop for FinishOnDrop<F> {
    fn drop(&mut self) {
        let Some(start) = self.start.take() else {
            return;
        };
        if !self.polled {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            tracing::debug!("a start was dropped by its caller; it goes on as a task");
            runtime.spawn(async move {
                let _ = start.await;
            });
        }
    }
}

/// One of a worker's [`EAGER_STARTS_MAX`] permits for a first activation, given back when
/// dropped. (Not tokio's owned permit, whose wait made each waiting start 100 bytes larger:
/// 10,000 of them wait in W5.)
struct EagerPermit(Arc<Inner>);

impl Drop for EagerPermit {
    fn drop(&mut self) {
        self.0.eager_starts.add_permits(1);
    }
}

/// One start in flight through a worker's client, counted for as long as it is held.
struct StartInFlight(Arc<Inner>);

impl StartInFlight {
    /// Counts a start in flight, and tells whether it is the only one.
    fn enter(inner: &Arc<Inner>) -> (StartInFlight, bool) {
        let before = inner.starts_in_flight.fetch_add(1, Ordering::AcqRel);
        (StartInFlight(Arc::clone(inner)), before == 0)
    }
}

impl Drop for StartInFlight {
    fn drop(&mut self) {
        self.0.starts_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An activity this worker runs: its body, and its name shared by the contexts of its calls.
struct RegisteredActivity {
    name: Arc<str>,
    handler: ActivityHandler,
}

struct Inner {
    store: SharedStore,
    /// This worker's id, shared by every commit it plans.
    owner: Arc<str>,
    coordinators: HashMap<String, (CoordinatorFn, &'static [&'static str])>,
    activities: HashMap<String, RegisteredActivity>,
    coordinator_names: Vec<String>,
    activity_names: Vec<String>,
    cache_enabled: bool,
    cache_capacity: usize,
    lease: Duration,
    poll_interval: Duration,
    /// Instances an activation has now, and cached executions, by instance id.
    slots: Mutex<InstanceSlots>,
    activity_slots: Arc<Semaphore>,
    /// First activations run by this worker's clients at once ([`EAGER_STARTS_MAX`]).
    eager_starts: Semaphore,
    /// Starts in flight through this worker's clients (see [`StartInFlight`]).
    starts_in_flight: AtomicUsize,
    poller_wake: Notify,
    observer: Option<Observer>,
    shutdown: watch::Receiver<bool>,
    /// Where the activations' random seeds come from (see [`Inner::next_seed`]).
    seeds: Mutex<SeedPool>,
}

/// Random activation seeds not handed out yet (see [`Inner::next_seed`]).
struct SeedPool {
    seeds: [u64; SEED_POOL],
    /// The next one to hand out; `SEED_POOL` when the pool is empty.
    next: usize,
}

/// Seeds drawn from the operating system at a time.
const SEED_POOL: usize = 64;

impl Default for SeedPool {
    fn default() -> Self {
        SeedPool {
            seeds: [0; SEED_POOL],
            next: SEED_POOL,
        }
    }
}

impl SeedPool {
    fn take(&mut self) -> u64 {
        if self.next >= self.seeds.len() {
            self.refill();
        }
        let seed = self.seeds[self.next];
        self.next += 1;
        seed
    }

    fn refill(&mut self) {
        let mut bytes = [0u8; SEED_POOL * 8];
        if let Err(e) = getrandom::fill(&mut bytes) {
            // Not seen on the platforms this runs on. The seeds then come from the standard
            // library's hasher keys (random per process, not meant for secrets): still
            // distinct, less unpredictable.
            tracing::warn!(error = %e, "no random bytes from the operating system; seeding activations from the hasher keys");
            let keys = std::collections::hash_map::RandomState::new();
            for (i, seed) in self.seeds.iter_mut().enumerate() {
                *seed = std::hash::BuildHasher::hash_one(&keys, (now_ms(), i));
            }
        } else {
            for (seed, chunk) in self.seeds.iter_mut().zip(bytes.chunks_exact(8)) {
                *seed = u64::from_le_bytes(<[u8; 8]>::try_from(chunk).unwrap_or_default());
            }
        }
        self.next = 0;
    }
}

/// Locks a worker map. A poisoned lock means a panic while holding it; the maps stay valid
/// (single inserts and removes), so the data is used as is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// The seed of a live activation (what `ctx.random()` and `ctx.uuid()` derive from): bytes
    /// of the operating system's random source, drawn 64 seeds at a time. One system call per
    /// 64 activations instead of one each (a random UUID per activation took `getrandom`, 2 %
    /// of the workers' time in W1), and as unpredictable: a seed says nothing of the others.
    fn next_seed(&self) -> u64 {
        lock(&self.seeds).take()
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Reports a commit to the `on_commit` observer; the notice is made only when there is
    /// one. `notice` gets an empty string to copy the instance id into: the thread's buffer,
    /// taken back once the observer returns (two notices per step each allocated a copy).
    fn notify(&self, notice: impl FnOnce(String) -> CommitNotice) {
        if let Some(observer) = &self.observer {
            let mut buffer = NOTICE_ID.take();
            buffer.clear();
            let notice = notice(buffer);
            observer(&notice);
            NOTICE_ID.set(notice.into_instance_id());
        }
    }

    /// Makes sure an activation task runs for `id` (this worker holds its lease).
    fn schedule(self: &Arc<Self>, id: String) {
        if self.stopping() {
            return;
        }
        if !lock(&self.slots).mark_running(&id) {
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move { inner.run_instance(id).await });
    }

    async fn run_instance(self: Arc<Self>, id: String) {
        // Only the first activation of this task checks an instance found with nothing to
        // deliver (an imported or forked one); a rerun asked for meanwhile (a duplicate claim
        // of an instance this task was activating) finds its inbox emptied by that activation.
        let mut first = true;
        loop {
            let mut claimed = Vec::new();
            let check_idle = std::mem::replace(&mut first, false);
            let again = match self.activate_once(&id, check_idle, &mut claimed).await {
                Ok(again) => again,
                Err(e) => {
                    tracing::warn!(instance_id = %id, error = %e, "activation failed; handing the instance back for another try");
                    // Hand the lease back (the renewer would otherwise keep it alive forever);
                    // the instance stays ready and is claimed again at the next poll.
                    let reason = format!("last activation failed, will be retried: {e}");
                    if let Err(e) = self.store.note_waiting(&id, &self.owner, &reason).await {
                        tracing::warn!(instance_id = %id, error = %e, "could not hand the instance back; its lease will expire");
                    }
                    false
                }
            };
            let more = lock(&self.slots).finish_activation(&id, again, self.stopping());
            // Started only now that the instance is no longer marked as activating (unless it
            // is activated again at once): an outcome that came back while it was could not
            // take the fast path (`finish_directly`).
            for task in claimed {
                self.spawn_task(task);
            }
            if !more {
                break;
            }
        }
    }

    /// One activation of `id`. Returns whether the instance has more inbox work.
    /// The activity tasks claimed by its commit are put in `claimed`, for the caller to start.
    async fn activate_once(
        self: &Arc<Self>,
        id: &str,
        check_idle: bool,
        claimed: &mut Vec<ActivityTask>,
    ) -> Result<bool, StoreError> {
        let span = tracing::debug_span!("activation", instance_id = %id, replaying = tracing::field::Empty, position = tracing::field::Empty);
        self.activate_inner(id, check_idle, claimed)
            .instrument(span)
            .await
    }

    /// See [`Inner::activate_once`]. With `check_idle`, an instance found with nothing to
    /// deliver on a cold load is replayed all the same, then handed back.
    async fn activate_inner(
        self: &Arc<Self>,
        id: &str,
        check_idle: bool,
        claimed: &mut Vec<ActivityTask>,
    ) -> Result<bool, StoreError> {
        let cached = if self.cache_enabled {
            lock(&self.slots).take_cached(id)
        } else {
            None
        };
        // A cached execution that is still current only needs the events after it.
        let mut warm_start = None;
        if let Some((cached_generation, execution)) = cached {
            let loaded = match self.store.load(id, execution.next_position()).await {
                Ok(loaded) => loaded,
                Err(e @ StoreError::Corrupt { .. }) => return self.stop_unreadable(id, e).await,
                Err(e) => return Err(e),
            };
            if loaded.info.status != InstanceStatus::Running {
                return Ok(false);
            }
            if cached_generation == loaded.info.generation
                && execution.next_position() <= loaded.info.next_position
            {
                warm_start = Some((loaded, execution));
            }
        }
        let (info, inbox, mut execution, replayed, replay) = match warm_start {
            Some((loaded, mut execution)) => {
                if loaded.inbox.is_empty() {
                    // Nothing to deliver (a duplicate wake-up, for example the dispatcher
                    // re-claiming an instance this worker was activating): polling would only
                    // commit an empty activation. The commit that emptied the inbox already
                    // cleared `ready` and the lease. Keep the execution if it is still current.
                    if loaded.events.is_empty() {
                        self.cache_put(id, loaded.info.generation, execution);
                    }
                    return Ok(false);
                }
                let replay = execution.replay(&loaded.events);
                let replayed = loaded.events.len() as u64;
                (loaded.info, loaded.inbox, execution, replayed, replay)
            }
            None => {
                // Cold: the store replays the history into a fresh execution while reading it.
                let inner = Arc::clone(self);
                // Replayed even with nothing to deliver when `check_idle`: an instance claimed
                // with an empty inbox (an imported or forked one, created ready for this) has
                // its history checked against this code at once.
                let start: ExecutionFactory = Box::new(move |info, inbox| {
                    if info.status != InstanceStatus::Running || (inbox.is_empty() && !check_idle) {
                        return None;
                    }
                    let (body, patches) = inner.coordinators.get(&info.coordinator)?.clone();
                    Some(Execution::new(&info.id, body).with_patches(patches))
                });
                let replayed = match self.store.load_and_replay(id, start).await {
                    Ok(r) => r,
                    Err(e @ StoreError::Corrupt { .. }) => {
                        return self.stop_unreadable(id, e).await
                    }
                    Err(e) => return Err(e),
                };
                let info = &replayed.loaded.info;
                if info.status != InstanceStatus::Running {
                    return Ok(false);
                }
                if !self.coordinators.contains_key(&info.coordinator) {
                    let reason = format!("no worker here knows coordinator {}", info.coordinator);
                    self.store.note_waiting(id, &self.owner, &reason).await?;
                    return Ok(false);
                }
                // No execution: not running, a coordinator unknown here (both seen above), or
                // nothing to deliver to an instance this task has just activated.
                let Some(execution) = replayed.execution else {
                    return Ok(false);
                };
                (
                    replayed.loaded.info,
                    replayed.loaded.inbox,
                    Box::new(execution),
                    replayed.events,
                    replayed.replay,
                )
            }
        };
        let generation = info.generation;
        tracing::Span::current().record("replaying", replayed > 0);
        tracing::Span::current().record("position", info.next_position);
        if let Err(e) = replay {
            tracing::error!(error = %e, "replay failed; stopping instance with its history intact");
            self.store
                .stop_instance(id, &self.owner, &e.to_string())
                .await?;
            return Ok(false);
        }
        if execution.next_position() != info.next_position {
            return Err(StoreError::Conflict {
                instance_id: id.to_string(),
                expected: execution.next_position(),
                found: info.next_position,
            });
        }
        if inbox.is_empty() {
            // Nothing to deliver (only a cold load gets here): the history replays on this code.
            // Hand the instance back, ready only if a message came meanwhile; otherwise the
            // dispatcher would claim it again at every poll and the renewer keep its lease.
            self.cache_put(id, generation, execution);
            self.store.release_idle(id, &self.owner).await?;
            return Ok(false);
        }
        // The start of a run is delivered first, even when signals for the new run arrived
        // before it (continue-as-new keeps the inbox).
        let mut inbox = inbox;
        inbox.sort_by_key(|m| !matches!(m.event, Event::InstanceStarted { .. }));
        let consumed: Vec<i64> = inbox.iter().map(|m| m.id).collect();
        let inbound: Vec<Event> = inbox.into_iter().map(|m| m.event).collect();
        let seed = self.next_seed();
        let activation = match execution.activate(inbound, now_ms(), seed) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "activation diverged; stopping instance with its history intact");
                self.store
                    .stop_instance(id, &self.owner, &e.to_string())
                    .await?;
                return Ok(false);
            }
        };
        let Planned {
            commit,
            committed,
            unknown_activity,
        } = self.plan(id, generation, info.next_position, activation, consumed);
        let summary = debug_summary(&commit.events);
        let commit_span = tracing::debug_span!(
            "store_commit",
            position = commit.expected_position,
            activation = commit.activation
        );
        let mut receipt = match self
            .store
            .commit_activation(commit)
            .instrument(commit_span)
            .await
        {
            Ok(r) => r,
            Err(e @ (StoreError::Conflict { .. } | StoreError::LeaseLost { .. })) => {
                tracing::info!(error = %e, "another worker moved this instance on; dropping our copy");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(activation = committed.activation, ended = committed.ended, events = %summary, "activation committed");
        let (kept, waiting) = self.after_commit(
            id,
            execution,
            &mut receipt,
            committed,
            unknown_activity,
            Start::None,
        );
        *claimed = match waiting {
            None => kept,
            Some(reason) => Box::pin(self.note_unclaimed(id, reason, kept)).await?,
        };
        Ok(receipt.ready_again)
    }

    /// A start through this worker's client ([`Worker::client`]).
    ///
    /// Once begun, a start runs to its end whatever its caller does (see [`FinishOnDrop`]).
    /// On a multi-threaded runtime, a lone start (no other start in flight through this
    /// worker) runs as a task from the beginning: the caller's thread has often slept, and the
    /// worker thread that commits the creation (when it commits directly, as a lone start
    /// does when the writer is idle) goes straight on with the first activity call (W2, a
    /// start and its ten steps: ~6 % faster, 21 of 25 interleaved runs). A burst of starts runs
    /// on the callers' tasks, which adds their threads to the work instead of queueing a task
    /// per start (running every start as a task made W1 ~15 % slower and W5 9 MiB larger).
    async fn start_from_client(
        self: Arc<Self>,
        new: NewInstance,
    ) -> Result<CreateOutcome, StoreError> {
        let (in_flight, lone) = StartInFlight::enter(&self);
        if lone {
            if let Some(runtime) = multi_threaded_runtime() {
                let start = async move {
                    let _in_flight = in_flight;
                    self.start_eagerly(new).await
                };
                return detach(&runtime, start).await;
            }
        }
        let _in_flight = in_flight;
        self.start_eagerly(new).await
    }

    /// Creates `new` together with its first activation, run here ([`Worker::client`]); only
    /// creates it when this worker does not run its coordinator or is stopping.
    async fn start_eagerly(
        self: &Arc<Self>,
        new: NewInstance,
    ) -> Result<CreateOutcome, StoreError> {
        let known = match self.coordinators.get(&new.coordinator) {
            Some(entry) if !self.stopping() => entry.clone(),
            _ => return self.store.create_instance(new).await,
        };
        let Ok(permit) = self.eager_starts.acquire().await else {
            return self.store.create_instance(new).await;
        };
        // Held by the start itself, which may go on as a task of its own (`FinishOnDrop`).
        permit.forget();
        let permit = EagerPermit(Arc::clone(self));
        let id = new.id.clone();
        let span = tracing::debug_span!("activation", instance_id = %id, replaying = false, position = 0u64);
        // Boxed, so that a start waiting for a permit does not hold the room of a whole
        // activation (W5 starts 10,000 at once: +10-15 MiB otherwise), and finished even if
        // its caller drops it midway.
        let start = Arc::clone(self).start_eagerly_inner(new, known, permit);
        FinishOnDrop::new(start.instrument(span)).await
    }

    async fn start_eagerly_inner(
        self: Arc<Self>,
        new: NewInstance,
        (body, patches): (CoordinatorFn, &'static [&'static str]),
        permit: EagerPermit,
    ) -> Result<CreateOutcome, StoreError> {
        let _permit = permit;
        let id = new.id.clone();
        let mut execution = Box::new(Execution::new(&id, body).with_patches(patches));
        // The same event the store would put in the inbox of an instance created on its own.
        let started = Event::InstanceStarted {
            coordinator: new.coordinator.clone(),
            input: new.input.clone(),
            parent: new.parent.clone(),
        };
        let seed = self.next_seed();
        let activation = match execution.activate(vec![started], now_ms(), seed) {
            Ok(a) => a,
            Err(e) => {
                // Cannot diverge from an empty history; whatever it is, the usual path meets it
                // again and records it (it stops the instance with the reason).
                tracing::warn!(error = %e, "first activation failed here; creating the instance for the usual path");
                return self.store.create_instance(new).await;
            }
        };
        let Planned {
            commit,
            committed,
            unknown_activity,
        } = self.plan(&id, 0, 0, activation, Vec::new());
        let summary = debug_summary(&commit.events);
        let (outcome, receipt) = self.store.create_and_activate(new, commit).await?;
        let Some(mut receipt) = receipt else {
            // Existing, or the store created the instance without the activation: the usual
            // path takes it from here.
            return Ok(outcome);
        };
        tracing::debug!(activation = committed.activation, ended = committed.ended, events = %summary, "instance created with its first activation");
        let (kept, waiting) = self.after_commit(
            &id,
            execution,
            &mut receipt,
            committed,
            unknown_activity,
            Start::None,
        );
        let tasks = match waiting {
            None => Ok(kept),
            Some(reason) => Box::pin(self.note_unclaimed(&id, reason, kept)).await,
        };
        if receipt.ready_again {
            self.schedule(id);
        }
        // The instance exists whatever `after_commit` met (a failed note about an unknown
        // activity): the caller gets `Created`, and the note is retried by the usual path.
        match tasks {
            Ok(tasks) => {
                for task in tasks {
                    self.spawn_task(task);
                }
            }
            Err(e) => tracing::warn!(error = %e, "after the first activation"),
        }
        Ok(outcome)
    }

    /// Plans the commit of `activation`, computed at `position` of run `generation` of `id`
    /// after delivering the inbox messages `consumed`.
    fn plan(
        &self,
        id: &str,
        generation: u64,
        position: u64,
        activation: Activation,
        consumed: Vec<i64>,
    ) -> Planned {
        let ended = activation.terminal().is_some();
        let number = activation.activation;
        let commit = ActivationCommit::plan(
            id,
            Arc::clone(&self.owner),
            generation,
            position,
            number,
            activation.events,
            consumed,
            activation.custom_status,
            &|name| self.activities.contains_key(name),
            self.lease_ms(),
        );
        let timers_due = commit.timers.iter().map(|(_, at)| *at).collect();
        // A claimed call's activity is known (the plan just looked it up): only the others are
        // looked up again.
        let unknown_activity = commit
            .tasks
            .iter()
            .find(|t| !t.claim && !self.activities.contains_key(&t.name))
            .map(|t| t.name.clone());
        Planned {
            commit,
            committed: Committed {
                generation,
                activation: number,
                ended,
                timers_due,
            },
            unknown_activity,
        }
    }

    /// What follows a committed activation, on either path: report it, keep the execution,
    /// start the tasks claimed with it, and wake the poller for its timers. Returns the claimed
    /// tasks that `start` says not to spawn, and, when the activation scheduled an activity
    /// this worker does not run, why the instance waits, for [`Inner::note_unclaimed`].
    ///
    /// Not `async`: the note is rare, and its future, built and moved at every sequential step
    /// and held in the state of every step's future, cost more than the note itself.
    fn after_commit(
        self: &Arc<Self>,
        id: &str,
        execution: Box<Execution>,
        receipt: &mut CommitReceipt,
        committed: Committed,
        unknown_activity: Option<String>,
        start: Start,
    ) -> (Vec<ActivityTask>, Option<String>) {
        self.notify(|buffer| CommitNotice::Activation {
            instance_id: copied(buffer, id),
            activation: committed.activation,
            ended: committed.ended,
        });
        self.cache_put(id, committed.generation, execution);
        // The claimed tasks move out of the receipt (no copy of their names and inputs).
        let claimed = std::mem::take(&mut receipt.claimed_tasks);
        let kept = match start {
            Start::None => claimed,
            Start::AllButOne if claimed.len() == 1 => claimed,
            Start::AllButOne => {
                for task in claimed {
                    self.spawn_task(task);
                }
                Vec::new()
            }
        };
        for at in committed.timers_due {
            self.wake_poller_at(at);
        }
        let waiting = match (receipt.ready_again, committed.ended, unknown_activity) {
            // Not a failure: another worker may run it. Say why the instance waits.
            (false, false, Some(name)) => Some(format!(
                "waiting for a worker that runs activity {name} (worker {} does not)",
                self.owner
            )),
            _ => None,
        };
        (kept, waiting)
    }

    /// The rest of [`Inner::after_commit`] when the instance waits for an activity this worker
    /// does not run: notes `reason` on it, and returns `kept`. When the note fails, the tasks
    /// are spawned (the activation is committed: they run whatever happens to the note) and
    /// the error is returned.
    async fn note_unclaimed(
        self: &Arc<Self>,
        id: &str,
        reason: String,
        kept: Vec<ActivityTask>,
    ) -> Result<Vec<ActivityTask>, StoreError> {
        if let Err(e) = self.store.note_waiting(id, &self.owner, &reason).await {
            for task in kept {
                self.spawn_task(task);
            }
            return Err(e);
        }
        Ok(kept)
    }

    /// An instance whose stored history or inbox cannot be decoded stops with the reason; its
    /// rows stay as they are, and other instances go on.
    async fn stop_unreadable(&self, id: &str, error: StoreError) -> Result<bool, StoreError> {
        tracing::error!(instance_id = %id, %error, "stopping instance with an unreadable history");
        self.store
            .stop_instance(id, &self.owner, &error.to_string())
            .await?;
        Ok(false)
    }

    /// Keeps an execution that has not finished, if the cache is on and the execution is hot:
    /// it waits on an activity, a child or an imminent timer. One that waits only on signals or
    /// distant timers may wait for days; holding it would cost memory per waiting instance
    /// (about 3 KiB each, measured by W5) for a replay saved only when its event comes.
    fn cache_put(&self, id: &str, generation: u64, execution: Box<Execution>) {
        if !self.cache_enabled
            || execution.is_finished()
            || !execution.awaits_work(CACHE_TIMER_HORIZON_MS)
        {
            return;
        }
        lock(&self.slots).put_cached(id, generation, execution, self.cache_capacity);
    }

    /// Fast path for a final outcome: when this worker has the instance's execution cached and
    /// idle, delivers the outcome to it at once and commits the outcome together with the
    /// activation it causes (one commit per sequential step instead of two, and no history
    /// load). Returns `None`, having changed nothing, when the execution is not at hand; the
    /// caller then records the outcome with `finish_task`. Otherwise `Some`, with the next
    /// activity call when the activation claimed exactly one, for the caller to run.
    async fn finish_directly(
        self: &Arc<Self>,
        task: &ActivityTask,
        outcome: &Event,
    ) -> Option<Option<ActivityTask>> {
        if !self.cache_enabled || self.stopping() {
            return None;
        }
        let id = task.instance_id.as_str();
        let (generation, mut execution) = lock(&self.slots).take_idle(id, task.generation)?;
        let expected_position = execution.next_position();
        let seed = self.next_seed();
        // Room for the commands and the end the activation appends to the outcome (a
        // sequential step adds one call, or the end): no reallocation on the way (`activate`
        // filters the list in place, which std does for a `Vec` collected from its own
        // `into_iter`; were it not to, this would only cost a reallocation again).
        let mut inbound = Vec::with_capacity(4);
        inbound.push(outcome.clone());
        let activation = match execution.activate(inbound, now_ms(), seed) {
            Ok(a) => a,
            Err(e) => {
                // The regular path records the outcome, replays, and stops the instance.
                tracing::debug!(instance_id = %id, error = %e, "direct activation diverged; taking the regular path");
                self.release_instance(id, false);
                return None;
            }
        };
        let Planned {
            commit,
            committed,
            unknown_activity,
        } = self.plan(id, generation, expected_position, activation, Vec::new());
        let outcome_notice = |buffer: String| CommitNotice::ActivityOutcome {
            instance_id: copied(buffer, id),
            seq: task.seq,
            attempt: task.attempt,
            is_final: true,
        };
        match self.store.finish_and_activate(task, commit).await {
            Ok(DirectFinish::Activated(mut receipt)) => {
                self.notify(outcome_notice);
                let (kept, waiting) = self.after_commit(
                    id,
                    execution,
                    &mut receipt,
                    committed,
                    unknown_activity,
                    Start::AllButOne,
                );
                let kept = match waiting {
                    None => Ok(kept),
                    Some(reason) => Box::pin(self.note_unclaimed(id, reason, kept)).await,
                };
                let next = match kept {
                    Ok(mut kept) => kept.pop(),
                    Err(e) => {
                        tracing::warn!(instance_id = %id, error = %e, "could not note why the instance waits");
                        None
                    }
                };
                self.release_instance(id, receipt.ready_again);
                return Some(next);
            }
            Ok(DirectFinish::Finished(receipt)) => {
                // Nothing of the activation was written: the execution ran ahead of the history
                // and is dropped; the outcome went to the inbox (or was refused) as usual.
                if receipt.accepted {
                    self.notify(outcome_notice);
                }
                self.release_instance(id, receipt.instance_claimed);
            }
            Err(e) => {
                // Nothing of the combined commit was written: the caller records the outcome on
                // the regular path.
                tracing::debug!(instance_id = %id, error = %e, "direct finish failed; taking the regular path");
                self.release_instance(id, false);
                return None;
            }
        }
        Some(None)
    }

    /// Ends the hold on `id` taken by `finish_directly`, and activates the instance if it has
    /// work (`run`) or if an activation was asked for meanwhile.
    fn release_instance(self: &Arc<Self>, id: &str, run: bool) {
        let requested = lock(&self.slots).release(id);
        if run || requested {
            self.schedule(id.to_string());
        }
    }

    fn spawn_task(self: &Arc<Self>, task: ActivityTask) {
        // A stopping worker starts no more attempts: it hands their leases back (or they
        // expire) and another worker runs them, instead of both.
        if self.stopping() {
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(_permit) = Arc::clone(&inner.activity_slots).acquire_owned().await else {
                return;
            };
            let mut next = Some(task);
            // A sequential coordinator's next call, claimed by the commit of this one's
            // outcome, runs in this same task and slot: no task spawn or wake-up per step.
            // The calls of a chain belong to one instance: one copy of its id for all.
            let mut instance: Option<Arc<str>> = None;
            while let Some(task) = next.take() {
                if inner.stopping() {
                    break;
                }
                let span = tracing::debug_span!(
                    "activity",
                    instance_id = %task.instance_id,
                    position = task.seq,
                    activity = %task.name,
                    attempt = task.attempt
                );
                next = inner.run_task(&task, &mut instance).instrument(span).await;
            }
        });
    }

    /// Runs one attempt and records its outcome. Returns the next activity call to run when
    /// the outcome's commit claimed exactly one (see `finish_directly`). `instance` is the
    /// shared id of the instance of the task before, if the caller ran one, and becomes this
    /// task's. The task is borrowed: its future, built at every step of a chain, then holds
    /// no copy of it.
    async fn run_task(
        self: &Arc<Self>,
        task: &ActivityTask,
        instance: &mut Option<Arc<str>>,
    ) -> Option<ActivityTask> {
        let Some(activity) = self.activities.get(&task.name) else {
            tracing::warn!(
                "claimed an activity this worker does not know; it will be retried elsewhere"
            );
            return None;
        };
        let (handler, name) = (activity.handler.clone(), Arc::clone(&activity.name));
        let instance_id = match instance {
            Some(id) if **id == *task.instance_id => Arc::clone(id),
            _ => Arc::clone(instance.insert(Arc::from(task.instance_id.as_str()))),
        };
        let started = tokio::time::Instant::now();
        let mut ctx = ActivityContext::with_shared_names(instance_id, name, task.seq, task.attempt)
            .with_generation(task.generation);
        // Heartbeats move only the heartbeat deadline: without one, `heartbeat` has nothing to
        // renew, and its closure and shared clock (two allocations per attempt) are not made.
        let no_beats = AtomicU64::new(0);
        let beats = task
            .retry
            .heartbeat_timeout_ms
            .is_some_and(|ms| ms > 0)
            .then(|| Arc::new(AtomicU64::new(0)));
        if let Some(beats) = &beats {
            let beat = Arc::clone(beats);
            ctx = ctx.with_heartbeat(Arc::new(move |_details| {
                let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                beat.store(elapsed, Ordering::Relaxed);
            }));
        }
        let last_beat_ms = beats.as_deref().unwrap_or(&no_beats);
        let body = AssertUnwindSafe(handler(ctx, task.input.clone())).catch_unwind();
        let result = bounded_attempt(body, &task.retry, started, last_beat_ms).await;
        let outcome = match result {
            Ok(output) => AttemptOutcome::Final(Event::ActivityCompleted {
                seq: task.seq,
                output,
                attempt: task.attempt,
            }),
            Err(error)
                if task
                    .retry
                    .may_retry(task.attempt, &error.kind, error.retryable) =>
            {
                let delay = task.retry.backoff(task.attempt);
                // Saturating, and within the stores' signed 64-bit times: an enormous backoff
                // (a policy's `max_interval(Duration::MAX)`) means "much later", never a wrap
                // to "at once".
                let next = now_ms()
                    .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                    .min(i64::MAX as u64);
                tracing::debug!(%error, retry_in_ms = delay.as_millis() as u64, "attempt failed; retry scheduled");
                AttemptOutcome::Retry {
                    next_attempt_at_ms: next,
                    error,
                }
            }
            Err(error) => {
                let non_retryable =
                    !error.retryable || task.retry.non_retryable.contains(&error.kind);
                AttemptOutcome::Final(Event::ActivityFailed {
                    seq: task.seq,
                    failure: ActivityFailure {
                        activity: task.name.clone(),
                        position: task.seq,
                        attempt: task.attempt,
                        kind: error.kind,
                        message: error.message,
                        non_retryable,
                    },
                })
            }
        };
        let retry_at = match &outcome {
            AttemptOutcome::Retry {
                next_attempt_at_ms, ..
            } => Some(*next_attempt_at_ms),
            AttemptOutcome::Final(_) => None,
        };
        if let AttemptOutcome::Final(event) = &outcome {
            tracing::debug!(outcome = event.kind(), "attempt finished");
            if let Some(next) = self.finish_directly(task, event).await {
                return next;
            }
        }
        // The outcome is known and only this worker holds the task (its renewer keeps the lease
        // alive): keep trying to record it while the worker runs, or the call would wait
        // forever. A dead worker's lease expires and the call is retried elsewhere.
        let mut delay = Duration::from_millis(10);
        let recorded = loop {
            let attempt = self
                .store
                .finish_task(&self.owner, task, outcome.clone(), self.lease_ms())
                .instrument(tracing::debug_span!("store_commit"))
                .await;
            match attempt {
                Err(e) if !self.stopping() => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "could not record the activity outcome; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                other => break other,
            }
        };
        match recorded {
            Ok(receipt) => {
                if receipt.accepted {
                    self.notify(|buffer| CommitNotice::ActivityOutcome {
                        instance_id: copied(buffer, &task.instance_id),
                        seq: task.seq,
                        attempt: task.attempt,
                        is_final: retry_at.is_none(),
                    });
                }
                if receipt.instance_claimed {
                    self.schedule(task.instance_id.clone());
                }
                if let Some(at) = retry_at {
                    self.wake_poller_at(at);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "worker stopping before the activity outcome was recorded; the call will be retried after the lease expires");
            }
        }
        None
    }

    /// Wakes the poller at `at_ms`, so that a short backoff or timer does not wait for the next
    /// poll. Only an optimisation: the due time itself is in the store.
    fn wake_poller_at(self: &Arc<Self>, at_ms: u64) {
        let delay = Duration::from_millis(at_ms.saturating_sub(now_ms()));
        if delay >= self.poll_interval.saturating_mul(10) {
            // Far enough out that the regular polls will see it within a poll interval.
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner.poller_wake.notify_one();
        });
    }

    async fn dispatcher(self: Arc<Self>) {
        if self.coordinator_names.is_empty() {
            return;
        }
        let mut changes = self.store.ready_changes();
        let mut shutdown = self.shutdown.clone();
        loop {
            changes.borrow_and_update();
            match self
                .store
                .claim_ready(
                    &self.owner,
                    &self.coordinator_names,
                    CLAIM_BATCH_MAX,
                    self.lease_ms(),
                )
                .await
            {
                Ok(ids) => {
                    let full = ids.len() == CLAIM_BATCH_MAX;
                    for id in ids {
                        self.schedule(id);
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming ready instances failed"),
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn poller(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        if let Err(e) = self.store.register_worker(&self.owner).await {
            tracing::warn!(error = %e, "could not register worker; crashed workers are detected by lease expiry only");
        }
        let mut next_reap = std::time::Instant::now();
        loop {
            if std::time::Instant::now() >= next_reap {
                next_reap = std::time::Instant::now() + REAP_INTERVAL;
                match self.store.reap_dead_workers().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(dead_workers = n, "took over the work of dead workers"),
                    Err(e) => tracing::warn!(error = %e, "looking for dead workers failed"),
                }
                // Only a worker that runs coordinators can tell which ones nobody claims.
                let marked = if self.coordinator_names.is_empty() {
                    Ok(0)
                } else {
                    self.store
                        .mark_unclaimed(&self.coordinator_names, UNCLAIMED_AFTER_MS)
                        .await
                };
                if let Err(e) = marked {
                    tracing::warn!(error = %e, "marking unclaimed instances failed");
                }
            }
            if let Err(e) = self.store.fire_due_timers(now_ms(), CLAIM_BATCH_MAX).await {
                tracing::warn!(error = %e, "firing due timers failed");
            }
            let free = self.activity_slots.available_permits().min(CLAIM_BATCH_MAX);
            if free > 0 && !self.activity_names.is_empty() {
                match self
                    .store
                    .claim_tasks(&self.owner, &self.activity_names, free, self.lease_ms())
                    .await
                {
                    Ok(tasks) => {
                        for task in tasks {
                            self.spawn_task(task);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming activity tasks failed"),
                }
            }
            tokio::select! {
                _ = self.poller_wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn renewer(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        let period = self.lease / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.store.renew_leases(&self.owner, self.lease_ms()).await {
                tracing::warn!(error = %e, "renewing leases failed");
            }
        }
    }
}

/// [`summarize`], when debug output is on (an empty string otherwise: formatting it cost
/// a few thousand instructions per activation that nobody would read).
fn debug_summary(events: &[Event]) -> String {
    if tracing::enabled!(tracing::Level::DEBUG) {
        summarize(events)
    } else {
        String::new()
    }
}

/// A one-line account of an activation's events, for the debug log: what was delivered and what
/// the code asked for (`activity_completed #0, activity book_hotel #1`).
fn summarize(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| match (e.command_identity(), e.seq()) {
            (Some(what), Some(seq)) => format!("{what} #{seq}"),
            (None, Some(seq)) => format!("{} #{seq}", e.kind()),
            _ => e.kind().to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_come_fresh_across_refills() {
        let mut pool = SeedPool::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(SEED_POOL * 3 + 5) {
            assert!(seen.insert(pool.take()), "a seed came twice");
        }
    }
}
