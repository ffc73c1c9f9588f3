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
    /// while it is empty. At least [`MIN_ADMIN_TOKEN_LEN`] characters.
    pub admin_token: String,
    /// Failed `/v1` authentications one source may make in a minute; then
    /// its tries are answered 429 until the minute is over.
    pub admin_auth_failures_per_minute: u32,
    /// Whole-request deadline (headers and body), against slow clients.
    pub request_timeout_secs: u64,
    /// Requests handled at once, in the whole process; more wait, within
    /// their `request_timeout_secs`.
    pub max_concurrent_requests: usize,
    /// Open connections at once. At the cap the oldest idle connection is
    /// closed to make room; with none idle, new ones wait in the kernel's
    /// backlog.
    pub max_connections: usize,
    /// Most of the `max_connections` one remote address may hold; past it,
    /// its oldest idle connection is closed, or the new one if none is idle.
    /// Behind a proxy every connection comes from the proxy: raise it to
    /// `max_connections` there.
    pub max_connections_per_ip: usize,
    /// Longest an answer may wait for the client to take it (a client that
    /// pipelines requests and never reads is cut off after it).
    pub write_timeout_secs: u64,
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
            admin_auth_failures_per_minute: 10,
            request_timeout_secs: 15,
            max_concurrent_requests: 1024,
            max_connections: 2048,
            max_connections_per_ip: 256,
            write_timeout_secs: 10,
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
    /// SQLite: read connections (the writer is always one).
    pub read_connections: u32,
    /// Refusals kept as rows of their own, a minute; the rest of that minute
    /// is counted per provider, reason and source in `refusal_summaries`.
    pub refusal_rows_per_minute: u32,
    /// The WAL file is cut back to this size once it has grown past it and
    /// checkpoints have caught up (SQLite's `journal_size_limit`).
    pub wal_size_limit_bytes: u64,
    /// PostgreSQL: connections of this replica's pool (reads and writes).
    pub max_connections: u32,
    /// PostgreSQL: how long to wait for the server when connecting.
    pub connect_timeout_secs: u64,
}

/// The database engine `database.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://path`: the embedded default, one machine.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`: several replicas may share it.
    Postgres(String),
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
            max_connections: 16,
            connect_timeout_secs: 5,
            wal_size_limit_bytes: 64 << 20,
            refusal_rows_per_minute: 600,
        }
    }
}

