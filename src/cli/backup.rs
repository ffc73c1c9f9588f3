//! `backup --to FILE`: a consistent copy of the database while the daemon
//! runs. Restoring it is copying it back with the daemon stopped
//! (docs/operations.md, "Backups and restore").

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::Config;

#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// The file to write; it must not exist yet.
    #[arg(long)]
    pub to: PathBuf,
}

/// Copies the configured database to `args.to` and prints where and how big.
pub async fn run(config: Config, args: BackupArgs) -> anyhow::Result<()> {
    if let crate::config::DatabaseUrl::Postgres(_) = config.database_url()? {
        anyhow::bail!(
            "`cancelwatch backup` copies a SQLite database; back up PostgreSQL with pg_dump or the server's own backups"
        );
    }
    let from = config.database_path()?;
    // Opening a missing database would create an empty one, and back that
    // up: a wrong configuration must not pass for a backup.
    anyhow::ensure!(
        from.exists(),
        "no database at {} (database.url): nothing to back up",
        from.display()
    );
    let store = crate::open_store(&config).await?;
    let copied = store.backup(&args.to).await;
    let schema = store.migrations().last().copied().unwrap_or(0);
    store.close().await;
    copied.with_context(|| format!("backing up {}", from.display()))?;
    let size = std::fs::metadata(&args.to)
        .with_context(|| format!("reading the size of {}", args.to.display()))?
        .len();
    println!(
        "backed up {} to {} ({size} bytes, schema version {schema})",
        from.display(),
        args.to.display()
    );
    Ok(())
}
