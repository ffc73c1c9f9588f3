//! Layered configuration: built-in defaults, then a TOML file, then
//! `CANCELWATCH_<SECTION>__<KEY>` environment variables. Validated once, at
//! start; secrets are redacted whenever the configuration is shown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod alerts;

/// Where `--config` / `CANCELWATCH_CONFIG` point when neither is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/cancelwatch.toml";
const REDACTED: &str = "<redacted>";

mod backfill;

pub use crate::providers::juice::config::JuiceConfig;
pub use crate::providers::stripe::config::StripeConfig;
pub use backfill::BackfillConfig;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub database: DatabaseConfig,
    pub stripe: StripeConfig,
    pub juice: JuiceConfig,
    pub workers: WorkerConfig,
    pub reconcile: ReconcileConfig,
    pub backfill: BackfillConfig,
    pub prune: PruneConfig,
    pub alerts: AlertsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Where `/ui/`, `/v1` and `/metrics` are served instead of `listen`,
    /// so that the address the providers reach answers only the webhooks
    /// and the health checks. Empty: everything on `listen`.
    pub admin_listen: String,
    pub max_body_bytes: usize,
    /// Bearer token for `/v1` and the sign-in of `/ui/`; both answer 404
    /// while it is empty.
    pub admin_token: String,
    /// Whole-request deadline (headers and body), against slow clients.
    pub request_timeout_secs: u64,
    /// Requests handled at once; more wait.
    pub max_concurrent_requests: usize,
    /// Open connections at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Deadline for a client to send its request headers (slowloris).
    pub header_read_timeout_secs: u64,
    /// How long shutdown waits for in-flight requests and workers.
    pub shutdown_grace_secs: u64,
    /// From a SIGTERM, how long `/readyz` fails before accepting stops, so
    /// a load balancer takes the instance out first.
    pub drain_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: String::new(),
            max_body_bytes: 1_048_576,
            admin_token: String::new(),
            request_timeout_secs: 15,
            max_concurrent_requests: 1024,
            max_connections: 2048,
            header_read_timeout_secs: 10,
            shutdown_grace_secs: 10,
            drain_secs: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `cancelwatch=debug,info`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    /// `full` (default: a 2xx survives power loss) or `normal` (survives a
    /// process crash; the last commits may be lost on power loss).
    pub synchronous: String,
    pub busy_timeout_ms: u64,
    /// Group commit: concurrent deliveries share one transaction and one fsync.
    pub group_commit: bool,
    /// Most deliveries in one group commit.
    pub max_batch: usize,
    /// Read connections (the writer is always one).
    pub read_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/cancelwatch.db".into(),
            synchronous: "full".into(),
            busy_timeout_ms: 5_000,
            group_commit: true,
            max_batch: 512,
            read_connections: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Deliveries being decided (fetched from the provider) at once; never
    /// two about one resource.
    pub concurrency: usize,
    pub lease_secs: u64,
    /// Attempts before a delivery goes `dead`.
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_secs: u64,
    /// How long an idle worker sleeps before it looks at the inbox again.
    pub poll_interval_ms: u64,
    /// Timeout of one provider API call.
    pub fetch_timeout_secs: u64,
    /// Attempts of one provider call within one processing attempt.
    pub http_retries: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            lease_secs: 60,
            max_attempts: 12,
            backoff_base_ms: 1_000,
            backoff_max_secs: 600,
            poll_interval_ms: 250,
            fetch_timeout_secs: 10,
            http_retries: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    pub enabled: bool,
    /// How often resources in a transitional status are fetched again.
    pub interval_secs: u64,
    /// Longest gap between two fetches of one resource as its backoff grows.
    pub max_interval_secs: u64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: 60,
            max_interval_secs: 3_600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruneConfig {
    /// Prune on a schedule inside `serve`.
    pub enabled: bool,
    pub interval_secs: u64,
    /// Same form as `prune --older-than` (`30d`).
    pub older_than: String,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval_secs: 86_400,
            older_than: "30d".into(),
        }
    }
}

