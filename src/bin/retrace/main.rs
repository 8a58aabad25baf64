//! `retrace`: look at and operate a Retrace store without loading any coordinator code.
//!
//! ```text
//! retrace --db trips.db list --status stopped
//! retrace --db trips.db show trip-7
//! retrace --db trips.db timeline trip-7 --format svg > trip-7.svg
//! retrace --db trips.db export trip-7 > trip-7.json
//! retrace --db 'postgres://postgres@127.0.0.1:5432/app?schema=trips' list
//! retrace migrate --from sqlite://trips.db --to 'postgres://postgres@127.0.0.1:5432/app?schema=trips'
//! ```
//!
//! The store is named by `--db URL` or the `RETRACE_DB` environment variable: a path or
//! `sqlite://PATH` for an SQLite file, `postgres://…` (with `?schema=name` if wanted) for
//! PostgreSQL. It must exist: the tool never creates one (except `import --create`). Every
//! command exits non-zero with a one-line message on stderr when the instance or the store is
//! missing; `--json` prints machine-readable output for scripts. `migrate` names its two stores
//! with `--from` and `--to` instead.
//!
//! Modules, one per concept: `open` (finding the store), `commands` (one function per
//! subcommand), `events` (reading a history as rows and calls), `table` (text tables and
//! times), `timeline` (the run as lanes and bars, and its Mermaid rendering), `svg` (its SVG
//! rendering).

/// `println!` that returns the write's error instead of panicking: a reader that goes away
/// early (`retrace list | head -1`) must not make the tool panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `print!` that returns the write's error instead of panicking (see `outln!`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod commands;
mod events;
mod open;
mod svg;
mod table;
mod timeline;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Look at and operate a Retrace store: list instances, read histories, export and import them,
/// signal, cancel, terminate, resume and fork instances, draw a run's timeline, and migrate an
/// SQLite store to PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "retrace", version, propagate_version = true)]
struct Cli {
    /// The store: an SQLite file written by Retrace (a path or sqlite://PATH) or a PostgreSQL
    /// store (postgres://user@host:port/db?schema=name). It must exist.
    #[arg(long, global = true, env = "RETRACE_DB", value_name = "URL")]
    db: Option<String>,

    #[command(subcommand)]
    command: Command,
}

/// Lifecycle states, as `list --status` accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatusArg {
    Running,
    Completed,
    Failed,
    Cancelled,
    Terminated,
    Stopped,
}

/// The picture formats of `timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TimelineFormat {
    /// A Mermaid Gantt chart, for Markdown (GitHub renders it).
    Mermaid,
    /// A standalone SVG image, for a browser.
    Svg,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One row per instance: id, coordinator, status, started, last event, custom status.
    List {
        /// Only instances in this state.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Only instances of this coordinator.
        #[arg(long, value_name = "NAME")]
        coordinator: Option<String>,
        /// At most this many, newest first (0: all).
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: usize,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// An instance and its history as a table: position, time, event, name, attempt, duration,
    /// payload summary; errors in full.
    Show {
        /// The instance id.
        id: String,
        /// Print JSON (the instance and one object per event) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an instance's history in the versioned JSON export format
    /// (docs/history-format.md).
    Export {
        /// The instance id.
        id: String,
        /// Write to this file instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Create an instance from an exported history (`-` reads standard input). Work pending in
    /// the history (activity calls and timers without an outcome) is re-created.
    Import {
        /// The export file.
        file: PathBuf,
        /// Create the instance under this id instead of the exported one.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Create the store if the file does not exist.
        #[arg(long)]
        create: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to an instance.
    Signal {
        /// The instance id.
        id: String,
        /// The signal's name.
        name: String,
        /// The payload, as JSON (for example '{"approved": true}' or '"text"').
        payload: String,
        /// Deliver at most once per this id: a repeated delivery with it is ignored.
        #[arg(long, value_name = "SIGNAL_ID")]
        once: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask an instance to cancel: its waits fail with a cancellation, and its code may
    /// compensate before it ends.
    Cancel {
        /// The instance id.
        id: String,
        /// Why.
        #[arg(long, default_value = "cancelled with the retrace tool")]
        reason: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End an instance at once, running no more of its code, recording why.
    Terminate {
        /// The instance id.
        id: String,
        /// Why (recorded in the history).
        #[arg(long)]
        reason: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put an instance stopped by a nondeterminism error (or waiting for a worker that knows its
    /// coordinator) back to running, after a code fix.
    Resume {
        /// The instance id.
        id: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a new instance from the first POSITION events of another, to re-run a run from a
    /// step after a fix. The cut is rounded down to an activation boundary before the end of the
    /// run; the original is not touched.
    Fork {
        /// The instance to copy.
        id: String,
        /// How many events to keep, at most (see `retrace show ID` for positions).
        #[arg(long, value_name = "POSITION")]
        at: u64,
        /// The new instance's id.
        #[arg(long, value_name = "NEW")]
        new_id: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draw a run: a lane per activity, a bar per call with its attempts and duration, timers,
    /// signals, compensations marked.
    Timeline {
        /// The instance id.
        id: String,
        /// The picture format.
        #[arg(long, value_enum, default_value_t = TimelineFormat::Mermaid)]
        format: TimelineFormat,
        /// Write to this file instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Copy every instance of an SQLite store into a PostgreSQL store, with its history, pending
    /// work, timers and undelivered signals. Refuses while the source has live leases (stop its
    /// workers first); copies each instance in one transaction; running it again copies only
    /// what is missing and duplicates nothing. The source is only read. Ignores --db.
    Migrate {
        /// The SQLite store to copy (a path or sqlite://PATH).
        #[arg(long, value_name = "URL")]
        from: String,
        /// The PostgreSQL store to copy into (postgres://…?schema=name), created if missing.
        #[arg(long, value_name = "URL")]
        to: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A failure of the tool, reported as one line on stderr.
#[derive(Debug)]
struct CliError {
    message: String,
    /// Standard output was closed by its reader: nothing to report, the reader has what it
    /// wanted.
    broken_pipe: bool,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + 'static> From<E> for CliError {
    fn from(e: E) -> Self {
        let broken_pipe = (&e as &dyn std::error::Error)
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        CliError {
            message: e.to_string(),
            broken_pipe,
        }
    }
}

impl CliError {
    fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            broken_pipe: false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("retrace: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // Like `head` closing its input: the output was cut short on purpose.
        Err(e) if e.broken_pipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("retrace: {e}");
            ExitCode::FAILURE
        }
    }
}
