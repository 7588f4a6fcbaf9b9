//! Bounded poll loops: every wait in the suite has a deadline and a short interval.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a poll loop sleeps between attempts.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value.
/// `Err(reason)` means "not yet"; after `timeout` this panics with `what` and the last reason.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let reason = match check().await {
            Ok(value) => return value,
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} ({attempts} polls) waiting for {what}; last: {reason}"
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
