//! Finding and opening the store named on the command line.
//!
//! The tool inspects stores that workers wrote; a typo in a path must not leave a fresh, empty
//! store behind. So the file must exist and be a Retrace store
//! ([`SqliteStore::open_existing`]), except for `import --create`.

use crate::CliError;
use retrace::{SharedStore, SqliteStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The path given by `--db` or `RETRACE_DB`.
pub(crate) fn db_path(db: Option<&Path>) -> Result<PathBuf, CliError> {
    db.map(Path::to_path_buf).ok_or_else(|| {
        CliError::new("no store given: pass --db PATH or set the RETRACE_DB environment variable")
    })
}

/// Opens an existing store; never creates one.
pub(crate) fn existing(path: &Path) -> Result<SharedStore, CliError> {
    let store = SqliteStore::open_existing(path)?;
    Ok(Arc::new(store))
}

/// Opens the store, creating it when the file does not exist and `create` is set.
pub(crate) fn existing_or_new(path: &Path, create: bool) -> Result<SharedStore, CliError> {
    if create && !path.exists() {
        return Ok(Arc::new(SqliteStore::open(path)?));
    }
    existing(path)
}
