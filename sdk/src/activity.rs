//! Activity definitions and the context an activity body receives.
//!
//! An activity is an ordinary async function with side effects:
//! `async fn reserve_car(ctx: ActivityContext, req: CarRequest) -> Result<Car, ActivityError>`.
//! It is named by a typed, `const` [`Activity`] definition shared by the coordinator (which calls
//! it through [`crate::Context::call`]) and the worker (which registers the body), so that a type
//! mismatch between the two is a compile error.

use crate::error::ActivityError;
use crate::retry::RetryPolicy;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

/// A typed activity definition: its registered name, input type `I`, output type `O` and default
/// retry policy.
///
/// ```
/// use retrace_sdk::{Activity, RetryPolicy};
/// pub const RESERVE_CAR: Activity<String, u64> =
///     Activity::new("reserve_car").with_retry(RetryPolicy::new().max_attempts(5));
/// assert_eq!(RESERVE_CAR.name(), "reserve_car");
/// ```
pub struct Activity<I, O> {
    name: &'static str,
    retry: RetryPolicy,
    _types: PhantomData<fn(I) -> O>,
}

impl<I, O> Activity<I, O> {
    /// An activity named `name`, with the default retry policy.
    pub const fn new(name: &'static str) -> Self {
        Activity {
            name,
            retry: RetryPolicy::new(),
            _types: PhantomData,
        }
    }

    /// The same activity with another default retry policy.
    pub const fn with_retry(self, retry: RetryPolicy) -> Self {
        Activity {
            name: self.name,
            retry,
            _types: PhantomData,
        }
    }

    /// The registered name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The default retry policy of calls to this activity.
    pub const fn retry(&self) -> RetryPolicy {
        self.retry
    }
}

impl<I, O> Clone for Activity<I, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I, O> Copy for Activity<I, O> {}

impl<I, O> std::fmt::Debug for Activity<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("name", &self.name)
            .finish()
    }
}

/// What an activity body knows about the call it serves.
#[derive(Clone)]
pub struct ActivityContext {
    instance_id: Arc<str>,
    activity: Arc<str>,
    position: u32,
    attempt: u32,
    generation: u64,
    heartbeat: Option<Arc<dyn Fn(Option<Value>) + Send + Sync>>,
}

impl ActivityContext {
    /// A context for the call at `position` of `instance_id`, on attempt `attempt` (from 1).
    pub fn new(instance_id: &str, activity: &str, position: u32, attempt: u32) -> Self {
        ActivityContext {
            instance_id: instance_id.into(),
            activity: activity.into(),
            position,
            attempt,
            generation: 0,
            heartbeat: None,
        }
    }

    /// As [`ActivityContext::new`], with the instance id and the activity's name already
    /// shared: a runtime hands every attempt of one instance, or of one activity, the same
    /// strings instead of a copy of each per attempt.
    pub fn with_shared_names(
        instance_id: Arc<str>,
        activity: Arc<str>,
        position: u32,
        attempt: u32,
    ) -> Self {
        ActivityContext {
            instance_id,
            activity,
            position,
            attempt,
            generation: 0,
            heartbeat: None,
        }
    }

    /// Sets the caller's run number (how many times it continued as new; set by the runtime).
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// Attaches the function that records heartbeats (set by the runtime).
    pub fn with_heartbeat(mut self, heartbeat: Arc<dyn Fn(Option<Value>) + Send + Sync>) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// The calling instance.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The activity's registered name.
    pub fn activity(&self) -> &str {
        &self.activity
    }

    /// The call position (command sequence number) in the caller's history.
    pub fn position(&self) -> u32 {
        self.position
    }

    /// The attempt, counting from 1. Survives worker restarts.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A key stable across retries, replays, crashes and workers: `"{instance_id}/{position}"`,
    /// or `"{instance_id}@{run}/{position}"` in the runs after a continue-as-new (where positions
    /// start again from 0). Pass it to external systems that dedupe requests.
    pub fn idempotency_key(&self) -> String {
        if self.generation == 0 {
            format!("{}/{}", self.instance_id, self.position)
        } else {
            format!("{}@{}/{}", self.instance_id, self.generation, self.position)
        }
    }

    /// Reports progress of a long activity, renewing its heartbeat deadline.
    pub fn heartbeat(&self, details: Option<Value>) {
        if let Some(h) = &self.heartbeat {
            h(details);
        }
    }
}

impl std::fmt::Debug for ActivityContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityContext")
            .field("instance_id", &self.instance_id)
            .field("activity", &self.activity)
            .field("position", &self.position)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// A type-erased activity body, as the runtime stores it: JSON in, JSON out.
pub type ActivityHandler = Arc<
    dyn Fn(ActivityContext, Value) -> BoxFuture<'static, Result<Value, ActivityError>>
        + Send
        + Sync,
>;

/// Erases a typed activity body into an [`ActivityHandler`]. An input that does not decode into
/// `I` is a non-retryable `payload` error.
pub fn activity_handler<I, O, F, Fut>(_def: &Activity<I, O>, body: F) -> ActivityHandler
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ActivityError>> + Send + 'static,
{
    let body = Arc::new(body);
    Arc::new(move |ctx: ActivityContext, input: Value| {
        let body = Arc::clone(&body);
        Box::pin(async move {
            let input: I = serde_json::from_value(input).map_err(|e| {
                ActivityError::non_retryable(
                    "payload",
                    format!("input of activity {} does not decode: {e}", ctx.activity()),
                )
            })?;
            // Kept for an encoding error's message (a shared name: no copy per call).
            let activity = Arc::clone(&ctx.activity);
            let output = body(ctx, input).await?;
            serde_json::to_value(output).map_err(|e| {
                ActivityError::non_retryable(
                    "payload",
                    format!("output of activity {activity} does not encode: {e}"),
                )
            })
        })
    })
}