pub use alerts::{
    AgeRule, AlertDeliveryConfig, AlertsConfig, RuleConfig, SinkConfig, StuckRule, VerificationRule,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration: {key}: {message}")]
    Invalid { key: String, message: String },
}

pub(crate) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

pub const SEVERITIES: [&str; 3] = ["info", "warning", "critical"];

impl Config {
    /// Loads defaults, then `path` (a missing default path is fine, a missing
    /// explicit one is not), then the environment; then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError::Load(format!(
                        "config file {} does not exist",
                        p.display()
                    )));
                }
                figment = figment.merge(Toml::file_exact(p));
            }
            None => {
                if Path::new(DEFAULT_CONFIG_PATH).exists() {
                    figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_PATH));
                }
            }
        }
        figment = figment.merge(
            Env::prefixed("CANCELWATCH_")
                .ignore(&["CONFIG"])
                .split("__"),
        );
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(describe(e)))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.admin_listen_addr()?;
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be above 0"));
        }
        if self.server.request_timeout_secs == 0 {
            return Err(invalid("server.request_timeout_secs", "must be above 0"));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be above 0"));
        }
        if self.server.header_read_timeout_secs == 0 {
            return Err(invalid(
                "server.header_read_timeout_secs",
                "must be above 0",
            ));
        }
        if self.server.max_concurrent_requests == 0 {
            return Err(invalid("server.max_concurrent_requests", "must be above 0"));
        }
        check_log_level(&self.log.level)?;
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        self.database_path()?;
        if !["full", "normal"].contains(&self.database.synchronous.as_str()) {
            return Err(invalid(
                "database.synchronous",
                "must be \"full\" or \"normal\"",
            ));
        }
        if self.database.max_batch == 0 {
            return Err(invalid("database.max_batch", "must be above 0"));
        }
        if self.database.read_connections == 0 {
            return Err(invalid("database.read_connections", "must be above 0"));
        }
        self.stripe.validate()?;
        self.juice.validate()?;
        if self.workers.concurrency == 0 {
            return Err(invalid("workers.concurrency", "must be above 0"));
        }
        if self.workers.max_attempts == 0 {
            return Err(invalid("workers.max_attempts", "must be above 0"));
        }
        if self.workers.lease_secs == 0 {
            return Err(invalid("workers.lease_secs", "must be above 0"));
        }
        if self.reconcile.interval_secs == 0 {
            return Err(invalid("reconcile.interval_secs", "must be above 0"));
        }
        self.backfill.validate()?;
        crate::time::parse_duration(&self.prune.older_than)
            .map_err(|e| invalid("prune.older_than", e))?;
        self.validate_alerts()
    }

    /// The `[alerts]` section: rule severities and sinks.
    fn validate_alerts(&self) -> Result<(), ConfigError> {
        for (key, sev) in [
            (
                "alerts.partial_cancellation.severity",
                &self.alerts.partial_cancellation.severity,
            ),
            (
                "alerts.cancel_not_effective.severity",
                &self.alerts.cancel_not_effective.severity,
            ),
            ("alerts.stuck.severity", &self.alerts.stuck.severity),
            (
                "alerts.refund_overdue.severity",
                &self.alerts.refund_overdue.severity,
            ),
            (
                "alerts.dead_letter.severity",
                &self.alerts.dead_letter.severity,
            ),
            (
                "alerts.verification_failures.severity",
                &self.alerts.verification_failures.severity,
            ),
        ] {
            check_severity(key, sev)?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, sink) in self.alerts.sinks.iter().enumerate() {
            let key = |k: &str| format!("alerts.sinks[{i}].{k}");
            check_severity(&key("min_severity"), &sink.min_severity)?;
            match sink.kind.as_str() {
                "webhook" | "slack" => {
                    // A Slack URL carries its secret in the path: never echoed.
                    check_secret_url(&key("url"), &sink.url)?;
                    if sink.kind == "webhook" {
                        crate::alerts::signing::decode_secret(&sink.secret)
                            .map_err(|e| invalid(&key("secret"), e))?;
                    }
                }
                "command" => {
                    if sink.command.is_empty() {
                        return Err(invalid(&key("command"), "a command sink needs a program"));
                    }
                }
                "log" => {}
                other => {
                    return Err(invalid(
                        &key("kind"),
                        format!("unknown sink kind {other:?} (webhook, slack, command or log)"),
                    ))
                }
            }
            if !names.insert(self.sink_name(i)) {
                return Err(invalid(&key("name"), "two sinks share this name"));
            }
        }
        Ok(())
    }

    /// The admin surface's own address; `None` while `server.admin_listen`
    /// is empty (it shares `server.listen`).
    pub fn admin_listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let text = self.server.admin_listen.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            invalid(
                "server.admin_listen",
                format!(
                    "{text:?} is not an address such as 127.0.0.1:8081 (leave it empty to serve everything on server.listen)"
                ),
            )
        })
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| {
            invalid(
                "server.listen",
                format!(
                    "{:?} is not an address such as 127.0.0.1:8080",
                    self.server.listen
                ),
            )
        })
    }

    /// The SQLite file behind `database.url` (`sqlite://path`, `sqlite:path`).
    pub fn database_path(&self) -> Result<PathBuf, ConfigError> {
        let url = self.database.url.as_str();
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| invalid("database.url", "must start with sqlite://"))?;
        let path = rest.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" {
            return Err(invalid(
                "database.url",
                "needs a file path (sqlite://data/cancelwatch.db)",
            ));
        }
        Ok(PathBuf::from(path))
    }

    pub fn sink_name(&self, index: usize) -> String {
        let sink = &self.alerts.sinks[index];
        if sink.name.is_empty() {
            format!("{}-{index}", sink.kind)
        } else {
            sink.name.clone()
        }
    }

    pub fn stripe_enabled(&self) -> bool {
        self.stripe.webhooks_enabled()
    }

    pub fn juice_enabled(&self) -> bool {
        self.juice.webhooks_enabled()
    }

    /// The effective configuration with every secret replaced, for display.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        let hide = |s: &mut String| {
            if !s.is_empty() {
                *s = REDACTED.into();
            }
        };
        hide(&mut c.server.admin_token);
        for s in c.stripe.secrets_mut().chain(c.juice.secrets_mut()) {
            hide(s);
        }
        for sink in &mut c.alerts.sinks {
            hide(&mut sink.secret);
            // Slack incoming-webhook URLs carry their secret in the path.
            if sink.kind == "slack" {
                hide(&mut sink.url);
            }
        }
        c
    }

    /// Every configured secret, for tests that check nothing leaks.
    pub fn secrets(&self) -> Vec<String> {
        let mut c = self.clone();
        let mut out: Vec<String> = vec![self.server.admin_token.clone()];
        out.extend(c.stripe.secrets_mut().map(|s| s.clone()));
        out.extend(c.juice.secrets_mut().map(|s| s.clone()));
        out.extend(self.alerts.sinks.iter().map(|s| s.secret.clone()));
        out.retain(|s| !s.is_empty());
        out
    }
}

