//! `cancelwatch sign`: prints what a provider would send with a body, so a
//! newcomer can post a signed test delivery with curl.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use crate::providers::{juice, stripe};
use crate::Config;

#[derive(Clone, Copy, ValueEnum)]
pub enum SignProvider {
    Stripe,
    Juice,
}

#[derive(Args)]
pub struct SignArgs {
    /// Which provider's scheme.
    #[arg(value_enum)]
    provider: SignProvider,
    /// The body to sign (`-` for stdin).
    #[arg(long, default_value = "-")]
    body: PathBuf,
    /// Secret (Stripe webhook secret or Juice business id). Default: the first configured one.
    #[arg(long, env = "CANCELWATCH_SIGN_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Stripe: the timestamp to sign with (default: now).
    #[arg(long)]
    timestamp: Option<i64>,
}

pub fn run(config: &Config, args: SignArgs) -> anyhow::Result<()> {
    let mut body = Vec::new();
    if args.body.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut body)
            .context("reading the body from stdin")?;
    } else {
        body = std::fs::read(&args.body)
            .with_context(|| format!("reading {}", args.body.display()))?;
    }
    match args.provider {
        SignProvider::Stripe => {
            let secret = args
                .secret
                .or_else(|| config.stripe.webhook_secrets.first().cloned())
                .context("no secret: pass --secret or configure stripe.webhook_secrets")?;
            let t = args
                .timestamp
                .unwrap_or_else(|| chrono::Utc::now().timestamp());
            println!("{}", stripe::signature::sign_header(&secret, t, &body));
        }
        SignProvider::Juice => {
            let key = args
                .secret
                .or_else(|| config.juice.checksum_keys.first().cloned())
                .context("no key: pass --secret or configure juice.checksum_keys")?;
            let value: serde_json::Value = serde_json::from_slice(&body)
                .context("the Juice body must be JSON with `event` and `data`")?;
            let (Some(event), Some(data)) = (
                value.get("event").and_then(|e| e.as_str()),
                value.get("data"),
            ) else {
                bail!("the Juice body must be an object with `event` (string) and `data`");
            };
            println!("{}", juice::checksum::sign(&key, event, data));
        }
    }
    Ok(())
}
