//! [`AlertRows`] on a SQLite write transaction: each a statement of this
//! folder's.

use super::alerts as sql;
use super::Tx;
use crate::store::alerting::{AlertRows, PendingRefund};
use crate::store::model::{Alert, AlertKey, CancelRequest, Delivery, NewAlert, ProgressRow};
use crate::store::model::{RaiseOutcome, Resource};
use crate::store::sqlite::resources::{self, Refund};
use crate::store::StoreError;

#[async_trait::async_trait]
impl AlertRows for Tx<'_> {
    async fn resource(&mut self, rid: i64) -> Result<Option<Resource>, StoreError> {
        sql::resource(self, rid).await
    }

    async fn resource_by_key(
        &mut self,
        provider: &str,
        kind: &str,
        id: &str,
    ) -> Result<Option<Resource>, StoreError> {
        resources::get(self, provider, kind, id).await
    }

    async fn children(
        &mut self,
        provider: &str,
        kind: &str,
        parent_id: &str,
    ) -> Result<Vec<Resource>, StoreError> {
        sql::children(self, provider, kind, parent_id).await
    }

    async fn unsettled_resources(&mut self) -> Result<Vec<Resource>, StoreError> {
        sql::unsettled_resources(self).await
    }

    async fn refund_of(&mut self, rid: i64) -> Result<Option<Refund>, StoreError> {
        resources::refund_of(self, rid).await
    }

    async fn pending_refunds_opened_before(
        &mut self,
        cutoff: &str,
    ) -> Result<Vec<PendingRefund>, StoreError> {
        sql::pending_refunds_opened_before(self, cutoff).await
    }

    async fn latest_progress(&mut self, rid: i64) -> Result<Option<ProgressRow>, StoreError> {
        sql::latest_progress(self, rid).await
    }

    async fn latest_cancel_with_outcome(
        &mut self,
        provider: &str,
        resource_id: &str,
        outcome: &str,
    ) -> Result<Option<CancelRequest>, StoreError> {
        sql::latest_cancel_with_outcome(self, provider, resource_id, outcome).await
    }

    async fn delivery(&mut self, id: i64) -> Result<Option<Delivery>, StoreError> {
        sql::delivery(self, id).await
    }

    async fn refusals_since(
        &mut self,
        since: &str,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        sql::refusals_since(self, since).await
    }

    async fn find_alert(&mut self, key: &AlertKey) -> Result<Option<Alert>, StoreError> {
        sql::find(self, key).await
    }

    async fn open_alerts_about(
        &mut self,
        provider: &str,
        kind: &str,
        resource_id: &str,
    ) -> Result<Vec<Alert>, StoreError> {
        sql::open_about(self, provider, kind, resource_id).await
    }

    async fn open_alerts_of_rule(&mut self, rule: &str) -> Result<Vec<Alert>, StoreError> {
        sql::open_of_rule(self, rule).await
    }

    async fn raise_alert(
        &mut self,
        alert: &NewAlert,
        sinks: &[String],
        now: &str,
    ) -> Result<RaiseOutcome, StoreError> {
        sql::raise(self, alert, sinks, now).await
    }

    async fn resolve_alert(
        &mut self,
        key: &AlertKey,
        sinks: &[String],
        now: &str,
    ) -> Result<Option<Alert>, StoreError> {
        sql::resolve(self, key, sinks, now).await
    }
}
