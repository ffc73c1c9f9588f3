//! The action commands: `replay <event-key>` and `cancel <kind> <id>`. Each
//! has a function that renders its outcome to a `String` (what tests call);
//! `run_*` opens the database and provider clients from the configuration.

use clap::Args;

use super::output::{self, Table};
use crate::pipeline::{self, cancel, Context};
use crate::Config;

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The stored delivery's key (`events` lists it): a Stripe event id, or
    /// `<juice event>:<checksum>`.
    pub event_key: String,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct CancelArgs {
    /// stripe.outbound_transfer, stripe.batch_job or juice.bulk_transfer.
    pub kind: String,
    /// The provider's id of the resource.
    pub id: String,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Processes a stored delivery again, here and now.
pub async fn replay(ctx: &Context, args: &ReplayArgs) -> anyhow::Result<String> {
    let report = pipeline::replay(ctx, &args.event_key, true).await?;
    if args.json {
        return output::json(&report);
    }
    let mut out = format!(
        "replayed {}: {} -> {}\n",
        report.key, report.previous_state, report.state
    );
    if !report.processed_inline {
        out.push_str("(being processed by a running daemon right now)\n");
    }
    Ok(out)
}

/// Cancels a resource at its provider, records the answer and the state
/// after it, and renders the report.
pub async fn cancel(ctx: &Context, args: &CancelArgs) -> anyhow::Result<String> {
    render_cancel(&cancel_report(ctx, args).await?, args.json)
}

async fn cancel_report(ctx: &Context, args: &CancelArgs) -> anyhow::Result<cancel::CancelReport> {
    Ok(cancel::request(ctx, &args.kind, &args.id, "cli").await?)
}

/// A cancel's report as a table, or one JSON document.
fn render_cancel(report: &cancel::CancelReport, json: bool) -> anyhow::Result<String> {
    if json {
        return output::json(report);
    }
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("resource", format!("{} {}", report.kind, report.id)),
        ("outcome", report.outcome.clone()),
        (
            "http status",
            output::cell(report.http_status.map(|s| s.to_string()).as_deref()),
        ),
        ("error code", output::cell(report.error_code.as_deref())),
        ("status now", output::cell(report.status.as_deref())),
        ("fetch error", output::cell(report.fetch_error.as_deref())),
        ("effect", output::cell(report.effect.as_deref())),
        ("idempotency key", report.idempotency_key.clone()),
        ("request id", report.request_id.to_string()),
    ] {
        t.push(vec![k.to_string(), v]);
    }
    Ok(t.render())
}

/// `replay`: opens the configured database and providers, replays, prints.
pub async fn run_replay(config: Config, args: ReplayArgs) -> anyhow::Result<()> {
    let ctx = Context::open(config).await?;
    let result = replay(&ctx, &args).await;
    ctx.store.close().await;
    print!("{}", result?);
    Ok(())
}

/// `cancel`: opens the configured database and providers, cancels, prints,
/// and exits with the code of the outcome ([`exit_code`]), so that
/// `cancelwatch cancel … && next-step` goes on only after a cancel that
/// took effect.
pub async fn run_cancel(config: Config, args: CancelArgs) -> anyhow::Result<u8> {
    let ctx = Context::open(config).await?;
    let timeout = ctx.config.workers.fetch_timeout_secs;
    let what = format!(
        "waiting for the provider to answer the cancel of {} {} (each call gives up after {timeout} s)",
        args.kind, args.id
    );
    // On a terminal a spinner says it from the start; elsewhere a line
    // says it once the wait is long, and again every ten seconds.
    let progress = super::progress::Progress::start(what.clone());
    let result = if progress.is_shown() {
        cancel_report(&ctx, &args).await
    } else {
        while_waiting(cancel_report(&ctx, &args), &what).await
    };
    drop(progress);
    ctx.store.close().await;
    let report = result?;
    print!("{}", render_cancel(&report, args.json)?);
    Ok(exit_code(&report.outcome))
}

/// The exit code of a cancel, by its outcome (docs/operations.md lists them):
/// 0 when it took effect or had already, otherwise one code per reason.
pub fn exit_code(outcome: &str) -> u8 {
    match outcome {
        "accepted" | "already_cancelled" => 0,
        "partial_cancellation" => 3,
        "not_cancellable" => 4,
        "not_found" => 5,
        "idempotency_conflict" => 6,
        "unknown" => 7,
        // `error`: the provider could not be reached, or answered with an error.
        _ => 8,
    }
}

/// Runs `work`, telling stderr what it waits for once it has taken longer
/// than a moment (a slow provider), and again every ten seconds.
async fn while_waiting<T>(work: impl std::future::Future<Output = T>, what: &str) -> T {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(10),
    );
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => eprintln!("cancelwatch: {what}"),
        }
    }
}
