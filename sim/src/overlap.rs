//! Which fetches of one resource were answered at the same time: the
//! simulator's view of cancelwatch's rule that no two deliveries of one
//! resource are processed at once, whichever replica holds them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The resource a request fetches (its path), when it is a `GET` of one
/// resource: not a listing, not an event.
pub(crate) fn fetched_resource(method: &axum::http::Method, path: &str) -> Option<String> {
    if method != axum::http::Method::GET {
        return None;
    }
    let path = path.split('?').next().unwrap_or_default();
    let one_of = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
    };
    (one_of("/v2/money_management/outbound_transfers/")
        || one_of("/v2/core/batch_jobs/")
        || one_of("/bulk-transfers/"))
    .then(|| path.to_string())
}

/// Fetches being answered now, per resource, and those that began while
/// another fetch of their resource was still being answered.
#[derive(Debug, Default)]
pub(crate) struct Overlaps {
    answering: HashMap<String, usize>,
    /// Each overlapping fetch and when it began.
    seen: Vec<(String, std::time::Instant)>,
}

/// A fetch being answered; it ends when this is dropped (an answer sent,
/// or a caller gone and its request dropped).
pub(crate) struct Fetching {
    overlaps: Arc<Mutex<Overlaps>>,
    resource: String,
}

impl Fetching {
    pub(crate) fn start(overlaps: &Arc<Mutex<Overlaps>>, resource: String) -> Fetching {
        let mut o = overlaps.lock().unwrap_or_else(|e| e.into_inner());
        let n = o.answering.entry(resource.clone()).or_default();
        *n += 1;
        if *n > 1 {
            o.seen.push((resource.clone(), std::time::Instant::now()));
        }
        Fetching {
            overlaps: overlaps.clone(),
            resource,
        }
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        let mut o = self.overlaps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = o.answering.get_mut(&self.resource) {
            *n -= 1;
            if *n == 0 {
                o.answering.remove(&self.resource);
            }
        }
    }
}

impl Overlaps {
    pub(crate) fn seen(&self) -> Vec<(String, std::time::Instant)> {
        self.seen.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn only_fetches_of_one_resource_count() {
        let get = |p: &str| fetched_resource(&Method::GET, p);
        assert_eq!(
            get("/v2/core/batch_jobs/batchjob_1").as_deref(),
            Some("/v2/core/batch_jobs/batchjob_1")
        );
        assert_eq!(
            get("/bulk-transfers/bt_1?x=1").as_deref(),
            Some("/bulk-transfers/bt_1")
        );
        assert_eq!(get("/bulk-transfers"), None);
        assert_eq!(get("/v2/core/events/evt_1"), None);
        assert_eq!(get("/v2/core/batch_jobs/batchjob_1/cancel"), None);
        assert_eq!(
            fetched_resource(&Method::POST, "/v2/core/batch_jobs/batchjob_1"),
            None
        );
    }

    #[test]
    fn a_second_fetch_while_the_first_is_answered_is_seen() {
        let overlaps = Arc::new(Mutex::new(Overlaps::default()));
        let a = Fetching::start(&overlaps, "/r/1".into());
        drop(Fetching::start(&overlaps, "/r/2".into()));
        assert!(overlaps.lock().unwrap().seen().is_empty());
        let b = Fetching::start(&overlaps, "/r/1".into());
        drop((a, b));
        drop(Fetching::start(&overlaps, "/r/1".into()));
        let seen = overlaps.lock().unwrap().seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "/r/1");
    }
}