/// `log.level`: a level (`error`, `warn`, `info`, `debug`, `trace`, `off`),
/// or comma-separated `target=level` directives. A bare word that is not a
/// level would be read as a target and silence everything else.
fn check_log_level(value: &str) -> Result<(), ConfigError> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let ok = value.split(',').all(|directive| {
        let level = directive.rsplit('=').next().unwrap_or("").trim();
        LEVELS.contains(&level.to_ascii_lowercase().as_str())
    });
    if ok && tracing_subscriber::EnvFilter::try_new(value).is_ok() {
        Ok(())
    } else {
        Err(invalid(
            "log.level",
            format!("{value:?} is not a level (error, warn, info, debug, trace, off) or target=level directives"),
        ))
    }
}

/// [`check_url`] for a URL that holds a secret: the error names the key and
/// the expected form, not the value.
fn check_secret_url(key: &str, value: &str) -> Result<(), ConfigError> {
    check_url(key, value).map_err(|_| {
        invalid(
            key,
            "is not an http(s) URL (the value is secret: not shown)",
        )
    })
}

pub(crate) fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(invalid(key, format!("{value:?} is not an http(s) URL"))),
    }
}

fn check_severity(key: &str, value: &str) -> Result<(), ConfigError> {
    if SEVERITIES.contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{value:?} is not one of info, warning, critical"),
        ))
    }
}

