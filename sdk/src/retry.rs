//! Retry policies for activity calls: how each attempt is bounded and how it is retried.
//!
//! A policy is chosen by the caller when it schedules an activity and is journaled with the call
//! (as a [`RetrySpec`]), so every attempt of one call, on any worker and after any restart, follows
//! the same policy. Attempt counts and next-attempt times live in the store, not in memory.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How an activity call is retried. `Copy` and `const`-constructible, so that it can sit in a
/// `const` [`crate::Activity`] definition.
///
/// ```
/// use retrace_sdk::RetryPolicy;
/// use std::time::Duration;
/// const BOOKING: RetryPolicy = RetryPolicy::new()
///     .max_attempts(5)
///     .initial_interval(Duration::from_millis(100))
///     .non_retryable(&["refused"]);
/// assert_eq!(BOOKING.backoff(1), Duration::from_millis(100));
/// assert_eq!(BOOKING.backoff(2), Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_interval: Duration,
    backoff_coefficient: f64,
    max_interval: Duration,
    non_retryable: &'static [&'static str],
    start_to_close_timeout: Option<Duration>,
    heartbeat_timeout: Option<Duration>,
}

impl RetryPolicy {
    /// The default: 10 attempts, 100 ms initial interval, doubling, at most 10 s between attempts.
    pub const fn new() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_interval: Duration::from_millis(100),
            backoff_coefficient: 2.0,
            max_interval: Duration::from_secs(10),
            non_retryable: &[],
            start_to_close_timeout: None,
            heartbeat_timeout: None,
        }
    }

    /// A single attempt, never retried.
    pub const fn no_retry() -> Self {
        RetryPolicy::new().max_attempts(1)
    }

    /// Total attempts allowed, counting the first (at least 1).
    pub const fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = if attempts == 0 { 1 } else { attempts };
        self
    }

    /// Wait before the second attempt.
    pub const fn initial_interval(mut self, interval: Duration) -> Self {
        self.initial_interval = interval;
        self
    }

    /// Each wait is the previous one times this coefficient (at least 1.0; NaN counts as 1.0 and
    /// infinity as `f64::MAX`, so that the journaled policy stays valid JSON).
    pub const fn backoff_coefficient(mut self, coefficient: f64) -> Self {
        self.backoff_coefficient = if coefficient > f64::MAX {
            f64::MAX
        } else if coefficient >= 1.0 {
            coefficient
        } else {
            1.0
        };
        self
    }

    /// Upper bound of a single wait.
    pub const fn max_interval(mut self, interval: Duration) -> Self {
        self.max_interval = interval;
        self
    }

    /// Error kinds that are never retried, whatever the activity says.
    pub const fn non_retryable(mut self, kinds: &'static [&'static str]) -> Self {
        self.non_retryable = kinds;
        self
    }

    /// Bounds each attempt: an attempt still running after `timeout` is abandoned and counts as
    /// a failed attempt of kind `timeout`, retried under this policy. The remote side may have
    /// acted; the idempotency key makes the retry safe. A zero timeout means none; one below a
    /// millisecond is a millisecond (timeouts are kept in whole milliseconds).
    pub const fn start_to_close_timeout(mut self, timeout: Duration) -> Self {
        self.start_to_close_timeout = Some(timeout);
        self
    }

    /// For long activities: an attempt that has not called
    /// [`crate::ActivityContext::heartbeat`] for `timeout` is abandoned and counts as a failed
    /// attempt of kind `heartbeat_timeout`. Zero and sub-millisecond values as for
    /// [`RetryPolicy::start_to_close_timeout`].
    pub const fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = Some(timeout);
        self
    }

    /// The wait after failed attempt `attempt` (counting from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.spec().backoff(attempt)
    }

    /// The journaled form of this policy.
    pub fn spec(&self) -> RetrySpec {
        RetrySpec {
            max_attempts: self.max_attempts,
            initial_interval_ms: duration_ms(self.initial_interval),
            backoff_coefficient: self.backoff_coefficient,
            max_interval_ms: duration_ms(self.max_interval),
            non_retryable: self.non_retryable.iter().map(|k| k.to_string()).collect(),
            start_to_close_timeout_ms: self.start_to_close_timeout.and_then(timeout_ms),
            heartbeat_timeout_ms: self.heartbeat_timeout.and_then(timeout_ms),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A timeout in whole milliseconds: none for zero, at least one otherwise (a truncated
/// sub-millisecond timeout would expire every attempt at once).
fn timeout_ms(d: Duration) -> Option<u64> {
    (!d.is_zero()).then(|| duration_ms(d).max(1))
}

/// The journaled form of a [`RetryPolicy`], recorded with each activity call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrySpec {
    /// Total attempts allowed, counting the first.
    pub max_attempts: u32,
    /// Wait before the second attempt, in milliseconds.
    pub initial_interval_ms: u64,
    /// Growth factor of the wait.
    pub backoff_coefficient: f64,
    /// Upper bound of a wait, in milliseconds.
    pub max_interval_ms: u64,
    /// Error kinds never retried.
    #[serde(default)]
    pub non_retryable: Vec<String>,
    /// Upper bound of one attempt, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_to_close_timeout_ms: Option<u64>,
    /// Longest silence between heartbeats of one attempt, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
}

impl RetrySpec {
    /// The wait after failed attempt `attempt` (counting from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        if self.initial_interval_ms == 0 {
            return Duration::ZERO;
        }
        let exponent = f64::from(attempt.saturating_sub(1));
        let ms = self.initial_interval_ms as f64 * self.backoff_coefficient.powf(exponent);
        let max = self.max_interval_ms as f64;
        // Growth that overflows (or a coefficient no policy would give) is the cap.
        let capped = if ms.is_finite() {
            ms.min(max).max(0.0)
        } else {
            max
        };
        Duration::from_millis(capped as u64)
    }

    /// Whether a failure of `kind` (retryable per the activity) on `attempt` may be retried.
    pub fn may_retry(&self, attempt: u32, kind: &str, retryable: bool) -> bool {
        retryable && attempt < self.max_attempts && !self.non_retryable.iter().any(|k| k == kind)
    }
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetryPolicy::new().spec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_reaches_its_cap_however_slowly_it_grows_and_zero_stays_zero() {
        let slow = RetryPolicy::new()
            .initial_interval(Duration::from_millis(100))
            .backoff_coefficient(1.05)
            .max_interval(Duration::from_secs(3600));
        assert_eq!(slow.backoff(1000), Duration::from_secs(3600));
        assert!(slow.backoff(70) > Duration::from_millis(2_500));
        let immediate = RetryPolicy::new()
            .initial_interval(Duration::ZERO)
            .backoff_coefficient(1e5);
        assert_eq!(immediate.backoff(65), Duration::ZERO);
        assert_eq!(immediate.backoff(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn zero_timeouts_are_none_and_sub_millisecond_ones_a_millisecond() {
        let spec = RetryPolicy::new()
            .start_to_close_timeout(Duration::ZERO)
            .heartbeat_timeout(Duration::from_micros(500))
            .spec();
        assert_eq!(spec.start_to_close_timeout_ms, None);
        assert_eq!(spec.heartbeat_timeout_ms, Some(1));
        let spec = RetryPolicy::new()
            .start_to_close_timeout(Duration::from_millis(1500))
            .spec();
        assert_eq!(spec.start_to_close_timeout_ms, Some(1500));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy::new()
            .initial_interval(Duration::from_millis(100))
            .backoff_coefficient(3.0)
            .max_interval(Duration::from_millis(500));
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(300));
        assert_eq!(p.backoff(3), Duration::from_millis(500));
        assert_eq!(p.backoff(60), Duration::from_millis(500));
    }

    #[test]
    fn non_retryable_kinds_and_exhaustion_stop_retries() {
        let s = RetryPolicy::new()
            .max_attempts(3)
            .non_retryable(&["refused"])
            .spec();
        assert!(s.may_retry(1, "timeout", true));
        assert!(s.may_retry(2, "timeout", true));
        assert!(!s.may_retry(3, "timeout", true));
        assert!(!s.may_retry(1, "refused", true));
        assert!(!s.may_retry(1, "timeout", false));
    }
}
