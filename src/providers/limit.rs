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

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket (see the module).
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Calls that may start at `at`; below zero, calls already booked ahead.
    tokens: f64,
    at: Instant,
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
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        })
    }

    /// Books the next free moment for one call and returns how long to wait
    /// for it, or, when that is longer than `longest`, books nothing and
    /// returns `Err` with the wait it would have been.
    pub fn reserve(&self, longest: Duration) -> Result<Duration, Duration> {
        let mut bucket = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        let wait = if bucket.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_second)
        };
        if wait > longest {
            return Err(wait);
        }
        bucket.tokens -= 1.0;
        Ok(wait)
    }

    /// Waits for the next free moment of the budget (see [`Self::reserve`]).
    pub async fn acquire(&self, longest: Duration) -> Result<(), Duration> {
        let wait = self.reserve(longest)?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn zero_means_no_limit() {
        assert!(RateLimit::new(0.0, 20).is_none());
        assert!(RateLimit::new(f64::NAN, 20).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_and_the_rest_at_the_rate() {
        let limit = RateLimit::new(2.0, 3).unwrap();
        for _ in 0..3 {
            assert_eq!(limit.reserve(LONG), Ok(Duration::ZERO));
        }
        // Booked one after another: half a second apart.
        assert_eq!(limit.reserve(LONG), Ok(Duration::from_millis(500)));
        assert_eq!(limit.reserve(LONG), Ok(Duration::from_millis(1000)));
        tokio::time::advance(Duration::from_millis(1000)).await;
        // Both booked moments have come; the next is half a second on.
        assert_eq!(limit.reserve(LONG), Ok(Duration::from_millis(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_never_holds_more_than_the_burst() {
        let limit = RateLimit::new(10.0, 2).unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(limit.reserve(LONG), Ok(Duration::ZERO));
        assert_eq!(limit.reserve(LONG), Ok(Duration::ZERO));
        assert_eq!(limit.reserve(LONG), Ok(Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_longest_books_nothing() {
        let limit = RateLimit::new(1.0, 1).unwrap();
        assert_eq!(limit.reserve(LONG), Ok(Duration::ZERO));
        assert_eq!(limit.reserve(LONG), Ok(Duration::from_secs(1)));
        // The next would start in 2 s: refused, and not booked.
        assert_eq!(
            limit.reserve(Duration::from_millis(1500)),
            Err(Duration::from_secs(2))
        );
        assert_eq!(limit.reserve(LONG), Ok(Duration::from_secs(2)));
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
}
