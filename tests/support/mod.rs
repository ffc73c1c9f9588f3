//! Shared by integration tests that run the real `cancelwatch` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `cancelwatch serve` as a child process, configured only through the
/// environment, logging to a file in `dir`.
pub struct BinaryDaemon {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl BinaryDaemon {
    /// Starts it on a free port with the database `dir/cw.db` (or `db`), provider
    /// APIs on a closed loopback port unless `env` says otherwise, and waits until
    /// it listens (up to 60 s on a loaded machine).
    pub async fn start(dir: &Path, env: &[(&str, String)]) -> BinaryDaemon {
        Self::start_on(dir, free_port(), env).await
    }

    /// The same on a given port (a restart keeps its address).
    pub async fn start_on(dir: &Path, port: u16, env: &[(&str, String)]) -> BinaryDaemon {
        let log = dir.join(format!("serve-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cancelwatch"));
        cmd.arg("serve")
            .env_clear()
            .current_dir(dir)
            .env("CANCELWATCH_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "CANCELWATCH_DATABASE__URL",
                format!("sqlite://{}/cw.db", dir.display()),
            )
            .env("CANCELWATCH_STRIPE__API_BASE", "http://127.0.0.1:9")
            .env("CANCELWATCH_JUICE__API_BASE", "http://127.0.0.1:9");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = BinaryDaemon {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        d.wait_listening().await;
        d
    }

    async fn wait_listening(&self) {
        let client = reqwest::Client::new();
        for _ in 0..2400 {
            if client
                .get(format!("{}/healthz", self.url))
                .send()
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the binary never started listening: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (None if still running after 20 s, then killed).
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        for _ in 0..400 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        None
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
