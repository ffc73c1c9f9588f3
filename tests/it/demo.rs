//! `cancelwatch demo`, as a newcomer runs it: every scenario is played and
//! recorded, the alerts that must fire are printed, and it keeps serving until
//! told to stop.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::binary::{self, free_port};
use crate::support::sim::Simulator;

#[test]
fn demo_plays_every_scenario_then_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = binary::command(dir.path())
        .arg("demo")
        .env("CANCELWATCH_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = String::new();
    while !out.contains("keeps serving") {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the demo did not finish its scenarios in time:\n{out}");
            }
        }
    }
    // Still serving: the health check answers.
    let health = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let stop = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    let status = child.wait().unwrap();

    for name in Simulator::scenario_names() {
        assert!(
            out.contains(&format!("== {name}")),
            "{name} was not played:\n{out}"
        );
    }
    assert!(
        out.contains("cancel through cancelwatch: not_cancellable"),
        "{out}"
    );
    for rule in ["partial_cancellation", "cancel_not_effective"] {
        assert!(out.contains(rule), "no {rule} alert:\n{out}");
    }
    assert!(out.contains("returned"), "{out}");
    // It points to the console, with the token to sign in with.
    let console = format!("console:    http://127.0.0.1:{port}/ui/");
    assert!(out.contains(&console), "{out}");
    let token = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin token"))
        .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no admin token printed:\n{out}"));
    assert!(token.starts_with("demo-admin-"), "{token}");
    assert!(
        out.contains(&format!("http://127.0.0.1:{port}/ui/resources/")),
        "{out}"
    );
    assert!(dir.path().join("data/cancelwatch.db").exists());
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "the daemon stopped serving: {health}"
    );
    assert!(
        status.success(),
        "the demo did not stop cleanly on SIGTERM: {status}"
    );
}
