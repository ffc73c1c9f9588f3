//! The `[juice]` section of the configuration.

use serde::{Deserialize, Serialize};

use crate::config::{check_url, invalid, ConfigError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JuiceConfig {
    pub api_base: String,
    pub api_key: String,
    /// `raw` (`Authorization: <key>`) or `bearer` (`Authorization: Bearer <key>`).
    pub auth_scheme: String,
    pub checksum_keys: Vec<String>,
    /// Item statuses that mean a cancelled transfer's money is back.
    pub reversed_statuses: Vec<String>,
    /// Events that announce a reversal of one transfer (its id in `data`).
    pub reversal_events: Vec<String>,
    /// Item fields read for its currency, first found first (Juice
    /// documents none); an item with none has an unknown currency.
    pub item_currency_fields: Vec<String>,
    /// Our own budget of API requests a second (0: none; see
    /// `providers::limit`), and how many may go at once.
    pub rate_limit_per_second: f64,
    pub rate_limit_burst: u32,
    /// Longest API answer read: a longer one fails its attempt unread.
    pub max_response_bytes: usize,
}

impl Default for JuiceConfig {
    fn default() -> Self {
        Self {
            api_base: "https://api.spendjuice.com".into(),
            api_key: String::new(),
            auth_scheme: "raw".into(),
            checksum_keys: Vec::new(),
            reversed_statuses: vec!["reversed".into(), "refunded".into()],
            reversal_events: vec![
                "bulk_transfer.transfer.reversed".into(),
                "bulk_transfer.transfer.refunded".into(),
            ],
            item_currency_fields: super::objects::CURRENCY_FIELDS.map(String::from).to_vec(),
            // Juice's documented limit on GET details: 120 a minute per key,
            // bursts of 20.
            rate_limit_per_second: 2.0,
            rate_limit_burst: 20,
            max_response_bytes: crate::config::MAX_RESPONSE_BYTES,
        }
    }
}

impl JuiceConfig {
    /// True when checksum keys are set: `/webhooks/juice` is mounted.
    pub fn webhooks_enabled(&self) -> bool {
        !self.checksum_keys.is_empty()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_response_bytes < 1_024 {
            return Err(invalid(
                "juice.max_response_bytes",
                "must be at least 1024 (an API answer is longer than that)",
            ));
        }
        check_url("juice.api_base", &self.api_base)?;
        if self.checksum_keys.iter().any(|s| s.is_empty()) {
            return Err(invalid("juice.checksum_keys", "holds an empty key"));
        }
        if self.item_currency_fields.iter().any(|s| s.is_empty()) {
            return Err(invalid("juice.item_currency_fields", "holds an empty name"));
        }
        if !(self.rate_limit_per_second.is_finite() && self.rate_limit_per_second >= 0.0) {
            return Err(invalid(
                "juice.rate_limit_per_second",
                "must be 0 (no limit) or above",
            ));
        }
        if !["raw", "bearer"].contains(&self.auth_scheme.as_str()) {
            return Err(invalid(
                "juice.auth_scheme",
                "must be \"raw\" or \"bearer\"",
            ));
        }
        Ok(())
    }

    /// Every secret of the section, for redaction.
    pub(crate) fn secrets_mut(&mut self) -> impl Iterator<Item = &mut String> {
        std::iter::once(&mut self.api_key).chain(self.checksum_keys.iter_mut())
    }
}
