//! Store URLs: choosing a store is one string, the same for workers, clients, examples, the
//! benchmark and the command-line tool.
//!
//! | URL | store |
//! | --- | --- |
//! | `sqlite://path/to/file.db`, `sqlite:///abs/file.db`, `sqlite:file.db` | [`SqliteStore`] on that file |
//! | `sqlite::memory:`, `sqlite://:memory:` | an in-memory [`SqliteStore`] (nothing durable) |
//! | `postgres://user@host:port/db`, `postgresql://…` | [`PostgresStore`]; `?schema=name` picks the PostgreSQL schema, `?pool_size=n` the pool |
//! | anything without a scheme | a path: [`SqliteStore`] on that file |
//!
//! [`open_store`] (and [`StoreUrl::open`]) create the store when it is missing, as workers and
//! clients want; [`StoreUrl::open_existing`] never does, for tools that inspect stores.
//! [`migrate_urls`](super::migrate::migrate_urls) copies an SQLite store into a PostgreSQL one.

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::SharedStore;
use crate::error::StoreError;
use std::path::PathBuf;
use std::sync::Arc;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// An in-memory SQLite store.
    SqliteMemory,
    /// A PostgreSQL server (the URL as given, with its `schema` and `pool_size` parameters).
    Postgres(String),
}

impl StoreUrl {
    /// Parses a store URL (see the module docs).
    ///
    /// # Errors
    /// [`StoreError::Database`] for an unknown scheme or an empty path.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |detail: String| StoreError::Database {
            operation: "parse store url".into(),
            detail,
        };
        let url = url.trim();
        if url.is_empty() {
            return Err(bad("empty store url".into()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path == ":memory:" || rest == ":memory:" {
                return Ok(StoreUrl::SqliteMemory);
            }
            if path.is_empty() {
                return Err(bad(format!("{url}: no file path after sqlite://")));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
            {
                return Err(bad(format!(
                    "{url}: unknown store scheme {scheme:?} (use sqlite:// or postgres://)"
                )));
            }
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(url)))
    }

    /// Opens (creating if needed) the store this URL names.
    ///
    /// # Errors
    /// As [`SqliteStore::open`] and [`PostgresStore::connect`].
    pub async fn open(&self) -> Result<SharedStore, StoreError> {
        Ok(match self {
            StoreUrl::Sqlite(path) => Arc::new(SqliteStore::open(path)?),
            StoreUrl::SqliteMemory => Arc::new(SqliteStore::open_in_memory()?),
            StoreUrl::Postgres(url) => Arc::new(PostgresStore::connect(url).await?),
        })
    }
}

impl StoreUrl {
    /// Opens the existing store this URL names, never creating one: for tools that inspect
    /// stores workers wrote, so that a typo does not leave an empty store behind. An older
    /// schema is migrated, as by [`StoreUrl::open`].
    ///
    /// # Errors
    /// [`StoreError::NotARetraceStore`] when there is no Retrace store there (a missing file,
    /// an empty schema, another program's data); those of [`SqliteStore::open_existing`] and
    /// [`PostgresStore::connect_existing`].
    pub async fn open_existing(&self) -> Result<SharedStore, StoreError> {
        Ok(match self {
            StoreUrl::Sqlite(path) => Arc::new(SqliteStore::open_existing(path)?),
            StoreUrl::SqliteMemory => Err(StoreError::NotARetraceStore {
                path: ":memory:".into(),
                detail: "an in-memory store never exists beforehand".into(),
            })?,
            StoreUrl::Postgres(url) => Arc::new(PostgresStore::connect_existing(url).await?),
        })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreUrl::SqliteMemory => f.write_str("sqlite::memory:"),
            // The URL may carry a password: show only what is needed to find the server.
            StoreUrl::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (main, query) = match rest.split_once('?') {
        Some((main, query)) => (main, Some(query)),
        None => (rest, None),
    };
    // The user information runs to the first `@`, as the driver reads it: a password may hold
    // a `/` (`postgres://app:ab/cd@db/x`).
    let main = match main.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => main.to_string(),
        },
        None => main.to_string(),
    };
    match query {
        None => format!("{scheme}://{main}"),
        Some(query) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{scheme}://{main}?{}", query.join("&"))
        }
    }
}

/// Opens the store named by `url`: `sqlite://path`, `postgres://…` (or `postgresql://…`), or a
/// plain path meaning SQLite. See the module docs for the forms accepted.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), retrace_runtime::StoreError> {
/// let store = retrace_runtime::open_store("sqlite::memory:").await?;
/// assert!(store.describe("nobody").await?.is_none());
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// A malformed URL or an unknown scheme ([`StoreError::Database`]), and the errors of opening
/// the store: [`StoreError::NotARetraceStore`], [`StoreError::NewerSchema`], connection errors.
pub async fn open_store(url: &str) -> Result<SharedStore, StoreError> {
    StoreUrl::parse(url)?.open().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_stores() {
        let p = |u: &str| StoreUrl::parse(u).unwrap();
        assert_eq!(
            p("sqlite://data/r.db"),
            StoreUrl::Sqlite("data/r.db".into())
        );
        assert_eq!(
            p("sqlite:///tmp/r.db"),
            StoreUrl::Sqlite("/tmp/r.db".into())
        );
        assert_eq!(p("sqlite:r.db"), StoreUrl::Sqlite("r.db".into()));
        assert_eq!(p("sqlite::memory:"), StoreUrl::SqliteMemory);
        assert_eq!(p("sqlite://:memory:"), StoreUrl::SqliteMemory);
        assert_eq!(p("./r.db"), StoreUrl::Sqlite("./r.db".into()));
        assert_eq!(p("/var/lib/r.db"), StoreUrl::Sqlite("/var/lib/r.db".into()));
        assert_eq!(
            p("postgres://postgres@127.0.0.1/test?schema=a"),
            StoreUrl::Postgres("postgres://postgres@127.0.0.1/test?schema=a".into())
        );
        assert!(matches!(p("postgresql://h/db"), StoreUrl::Postgres(_)));
        assert!(StoreUrl::parse("mysql://h/db").is_err());
        assert!(StoreUrl::parse("sqlite://").is_err());
        assert!(StoreUrl::parse("").is_err());
    }

    #[test]
    fn display_hides_passwords() {
        let u = StoreUrl::parse("postgres://me:secret@db:5432/x?schema=s").unwrap();
        assert_eq!(u.to_string(), "postgres://me:***@db:5432/x?schema=s");
        let u = StoreUrl::parse("postgres://me@db/x").unwrap();
        assert_eq!(u.to_string(), "postgres://me@db/x");
        // A password holding a `/`, and one given as a parameter.
        let u = StoreUrl::parse("postgres://app:ab/cd@db/x").unwrap();
        assert_eq!(u.to_string(), "postgres://app:***@db/x");
        let u = StoreUrl::parse("postgres://db/x?user=me&password=secret&schema=s").unwrap();
        assert_eq!(
            u.to_string(),
            "postgres://db/x?user=me&password=***&schema=s"
        );
    }
}
