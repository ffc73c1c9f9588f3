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

/// Why the database cannot take writes for now, for a cause outside the
/// daemon: the edges answer these as "try again later" (not as a bug), and
/// readiness reports them until a write succeeds again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The disk (or the database's size limit) is full.
    Full,
    /// Another process holds the database's lock past the busy timeout,
    /// or the writer was not free in time.
    Busy,
    /// Reading or writing the database's files failed, or they cannot be
    /// written (a read-only file or mount).
    Io,
}

impl Unavailable {
    /// A stable name, for logs, metrics and error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            Unavailable::Full => "disk_full",
            Unavailable::Busy => "database_busy",
            Unavailable::Io => "database_io",
        }
    }

    /// The stable error code an HTTP answer carries.
    pub fn code(self) -> &'static str {
        match self {
            Unavailable::Full => "storage_full",
            Unavailable::Busy => "storage_locked",
            Unavailable::Io => "storage_unavailable",
        }
    }

    /// What it means, for an operator.
    pub fn describe(self) -> &'static str {
        match self {
            Unavailable::Full => "the database cannot take writes: the disk is full",
            Unavailable::Busy => "the database cannot take writes: it is locked by another process",
            Unavailable::Io => "the database cannot take writes: its files cannot be written",
        }
    }
}

impl StoreError {
    /// Whether this failure is the database's surroundings rather than
    /// this request or a bug: see [`Unavailable`].
    pub fn unavailable(&self) -> Option<Unavailable> {
        match self {
            StoreError::Sql(e) => sql_unavailable(e),
            StoreError::Sync(e) | StoreError::Backup { source: e, .. } => Some(io_unavailable(e)),
            _ => None,
        }
    }
}

impl QueryError {
    /// See [`StoreError::unavailable`].
    pub fn unavailable(&self) -> Option<Unavailable> {
        match self {
            QueryError::Store(e) => e.unavailable(),
            QueryError::Invalid { .. } => None,
        }
    }
}

fn io_unavailable(e: &std::io::Error) -> Unavailable {
    // ENOSPC and EDQUOT: no space, or none left in the user's quota.
    match e.raw_os_error() {
        Some(28 | 122) => Unavailable::Full,
        _ => Unavailable::Io,
    }
}

/// SQLite's primary result codes (the low byte of the extended ones) that
/// are the database's surroundings; other engines' codes are theirs to add.
fn sqlite_unavailable(code: i32) -> Option<Unavailable> {
    match code & 0xff {
        // SQLITE_FULL
        13 => Some(Unavailable::Full),
        // SQLITE_BUSY, SQLITE_LOCKED
        5 | 6 => Some(Unavailable::Busy),
        // SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN
        8 | 10 | 14 => Some(Unavailable::Io),
        _ => None,
    }
}

/// PostgreSQL's error codes (SQLSTATE) that are the server's surroundings:
/// class 53 (insufficient resources: 53100 is a full disk), 57P0x (the
/// server shutting down or starting), class 08 (the connection).
fn postgres_unavailable(code: &str) -> Option<Unavailable> {
    match code {
        "53100" => Some(Unavailable::Full),
        c if c.starts_with("53") => Some(Unavailable::Busy),
        c if c.starts_with("57P0") || c.starts_with("08") => Some(Unavailable::Io),
        _ => None,
    }
}

fn sql_unavailable(e: &sqlx::Error) -> Option<Unavailable> {
    match e {
        sqlx::Error::Database(db)
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
        {
            db.code()
                .and_then(|c| c.parse::<i32>().ok())
                .and_then(sqlite_unavailable)
        }
        sqlx::Error::AnyDriverError(inner) => match inner.downcast_ref::<rusqlite::Error>() {
            Some(rusqlite::Error::SqliteFailure(f, _)) => sqlite_unavailable(f.extended_code),
            _ => None,
        },
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| postgres_unavailable(pg.code())),
        sqlx::Error::Io(e) => Some(io_unavailable(e)),
        sqlx::Error::PoolTimedOut => Some(Unavailable::Busy),
        _ => None,
    }
}
