//! The rows the storage interface takes and returns, one type per purpose.
//! Plain data: the engines map their own rows onto these.

pub use super::queries::{
    parse_time, AlertFilter, Event, EventFilter, History, Page, PageRequest, TransitionFilter,
    Trigger as TriggerView, ALERT_STATES, ALERT_TYPES, DEFAULT_LIMIT, EVENT_STATES, MAX_LIMIT,
};
pub use super::queries::{Alert as AlertView, Refund as RefundView, Transition as TransitionView};
pub use super::queries::{
    CancelRequest as CancelRequestView, ChildHistory, Progress as ProgressView, ResourceHistory,
};
pub use super::sqlite::alerts::{
    Alert, AlertKey, Attempt, Backlog, NewAlert, OutboxRow, ProgressRow, RaiseOutcome,
};
pub use super::sqlite::cancels::CancelRequest;
pub use super::sqlite::inbox::{Delivery, NewDelivery};
pub use super::sqlite::refusals::Refusal;
pub use super::sqlite::resources::Resource;
