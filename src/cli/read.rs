//! The read commands: `history`, `transitions`, `alerts`, `events`. Each has a
//! function that renders its output to a `String` (what tests call) and
//! `run` opens the database from the configuration and prints it.

use anyhow::Context;
use clap::{Args, Subcommand};

use super::output::{self, cell, field, Format, OutputArgs, Table};
use crate::store::model::{
    AlertFilter, AlertView as Alert, CancelRequestView as CancelRequest, ChildHistory, EventFilter,
    History, Page, PageRequest, ProgressView as Progress, RefundView as Refund, Resource,
    ResourceHistory, TransitionFilter, TransitionView as Transition, TriggerView, DEFAULT_LIMIT,
};
use crate::store::Store;
use crate::Config;

/// The read commands, as `main.rs` parses them.
#[derive(Subcommand, Debug, Clone)]
pub enum ReadCommand {
    /// One resource's current state and all its transitions (for a bulk transfer, its items too).
    History(HistoryArgs),
    /// Status transitions, newest first.
    Transitions(TransitionsArgs),
    /// Alerts with their delivery state per sink, newest first.
    Alerts(AlertsArgs),
    /// Stored deliveries (the inbox), newest first, without their bodies.
    Events(EventsArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    /// The provider's id of the resource (e.g. `obt_…`, a bulk transfer UUID).
    pub resource_id: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where a listing starts and how long it is.
#[derive(Args, Debug, Clone, Default)]
pub struct PageArgs {
    /// Rows to print (1 to 1000).
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    pub limit: i64,
    /// Continue after a previous listing (its `next_cursor`).
    #[arg(long)]
    pub cursor: Option<String>,
}

impl PageArgs {
    fn request(&self) -> PageRequest {
        PageRequest {
            limit: Some(self.limit),
            cursor: self.cursor.clone(),
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct TransitionsArgs {
    /// `stripe` or `juice`.
    #[arg(long)]
    pub provider: Option<String>,
    /// e.g. `stripe.outbound_transfer`, `juice.transfer`.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only transitions to this status.
    #[arg(long = "to")]
    pub to_status: Option<String>,
    /// Observed at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Observed before this RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this resource's transitions.
    #[arg(long = "resource")]
    pub resource_id: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct AlertsArgs {
    /// The rule, e.g. `partial_cancellation`.
    #[arg(long = "type")]
    pub rule: Option<String>,
    /// Raised or updated at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// `open` or `resolved`.
    #[arg(long)]
    pub state: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct EventsArgs {
    /// pending, processing, processed, ignored, failed or dead.
    #[arg(long)]
    pub state: Option<String>,
    /// `stripe` or `juice`.
    #[arg(long)]
    pub provider: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Opens the configured database, runs the command, prints its output.
pub async fn run(config: Config, command: ReadCommand) -> anyhow::Result<()> {
    let store = crate::open_store_read_only(&config).await?;
    let rendered = render(&store, &command).await;
    store.close().await;
    print!("{}", rendered?);
    Ok(())
}

/// The output of one read command.
pub async fn render(store: &Store, command: &ReadCommand) -> anyhow::Result<String> {
    match command {
        ReadCommand::History(a) => history(store, a).await,
        ReadCommand::Transitions(a) => transitions(store, a).await,
        ReadCommand::Alerts(a) => alerts(store, a).await,
        ReadCommand::Events(a) => events(store, a).await,
    }
}

/// `history <resource-id>`; an error when no resource has that id.
pub async fn history(store: &Store, args: &HistoryArgs) -> anyhow::Result<String> {
    let history = store
        .history(&args.resource_id)
        .await
        .context("reading the history")?
        .ok_or_else(|| anyhow::anyhow!("no resource with id {:?} is recorded", args.resource_id))?;
    match args.output.format() {
        Format::Json => output::json(&history),
        Format::Csv => Ok(history_csv(&history)),
        Format::Table => {
            let mut out = String::new();
            for (i, r) in history.resources.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str(&resource_history_text(r));
            }
            Ok(out)
        }
    }
}

/// Every transition of a history, the resources' and their items', as CSV.
fn history_csv(history: &History) -> String {
    let mut t = transitions_csv_table();
    for r in &history.resources {
        for tr in &r.transitions {
            push_transition_csv(&mut t, tr);
        }
        for c in &r.children {
            for tr in &c.transitions {
                push_transition_csv(&mut t, tr);
            }
        }
    }
    t.csv()
}

/// One resource's history as tables: its state, transitions, progress,
/// refunds (its items' too), alerts, cancel requests and items.
fn resource_history_text(r: &ResourceHistory) -> String {
    let mut out = String::new();
    out.push_str(&facts_table(&r.resource).render());

    out.push_str("\nTRANSITIONS\n");
    out.push_str(&own_transitions_table(&r.transitions).render());
    if !r.progress.is_empty() {
        out.push_str("\nPROGRESS\n");
        out.push_str(&progress_table(&r.progress).render());
    }
    let mut refunds: Vec<&Refund> = r.refunds.iter().collect();
    refunds.extend(r.children.iter().flat_map(|c| &c.refunds));
    out.push_str("\nREFUNDS\n");
    out.push_str(&refunds_table(&refunds).render());
    out.push_str("\nALERTS\n");
    out.push_str(&alerts_table(&r.alerts).render());
    if !r.cancel_requests.is_empty() {
        out.push_str("\nCANCEL REQUESTS\n");
        out.push_str(&cancel_requests_table(&r.cancel_requests).render());
    }
    if !r.children.is_empty() {
        out.push_str(&items_text(&r.children));
    }
    out
}

/// A resource's current state, one field a row.
fn facts_table(res: &Resource) -> Table {
    let mut facts = Table::new(&["FIELD", "VALUE"]);
    let status = match (&res.status, res.terminal) {
        (Some(s), true) => format!("{s} (terminal)"),
        (Some(s), false) => s.clone(),
        (None, _) => "- (not fetched yet)".into(),
    };
    let amount = amount_cell(res.amount, res.currency.as_deref());
    for (k, v) in [
        ("resource", format!("{} {}", res.kind, res.id)),
        ("status", status),
        ("status since", cell(res.status_since.as_deref())),
        ("amount", amount),
        ("parent", cell(res.parent_id.as_deref())),
        ("livemode", cell(res.livemode.map(bool_text))),
        ("first seen", res.first_seen_at.clone()),
        ("last observed", cell(res.last_observed_at.as_deref())),
        ("provider updated", cell(res.provider_updated_at.as_deref())),
        ("cancel requested", cell(res.cancel_requested_at.as_deref())),
        ("not found", bool_text(res.not_found).to_string()),
    ] {
        facts.push(vec![k.to_string(), v]);
    }
    facts
}

/// A batch job's progress counts, one observation a row.
fn progress_table(progress: &[Progress]) -> Table {
    let mut t = Table::new(&[
        "OBSERVED_AT",
        "STATUS",
        "SUCCESS",
        "FAILURE",
        "VALIDATED",
        "TRIGGER",
    ]);
    for p in progress {
        t.push(vec![
            p.observed_at.clone(),
            p.status.clone(),
            cell(p.success_count.map(|n| n.to_string()).as_deref()),
            cell(p.failure_count.map(|n| n.to_string()).as_deref()),
            cell(p.validated_count.map(|n| n.to_string()).as_deref()),
            trigger_text(&p.trigger),
        ]);
    }
    t
}

/// The cancels issued through cancelwatch, with the provider's answers.
fn cancel_requests_table(requests: &[CancelRequest]) -> Table {
    let mut t = Table::new(&[
        "REQUESTED_AT",
        "BY",
        "HTTP",
        "OUTCOME",
        "ERROR_CODE",
        "ANSWERED_AT",
    ]);
    for c in requests {
        t.push(vec![
            c.requested_at.clone(),
            c.requested_by.clone(),
            cell(c.http_status.map(|s| s.to_string()).as_deref()),
            cell(c.outcome.as_deref()),
            cell(c.error_code.as_deref()),
            cell(c.answered_at.as_deref()),
        ]);
    }
    t
}

/// A bulk transfer's items: one row each, then all their transitions.
fn items_text(children: &[ChildHistory]) -> String {
    let mut items = Table::new(&["ITEM", "STATUS", "AMOUNT", "REFUND", "LAST_OBSERVED"]);
    let mut item_transitions = Table::new(&["OBSERVED_AT", "ITEM", "FROM", "TO", "TRIGGER"]);
    for c in children {
        let res = &c.resource;
        items.push(vec![
            res.id.clone(),
            cell(res.status.as_deref()),
            amount_cell(res.amount, res.currency.as_deref()),
            cell(c.refunds.last().map(|f| f.status.as_str())),
            cell(res.last_observed_at.as_deref()),
        ]);
        for t in &c.transitions {
            item_transitions.push(vec![
                t.observed_at.clone(),
                t.resource_id.clone(),
                cell(t.from_status.as_deref()),
                t.to_status.clone(),
                trigger_text(&t.trigger),
            ]);
        }
    }
    let mut out = format!("\nITEMS ({})\n", children.len());
    out.push_str(&items.render());
    out.push_str("\nITEM TRANSITIONS\n");
    out.push_str(&item_transitions.render());
    out
}

/// `transitions [--provider P] [--kind K] [--to STATUS] [--since T] [--until T] [--limit N]`.
pub async fn transitions(store: &Store, args: &TransitionsArgs) -> anyhow::Result<String> {
    let filter = TransitionFilter {
        provider: args.provider.clone(),
        kind: args.kind.clone(),
        to_status: args.to_status.clone(),
        since: args.since.clone(),
        until: args.until.clone(),
        resource_id: args.resource_id.clone(),
    };
    let page = store.transitions(&filter, &args.page.request()).await?;
    match args.output.format() {
        Format::Json => output::json(&page),
        Format::Csv => {
            let mut t = transitions_csv_table();
            for tr in &page.data {
                push_transition_csv(&mut t, tr);
            }
            Ok(t.csv())
        }
        Format::Table => {
            let mut t = Table::new(&[
                "ID",
                "OBSERVED_AT",
                "PROVIDER",
                "KIND",
                "RESOURCE",
                "FROM",
                "TO",
                "TRIGGER",
            ]);
            for tr in &page.data {
                t.push(vec![
                    tr.id.to_string(),
                    tr.observed_at.clone(),
                    tr.provider.clone(),
                    tr.kind.clone(),
                    tr.resource_id.clone(),
                    cell(tr.from_status.as_deref()),
                    tr.to_status.clone(),
                    trigger_text(&tr.trigger),
                ]);
            }
            Ok(with_more(t.render(), &page))
        }
    }
}

/// `alerts [--type T] [--since T] [--state S]`.
pub async fn alerts(store: &Store, args: &AlertsArgs) -> anyhow::Result<String> {
    let filter = AlertFilter {
        rule: args.rule.clone(),
        since: args.since.clone(),
        state: args.state.clone(),
    };
    let page = store.alerts(&filter, &args.page.request()).await?;
    match args.output.format() {
        Format::Json => output::json(&page),
        Format::Csv => {
            let mut t = Table::new(&[
                "id",
                "type",
                "severity",
                "state",
                "provider",
                "kind",
                "resource_id",
                "summary",
                "version",
                "created_at",
                "updated_at",
                "resolved_at",
                "deliveries",
            ]);
            for a in &page.data {
                t.push(vec![
                    a.id.clone(),
                    a.rule.clone(),
                    a.severity.clone(),
                    a.state.clone(),
                    a.resource.provider.clone(),
                    a.resource.kind.clone(),
                    a.resource.id.clone(),
                    a.summary.clone(),
                    a.version.to_string(),
                    a.created_at.clone(),
                    a.updated_at.clone(),
                    field(a.resolved_at.as_deref()),
                    deliveries_text(a),
                ]);
            }
            Ok(t.csv())
        }
        Format::Table => Ok(with_more(alerts_table(&page.data).render(), &page)),
    }
}

/// `events [--state S] [--provider P] [--limit N]`.
pub async fn events(store: &Store, args: &EventsArgs) -> anyhow::Result<String> {
    let filter = EventFilter {
        state: args.state.clone(),
        provider: args.provider.clone(),
    };
    let page = store.events(&filter, &args.page.request()).await?;
    match args.output.format() {
        Format::Json => output::json(&page),
        Format::Csv => {
            let mut t = Table::new(&[
                "id",
                "provider",
                "key",
                "event_type",
                "event_id",
                "resource_kind",
                "resource_id",
                "state",
                "attempts",
                "received_at",
                "processed_at",
                "next_attempt_at",
                "last_error",
                "body_size",
                "body_kept",
                "source",
            ]);
            for e in &page.data {
                t.push(vec![
                    e.id.to_string(),
                    e.provider.clone(),
                    e.key.clone(),
                    e.event_type.clone(),
                    field(e.event_id.as_deref()),
                    field(e.resource_kind.as_deref()),
                    field(e.resource_id.as_deref()),
                    e.state.clone(),
                    e.attempts.to_string(),
                    e.received_at.clone(),
                    field(e.processed_at.as_deref()),
                    e.next_attempt_at.clone(),
                    field(e.last_error.as_deref()),
                    e.body_size.to_string(),
                    bool_text(e.body_kept).to_string(),
                    e.source.clone(),
                ]);
            }
            Ok(t.csv())
        }
        Format::Table => {
            let mut t = Table::new(&[
                "ID",
                "RECEIVED_AT",
                "PROVIDER",
                "TYPE",
                "RESOURCE",
                "STATE",
                "ATTEMPTS",
                "KEY",
                "LAST_ERROR",
            ]);
            for e in &page.data {
                t.push(vec![
                    e.id.to_string(),
                    e.received_at.clone(),
                    e.provider.clone(),
                    e.event_type.clone(),
                    cell(e.resource_id.as_deref()),
                    e.state.clone(),
                    e.attempts.to_string(),
                    e.key.clone(),
                    cell(e.last_error.as_deref()),
                ]);
            }
            Ok(with_more(t.render(), &page))
        }
    }
}

fn bool_text(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

fn trigger_text(t: &TriggerView) -> String {
    match &t.id {
        Some(id) => format!("{} {id}", t.kind),
        None => t.kind.clone(),
    }
}

fn with_more<T>(mut table: String, page: &Page<T>) -> String {
    if let Some(c) = &page.next_cursor {
        table.push_str(&format!("(more: --cursor {c})\n"));
    }
    table
}

fn own_transitions_table(transitions: &[Transition]) -> Table {
    let mut t = Table::new(&["OBSERVED_AT", "FROM", "TO", "PROVIDER_AT", "TRIGGER"]);
    for tr in transitions {
        t.push(vec![
            tr.observed_at.clone(),
            cell(tr.from_status.as_deref()),
            tr.to_status.clone(),
            cell(tr.provider_at.as_deref()),
            trigger_text(&tr.trigger),
        ]);
    }
    t
}

fn refunds_table(refunds: &[&Refund]) -> Table {
    let mut t = Table::new(&[
        "RESOURCE",
        "STATUS",
        "REASON",
        "AMOUNT",
        "OPENED_AT",
        "COMPLETED_AT",
    ]);
    for r in refunds {
        t.push(vec![
            r.resource_id.clone(),
            r.status.clone(),
            r.reason.clone(),
            amount_text(r),
            r.opened_at.clone(),
            cell(r.completed_at.as_deref()),
        ]);
    }
    t
}

/// A refund's amount, with the transfer's own beside it when they differ.
fn amount_text(r: &Refund) -> String {
    let money =
        |amount: Option<i64>, currency: &Option<String>| amount_cell(amount, currency.as_deref());
    let refunded = money(r.amount, &r.currency);
    match r.presentment_amount {
        Some(_) => format!(
            "{refunded} (presented {})",
            money(r.presentment_amount, &r.presentment_currency)
        ),
        None => refunded,
    }
}

fn deliveries_text(a: &Alert) -> String {
    a.deliveries
        .iter()
        .map(|d| match d.state.as_str() {
            "delivered" => format!("{}:delivered", d.sink),
            s => format!("{}:{s}({} attempts)", d.sink, d.attempts),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn alerts_table(alerts: &[Alert]) -> Table {
    let mut t = Table::new(&[
        "CREATED_AT",
        "TYPE",
        "SEVERITY",
        "STATE",
        "RESOURCE",
        "SUMMARY",
        "DELIVERIES",
    ]);
    for a in alerts {
        t.push(vec![
            a.created_at.clone(),
            a.rule.clone(),
            a.severity.clone(),
            a.state.clone(),
            format!("{} {}", a.resource.kind, a.resource.id),
            a.summary.clone(),
            cell(Some(deliveries_text(a).as_str()).filter(|s| !s.is_empty())),
        ]);
    }
    t
}

fn transitions_csv_table() -> Table {
    Table::new(&[
        "id",
        "provider",
        "kind",
        "resource_id",
        "parent_id",
        "from_status",
        "to_status",
        "observed_at",
        "provider_at",
        "trigger_type",
        "trigger_id",
        "livemode",
    ])
}

fn push_transition_csv(t: &mut Table, tr: &Transition) {
    t.push(vec![
        tr.id.to_string(),
        tr.provider.clone(),
        tr.kind.clone(),
        tr.resource_id.clone(),
        field(tr.parent_id.as_deref()),
        field(tr.from_status.as_deref()),
        tr.to_status.clone(),
        tr.observed_at.clone(),
        field(tr.provider_at.as_deref()),
        tr.trigger.kind.clone(),
        field(tr.trigger.id.as_deref()),
        field(tr.livemode.map(bool_text)),
    ]);
}

/// An amount with its currency (`unknown` when the provider gave none); `-`
/// without an amount.
fn amount_cell(amount: Option<i64>, currency: Option<&str>) -> String {
    amount.map_or_else(|| "-".into(), |a| crate::domain::alerts::money(a, currency))
}
