// `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not
// know it reads that folder: without this, a new migration file is left out
// of the next build until some Rust file changes (sqlx's documented fix).
//
// `--version` names the commit it was built from, when built from a git
// checkout (a source package without `.git` says `unknown`).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=.git/HEAD");
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CANCELWATCH_COMMIT={commit}");
}
