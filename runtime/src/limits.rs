//! Every hard limit and default of the runtime, in one place.

use std::time::Duration;

/// How long a worker's claim on an instance or an activity task lasts without renewal.
pub const LEASE_DEFAULT: Duration = Duration::from_secs(3);
/// How often a worker looks for work it was not told about (other processes' writes).
pub const POLL_INTERVAL_DEFAULT: Duration = Duration::from_millis(100);
/// Activity bodies running at once in one worker.
pub const ACTIVITIES_CONCURRENT_MAX: usize = 1024;
/// A cached execution stays cached while it waits on a timer due within this horizon (or on an
/// activity or child); one waiting only on signals or later timers is dropped after its
/// activation and replayed when its event comes.
pub const CACHE_TIMER_HORIZON_MS: u64 = 5_000;
/// Executions kept in a worker's hot cache.
pub const CACHE_CAPACITY_DEFAULT: usize = 10_000;
/// Instances or tasks claimed by one poll.
pub const CLAIM_BATCH_MAX: usize = 256;
/// First activations a worker's client ([`crate::Worker::client`]) runs at once; further starts
/// wait for one to commit. Bounds the memory of a burst of starts (each holds an execution and
/// its commit until the group commit answers). As many as one group commit takes: at 256, a
/// burst of starts could never fill a batch, and W1's 1,000 starts took 23–35 ms instead of
/// 15–28 ms (W1 ~+5 % in interleaved runs; W5's burst of 10,000 starts ~+1.5 MiB of RSS).
pub const EAGER_STARTS_MAX: usize = GROUP_COMMIT_MAX;
/// Store operations committed in one group-commit transaction.
pub const GROUP_COMMIT_MAX: usize = 512;
/// Ended instances an SQLite store handle keeps in memory, so that a client waiting for one
/// reads its end without a round trip to the file.
pub const ENDED_REMEMBERED_MAX: usize = 1024;
/// Reads of one SQLite store running at once (each on its own connection and thread).
pub const READERS_MAX: usize = 4;
/// How often, at most, an SQLite store handle looks for held activity calls whose lease ran out
/// (their worker stopped renewing), when claiming tasks; more often when a commit asked for a
/// shorter lease (twice per lease). The scan reads every held call (0.75 ms for 10,000, 11 ms
/// for 100,000), and workers claim every poll; a dead worker's calls are reaped at once
/// anyway, through its lock file.
pub const HELD_EXPIRY_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// SQLite busy timeout.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
