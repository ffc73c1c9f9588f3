//! Command implementations behind `src/main.rs`.

pub mod actions;
pub mod backfill;
pub mod backup;
pub mod demo;
pub mod output;
pub mod progress;
pub mod prune;
pub mod read;
pub mod sign;
pub mod simulate;

use std::path::Path;

use anyhow::Context;

use crate::Config;

pub async fn serve(config: Config) -> anyhow::Result<()> {
    crate::init_logging(&config.log);
    let addr = config.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("server.listen: cannot listen on {addr}"))?;
    crate::run(config, listener).await
}

/// `migrate`: the configured database brought to this binary's schema;
/// or, with `--from` and `--to`, a SQLite database copied into a new
/// PostgreSQL one.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The SQLite database to copy from (sqlite://path); stop the daemon first.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// The empty PostgreSQL database to copy into (postgres://…).
    #[arg(long, requires = "from")]
    pub to: Option<String>,
}

pub async fn migrate(config: Config, args: MigrateArgs) -> anyhow::Result<()> {
    if let (Some(from), Some(to)) = (&args.from, &args.to) {
        return copy(&config, from, to).await;
    }
    let store = crate::open_store(&config).await?;
    let applied = store.migrations();
    store.close().await;
    println!(
        "database {} is at schema version {}",
        config.database_display(),
        applied.last().copied().unwrap_or(0)
    );
    Ok(())
}

/// `migrate --from sqlite://… --to postgres://…`.
async fn copy(config: &Config, from: &str, to: &str) -> anyhow::Result<()> {
    use crate::config::DatabaseUrl;
    let engine_of = |url: &str| {
        let mut c = config.clone();
        c.database.url = url.to_string();
        c.database_url()
    };
    let (DatabaseUrl::Sqlite(path), DatabaseUrl::Postgres(target)) =
        (engine_of(from)?, engine_of(to)?)
    else {
        anyhow::bail!("--from must be a sqlite:// URL and --to a postgres:// one");
    };
    let shown = crate::config::redact_password(&target);
    let copied = crate::store::copy::sqlite_to_postgres(&path, &target, &config.database)
        .await
        .with_context(|| format!("copying {} into {shown}", path.display()))?;
    for (table, rows) in &copied {
        println!("{table:<17} {rows} rows");
    }
    println!(
        "copied {} into {shown}: set database.url to it and start the daemon",
        path.display()
    );
    Ok(())
}

/// `path` made absolute against the working directory (as it stands).
fn absolute(path: &Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

pub fn check_config(config: &Config) -> anyhow::Result<()> {
    let shown =
        toml::to_string_pretty(&config.redacted()).context("rendering the configuration")?;
    println!("# effective configuration (secrets redacted)");
    println!("{shown}");
    // The files the daemon will use, spelled out: relative paths in the
    // file are relative to its folder, which the value above already says;
    // these say it whatever the working directory.
    if let Ok(path) = config.database_path() {
        println!("# database: {}", absolute(&path).display());
    }
    for (i, sink) in config.alerts.sinks.iter().enumerate() {
        if let Some(program) = sink.command.first().filter(|_| sink.kind == "command") {
            let name = config.sink_name(i);
            let program = Path::new(program);
            if program.components().count() > 1 {
                println!("# sink {name} runs: {}", absolute(program).display());
            } else {
                println!(
                    "# sink {name} runs: {} (looked up on PATH)",
                    program.display()
                );
            }
        }
    }
    for provider in crate::providers::knowledge::all() {
        let name = provider.name();
        let (what, enabled) = provider.webhook_secrets(config);
        if enabled {
            println!("# {name}: mounted at POST /webhooks/{name}");
        } else {
            println!("# {name}: NOT mounted ({what} is empty): /webhooks/{name} answers 404");
        }
    }
    if config.server.admin_token.is_empty() {
        println!("# /v1 API: off (server.admin_token is empty)");
    }
    println!("# configuration is valid");
    Ok(())
}
