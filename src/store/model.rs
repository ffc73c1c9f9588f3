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

/// A client's address as per-source limits and refusal summaries group
/// them: an IPv4 address, or an IPv6 address's /64 (one host commonly holds
/// a whole /64, so its single addresses are free to it).
pub fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(_) => ip,
        std::net::IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            std::net::IpAddr::from(octets)
        }
    }
}
pub use super::sqlite::resources::Resource;
