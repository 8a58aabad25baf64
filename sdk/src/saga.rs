//! The saga helper: compensations registered step by step, run in reverse on failure.
//!
//! After each step that succeeded, register the activity call that undoes it. When a later step
//! fails for good, or the instance is cancelled, [`Saga::compensate`] runs the registered
//! compensations in reverse order, each a journaled activity call with its own retry policy.
//!
//! ```no_run
//! # use retrace_sdk::{Activity, Context, Error, Saga};
//! const RESERVE_CAR: Activity<String, String> = Activity::new("reserve_car");
//! const CANCEL_CAR: Activity<String, ()> = Activity::new("cancel_car");
//! const BOOK_FLIGHT: Activity<String, String> = Activity::new("book_flight");
//! async fn trip(ctx: Context, who: String) -> Result<String, Error> {
//!     let mut saga = Saga::new();
//!     let car = ctx.call(&RESERVE_CAR, &who).await?;
//!     saga.add(&CANCEL_CAR, &car)?;
//!     match ctx.call(&BOOK_FLIGHT, &who).await {
//!         Ok(flight) => Ok(flight),
//!         Err(e) => Err(saga.fail(&ctx, e).await),
//!     }
//! }
//! ```

use crate::activity::Activity;
use crate::context::Context;
use crate::error::Error;
use crate::retry::RetryPolicy;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// One registered compensation: an activity call to make if the saga unwinds.
#[derive(Debug, Clone)]
struct Compensation {
    activity: &'static str,
    input: Value,
    retry: RetryPolicy,
}

/// Compensations registered so far, in registration order.
#[derive(Debug, Clone, Default)]
pub struct Saga {
    compensations: Vec<Compensation>,
}

impl Saga {
    /// An empty saga.
    pub fn new() -> Self {
        Saga::default()
    }

    /// Registers `activity(input)` as the compensation of the step that just succeeded.
    ///
    /// # Errors
    /// [`Error::Payload`] when the input does not encode.
    pub fn add<I: Serialize, O>(
        &mut self,
        activity: &Activity<I, O>,
        input: &I,
    ) -> Result<(), Error> {
        let input = serde_json::to_value(input).map_err(|e| Error::Payload {
            action: "encode".into(),
            what: format!("compensation input of {}", activity.name()),
            message: e.to_string(),
        })?;
        self.compensations.push(Compensation {
            activity: activity.name(),
            input,
            retry: activity.retry(),
        });
        Ok(())
    }

    /// Moves the compensations that call `activity` to the front of the unwinding order (for
    /// example "cancel the car first: it is free within the hour"); the others keep their
    /// reverse order.
    pub fn run_first<I, O>(&mut self, activity: &Activity<I, O>) {
        // Unwinding pops from the end: move the chosen ones to the end, keeping their order.
        let (first, rest): (Vec<_>, Vec<_>) = self
            .compensations
            .drain(..)
            .partition(|c| c.activity == activity.name());
        self.compensations = rest.into_iter().chain(first).collect();
    }

    /// How many compensations are registered.
    pub fn len(&self) -> usize {
        self.compensations.len()
    }

    /// Whether no compensation is registered.
    pub fn is_empty(&self) -> bool {
        self.compensations.is_empty()
    }

    /// Runs every registered compensation in reverse order, one after another. A compensation
    /// that fails for good does not stop the others.
    ///
    /// A cancellation of the instance does not cut a compensation short: one under way when
    /// the cancel arrives is waited for, and the rest still run in order. (Histories that began
    /// compensating before this was so replay as they ran: a `retrace.shielded-compensations`
    /// marker in the history says which rule a run follows.)
    ///
    /// # Errors
    /// The first compensation failure, after all compensations were tried.
    pub async fn compensate(self, ctx: &Context) -> Result<(), Error> {
        if self.compensations.is_empty() {
            return Ok(());
        }
        let shielded = ctx.shield_compensations();
        let mut first_error = None;
        for c in self.compensations.into_iter().rev() {
            let def: Activity<Value, IgnoredOutput> = Activity::new(c.activity);
            let call = ctx.call_with(&def, &c.input, c.retry);
            let call = if shielded { call.mark_shielded() } else { call };
            if let Err(e) = call.await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Compensates and returns the error that caused it, for `Err(saga.fail(&ctx, e).await)`.
    /// A compensation failure is reported in the returned error's place only when the cause was
    /// not itself a failure worth keeping; the original cause always wins.
    pub async fn fail(self, ctx: &Context, cause: Error) -> Error {
        if let Err(compensation_error) = self.compensate(ctx).await {
            tracing::warn!(%cause, %compensation_error, "compensation failed while unwinding saga");
        }
        cause
    }
}

/// Accepts any activity output: compensations are called for their effect.
#[derive(Debug)]
struct IgnoredOutput;

impl<'de> serde::Deserialize<'de> for IgnoredOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| IgnoredOutput)
    }
}

fn _assert_deserialize_owned<T: DeserializeOwned>() {}
const _: fn() = _assert_deserialize_owned::<IgnoredOutput>;
