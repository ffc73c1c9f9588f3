//! `cancelwatch-bench` as a user runs it: short runs at a low fixed rate
//! (so they finish in seconds on a busy CI machine), checking what the
//! report counts, not how fast anything went.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The daemon of the same sources as the bench under test. `cargo test
/// --workspace` has just built it beside the bench; `cargo test -p
/// cancelwatch-bench` builds only this package, so a `cancelwatch` older
/// than the daemon's sources is built again rather than measured.
fn daemon() -> &'static PathBuf {
    static DAEMON: OnceLock<PathBuf> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let bench = PathBuf::from(env!("CARGO_BIN_EXE_cancelwatch-bench"));
        let profile_dir = bench.parent().unwrap();
        let built = profile_dir.join(format!("cancelwatch{}", std::env::consts::EXE_SUFFIX));
        if is_newer_than_its_sources(&built) {
            return built;
        }
        let target_dir = profile_dir.parent().unwrap();
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--package", "cancelwatch", "--bin", "cancelwatch"])
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(status.success(), "building the daemon failed: {status}");
        profile_dir.join(format!("cancelwatch{}", std::env::consts::EXE_SUFFIX))
    })
}

/// True when `binary` exists and is newer than every file of the daemon's
/// sources (its `src/`, `migrations/`, manifest and lock file).
fn is_newer_than_its_sources(binary: &std::path::Path) -> bool {
    fn newest(path: &std::path::Path) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| newest(&e.ok()?.path()))
            .max()
    }
    let Some(built) = std::fs::metadata(binary).and_then(|m| m.modified()).ok() else {
        return false;
    };
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    ["src", "migrations", "sim/src", "Cargo.toml", "Cargo.lock"]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .all(|source| source <= built)
}

/// Runs `cancelwatch-bench <args>` and returns its standard output.
fn bench(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cancelwatch-bench"))
        .arg("--daemon")
        .arg(daemon())
        .args(["--dir", dir.path().to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The number after `label` on the line that starts with `line_start`.
fn figure(report: &str, line_start: &str, label: &str) -> u64 {
    let line = report
        .lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no line starting {line_start:?} in:\n{report}"));
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
        + label.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {line:?}"))
}

#[test]
fn every_delivery_is_accepted_and_recorded_end_to_end() {
    let report = bench(&[
        "--e2e",
        "--duration",
        "1",
        "--rate",
        "100",
        "--connections",
        "4",
    ]);
    let accepted = figure(&report, "accepted", "accepted");
    assert!(accepted >= 90, "{report}");
    assert_eq!(figure(&report, "accepted", "errors"), 0, "{report}");
    assert_eq!(figure(&report, "accepted", "refused"), 0, "{report}");
    assert_eq!(figure(&report, "accepted", "duplicates"), 0, "{report}");
    assert_eq!(
        figure(&report, "end to end:", "end to end:"),
        accepted,
        "{report}"
    );
    assert!(report.contains("daemon peak RSS: "), "{report}");
    assert!(report.contains("; threads: at most "), "{report}");
}

#[test]
fn forged_deliveries_are_counted_as_refused() {
    let report = bench(&[
        "--forged",
        "--duration",
        "1",
        "--rate",
        "50",
        "--connections",
        "2",
    ]);
    assert_eq!(figure(&report, "accepted", "accepted"), 0, "{report}");
    assert!(figure(&report, "accepted", "refused") >= 45, "{report}");
    assert_eq!(figure(&report, "accepted", "errors"), 0, "{report}");
}