/// Default of `<provider>.max_response_bytes`: 16 MiB, far above a real
/// answer (a Juice bulk transfer of 100,000 items is about 8 MB) and far
/// below what would strain memory.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

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
    /// A provider call still running after this long gives its worker slot
    /// back and waits in its provider's slow lane (a quarter of the slots);
    /// when that is full, the attempt fails and is retried later.
    pub slow_call_secs: u64,
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
            slow_call_secs: 5,
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
        // `CANCELWATCH_TEST_POSTGRES_URL` names the server the test suite
        // makes its databases on: it shares the prefix but is no setting,
        // and a daemon started where it is exported must start as without.
        figment = figment.merge(
            Env::prefixed("CANCELWATCH_")
                .ignore(&["CONFIG"])
                // `CANCELWATCH_TEST_*` are the test suite's (the PostgreSQL
                // server it uses), never a setting of the daemon's.
                .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_"))
                .split("__"),
        );
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(describe(e)))?;
        config.resolve_paths(|key| file_folder(&figment, key));
        config.validate()?;
        Ok(config)
    }

    /// Makes the relative paths of values read from a file (the database of
    /// a `sqlite:` URL, the program of a `command` sink) relative to that
    /// file's folder, as one expects of a path written in a file: the same
    /// configuration then names the same files from whatever folder the
    /// daemon is started in. `folder_of(key)` is the folder of the file that
    /// set `key`, `None` for a value from the defaults or the environment,
    /// whose relative paths stay relative to the working directory.
    pub fn resolve_paths(&mut self, folder_of: impl Fn(&str) -> Option<PathBuf>) {
        if let Some(folder) = folder_of("database.url") {
            if let Some(url) = resolve_sqlite_url(&self.database.url, &folder) {
                self.database.url = url;
            }
        }
        if let Some(folder) = folder_of("alerts.sinks") {
            for sink in self.alerts.sinks.iter_mut().filter(|s| s.kind == "command") {
                // A bare name (`page-oncall`) is looked up on PATH, as a
                // shell would; only a path with a folder in it is resolved.
                if let Some(program) = sink.command.first_mut() {
                    let path = Path::new(program.as_str());
                    if path.is_relative() && path.components().count() > 1 {
                        *program = normalized(&folder.join(path)).display().to_string();
                    }
                }
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        check_admin_token(&self.server.admin_token)?;
        if self.server.admin_auth_failures_per_minute == 0 {
            return Err(invalid(
                "server.admin_auth_failures_per_minute",
                "must be above 0",
            ));
        }
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
        if self.server.max_connections_per_ip == 0 {
            return Err(invalid("server.max_connections_per_ip", "must be above 0"));
        }
        if self.server.write_timeout_secs == 0 {
            return Err(invalid("server.write_timeout_secs", "must be above 0"));
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
        self.database_url()?;
        if self.database.max_connections < 2 {
            return Err(invalid(
                "database.max_connections",
                "must be at least 2 (acknowledgements and the pipeline each need one)",
            ));
        }
        if self.database.connect_timeout_secs == 0 {
            return Err(invalid("database.connect_timeout_secs", "must be above 0"));
        }
        if !["full", "normal"].contains(&self.database.synchronous.as_str()) {
            return Err(invalid(
                "database.synchronous",
                "must be \"full\" or \"normal\"",
            ));
        }
        if self.database.max_batch == 0 {
            return Err(invalid("database.max_batch", "must be above 0"));
        }
        if self.database.wal_size_limit_bytes < 1 << 20 {
            return Err(invalid(
                "database.wal_size_limit_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
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
        if self.workers.slow_call_secs == 0 {
            return Err(invalid("workers.slow_call_secs", "must be above 0"));
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

    /// The engine and place `database.url` names.
    pub fn database_url(&self) -> Result<DatabaseUrl, ConfigError> {
        let url = self.database.url.as_str();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // Parsed here so that a typo is refused at start, naming the
            // key but never echoing the URL (it may carry a password).
            return match url::Url::parse(url) {
                Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {
                    Ok(DatabaseUrl::Postgres(url.to_string()))
                }
                _ => Err(invalid(
                    "database.url",
                    "is not a valid PostgreSQL URL (postgres://user:password@host:5432/database)",
                )),
            };
        }
        self.database_path().map(DatabaseUrl::Sqlite)
    }

    /// Where the database is, for logs and messages: the SQLite file, or
    /// the PostgreSQL URL without its password.
    pub fn database_display(&self) -> String {
        match self.database_url() {
            Ok(DatabaseUrl::Sqlite(path)) => path.display().to_string(),
            Ok(DatabaseUrl::Postgres(url)) => redact_password(&url),
            Err(_) => "(invalid database.url)".into(),
        }
    }

    /// The SQLite file behind `database.url` (`sqlite://path`, `sqlite:path`).
    pub fn database_path(&self) -> Result<PathBuf, ConfigError> {
        let url = self.database.url.as_str();
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| {
                invalid(
                    "database.url",
                    "must start with sqlite:// or postgres:// (or postgresql://)",
                )
            })?;
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
        c.database.url = redact_password(&c.database.url);
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
        if let Ok(url) = url::Url::parse(&self.database.url) {
            out.extend(url.password().map(str::to_string));
        }
        out.retain(|s| !s.is_empty());
        out
    }
}

/// The folder, absolute, of the file that set `key` in `figment`, if a
/// file did.
fn file_folder(figment: &Figment, key: &str) -> Option<PathBuf> {
    let source = figment.find_metadata(key)?.source.as_ref()?;
    let file = source.file_path()?;
    let folder = file.parent().filter(|p| !p.as_os_str().is_empty());
    let folder = std::path::absolute(folder.unwrap_or(Path::new("."))).ok()?;
    Some(normalized(&folder))
}

/// `url` with its relative database path made relative to `folder`; `None`
/// when there is nothing to resolve: another engine's URL (`postgres://`),
/// an absolute path, no path at all.
fn resolve_sqlite_url(url: &str, folder: &Path) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    if path.is_empty() || path == ":memory:" || Path::new(path).is_absolute() {
        return None;
    }
    let resolved = normalized(&folder.join(path));
    Some(match query {
        Some(q) => format!("sqlite://{}?{q}", resolved.display()),
        None => format!("sqlite://{}", resolved.display()),
    })
}

/// `path` without `.` and with each `..` taken back, so that the paths
/// shown (`check-config`, the start line) read plainly. Lexical: the folder
/// it starts from is a real one, and the rest are the names written in the
/// file.
fn normalized(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(part);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Shortest admin token accepted: guessing one of 32 random characters is
/// out of reach even at the speed of a network.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// `server.admin_token`: empty (the API off) or long enough. The error
/// offers a fresh random token, never the configured one.
fn check_admin_token(token: &str) -> Result<(), ConfigError> {
    if token.is_empty() || token.chars().count() >= MIN_ADMIN_TOKEN_LEN {
        return Ok(());
    }
    Err(invalid(
        "server.admin_token",
        format!(
            "is shorter than {MIN_ADMIN_TOKEN_LEN} characters (the value is secret: not shown); \
             leave it empty to turn /v1 off, or use a random one such as {}",
            random_token()
        ),
    ))
}

/// 32 random bytes as 64 hex digits.
pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
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

/// A database URL with its password, if any, replaced.
pub fn redact_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            // Set as a plain word (a URL would escape the brackets), then
            // shown as every other redacted value is.
            let _ = u.set_password(Some("REDACTED"));
            u.to_string()
                .replacen(":REDACTED@", &format!(":{REDACTED}@"), 1)
        }
        _ => url.to_string(),
    }
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

    /// The example in the repository is complete and says the defaults
    /// truly; read from its folder `config/`, it names the same database
    /// as the defaults do from the repository's root (where the quick start
    /// runs).
    #[test]
    fn example_file_matches_the_defaults() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut example: Config =
            Figment::from(Toml::string(include_str!("../../config/cancelwatch.toml")))
                .extract()
                .unwrap();
        example.resolve_paths(|_| Some(root.join("config")));
        let mut defaults = Config::default();
        defaults.resolve_paths(|_| Some(root.to_path_buf()));
        assert_eq!(
            toml::to_string(&example).unwrap(),
            toml::to_string(&defaults).unwrap()
        );
        assert_eq!(
            example.database_path().unwrap(),
            root.join("data/cancelwatch.db")
        );
    }

    /// Relative paths are resolved against the folder given; absolute ones,
    /// another engine's URL and bare program names are left alone.
    #[test]
    fn relative_paths_are_resolved_against_the_folder() {
        let folder = Path::new("/etc/cw");
        let resolve = |url: &str| resolve_sqlite_url(url, folder);
        assert_eq!(
            resolve("sqlite://data/cw.db").as_deref(),
            Some("sqlite:///etc/cw/data/cw.db")
        );
        assert_eq!(
            resolve("sqlite:./cw.db?mode=rwc").as_deref(),
            Some("sqlite:///etc/cw/cw.db?mode=rwc")
        );
        assert_eq!(
            resolve("sqlite://../var/cw.db").as_deref(),
            Some("sqlite:///etc/var/cw.db")
        );
        assert_eq!(resolve("sqlite:///var/lib/cw.db"), None);
        assert_eq!(resolve("postgres://cw@localhost/cw"), None);
        assert_eq!(resolve("postgres://cw@localhost/../cw"), None);

        let mut c = Config::default();
        c.database.url = "postgres://cw@db/cancelwatch".into();
        c.alerts.sinks = ["bin/page", "page-oncall", "/usr/bin/page"]
            .into_iter()
            .map(|program| SinkConfig {
                kind: "command".into(),
                command: vec![program.into(), "bin/not-a-program".into()],
                ..SinkConfig::default()
            })
            .collect();
        c.resolve_paths(|_| Some(folder.to_path_buf()));
        assert_eq!(c.database.url, "postgres://cw@db/cancelwatch");
        let programs: Vec<&str> = c
            .alerts
            .sinks
            .iter()
            .map(|s| s.command[0].as_str())
            .collect();
        assert_eq!(
            programs,
            ["/etc/cw/bin/page", "page-oncall", "/usr/bin/page"]
        );
        assert_eq!(c.alerts.sinks[0].command[1], "bin/not-a-program");
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
