//! Where alerts go: `webhook` (Standard Webhooks signed POST), `slack`
//! (incoming webhook), `command` (a program with the alert JSON on stdin)
//! and `log` (a tracing line). One call to [`Sink::deliver`] is one attempt.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::config::{Config, SinkConfig};
use crate::store::model::OutboxRow;

/// Longest piece of a sink's answer kept in an attempt's error.
const MAX_ERROR_CHARS: usize = 300;

/// One configured sink, ready to deliver.
#[derive(Clone)]
pub struct Sink {
    /// `alerts.sinks[i].name`, or `<kind>-<i>`: the `sink` column of the outbox.
    pub name: String,
    config: SinkConfig,
    /// Standard Webhooks key (webhook sinks).
    key: Vec<u8>,
    http: reqwest::Client,
    timeout: Duration,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// HTTP status of the answer, for HTTP sinks that got one.
    pub status_code: Option<u16>,
    /// Why the attempt failed; `None` when delivered.
    pub error: Option<String>,
}

impl Outcome {
    fn delivered(status_code: Option<u16>) -> Self {
        Self {
            status_code,
            error: None,
        }
    }

    fn failed(status_code: Option<u16>, error: impl Into<String>) -> Self {
        Self {
            status_code,
            error: Some(error.into()),
        }
    }

    /// True when the sink accepted the alert.
    pub fn is_delivered(&self) -> bool {
        self.error.is_none()
    }
}

/// The HTTP client every HTTP sink shares: `alerts.delivery.timeout_secs`
/// for a whole attempt, no redirects (an alert goes where it was configured).
pub fn http_client(config: &Config) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(
            config.alerts.delivery.timeout_secs.max(1),
        ))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cancelwatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with static settings builds")
}

/// Every configured sink, in configuration order.
pub fn from_config(config: &Config, http: &reqwest::Client) -> Vec<Sink> {
    (0..config.alerts.sinks.len())
        .map(|i| {
            let cfg = config.alerts.sinks[i].clone();
            let key = if cfg.kind == "webhook" {
                // Validated at start; an invalid secret cannot reach here.
                super::signing::decode_secret(&cfg.secret).unwrap_or_default()
            } else {
                Vec::new()
            };
            Sink {
                name: config.sink_name(i),
                config: cfg,
                key,
                http: http.clone(),
                timeout: Duration::from_secs(config.alerts.delivery.timeout_secs.max(1)),
            }
        })
        .collect()
}

impl Sink {
    /// Makes one attempt to hand `row` to this sink.
    pub async fn deliver(&self, row: &OutboxRow) -> Outcome {
        match self.config.kind.as_str() {
            "webhook" => self.webhook(row).await,
            "slack" => self.slack(row).await,
            "command" => self.command(row).await,
            _ => self.log(row),
        }
    }

