//! Waiting for what a test can observe, never for a fixed time.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is looked at again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` until it yields a value; None once `timeout` has passed.
async fn poll<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // The interval between two looks.
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `condition` until it holds (true) or `timeout` has passed (false).
pub async fn poll_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(timeout, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `condition` until it holds; panics naming `what` once `timeout`
/// has passed without it.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !poll_until(timeout, condition).await {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}

/// Polls `probe` until it yields a value, and returns it; panics naming
/// `what` once `timeout` has passed without one.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(timeout, probe)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}
