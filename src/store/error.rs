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
    /// A rule of the store's own was broken (a bug, never bad input).
    #[error("database: broken invariant: {0}")]
    Invariant(&'static str),
}

/// A database that cannot take a write for now, for a cause outside the
/// daemon that goes away by itself or by an operator's hand: answered 503
/// with a `Retry-After`, not as an internal error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The disk (or the database's size limit) is full.
    DiskFull,
    /// Another process holds the database's lock past `database.busy_timeout_ms`.
    Locked,
}

impl Unavailable {
    /// The stable error code an HTTP answer carries.
    pub fn code(self) -> &'static str {
        match self {
            Unavailable::DiskFull => "storage_full",
            Unavailable::Locked => "storage_locked",
        }
    }
}

impl StoreError {
    /// Whether this failure is the database being full or locked.
    pub fn unavailable(&self) -> Option<Unavailable> {
        match self {
            StoreError::Sql(e) => super::sqlite::unavailable(e),
            StoreError::Sync(e) => super::sqlite::disk_full(e),
            _ => None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// SQLite's own "database or disk is full" is told apart from other
    /// failures: the size limit stands in for a full disk.
    #[tokio::test]
    async fn a_full_database_is_unavailable_not_an_internal_error() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::raw_sql("CREATE TABLE t (b BLOB); PRAGMA max_page_count = 4;")
            .execute(&mut conn)
            .await
            .unwrap();
        let full = sqlx::query("INSERT INTO t VALUES (zeroblob(100000))")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert_eq!(
            StoreError::from(full).unavailable(),
            Some(Unavailable::DiskFull)
        );
        let other = sqlx::query("SELECT * FROM missing")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert_eq!(StoreError::from(other).unavailable(), None);
    }
}