    async fn webhook(&self, row: &OutboxRow) -> Outcome {
        let msg_id = webhook_id(&row.alert_id, row.alert_version);
        let timestamp = chrono::Utc::now().timestamp();
        let signature = super::signing::sign(&self.key, &msg_id, timestamp, row.payload.as_bytes());
        let request = self
            .http
            .post(&self.config.url)
            .header("content-type", "application/json")
            .header("webhook-id", &msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(row.payload.clone());
        send(request).await
    }

    async fn slack(&self, row: &OutboxRow) -> Outcome {
        let payload: Value = serde_json::from_str(&row.payload).unwrap_or(Value::Null);
        let body = serde_json::json!({ "text": slack_text(&payload) });
        send(self.http.post(&self.config.url).json(&body)).await
    }

    async fn command(&self, row: &OutboxRow) -> Outcome {
        let Some((program, args)) = self.config.command.split_first() else {
            return Outcome::failed(None, "no program configured");
        };
        let mut child = match tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // A group of its own, ended whole: a shell script's children
            // (and theirs) are not left running when it times out.
            .process_group(0)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return Outcome::failed(None, format!("cannot start {program:?}: {e}")),
        };
        let group = child.id().map(EndGroup);
        let stdin = child.stdin.take();
        let payload = row.payload.clone();
        let run = async move {
            if let Some(mut stdin) = stdin {
                // A program that exits without reading is judged by its exit status.
                let _ = stdin.write_all(payload.as_bytes()).await;
                let _ = stdin.shutdown().await;
            }
            child.wait_with_output().await
        };
        // On timeout the future, and with it the child, is dropped:
        // kill_on_drop kills it, and `group` what it started, as it goes.
        let finished = tokio::time::timeout(self.timeout, run).await;
        drop(group);
        match finished {
            Err(_) => Outcome::failed(
                None,
                format!(
                    "{program:?} did not finish within {} s; killed",
                    self.timeout.as_secs()
                ),
            ),
            Ok(Err(e)) => Outcome::failed(None, format!("waiting for {program:?}: {e}")),
            Ok(Ok(out)) if out.status.success() => Outcome::delivered(None),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                Outcome::failed(
                    None,
                    truncate(&format!(
                        "{program:?} exited with {}: {}",
                        out.status,
                        stderr.trim()
                    )),
                )
            }
        }
    }

    fn log(&self, row: &OutboxRow) -> Outcome {
        let payload: Value = serde_json::from_str(&row.payload).unwrap_or(Value::Null);
        let text = slack_text(&payload);
        if payload["severity"] == "critical" && payload["state"] != "resolved" {
            tracing::error!(sink = %self.name, alert = %row.alert_id, version = row.alert_version, "ALERT {text}");
        } else {
            tracing::warn!(sink = %self.name, alert = %row.alert_id, version = row.alert_version, "ALERT {text}");
        }
        Outcome::delivered(None)
    }
}

/// The `webhook-id` of one alert version: stable across retries, so a
/// receiver can drop duplicates.
pub fn webhook_id(alert_id: &str, version: i64) -> String {
    format!("{alert_id}_v{version}")
}

/// One readable line: severity, rule, resource, summary.
pub fn slack_text(payload: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let state = if payload["state"] == "resolved" {
        " RESOLVED"
    } else {
        ""
    };
    format!(
        "[{}{state}] {}: {} {} ({}): {}",
        s(&payload["severity"]).to_uppercase(),
        s(&payload["type"]),
        s(&payload["resource"]["kind"]),
        s(&payload["resource"]["id"]),
        s(&payload["resource"]["provider"]),
        s(&payload["summary"]),
    )
}

/// Sends an HTTP attempt: any 2xx is delivered.
async fn send(request: reqwest::RequestBuilder) -> Outcome {
    match request.send().await {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                Outcome::delivered(Some(status.as_u16()))
            } else {
                let body = resp.text().await.unwrap_or_default();
                Outcome::failed(
                    Some(status.as_u16()),
                    truncate(&format!("HTTP {status}: {}", body.trim())),
                )
            }
        }
        // Without the URL: a Slack webhook URL is a secret.
        Err(e) => Outcome::failed(None, e.without_url().to_string()),
    }
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_ERROR_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The process group of a command sink's run (its id is the command's
/// pid), sent SIGKILL when dropped: whatever the command started and left
/// behind ends with it, on a timeout or after it exited.
struct EndGroup(u32);

impl Drop for EndGroup {
    fn drop(&mut self) {
        let Ok(group) = libc::pid_t::try_from(self.0) else {
            return;
        };
        // SAFETY: kill(2) with a negative pid signals that process group;
        // it touches no memory of ours. ESRCH (the group is gone) is fine.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_line_is_readable() {
        let payload = serde_json::json!({
            "type": "partial_cancellation",
            "severity": "critical",
            "state": "open",
            "resource": {"provider": "juice", "kind": "juice.bulk_transfer", "id": "b1"},
            "summary": "2 of 3 items cancelled",
        });
        assert_eq!(
            slack_text(&payload),
            "[CRITICAL] partial_cancellation: juice.bulk_transfer b1 (juice): 2 of 3 items cancelled"
        );
    }

    #[test]
    fn webhook_ids_are_per_version() {
        assert_eq!(webhook_id("alrt_x", 3), "alrt_x_v3");
    }

    #[test]
    fn long_errors_are_cut() {
        let long = "x".repeat(1000);
        assert_eq!(truncate(&long).chars().count(), MAX_ERROR_CHARS + 1);
        assert_eq!(truncate("short"), "short");
    }
}
