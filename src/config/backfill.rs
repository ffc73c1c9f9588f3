//! The `[backfill]` section: the catch-up from the providers' event lists.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// Catch up at start and every `interval_secs`: list the events of each
    /// provider whose API lists them and take in those the inbox lacks.
    pub enabled: bool,
    pub interval_secs: u64,
    /// Each listing starts this long before the newest event received, or
    /// before where the last listing began: events appear in the list a
    /// little after they are created, and our clock is not the provider's.
    pub overlap_secs: u64,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // Stripe retries a live-mode delivery for 3 days but a sandbox
            // one only a few times over hours, and a delivery can fail for
            // good: every 15 minutes bounds how long an event stays missed,
            // at one listing a run per account context (one page when quiet).
            interval_secs: 900,
            overlap_secs: 300,
        }
    }
}

impl BackfillConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval_secs == 0 {
            return Err(invalid("backfill.interval_secs", "must be above 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn an_interval_of_zero_is_refused() {
        let mut c = Config::default();
        c.backfill.interval_secs = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("backfill.interval_secs"), "{e}");
    }
}
