//! The alert rules that run inside a storage transaction, once for every
//! engine: [`rules`] (after an observation is recorded or a delivery goes
//! to the dead letters) and [`scan`] (the time-based ones). They read and
//! write through [`AlertRows`], which each engine implements on its own
//! transaction, so a rule changes in one place whatever the database.

pub mod rules;
pub mod scan;

use crate::store::model::{Alert, AlertKey, CancelRequest, Delivery, NewAlert, ProgressRow};
use crate::store::model::{RaiseOutcome, Resource};
use crate::store::sqlite::resources::Refund;
use crate::store::StoreError;

pub use crate::store::sqlite::alerts::PendingRefund;

/// What the alert rules read and write, inside the caller's transaction:
/// whatever they raise or resolve commits or rolls back with the rest.
#[async_trait::async_trait]
pub trait AlertRows: Send {
    async fn resource(&mut self, rid: i64) -> Result<Option<Resource>, StoreError>;
    /// The resource `(provider, kind, id)`, by its own id only.
    async fn resource_by_key(
        &mut self,
        provider: &str,
        kind: &str,
        id: &str,
    ) -> Result<Option<Resource>, StoreError>;
    /// The items of a parent (a bulk transfer's transfers), by id.
    async fn children(
        &mut self,
        provider: &str,
        kind: &str,
        parent_id: &str,
    ) -> Result<Vec<Resource>, StoreError>;
    /// Resources with a status that is not final, oldest row first.
    async fn unsettled_resources(&mut self) -> Result<Vec<Resource>, StoreError>;
    async fn refund_of(&mut self, rid: i64) -> Result<Option<Refund>, StoreError>;
    async fn pending_refunds_opened_before(
        &mut self,
        cutoff: &str,
    ) -> Result<Vec<PendingRefund>, StoreError>;
    async fn latest_progress(&mut self, rid: i64) -> Result<Option<ProgressRow>, StoreError>;
    /// The newest cancel request of a resource answered with `outcome`.
    async fn latest_cancel_with_outcome(
        &mut self,
        provider: &str,
        resource_id: &str,
        outcome: &str,
    ) -> Result<Option<CancelRequest>, StoreError>;
    async fn delivery(&mut self, id: i64) -> Result<Option<Delivery>, StoreError>;
    /// Refusals per (provider, reason) received at or after `since`.
    async fn refusals_since(
        &mut self,
        since: &str,
    ) -> Result<Vec<(String, String, i64)>, StoreError>;

    async fn find_alert(&mut self, key: &AlertKey) -> Result<Option<Alert>, StoreError>;
    async fn open_alerts_about(
        &mut self,
        provider: &str,
        kind: &str,
        resource_id: &str,
    ) -> Result<Vec<Alert>, StoreError>;
    async fn open_alerts_of_rule(&mut self, rule: &str) -> Result<Vec<Alert>, StoreError>;
    /// Creates the alert or updates it (a new version) unless it says the
    /// same as the open one; each new version is queued for `sinks`.
    async fn raise_alert(
        &mut self,
        alert: &NewAlert,
        sinks: &[String],
        now: &str,
    ) -> Result<RaiseOutcome, StoreError>;
    /// Resolves the open alert of `key` (a new version, queued for `sinks`).
    async fn resolve_alert(
        &mut self,
        key: &AlertKey,
        sinks: &[String],
        now: &str,
    ) -> Result<Option<Alert>, StoreError>;
}
