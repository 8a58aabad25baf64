//! A PostgreSQL schema of its own for one test, for the tests that also run against PostgreSQL
//! when `RETRACE_PG_URL` names a server (`.ci/run` sets it). Included with
//! `#[path = "common/pg.rs"] mod pg;` by the test files that need it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::hash::{BuildHasher, Hasher};
use std::io::Write;

/// The environment variable naming the PostgreSQL server.
pub const PG_URL_ENV: &str = "RETRACE_PG_URL";

/// A schema named `<prefix>_<random>` on the server of `RETRACE_PG_URL`, dropped (with
/// everything in it) when this value is dropped, whatever the test's outcome. The schema itself
/// is created by the first store that connects to [`PgSchema::url`].
#[derive(Debug)]
pub struct PgSchema {
    server: String,
    name: String,
}

/// Says on stderr, past the test harness's output capture (so that it shows when the test
/// passes), that `what` was not run and why.
pub fn say_not_run(what: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "{what} was NOT RUN: {PG_URL_ENV} is not set; set it to a PostgreSQL server to run it, \
         e.g. {PG_URL_ENV}=postgres://postgres@127.0.0.1:5432/test (.ci/run does)"
    );
}

/// A random lowercase hexadecimal suffix.
fn random_suffix() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", hasher.finish())
}

impl PgSchema {
    /// A fresh schema name on the server of `RETRACE_PG_URL`, or `None` after saying (see
    /// [`say_not_run`]) that `what` was not run, when the variable is not set.
    pub fn new(prefix: &str, what: &str) -> Option<Self> {
        let Ok(server) = std::env::var(PG_URL_ENV) else {
            say_not_run(what);
            return None;
        };
        Some(PgSchema {
            server,
            name: format!("{prefix}_{}", random_suffix()),
        })
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store URL of this schema: the server's URL with `schema=<name>`.
    pub fn url(&self) -> String {
        self.url_of(&self.name)
    }

    /// The store URL of another schema on the same server.
    pub fn url_of(&self, schema: &str) -> String {
        let sep = if self.server.contains('?') { '&' } else { '?' };
        format!("{}{sep}schema={schema}", self.server)
    }

    /// Whether a schema of this name exists on the server.
    pub fn exists(&self, schema: &str) -> bool {
        let schema = schema.to_string();
        self.with_client(move |client| async move {
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                    &[&schema],
                )
                .await?;
            Ok(row.get::<_, i64>(0) > 0)
        })
        .unwrap_or_else(|e| panic!("{PG_URL_ENV}: {e}"))
    }

    /// Runs `f` with a plain connection to the server, on a thread and a runtime of its own, so
    /// that it works from synchronous code, from async tests and from `Drop`.
    fn with_client<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let server = self.server.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("cannot connect to {server}: {e}"))?;
                let connection = tokio::spawn(connection);
                let result = f(client).await.map_err(|e| e.to_string());
                let _ = connection.await;
                result
            })
        })
        .join()
        .map_err(|_| "the PostgreSQL helper thread panicked".to_string())?
    }

    /// Drops `schema` (and everything in it) if it exists.
    pub fn drop_schema(&self, schema: &str) {
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
        if let Err(e) =
            self.with_client(move |client| async move { client.batch_execute(&sql).await })
        {
            let _ = writeln!(
                std::io::stderr(),
                "could not drop test schema {schema}: {e}"
            );
        }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        self.drop_schema(&self.name.clone());
    }
}
