//! Finding and opening the store named on the command line.
//!
//! `--db` takes a store URL ([`StoreUrl`]): a plain path or `sqlite://path` for an SQLite file,
//! `postgres://…?schema=name` for a PostgreSQL store. The tool inspects stores that workers
//! wrote; a typo must not leave a fresh, empty store behind. So the store must exist and be a
//! Retrace store ([`StoreUrl::open_existing`]), except for `import --create`.

use crate::CliError;
use retrace::{SharedStore, SqliteStore, StoreUrl};

/// The store named by `--db` or `RETRACE_DB`.
pub(crate) struct Target {
    url: StoreUrl,
    place: String,
}

impl Target {
    /// Parses the URL given by `--db` or `RETRACE_DB`.
    pub(crate) fn from_arg(db: Option<&str>) -> Result<Self, CliError> {
        let db = db.ok_or_else(|| {
            CliError::new(
                "no store given: pass --db URL (a path, sqlite://PATH or postgres://…) or set \
                 the RETRACE_DB environment variable",
            )
        })?;
        let url = StoreUrl::parse(db)?;
        let place = match &url {
            StoreUrl::Sqlite(path) => path.display().to_string(),
            other => other.to_string(),
        };
        Ok(Target { url, place })
    }

    /// Where the store is, for messages: the file, or the URL without its password.
    pub(crate) fn place(&self) -> &str {
        &self.place
    }

    /// Opens the existing store; never creates one.
    pub(crate) async fn existing(&self) -> Result<SharedStore, CliError> {
        Ok(self.url.open_existing().await?)
    }

    /// Opens the store, creating it when it does not exist and `create` is set.
    pub(crate) async fn existing_or_new(&self, create: bool) -> Result<SharedStore, CliError> {
        match (&self.url, create) {
            (StoreUrl::Sqlite(path), true) if !path.exists() => {
                Ok(std::sync::Arc::new(SqliteStore::open(path)?))
            }
            (StoreUrl::Postgres(_), true) => Ok(self.url.open().await?),
            _ => self.existing().await,
        }
    }
}
