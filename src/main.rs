//! The command line: parse, load configuration, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use cancelwatch::Config;

/// mimalloc rather than glibc's malloc: hyper takes a fresh 8 KiB read
/// buffer for each request, and glibc consolidates its fast bins before each
/// such allocation, which made malloc and free a large share of the
/// daemon's CPU (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (its place in mimalloc's `mi_option_e`;
/// libmimalloc-sys names no constant for it). `MIMALLOC_VERBOSE=1
/// cancelwatch check-config` prints each option by name with its value.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed in whole pages goes back to the OS at once, not a second
/// later (mimalloc's default): under full load the daemon otherwise holds
/// each thread's freed pages on top of what it uses, which raises peak RSS
/// by several MiB. Called first thing, on one thread.
fn return_freed_memory_at_once() {
    // SAFETY: no other thread runs yet (the option setter is not thread safe).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

#[derive(Parser)]
#[command(
    name = "cancelwatch",
    version = cancelwatch::VERSION,
    about = "Follows payment cancellations to their end and keeps the audit trail"
)]
struct Cli {
    /// Configuration file (default: config/cancelwatch.toml when present).
    #[arg(long, global = true, env = "CANCELWATCH_CONFIG")]
    config: Option<PathBuf>,
    /// More log lines on stderr from a command (-v info, -vv debug);
    /// `serve` and `demo` log as `log.level` says. RUST_LOG overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Errors only on stderr from a command.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (applies migrations first).
    Serve,
    /// Start the daemon with the provider simulator, play every scenario, print what was recorded, keep serving.
    Demo,
    /// Apply migrations and exit; with --from and --to, copy a SQLite database into a new PostgreSQL one.
    Migrate(cancelwatch::cli::MigrateArgs),
    /// Copy the database, consistent, while the daemon runs (to a file that must not exist).
    Backup(cancelwatch::cli::backup::BackupArgs),
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Print a signature for a test delivery (Stripe-Signature header, or Juice checksum).
    Sign(cancelwatch::cli::sign::SignArgs),
    #[command(flatten)]
    Read(cancelwatch::cli::read::ReadCommand),
    /// Drop raw bodies of finished deliveries and old refusal records.
    Prune(cancelwatch::cli::prune::PruneArgs),
    /// Process a stored delivery again.
    Replay(cancelwatch::cli::actions::ReplayArgs),
    /// Cancel a resource at its provider and record the answer and the state after it.
    Cancel(cancelwatch::cli::actions::CancelArgs),
    /// List a provider's events since a time and take in the ones missing.
    Backfill(cancelwatch::cli::backfill::BackfillArgs),
    /// Serve simulated Stripe and Juice APIs and play cancel scenarios against a daemon.
    Simulate(cancelwatch::cli::simulate::SimulateArgs),
    /// Print a shell's completion script for cancelwatch (e.g. `cancelwatch completions bash > /etc/bash_completion.d/cancelwatch`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, cancelwatch(1), in roff (`cancelwatch man | man -l -`).
    Man {
        /// Write cancelwatch.1 and a page per subcommand (cancelwatch-serve.1, …) into this folder instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    let cli = Cli::parse();
    // Both describe the command line only: no configuration is read.
    match cli.command {
        Command::Completions { shell } => return completions(shell),
        Command::Man { dir } => return man(dir),
        _ => {}
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cancelwatch: {e}");
            return ExitCode::from(2);
        }
    };
    if !matches!(cli.command, Command::Serve | Command::Demo) {
        let level = match (cli.quiet, cli.verbose) {
            (true, _) => "error",
            (false, 0) => "warn",
            (false, 1) => "info",
            _ => "debug",
        };
        cancelwatch::init_logging(&cancelwatch::config::LogConfig {
            level: level.into(),
            ..config.log.clone()
        });
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cancelwatch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let done = |r: anyhow::Result<()>| r.map(|()| 0u8);
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => done(cancelwatch::cli::serve(config).await),
            Command::Demo => done(cancelwatch::cli::demo::run(config).await),
            Command::Migrate(args) => done(cancelwatch::cli::migrate(config, args).await),
            Command::Backup(args) => done(cancelwatch::cli::backup::run(config, args).await),
            Command::CheckConfig => done(cancelwatch::cli::check_config(&config)),
            Command::Sign(args) => done(cancelwatch::cli::sign::run(&config, args)),
            Command::Read(command) => done(cancelwatch::cli::read::run(config, command).await),
            Command::Prune(args) => done(cancelwatch::cli::prune::run(config, args).await),
            Command::Replay(args) => {
                done(cancelwatch::cli::actions::run_replay(config, args).await)
            }
            Command::Cancel(args) => cancelwatch::cli::actions::run_cancel(config, args).await,
            Command::Backfill(args) => done(cancelwatch::cli::backfill::run(config, args).await),
            Command::Simulate(args) => done(cancelwatch::cli::simulate::run(&config, args).await),
            Command::Completions { .. } | Command::Man { .. } => unreachable!("answered before"),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cancelwatch: {}", cancelwatch::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The completion script of `shell` on stdout. (`clap_complete::generate`
/// would panic on a closed pipe, `… | head`; this says so and fails.)
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap_complete::Generator;
    let mut cli = Cli::command();
    cli.set_bin_name("cancelwatch");
    cli.build();
    match shell.try_generate(&cli, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cancelwatch: writing the completion script: {e}");
            ExitCode::FAILURE
        }
    }
}

/// cancelwatch(1) on stdout, or with `dir` that page and one per
/// subcommand (cancelwatch-serve(1), …) written there; from the same
/// definitions as `--help`, so the pages cannot fall behind.
fn man(dir: Option<PathBuf>) -> ExitCode {
    let written = match dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), &dir),
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cancelwatch: writing the manual pages: {e}");
            ExitCode::FAILURE
        }
    }
}