/// One line naming the key, from figment's error (which may carry several).
/// Keys whose values are secrets: an error about one never prints the value.
fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    [
        "api_key",
        "webhook_secrets",
        "checksum_keys",
        "admin_token",
        "secret",
        "url",
    ]
    .contains(&last)
        || key.contains("webhook_secrets")
        || key.contains("checksum_keys")
}

/// What was wrong with a secret's value, without the value.
fn without_the_value(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::InvalidType(_, expected) => format!("the value is not {expected}"),
        Kind::InvalidValue(_, expected) => format!("the value is not {expected}"),
        Kind::InvalidLength(_, expected) => format!("wrong length: expected {expected}"),
        Kind::Message(_) => "the value is not valid here".to_string(),
        other => {
            // The remaining kinds name keys and variants, never a value.
            other.to_string()
        }
    }
}

fn describe(e: figment::Error) -> String {
    let mut lines = Vec::new();
    for err in e {
        let key = err.path.join(".");
        let source = err
            .metadata
            .as_ref()
            .map(|m| format!(" (from {})", m.name))
            .unwrap_or_default();
        let kind = if is_secret_key(&key) {
            without_the_value(&err.kind)
        } else {
            err.kind.to_string()
        };
        if key.is_empty() {
            lines.push(format!("{kind}{source}"));
        } else {
            lines.push(format!("{key}: {kind}{source}"));
        }
    }
    lines.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_checked() {
        for good in ["info", "warn", "cancelwatch=debug,info", "off"] {
            assert!(check_log_level(good).is_ok(), "{good}");
        }
        for bad in ["loud", "cancelwatch=loud", ""] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    /// The example in the repository is complete and says the defaults truly.
    #[test]
    fn example_file_matches_the_defaults() {
        let example: Config =
            Figment::from(Toml::string(include_str!("../../config/cancelwatch.toml")))
                .extract()
                .unwrap();
        assert_eq!(
            toml::to_string(&example).unwrap(),
            toml::to_string(&Config::default()).unwrap()
        );
    }

    #[test]
    fn an_admin_address_is_checked_and_optional() {
        let mut c = Config::default();
        assert_eq!(c.admin_listen_addr().unwrap(), None);
        c.server.admin_listen = "127.0.0.1:8081".into();
        assert_eq!(
            c.admin_listen_addr().unwrap(),
            Some("127.0.0.1:8081".parse().unwrap())
        );
        c.server.admin_listen = "localhost".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.admin_listen"), "{e}");
    }

    #[test]
    fn a_rate_limit_below_zero_is_refused() {
        let mut c = Config::default();
        c.juice.rate_limit_per_second = -1.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("juice.rate_limit_per_second"), "{e}");
        c.juice.rate_limit_per_second = 0.0;
        c.validate().unwrap();
    }

    #[test]
    fn redaction_hides_every_secret() {
        let mut c = Config::default();
        c.server.admin_token = "adm-7f3k".into();
        c.stripe.api_key = "sk_test_x".into();
        c.stripe.webhook_secrets = vec!["whsec_a".into()];
        c.juice.checksum_keys = vec!["biz-9q2z".into()];
        let shown = toml::to_string(&c.redacted()).unwrap();
        for s in c.secrets() {
            assert!(!shown.contains(&s), "{s} leaked");
        }
    }
}
