// `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not
// know it reads that folder: without this, a new migration file is left out
// of the next build until some Rust file changes (sqlx's documented fix).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
