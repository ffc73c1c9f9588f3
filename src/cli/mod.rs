//! Command implementations behind `src/main.rs`.

pub mod actions;
pub mod backfill;
pub mod backup;
pub mod demo;
pub mod output;
pub mod prune;
pub mod read;
pub mod sign;
pub mod simulate;

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

pub async fn migrate(config: Config) -> anyhow::Result<()> {
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

pub fn check_config(config: &Config) -> anyhow::Result<()> {
    let shown =
        toml::to_string_pretty(&config.redacted()).context("rendering the configuration")?;
    println!("# effective configuration (secrets redacted)");
    println!("{shown}");
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
