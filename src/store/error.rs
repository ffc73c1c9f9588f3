//! The storage layer's errors. Callers see what went wrong in storage terms;
//! the engine's own error is kept as the source, for the log.

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: syncing the write-ahead log to disk: {0}")]
    Sync(#[source] std::io::Error),
    #[error("database: cannot create the folder {path}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no database at {path}: `cancelwatch serve` or `cancelwatch migrate` creates it (or point database.url at the existing one)")]
    Missing { path: String },
    #[error("this is not a cancelwatch database (it has no migration table)")]
    NotOurs,
    #[error("the database schema is at version {database}, older than this binary's {binary}: run `cancelwatch migrate`")]
    SchemaOlder { database: i64, binary: i64 },
    /// The database was migrated by a newer cancelwatch than this one.
    #[error(
        "database: its schema is at version {database}, newer than this cancelwatch \
         ({binary_version}) knows (up to {binary}): it was migrated by a newer release; \
         run that release, or restore a backup taken before the upgrade"
    )]
    SchemaTooNew {
        database: i64,
        binary: i64,
        binary_version: &'static str,
    },
    #[error("database: cannot write the backup file {path}")]
    Backup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database: no answer from the server within {secs} s (database.connect_timeout_secs)")]
    Unreachable { secs: u64 },
    /// A copy's target already holds data of its own.
    #[error("the target database is not empty (its table {0} has rows): copy into a new, empty database")]
    NotEmpty(&'static str),
    /// The engine does not do this; the message says what to use instead.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A rule of the store's own was broken (a bug, never bad input).
    #[error("database: broken invariant: {0}")]
    Invariant(&'static str),
}

/// Why a read query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A filter, limit or cursor the user gave is not valid.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for QueryError {
    fn from(e: sqlx::Error) -> QueryError {
        QueryError::Store(StoreError::Sql(e))
    }
}
