//! Failed admin authentications, per source: counted, logged (at most a line
//! a second) and, past `server.admin_auth_failures_per_minute` from one
//! source, answered 429 without looking at the token until its minute is
//! over, so a token cannot be guessed at the speed of the network.
//!
//! Written here rather than taken from a rate-limiting crate because what is
//! limited is failures only, looked up before the token is checked; the
//! keyed limiters at hand count every call they are asked about.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ingress::LogLimiter;
use crate::store::model::source_of;

/// The span failures are counted over.
const WINDOW: Duration = Duration::from_secs(60);
/// Most sources remembered; beyond it, expired ones are forgotten first, and
/// a source that finds no room is counted and logged but not held back.
const MAX_SOURCES: usize = 65_536;

pub struct Guesses {
    per_minute: u32,
    /// Per source: when its window began and its failures in it.
    sources: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

static LOG: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(Duration::from_secs(1)));

impl Guesses {
    pub fn new(per_minute: u32) -> Guesses {
        Guesses {
            per_minute,
            sources: Mutex::default(),
        }
    }

    /// How long `source` must wait before its next try is looked at, if it
    /// has used up its failures.
    pub fn held_back(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let (began, failures) = *sources.get(&source_of(source))?;
        let left = WINDOW
            .checked_sub(now.duration_since(began))
            .filter(|left| !left.is_zero())?;
        (failures >= self.per_minute).then_some(left)
    }

    /// A wrong or missing token from `source`: counted, logged, remembered.
    pub fn failed(&self, source: IpAddr, now: Instant, throttled: bool) {
        let result = if throttled { "throttled" } else { "refused" };
        metrics::counter!("cancelwatch_admin_auth_failures_total", "result" => result).increment(1);
        if let Some(left_out) = LOG.admit(now) {
            tracing::warn!(%source, result, left_out, "failed authentication to /v1");
        }
        if throttled {
            return;
        }
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source_of(source)) {
            sources.retain(|_, (began, _)| now.duration_since(*began) < WINDOW);
            if sources.len() >= MAX_SOURCES {
                return;
            }
        }
        let entry = sources.entry(source_of(source)).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_held_back_after_its_failures_until_its_minute_ends() {
        let guesses = Guesses::new(3);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 0..3 {
            assert_eq!(guesses.held_back(a, t0), None, "after {i} failures");
            guesses.failed(a, t0, false);
        }
        assert!(guesses.held_back(a, t0 + Duration::from_secs(59)).is_some());
        assert_eq!(
            guesses.held_back(b, t0),
            None,
            "another source is not held back"
        );
        assert_eq!(guesses.held_back(a, t0 + WINDOW), None);
    }

    #[test]
    fn one_ipv6_host_is_one_source() {
        let guesses = Guesses::new(2);
        let t0 = Instant::now();
        guesses.failed("2001:db8::1".parse().unwrap(), t0, false);
        guesses.failed("2001:db8::2".parse().unwrap(), t0, false);
        assert!(guesses
            .held_back("2001:db8::ffff".parse().unwrap(), t0)
            .is_some());
        assert!(guesses
            .held_back("2001:db8:0:1::1".parse().unwrap(), t0)
            .is_none());
    }
}
