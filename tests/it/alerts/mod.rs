//! Alerts: each rule fires exactly when it should (seeded database state,
//! rules called directly), and the outbox of a real daemon delivers at least
//! once, signed, with retries, across a restart, per sink independently.

mod rules;
mod scenarios;
mod sinks;
