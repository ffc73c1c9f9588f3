//! What the audit queries need of a database engine, so that one text of
//! them serves SQLite and PostgreSQL alike.
//!
//! The queries build their SQL with [`QueryBuilder`], which writes each
//! engine's own placeholder (`?` or `$n`) for every value bound; the SQL
//! around the placeholders is standard and the same on both. What differs
//! is only how a plan is asked for and what it comes back as.
//!
//! The binding and fetching go through this trait rather than through sqlx's
//! generic bounds: those bounds sit on other types than the engine (on the
//! value, on the row type, on `&mut Connection`), and Rust does not carry
//! such bounds from a trait to its users, so every query function would
//! have to repeat them. Here they are stated once, per engine, on concrete
//! types.

use futures_util::future::BoxFuture;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{Encode, FromRow, Pool, Postgres, QueryBuilder, Sqlite, Type};

/// A value the queries bind: encodable by every engine.
pub trait Param:
    for<'q> Encode<'q, Sqlite>
    + Type<Sqlite>
    + for<'q> Encode<'q, Postgres>
    + Type<Postgres>
    + Send
    + 'static
{
}

impl<T> Param for T where
    T: for<'q> Encode<'q, Sqlite>
        + Type<Sqlite>
        + for<'q> Encode<'q, Postgres>
        + Type<Postgres>
        + Send
        + 'static
{
}

/// A row type the queries read: decodable from every engine's rows.
pub trait Rows:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin + 'static
{
}

impl<T> Rows for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin + 'static
{
}

/// An engine the audit queries run on.
pub trait ReadEngine: sqlx::Database {
    /// What goes before a query to have its plan instead of its rows.
    const EXPLAIN: &'static str;
    /// One row of that plan.
    type PlanRow: Rows;

    /// The text of one step of a plan.
    fn plan_step(row: Self::PlanRow) -> String;

    /// Appends `value` to `q` as a bound parameter.
    fn bind<'a, V: Param>(q: &mut QueryBuilder<'a, Self>, value: V);

    /// Runs the query `q` holds and reads every row it returns.
    fn fetch_all<'a, T: Rows>(
        pool: &'a Pool<Self>,
        q: QueryBuilder<'a, Self>,
    ) -> BoxFuture<'a, Result<Vec<T>, sqlx::Error>>;
}

/// [`ReadEngine::bind`] as a method of the builder, so that building a
/// query reads as a chain, as it does with [`QueryBuilder::push_bind`].
pub trait PushParam {
    fn param<V: Param>(&mut self, value: V) -> &mut Self;
}

impl<DB: ReadEngine> PushParam for QueryBuilder<'_, DB> {
    fn param<V: Param>(&mut self, value: V) -> &mut Self {
        DB::bind(self, value);
        self
    }
}

/// The same body for every engine: only the names of its types differ.
macro_rules! read_engine {
    ($db:ty, $explain:literal, $plan_row:ty, |$row:ident| $step:expr) => {
        impl ReadEngine for $db {
            const EXPLAIN: &'static str = $explain;
            type PlanRow = $plan_row;

            fn plan_step($row: Self::PlanRow) -> String {
                $step
            }

            fn bind<'a, V: Param>(q: &mut QueryBuilder<'a, Self>, value: V) {
                q.push_bind(value);
            }

            fn fetch_all<'a, T: Rows>(
                pool: &'a Pool<Self>,
                mut q: QueryBuilder<'a, Self>,
            ) -> BoxFuture<'a, Result<Vec<T>, sqlx::Error>> {
                Box::pin(async move { q.build_query_as::<T>().fetch_all(pool).await })
            }
        }
    };
}

// SQLite's `EXPLAIN QUERY PLAN` answers one row per step: (id, parent,
// unused, detail); the detail is the step.
read_engine!(
    Sqlite,
    "EXPLAIN QUERY PLAN ",
    (i64, i64, i64, String),
    |row| row.3
);
// PostgreSQL's `EXPLAIN` answers one text line per row, already indented
// by depth.
read_engine!(Postgres, "EXPLAIN ", (String,), |row| row.0);
