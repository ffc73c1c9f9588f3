//! A provider's request budget, kept on our side: a token bucket that
//! refills at `per_second` and holds at most `burst`, so cancelwatch spaces
//! its calls as the provider asks (Juice: 120 a minute, bursts of 20)
//! instead of running into 429s, and leaves room for the payments app that
//! shares the API key.
//!
//! Each call reserves the next free moment of the budget, in the order the
//! calls come, and waits for it. A call whose moment lies further than the
//! caller will wait is not made: [`RateLimit::reserve`] says how long the
//! budget is booked, and the delivery waits that long without using up an
//! attempt, as after a 429.
//!
//! An urgent call (a cancel issued through cancelwatch, and the fetch right
//! after it: see [`urgent`]) goes ahead of every ordinary call booked and
//! not yet made, so that no amount of reconcile or delivery traffic starves
//! it. The ordinary calls it overtakes each wait one moment more, so the
//! budget is never overspent.
//!
//! Several replicas on one database share one budget: each spends its
//! share, the configured rate (and burst) divided by the replicas alive
//! ([`RateLimit::share_among`]), so their sum stays what the provider allows.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    /// Set while a task's provider calls go ahead of the others ([`urgent`]).
    static URGENT: bool;
}

/// Runs `calls` with its provider calls ahead of the others in each request
/// budget.
pub async fn urgent<F: Future>(calls: F) -> F::Output {
    URGENT.scope(true, calls).await
}

/// True inside [`urgent`].
pub fn is_urgent() -> bool {
    URGENT.try_with(|u| *u).unwrap_or(false)
}

/// A token bucket (see the module).
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    /// Replicas spending this budget together (at least one).
    replicas: AtomicU32,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Calls that may start at `at`; below zero, calls already booked ahead.
    tokens: f64,
    at: Instant,
    /// Ordinary calls booked whose moment has not come yet.
    waiting: u32,
    /// How many times an urgent call went ahead of waiting ordinary calls.
    overtaken: u64,
}

/// An ordinary call's booking: how long to wait, and how many overtakings
/// it has already been moved back for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Booking {
    pub wait: Duration,
    seen: u64,
}

impl RateLimit {
    /// A budget of `per_second` calls, at most `burst` at once (at least
    /// one); `None` when `per_second` is zero (no limit).
    pub fn new(per_second: f64, burst: u32) -> Option<RateLimit> {
        if per_second <= 0.0 || !per_second.is_finite() {
            return None;
        }
        let burst = f64::from(burst.max(1));
        Some(RateLimit {
            per_second,
            burst,
            replicas: AtomicU32::new(1),
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
                waiting: 0,
                overtaken: 0,
            }),
        })
    }

    /// Spends from now on a `replicas`-th of the budget: that many
    /// processes share it.
    pub fn share_among(&self, replicas: u32) {
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
    }

    /// This process's share of the rate, in calls a second.
    fn rate(&self) -> f64 {
        self.per_second / f64::from(self.replicas.load(Ordering::Relaxed).max(1))
    }

    /// This process's share of the burst (at least one call).
    fn burst(&self) -> f64 {
        (self.burst / f64::from(self.replicas.load(Ordering::Relaxed).max(1))).max(1.0)
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate();
        bucket.tokens = (bucket.tokens + refill).min(self.burst());
        bucket.at = now;
        bucket
    }

    /// The wait until the level `tokens` reaches one call.
    fn wait_for(&self, tokens: f64) -> Duration {
        if tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - tokens) / self.rate())
        }
    }

    /// Books the next free moment for one ordinary call and returns how
    /// long to wait for it, or, when that is longer than `longest`, books
    /// nothing and returns `Err` with the wait it would have been. The
    /// moment moves back if an urgent call overtakes it ([`Self::acquire`]
    /// waits for that too).
    pub fn reserve(&self, longest: Duration) -> Result<Booking, Duration> {
        let mut bucket = self.bucket();
        let wait = self.wait_for(bucket.tokens);
        if wait > longest {
            return Err(wait);
        }
        bucket.tokens -= 1.0;
        bucket.waiting += 1;
        Ok(Booking {
            wait,
            seen: bucket.overtaken,
        })
    }

    /// Books the next moment for an urgent call, ahead of the ordinary calls
    /// waiting (as if they were not booked); as [`Self::reserve`] otherwise.
    pub fn reserve_urgent(&self, longest: Duration) -> Result<Duration, Duration> {
        let mut bucket = self.bucket();
        let wait = self.wait_for(bucket.tokens + f64::from(bucket.waiting));
        if wait > longest {
            return Err(wait);
        }
        bucket.tokens -= 1.0;
        if bucket.waiting > 0 {
            bucket.overtaken += 1;
        }
        Ok(wait)
    }

    /// Waits for the next free moment of the budget (see [`Self::reserve`]),
    /// ahead of the ordinary calls inside [`urgent`].
    pub async fn acquire(&self, longest: Duration) -> Result<(), Duration> {
        if is_urgent() {
            let wait = self.reserve_urgent(longest)?;
            tokio::time::sleep(wait).await;
            return Ok(());
        }
        let booking = self.reserve(longest)?;
        let _waiting = Waiting(self);
        let (mut wait, mut seen) = (booking.wait, booking.seen);
        loop {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let overtaken = self.bucket().overtaken;
            if overtaken == seen {
                return Ok(());
            }
            // Urgent calls took moments ahead of this one: one more each.
            wait = Duration::from_secs_f64((overtaken - seen) as f64 / self.rate());
            seen = overtaken;
        }
    }
}

