//! Command line: the worker and the admin subcommands (run them with `kubectl exec` or as a
//! Job; there is no HTTP admin port). Configuration comes only from the environment.
//!
//! Exit codes (README, "Exit codes"): 0 ok; 1 failed (a mailbox command failed for at least
//! one mailbox, `keys rotate` could not reseal some credential, a probe is unhealthy, the worker
//! could not start); 2 usage or configuration (including a bad token key file, Gmail
//! credentials that do not work, any failed `check-config` check); 3 the worker stopped because
//! one of its tasks ended.

mod check;
pub(crate) mod credential;
mod keys;
mod mailbox;

use crate::config::{Config, help_table};
use crate::telemetry::{Counters, LogTarget};
use clap::{Args, Parser, Subcommand};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The shape of the runtime [`runtime`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeShape {
    /// Every task on the calling thread (tokio's current-thread runtime); blocking work (file
    /// writes, DNS) still goes to tokio's blocking pool.
    CurrentThread,
    /// tokio's multi-threaded runtime with this many worker threads.
    Workers(usize),
}

/// What `gmail-sync` runs on. One thread: the work per notification is a few microseconds of
/// decoding and bookkeeping between network waits, and on a multi-threaded runtime a large share
/// of the worker's CPU went into worker threads parking and waking each other (futex calls and
/// context switches) to pass that work around; on one thread there is nobody to wake (the
/// benchmark's figures are in the commit that chose it, and README's table). One thread
/// needs a fraction of a core at 1,000 notifications/s; more throughput comes from more
/// replicas, which share the subscription and the leases.
pub const RUNTIME_SHAPE: RuntimeShape = RuntimeShape::CurrentThread;

/// Builds the runtime every command runs on (see [`RUNTIME_SHAPE`]).
pub fn runtime(shape: RuntimeShape) -> std::io::Result<tokio::runtime::Runtime> {
    match shape {
        RuntimeShape::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        RuntimeShape::Workers(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n.max(1));
            builder
        }
    }
    .enable_all()
    .build()
}

#[derive(Parser, Debug)]
#[command(
    name = "gmail-sync",
    version,
    about = "Keeps Gmail mailboxes in sync through Gmail push notifications (Pub/Sub StreamingPull → history sync → Redis).",
    after_help = help_table()
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the worker until SIGTERM/SIGINT.
    Run,
    /// Manage mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Manage the keys that seal stored refresh tokens.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Exec probe: exit 0 if the worker in this pod is alive (--live) or ready (--ready).
    Health(HealthArgs),
    /// Print the effective configuration (secrets redacted) and run the startup checks: Redis,
    /// the Pub/Sub subscription, the Gmail credentials. Exit 2 if a check fails.
    CheckConfig(CheckConfigArgs),
}

pub use keys::KeysCommand;
pub use mailbox::MailboxCommand;

#[derive(Args, Debug)]
pub struct CheckConfigArgs {
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    pub which: HealthProbe,
    /// A heartbeat older than this many seconds fails either probe (the worker's loops
    /// stopped turning). At least 10: an idle worker beats every 5 s.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = crate::health::MAX_HEARTBEAT_AGE.as_secs(),
        value_parser = clap::value_parser!(u64).range(crate::health::MIN_HEARTBEAT_AGE.as_secs()..=3600)
    )]
    pub max_heartbeat_age: u64,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct HealthProbe {
    /// Alive: the worker's loops made progress within the heartbeat age.
    #[arg(long)]
    pub live: bool,
    /// Ready: alive, the Pub/Sub stream open, Redis answering, no mass failure, not stopping.
    #[arg(long)]
    pub ready: bool,
}

/// Runs a parsed command; returns the process exit code.
pub async fn execute(cli: Cli) -> i32 {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gmail-sync: {e}");
            eprintln!("(run `gmail-sync --help` for the list of environment variables)");
            return 2;
        }
    };
    match cli.command {
        Command::Health(args) => {
            let max_age = std::time::Duration::from_secs(args.max_heartbeat_age);
            match crate::health::Health::new(&config.health_dir).probe(args.which.ready, max_age) {
                Ok(()) => 0,
                Err(why) => {
                    eprintln!("unhealthy: {why}");
                    1
                }
            }
        }
        Command::CheckConfig(args) => {
            crate::telemetry::init_logging(LogTarget::Stderr);
            check::execute(&config, args.json).await
        }
        Command::Run => {
            // The token key files are read at startup, so a bad one stops it naming its
            // variable (exit 2) rather than failing each mailbox later.
            if let Err(e) = crate::vault::Vault::from_config(&config.token_keys) {
                eprintln!("gmail-sync: {e}");
                return 2;
            }
            crate::telemetry::init_logging(LogTarget::Stdout);
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            match crate::app::run(config, shutdown, Arc::new(Counters::default())).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "gmail-sync stopped on an error");
                    e.exit_code()
                }
            }
        }
        Command::Mailbox(command) => {
            crate::telemetry::init_logging(LogTarget::Stderr);
            mailbox::execute(&config, command).await
        }
        Command::Keys(command) => {
            crate::telemetry::init_logging(LogTarget::Stderr);
            keys::execute(&config, command).await
        }
    }
}

/// SIGTERM (Kubernetes) and SIGINT (Ctrl-C) both start a graceful shutdown; a second signal
/// is not special-cased: the drain is already bounded by GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
}
