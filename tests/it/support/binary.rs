//! The built `cancelwatch` binary: one-shot commands, and `serve` as a
//! child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::config::{write_toml, TestConfig};
use super::db::TestDb;
use super::wait::poll_until;

/// A free loopback port (bound, then released for a child to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The binary, to run in `dir` with an empty environment.
pub fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cancelwatch"));
    cmd.env_clear().current_dir(dir);
    cmd
}

/// Runs `cancelwatch <args>` to its end, configured by `config` alone.
pub fn run(config: &TestConfig, args: &[&str]) -> Output {
    command(config.dir())
        .args(args)
        .env("CANCELWATCH_CONFIG", config.write_toml())
        .output()
        .unwrap()
}

/// Runs `cancelwatch <args>` (configured by `config` alone) and waits up
/// to `timeout` for it to end, for a command that must stop on its own
/// (`serve` refusing to start): panics, after killing it, if it does not.
pub async fn run_to_exit(config: &TestConfig, args: &[&str], timeout: Duration) -> Output {
    let out = config.dir().join("run-to-exit.out");
    let err = config.dir().join("run-to-exit.err");
    let mut child = command(config.dir())
        .args(args)
        .env("CANCELWATCH_CONFIG", config.write_toml())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    poll_until(timeout, || {
        status = child.try_wait().unwrap();
        std::future::ready(status.is_some())
    })
    .await;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "cancelwatch {args:?} still ran after {timeout:?}: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

/// `cancelwatch serve` as a child process, configured by a [`TestConfig`]
/// alone (its TOML file), logging to a file in its folder.
pub struct BinaryDaemon {
    child: Child,
    pub url: String,
    log: PathBuf,
    db: TestDb,
}

impl BinaryDaemon {
    /// Starts it and waits until it listens (up to 60 s on a loaded
    /// machine). Started again with the same configuration, it keeps its
    /// database (and its address, [`TestConfig::on_a_fixed_port`]).
    pub async fn start(config: &TestConfig) -> BinaryDaemon {
        BinaryDaemon::start_with(config, |_| {}).await
    }

    /// [`BinaryDaemon::start`] with `adjust` applied to its command first
    /// (limits, environment).
    pub async fn start_with(
        config: &TestConfig,
        adjust: impl FnOnce(&mut Command),
    ) -> BinaryDaemon {
        let mut serve = config.config().clone();
        if serve.server.listen.ends_with(":0") {
            serve.server.listen = format!("127.0.0.1:{}", free_port());
        }
        let url = format!("http://{}", serve.server.listen);
        let port = url.rsplit(':').next().unwrap();
        let log = config.dir().join(format!("serve-{port}.log"));
        let mut serve_command = command(config.dir());
        serve_command
            .arg("serve")
            .env("CANCELWATCH_CONFIG", write_toml(config.dir(), &serve))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        adjust(&mut serve_command);
        let child = serve_command.spawn().unwrap();
        let daemon = BinaryDaemon {
            child,
            url,
            log,
            db: TestDb::of(config),
        };
        let client = reqwest::Client::new();
        let health = format!("{}/healthz", daemon.url);
        // Past its start: while the database is opened and migrated,
        // `/healthz` already answers, `starting`.
        let listening = poll_until(Duration::from_secs(60), || async {
            let answer = client.get(&health).send().await;
            match answer {
                Ok(answer) => answer
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|v| v["status"] != "starting"),
                Err(_) => false,
            }
        })
        .await;
        assert!(
            listening,
            "the binary never started listening: {}",
            daemon.log_text()
        );
        daemon
    }

    /// Its database, for fixtures and checks.
    pub fn db(&self) -> &TestDb {
        &self.db
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`HUP`, `TERM`, …) and returns at once.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (None if still running after 20 s;
    /// then it is killed).
    pub async fn terminate(&mut self) -> Option<ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let child = &mut self.child;
        let mut status = None;
        poll_until(Duration::from_secs(20), || {
            status = child.try_wait().unwrap();
            std::future::ready(status.is_some())
        })
        .await;
        if status.is_none() {
            self.kill();
        }
        status
    }
}

impl Drop for BinaryDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
