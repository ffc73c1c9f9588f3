//! The harness every test module shares: the daemon in-process
//! ([`TestApp`]) or as the binary, one configuration builder, a webhook
//! receiver, the simulator, polling with a bound, and the database.
//!
//! Tests of behaviour run on both engines ([`both_engines!`]): the same
//! body once on SQLite and once on PostgreSQL. What stays on SQLite alone
//! is what only SQLite has: its file (permissions, backups to a file, the
//! WAL and fsync faults, pragmas, the schema's migration files and their
//! upgrade path), the engine's own functions called on its transactions (a
//! claim judged at a time of the test's choosing, batch recording, a claim
//! beside a command's write), signals, the packaging and the demo (which
//! runs on SQLite by design).

pub mod binary;
pub mod browser;
pub mod config;
pub mod daemon;
pub mod db;
pub mod engines;
pub mod postgres;
pub mod receiver;
pub mod sim;
pub mod wait;
pub mod webhooks;

pub use config::TestConfig;
pub use daemon::TestApp;
pub(crate) use engines::both_engines;
pub use engines::Engine;
pub use wait::{wait_for, wait_until};
