//! The `[alerts]` section: each rule's switch and severity, how alerts are
//! delivered, and the sinks they go to.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often time-based rules (stuck, refund_overdue, …) are evaluated.
    pub scan_interval_secs: u64,
    pub partial_cancellation: RuleConfig,
    pub cancel_not_effective: RuleConfig,
    pub stuck: StuckRule,
    pub refund_overdue: AgeRule,
    pub dead_letter: RuleConfig,
    pub verification_failures: VerificationRule,
    pub delivery: AlertDeliveryConfig,
    pub sinks: Vec<SinkConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            scan_interval_secs: 30,
            partial_cancellation: RuleConfig::on("critical"),
            cancel_not_effective: RuleConfig::on("critical"),
            stuck: StuckRule::default(),
            refund_overdue: AgeRule::default(),
            dead_letter: RuleConfig::on("critical"),
            verification_failures: VerificationRule::default(),
            delivery: AlertDeliveryConfig::default(),
            sinks: vec![SinkConfig::log()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    pub enabled: bool,
    /// `info`, `warning` or `critical`.
    pub severity: String,
}

impl RuleConfig {
    fn on(severity: &str) -> Self {
        Self {
            enabled: true,
            severity: severity.into(),
        }
    }
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self::on("warning")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgeRule {
    pub enabled: bool,
    pub severity: String,
    pub after_secs: u64,
}

impl Default for AgeRule {
    fn default() -> Self {
        Self {
            enabled: true,
            severity: "warning".into(),
            after_secs: 3 * 86_400,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StuckRule {
    pub enabled: bool,
    pub severity: String,
    /// Limit for any transitional status not listed in `limits`.
    pub after_secs: u64,
    /// Per-status limits in seconds, e.g. `{ cancelling = 900 }`.
    pub limits: std::collections::BTreeMap<String, u64>,
}

impl Default for StuckRule {
    fn default() -> Self {
        Self {
            enabled: true,
            severity: "warning".into(),
            after_secs: 6 * 3_600,
            limits: [("cancelling".to_string(), 3_600)].into_iter().collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationRule {
    pub enabled: bool,
    pub severity: String,
    /// Alert when more than `threshold` deliveries are refused within `window_secs`.
    pub threshold: u64,
    pub window_secs: u64,
}

impl Default for VerificationRule {
    fn default() -> Self {
        Self {
            enabled: true,
            severity: "warning".into(),
            threshold: 20,
            window_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertDeliveryConfig {
    pub timeout_secs: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_secs: u64,
    pub poll_interval_ms: u64,
}

impl Default for AlertDeliveryConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 10,
            backoff_base_ms: 1_000,
            backoff_max_secs: 900,
            poll_interval_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Unique name, used in delivery records; defaults to `<kind>-<index>`.
    pub name: String,
    /// `webhook`, `slack`, `command` or `log`.
    pub kind: String,
    pub url: String,
    /// Standard Webhooks secret (`whsec_<base64>`) for `webhook` sinks.
    pub secret: String,
    /// Program and arguments for `command` sinks; the alert JSON is its stdin.
    pub command: Vec<String>,
    /// Rules routed to this sink; empty means all.
    pub rules: Vec<String>,
    /// Lowest severity routed to this sink.
    pub min_severity: String,
}

impl SinkConfig {
    fn log() -> Self {
        Self {
            name: "log".into(),
            kind: "log".into(),
            ..Self::default()
        }
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: "log".into(),
            url: String::new(),
            secret: String::new(),
            command: Vec::new(),
            rules: Vec::new(),
            min_severity: "info".into(),
        }
    }
}
