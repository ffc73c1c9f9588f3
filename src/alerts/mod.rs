//! Alerts: rules raise them in the same transaction as the observation that
//! triggers them; an outbox delivers them at least once to every sink.

pub mod signing;