/// An ordinary call booked and waiting for its moment; dropped when the
/// moment came, or when the caller gave up waiting.
struct Waiting<'a>(&'a RateLimit);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut bucket = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        bucket.waiting = bucket.waiting.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    /// The wait of an ordinary call booked now.
    fn wait(limit: &RateLimit) -> Result<Duration, Duration> {
        limit.reserve(LONG).map(|b| b.wait)
    }

    /// Two replicas sharing a budget of 2 a second, bursts of 4: each may
    /// make 2 calls at once, then one a second, so together they never go
    /// above what the provider allows.
    #[tokio::test(start_paused = true)]
    async fn replicas_share_the_budget() {
        let limit = RateLimit::new(2.0, 4).unwrap();
        limit.share_among(2);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(wait(&limit), Ok(Duration::ZERO));
        assert_eq!(wait(&limit), Ok(Duration::ZERO));
        assert_eq!(wait(&limit), Ok(Duration::from_secs(1)));
        assert_eq!(wait(&limit), Ok(Duration::from_secs(2)));
        // Alone again: the whole rate.
        limit.share_among(1);
        assert_eq!(wait(&limit), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(RateLimit::new(0.0, 20).is_none());
        assert!(RateLimit::new(f64::NAN, 20).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_and_the_rest_at_the_rate() {
        let limit = RateLimit::new(2.0, 3).unwrap();
        for _ in 0..3 {
            assert_eq!(wait(&limit), Ok(Duration::ZERO));
        }
        // Booked one after another: half a second apart.
        assert_eq!(wait(&limit), Ok(Duration::from_millis(500)));
        assert_eq!(wait(&limit), Ok(Duration::from_millis(1000)));
        tokio::time::advance(Duration::from_millis(1000)).await;
        // Both booked moments have come; the next is half a second on.
        assert_eq!(wait(&limit), Ok(Duration::from_millis(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_never_holds_more_than_the_burst() {
        let limit = RateLimit::new(10.0, 2).unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(wait(&limit), Ok(Duration::ZERO));
        assert_eq!(wait(&limit), Ok(Duration::ZERO));
        assert_eq!(wait(&limit), Ok(Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_longest_books_nothing() {
        let limit = RateLimit::new(1.0, 1).unwrap();
        assert_eq!(wait(&limit), Ok(Duration::ZERO));
        assert_eq!(wait(&limit), Ok(Duration::from_secs(1)));
        // The next would start in 2 s: refused, and not booked.
        assert_eq!(
            limit.reserve(Duration::from_millis(1500)).map(|b| b.wait),
            Err(Duration::from_secs(2))
        );
        assert_eq!(wait(&limit), Ok(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_the_booked_moment() {
        let limit = RateLimit::new(4.0, 1).unwrap();
        let start = Instant::now();
        for _ in 0..5 {
            limit.acquire(LONG).await.unwrap();
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    /// An urgent call goes ahead of the ordinary calls waiting, and each of
    /// those it overtook starts one moment later: never more calls than the
    /// budget allows, in any order.
    #[tokio::test(start_paused = true)]
    async fn an_urgent_call_goes_ahead_of_the_waiting_ones() {
        let limit = std::sync::Arc::new(RateLimit::new(1.0, 1).unwrap());
        let start = Instant::now();
        let started = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut ordinary = Vec::new();
        for n in 0..4 {
            let (limit, started) = (limit.clone(), started.clone());
            ordinary.push(tokio::spawn(async move {
                limit.acquire(LONG).await.unwrap();
                started.lock().unwrap().push((n, start.elapsed()));
            }));
            tokio::task::yield_now().await;
        }
        // Booked at 0, 1, 2 and 3 s; at 0.5 s a cancel comes.
        tokio::time::advance(Duration::from_millis(500)).await;
        urgent(async { limit.acquire(Duration::from_secs(1)).await })
            .await
            .unwrap();
        let urgent_at = start.elapsed();
        for task in ordinary {
            task.await.unwrap();
        }
        assert_eq!(urgent_at, Duration::from_secs(1), "ahead of 3 booked calls");
        let mut at: Vec<Duration> = started.lock().unwrap().iter().map(|s| s.1).collect();
        at.sort();
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(at, [secs(0), secs(2), secs(3), secs(4)]);
        // Without the overtaken calls, an urgent call waits as any other.
        assert!(limit.reserve_urgent(Duration::ZERO).is_err());
    }
}
