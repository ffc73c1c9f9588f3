//! The harness every test module shares: the daemon in-process
//! ([`TestApp`]) or as the binary, one configuration builder, a webhook
//! receiver, the simulator, polling with a bound, and the database.

pub mod binary;
pub mod browser;
pub mod config;
pub mod daemon;
pub mod db;
pub mod receiver;
pub mod sim;
pub mod wait;
pub mod webhooks;

pub use config::TestConfig;
pub use daemon::TestApp;
pub use wait::{wait_for, wait_until};
