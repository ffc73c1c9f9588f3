//! The daemon under test: started as a child process, watched through
//! `/proc`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{BenchArgs, API_KEY, SECRET};

/// A number from `/proc/<pid>/status`: `VmHWM:` (the most resident memory
/// the process ever had, KiB), `Threads:`. None once the process is gone.
pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User and system CPU seconds of a process, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    /// The CPU time of two processes together.
    pub fn plus(self, other: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }

    /// Reads it for `pid` (`None` without `/proc`).
    pub fn of(pid: u32) -> Option<CpuTime> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_cpu_time(&stat)
    }

    pub fn since(self, start: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - start.user,
            system: self.system - start.system,
        }
    }

    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

/// utime and stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in
/// clock ticks of 1/100 s (the kernel's fixed USER_HZ). The command name
/// (field 2) may hold spaces and parentheses, so fields are counted from
/// after its closing parenthesis.
fn parse_cpu_time(stat: &str) -> Option<CpuTime> {
    const TICKS_PER_SECOND: f64 = 100.0;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some(CpuTime {
        user: user / TICKS_PER_SECOND,
        system: system / TICKS_PER_SECOND,
    })
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The daemon under test, as a child process.
pub struct DaemonProcess {
    pub child: Child,
}

impl DaemonProcess {
    /// Starts `exe serve` on `port`, on the database at `database_url`
    /// (its configuration file, empty, goes to `dir`).
    pub fn spawn(
        exe: &Path,
        dir: &Path,
        database_url: &str,
        port: u16,
        group_commit: bool,
        args: &BenchArgs,
        api_base: Option<String>,
    ) -> anyhow::Result<Self> {
        let api_base = api_base.unwrap_or_else(|| "http://127.0.0.1:9".into());
        std::fs::write(dir.join("none.toml"), "").context("writing an empty config")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .env_clear()
            .env("CANCELWATCH_CONFIG", dir.join("none.toml"))
            .env("CANCELWATCH_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            // Every connection of the load comes from one address, as from a
            // proxy: it may hold them all.
            .env("CANCELWATCH_SERVER__MAX_CONNECTIONS_PER_IP", "2048")
            .env("CANCELWATCH_DATABASE__URL", database_url)
            .env(
                "CANCELWATCH_DATABASE__GROUP_COMMIT",
                group_commit.to_string(),
            )
            .env("CANCELWATCH_DATABASE__SYNCHRONOUS", &args.synchronous)
            .env(
                "CANCELWATCH_STRIPE__WEBHOOK_SECRETS",
                format!("[\"{SECRET}\"]"),
            )
            .env("CANCELWATCH_STRIPE__API_BASE", &api_base)
            .env("CANCELWATCH_STRIPE__API_KEY", API_KEY)
            .env("CANCELWATCH_JUICE__API_BASE", "http://127.0.0.1:9")
            .env("CANCELWATCH_RECONCILE__ENABLED", "false")
            .env("CANCELWATCH_LOG__LEVEL", "error");
        for kv in &args.daemon_env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--daemon-env {kv:?} is not KEY=VALUE"))?;
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the daemon under test")?;
        Ok(Self { child })
    }

    pub async fn wait_ready(&mut self, url: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon under test exited: {status}");
            }
            if let Ok(r) = client.get(format!("{url}/readyz")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the daemon under test did not become ready within 30 s")
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // A command name with a space and a parenthesis; utime 250 and
        // stime 75 ticks (fields 14 and 15).
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(
            parse_cpu_time(stat),
            Some(CpuTime {
                user: 2.5,
                system: 0.75
            })
        );
        assert_eq!(parse_cpu_time("4242 (cut short) S 1 2"), None);
        let own = CpuTime::of(std::process::id()).expect("this test runs on Linux");
        assert!(own.user >= 0.0 && own.system >= 0.0);
    }
}
