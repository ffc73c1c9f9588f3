//! The `[stripe]` section of the configuration.

use serde::{Deserialize, Serialize};

use crate::config::{check_url, invalid, ConfigError};

/// The longest return watch: ten years is already past any bank's returns.
const MAX_RETURN_WATCH_DAYS: u64 = 3_650;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StripeConfig {
    pub api_base: String,
    pub api_key: String,
    pub api_version: String,
    pub webhook_secrets: Vec<String>,
    pub tolerance_secs: i64,
    /// Event types followed besides the outbound-transfer and batch-job ones.
    pub follow_event_types: Vec<String>,
    /// Our own budget of API requests a second (0: none; see
    /// `providers::limit`), and how many may go at once.
    pub rate_limit_per_second: f64,
    pub rate_limit_burst: u32,
    /// How long a posted outbound transfer is still fetched for a return
    /// (0: not at all), and how often.
    pub return_watch_days: u64,
    pub return_watch_interval_secs: u64,
    /// Longest API answer read: a longer one fails its attempt unread.
    pub max_response_bytes: usize,
}

impl Default for StripeConfig {
    fn default() -> Self {
        Self {
            api_base: "https://api.stripe.com".into(),
            api_key: String::new(),
            api_version: "2026-10-14.preview".into(),
            webhook_secrets: Vec::new(),
            tolerance_secs: 300,
            follow_event_types: Vec::new(),
            // Stripe's limits depend on the account and the mode (about 100
            // requests a second in live mode, 25 in test mode), and
            // `workers.concurrency` already bounds the calls in flight.
            rate_limit_per_second: 0.0,
            rate_limit_burst: 0,
            max_response_bytes: crate::config::MAX_RESPONSE_BYTES,
            // `posted` is not final: the receiving bank can send the money
            // back, usually within a few banking days, sometimes weeks later,
            // and Stripe documents no limit. 30 days covers the late ones and
            // is as long as Stripe keeps the events a catch-up could list.
            // A look every 12 hours notices a return whose webhook was lost
            // within half a day, at 60 fetches per transfer over the window.
            return_watch_days: 30,
            return_watch_interval_secs: 43_200,
        }
    }
}

impl StripeConfig {
    /// True when webhook secrets are set: `/webhooks/stripe` is mounted.
    pub fn webhooks_enabled(&self) -> bool {
        !self.webhook_secrets.is_empty()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_response_bytes < 1_024 {
            return Err(invalid(
                "stripe.max_response_bytes",
                "must be at least 1024 (an API answer is longer than that)",
            ));
        }
        if self.tolerance_secs <= 0 {
            return Err(invalid("stripe.tolerance_secs", "must be above 0"));
        }
        check_url("stripe.api_base", &self.api_base)?;
        if self.webhook_secrets.iter().any(|s| s.is_empty()) {
            return Err(invalid("stripe.webhook_secrets", "holds an empty secret"));
        }
        if self.return_watch_days > MAX_RETURN_WATCH_DAYS {
            return Err(invalid(
                "stripe.return_watch_days",
                format!("must be {MAX_RETURN_WATCH_DAYS} or below (0: no watch)"),
            ));
        }
        if self.return_watch_days > 0 && self.return_watch_interval_secs == 0 {
            return Err(invalid(
                "stripe.return_watch_interval_secs",
                "must be above 0 while stripe.return_watch_days is",
            ));
        }
        if !(self.rate_limit_per_second.is_finite() && self.rate_limit_per_second >= 0.0) {
            return Err(invalid(
                "stripe.rate_limit_per_second",
                "must be 0 (no limit) or above",
            ));
        }
        Ok(())
    }

    /// Every secret of the section, for redaction.
    pub(crate) fn secrets_mut(&mut self) -> impl Iterator<Item = &mut String> {
        std::iter::once(&mut self.api_key).chain(self.webhook_secrets.iter_mut())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn the_return_watch_is_checked() {
        let mut c = Config::default();
        c.stripe.return_watch_interval_secs = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("stripe.return_watch_interval_secs"), "{e}");
        c.stripe.return_watch_days = 0;
        c.validate().expect("no watch needs no interval");
        c.stripe.return_watch_days = 100_000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("stripe.return_watch_days"), "{e}");
    }
}
