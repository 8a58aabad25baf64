//! Coordinator definitions.
//!
//! A coordinator is an ordinary async function `async fn(Context, I) -> Result<O, Error>`. A
//! typed, `const` [`Coordinator`] definition names it, so that the worker that registers it, the
//! client that starts it and a parent that starts it as a child agree on its types.

use crate::context::Context;
use crate::error::Error;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

/// A typed coordinator definition: registered name, input type `I`, output type `O`.
///
/// ```
/// use retrace_sdk::Coordinator;
/// pub const BOOK_TRIP: Coordinator<u32, String> = Coordinator::new("book_trip");
/// assert_eq!(BOOK_TRIP.name(), "book_trip");
/// ```
pub struct Coordinator<I, O> {
    name: &'static str,
    patches: &'static [&'static str],
    _types: PhantomData<fn(I) -> O>,
}

impl<I, O> Coordinator<I, O> {
    /// A coordinator named `name`.
    pub const fn new(name: &'static str) -> Self {
        Coordinator {
            name,
            patches: &[],
            _types: PhantomData,
        }
    }

    /// The same coordinator with the patches its code knows (see [`Context::patched`]). Each
    /// run pins this list when it starts and follows it to its end. Ids beginning with
    /// `retrace.` are Retrace's own markers (`retrace.shielded-compensations`,
    /// `retrace.shielded-call`): do not use them.
    pub const fn with_patches(self, patches: &'static [&'static str]) -> Self {
        Coordinator {
            name: self.name,
            patches,
            _types: PhantomData,
        }
    }

    /// The patches declared for new runs.
    pub const fn patches(&self) -> &'static [&'static str] {
        self.patches
    }

    /// The registered name.
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

impl<I, O> Clone for Coordinator<I, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I, O> Copy for Coordinator<I, O> {}

impl<I, O> std::fmt::Debug for Coordinator<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("name", &self.name)
            .finish()
    }
}

/// A type-erased coordinator, as the runtime and the replayer store it: JSON in, JSON out.
pub type CoordinatorFn =
    Arc<dyn Fn(Context, Value) -> BoxFuture<'static, Result<Value, Error>> + Send + Sync>;

/// Erases a typed coordinator function into a [`CoordinatorFn`]. An input that does not decode
/// into `I` fails the instance with [`Error::Payload`].
pub fn coordinator_fn<I, O, F, Fut>(def: &Coordinator<I, O>, body: F) -> CoordinatorFn
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(Context, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, Error>> + Send + 'static,
{
    let name = def.name();
    let body = Arc::new(body);
    Arc::new(move |ctx: Context, input: Value| {
        let body = Arc::clone(&body);
        Box::pin(async move {
            let input: I = serde_json::from_value(input)
                .map_err(|e| Error::decode(format!("input of coordinator {name}"), &e))?;
            let output = body(ctx, input).await?;
            serde_json::to_value(output)
                .map_err(|e| Error::encode(format!("output of coordinator {name}"), &e))
        })
    })
}
