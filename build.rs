// `sqlx::migrate!` embeds `migrations/` (a folder per engine) at compile time, but cargo does not
// know it reads that folder: without this, a new migration file is left out
// of the next build until some Rust file changes (sqlx's documented fix).
//
// `--version` names the commit it was built from, when built from a git
// checkout (a source package without `.git` says `unknown`). The variable's
// name must not start with `CANCELWATCH_`: cargo also sets it when it runs
// the binary or its tests, and the configuration reads those variables.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=build.rs");
    watch_head();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=GIT_COMMIT_OF_CANCELWATCH={commit}");
}

/// Builds again when the checked-out commit moves: `.git/HEAD`, the branch
/// it names and the packed refs. Only paths that exist are watched (a
/// missing one would make every build run this script again).
fn watch_head() {
    let git = Path::new(".git");
    if !git.is_dir() {
        return;
    }
    let mut watched = vec![git.join("HEAD"), git.join("packed-refs")];
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            watched.push(git.join(branch));
        }
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
