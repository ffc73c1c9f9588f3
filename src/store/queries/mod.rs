//! Audit queries behind the read commands and `/v1`: one resource's history,
//! and pages of transitions, alerts and inbox deliveries.
//!
//! Pages are keyset pages, newest first: the cursor names the last row
//! returned and the next page starts strictly below it, so rows that arrive
//! between two pages never shift or repeat what the reader sees.
//! Filters come in as the user typed them and are validated here, once, for
//! the CLI and the API alike.
//!
//! One text of these queries serves every engine: each function takes the
//! pool of any [`ReadEngine`].

mod engine;
mod history;
mod lists;
mod overview;
#[cfg(test)]
pub(crate) mod parity;
mod rows;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Serialize, Serializer};

pub use engine::ReadEngine;
pub use history::{history, ChildHistory, History, ResourceHistory};
pub use lists::{
    alerts, events, explain_transitions, transitions, AlertFilter, EventFilter, TransitionFilter,
};
pub use overview::{deliveries_of, unsettled_since};
pub use rows::{
    Alert, AlertDelivery, CancelRequest, Event, Progress, Refund, ResourceRef, Transition, Trigger,
};

/// Rows per page when none is asked for.
pub const DEFAULT_LIMIT: i64 = 100;
/// Most rows one page may hold.
pub const MAX_LIMIT: i64 = 1000;
/// States of an inbox delivery.
pub const EVENT_STATES: [&str; 6] = [
    "pending",
    "processing",
    "processed",
    "ignored",
    "failed",
    "dead",
];
/// States of an alert.
pub const ALERT_STATES: [&str; 2] = ["open", "resolved"];
/// Alert rules (the `type` of an alert).
pub const ALERT_TYPES: [&str; 6] = [
    "partial_cancellation",
    "cancel_not_effective",
    "stuck",
    "refund_overdue",
    "dead_letter",
    "verification_failures",
];

pub use crate::store::QueryError;

fn invalid(field: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        field,
        message: message.into(),
    }
}

/// What page to read: how many rows, and where the previous page ended.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// 1..=1000; 100 when absent.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageRequest {
    fn limit(&self) -> Result<i64, QueryError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(invalid(
                "limit",
                format!("{n} is out of range: it must be between 1 and {MAX_LIMIT}"),
            )),
        }
    }

    fn cursor(&self, tag: &str) -> Result<Option<String>, QueryError> {
        let Some(c) = self.cursor.as_deref().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let bad = || invalid("cursor", format!("{c:?} is not a cursor of this listing"));
        let bytes = URL_SAFE_NO_PAD.decode(c).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let payload = text
            .strip_prefix(tag)
            .and_then(|t| t.strip_prefix(':'))
            .ok_or_else(bad)?;
        Ok(Some(payload.to_string()))
    }

    fn id_cursor(&self, tag: &str) -> Result<Option<i64>, QueryError> {
        match self.cursor(tag)? {
            None => Ok(None),
            Some(p) => p.parse::<i64>().map(Some).map_err(|_| {
                invalid(
                    "cursor",
                    format!(
                        "{:?} is not a cursor of this listing",
                        self.cursor.as_deref().unwrap_or_default()
                    ),
                )
            }),
        }
    }
}

fn encode_cursor(tag: &str, payload: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{tag}:{payload}"))
}

/// One page of rows, newest first; `next_cursor` is absent on the last page.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Cuts the `limit + 1` rows read down to `limit` and names the cursor.
fn page<T>(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(cursor_of)
    } else {
        None
    };
    Page {
        data: rows,
        next_cursor,
    }
}

/// Parses an RFC 3339 time into the stored text form (UTC, milliseconds).
pub fn parse_time(field: &'static str, value: &str) -> Result<String, QueryError> {
    crate::time::parse_since(value, crate::time::now())
        .map(crate::time::fmt)
        .map_err(|e| invalid(field, e))
}

fn one_of(field: &'static str, value: &str, allowed: &[&str]) -> Result<String, QueryError> {
    if allowed.contains(&value) {
        Ok(value.to_string())
    } else {
        Err(invalid(
            field,
            format!("{value:?} is not one of {}", allowed.join(", ")),
        ))
    }
}

fn non_empty(field: &'static str, value: &str) -> Result<String, QueryError> {
    if value.trim().is_empty() {
        Err(invalid(field, "must not be empty"))
    } else {
        Ok(value.to_string())
    }
}

/// Serializes text holding JSON as that JSON (or as a string if it is not JSON).
fn json_text<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => v.serialize(s),
        Err(_) => s.serialize_str(text),
    }
}

pub(crate) fn json_text_opt<S: Serializer>(text: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match text {
        Some(t) => json_text(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked() {
        let p = |limit| PageRequest {
            limit,
            cursor: None,
        };
        assert_eq!(p(None).limit().unwrap(), DEFAULT_LIMIT);
        assert_eq!(p(Some(1000)).limit().unwrap(), 1000);
        assert!(p(Some(0)).limit().is_err());
        assert!(p(Some(1001)).limit().is_err());
    }

    #[test]
    fn cursors_round_trip_and_are_tagged() {
        let c = encode_cursor("t", "42");
        let req = PageRequest {
            limit: None,
            cursor: Some(c),
        };
        assert_eq!(req.id_cursor("t").unwrap(), Some(42));
        assert!(req.id_cursor("e").is_err());
        let bad = PageRequest {
            limit: None,
            cursor: Some("not a cursor!".into()),
        };
        assert!(bad.id_cursor("t").is_err());
    }

    #[test]
    fn times_are_normalised() {
        assert_eq!(
            parse_time("since", "2026-10-30T14:00:00+02:00").unwrap(),
            "2026-10-30T12:00:00.000Z"
        );
        assert!(parse_time("since", "yesterday").is_err());
    }
}
