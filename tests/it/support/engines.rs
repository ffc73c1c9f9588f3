//! The two storage engines every engine-neutral test runs on, and the
//! macro that makes one test of each body per engine.
//!
//! ```ignore
//! both_engines! {
//!     /// What it shows.
//!     #[tokio::test]
//!     async fn something_holds(engine) {
//!         let config = TestConfig::on(engine).await;
//!         ...
//!     }
//! }
//! ```
//!
//! makes `something_holds::sqlite` and `something_holds::postgres`. The
//! PostgreSQL one runs on a database of its own on the server
//! `CANCELWATCH_TEST_POSTGRES_URL` names; without the variable it says on
//! stderr that it was skipped, and passes.

use std::io::Write;

use super::postgres;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// Whether `test` can run on this engine; when not, says so: in the
    /// test's own output, and once for the whole run on the real stderr
    /// (which the test harness does not capture, so it shows in a plain
    /// `cargo test`).
    pub fn available(self, test: &str) -> bool {
        if self == Engine::Postgres && postgres::server().is_none() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "\nskipped: the PostgreSQL half of the integration tests (each `::postgres` \
                     test passes without running): {} is not set; it names a server whose \
                     user may create databases, e.g. postgres://postgres@127.0.0.1:5432/postgres",
                    postgres::ENV
                );
            });
            eprintln!("skipped {test}: {} is not set", postgres::ENV);
            return false;
        }
        true
    }
}

/// One test per engine from one body; see the module's documentation.
/// The attributes (documentation, `#[tokio::test(..)]`) go on each.
macro_rules! both_engines {
    ($(
        $(#[$meta:meta])*
        async fn $name:ident($engine:ident) $body:block
    )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($engine: $crate::support::Engine) $body

            $(#[$meta])*
            async fn sqlite() {
                body($crate::support::Engine::Sqlite).await
            }

            $(#[$meta])*
            async fn postgres() {
                if $crate::support::Engine::Postgres.available(module_path!()) {
                    body($crate::support::Engine::Postgres).await
                }
            }
        }
    )*};
}
pub(crate) use both_engines;
