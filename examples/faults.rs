//! The fault suite driver (README "Fault suite").
//!
//! ```sh
//! cargo run --release --example faults -- --scenario kill --seed 1 --minutes 2
//! cargo run --release --example faults -- --scenario all --seed 7 --minutes 1 --json
//! ```
//! Each scenario runs on a test bed of its own (its own Redis — a cluster of three masters with
//! a replica each for the failovers —, Pub/Sub emulator, simulator,
//! topic and subscription, so one scenario's stranded messages never reach the next): `N`
//! worker processes (this binary re-executed with `--worker`) behind a loopback proxy to the
//! emulator, seeded traffic and the scenario's seeded faults for `--minutes`, then the drain
//! and the checks P1–P6 (`gmail_sync_testbed::faults`). Prints one table row per scenario, and
//! with `--json` the rows (with the details of every violation) as one JSON document. Exits 1
//! if any property was violated.
//!
//! Every process it starts is stopped by PID: workers by the fault driver (SIGTERM, then by
//! their guards), Redis, the emulator and the simulator when the bed drops, and all of them by
//! the test bed's reaper if this process dies.

#[path = "support/mod.rs"]
mod support;

use clap::Parser;
use gmail_sync_testbed::faults::driver::{self, RunOptions, WorkerCommand};
use gmail_sync_testbed::faults::{self, Row, Scenario};
use gmail_sync_testbed::gmail::SimConfig;
use std::time::Duration;
use support::Bed;

#[derive(Parser, Debug)]
#[command(about = "gmail-sync fault suite: workers, faults, and the checks P1-P6")]
struct Args {
    /// A scenario name (kill, stop, term, scale, redis-restart, redis-oom, redis-latency,
    /// pubsub, gmail, gmail-404, notify, stream-cut, redis-failover, redis-master-kill), `mixed`
    /// (all faults drawn at random, but scale and the cluster ones), or `all` (each single
    /// scenario in turn, then mixed)
    #[arg(long, default_value = "mixed")]
    scenario: String,
    /// Seed of the fault schedule and the traffic (a seed reproduces a schedule)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Traffic (and fault) duration per scenario, in minutes (fractions allowed)
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// Worker processes on the subscription
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Mailboxes (every fourth starts just below 2^53)
    #[arg(long, default_value_t = 40)]
    mailboxes: usize,
    /// Changes per second over all mailboxes
    #[arg(long, default_value_t = 40)]
    rate: u32,
    /// Also print the rows as one JSON document
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    support::main(run)
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenarios: Vec<Scenario> = match args.scenario.as_str() {
        "all" => Scenario::SINGLE
            .into_iter()
            .chain([Scenario::Mixed])
            .collect(),
        name => vec![
            Scenario::parse(name).ok_or_else(|| anyhow::anyhow!("unknown scenario {name:?}"))?,
        ],
    };
    anyhow::ensure!(
        args.minutes > 0.0 && args.minutes <= 60.0,
        "--minutes must be in (0, 60]"
    );
    anyhow::ensure!((1..=8).contains(&args.workers), "--workers must be 1 to 8");
    anyhow::ensure!(args.mailboxes >= 1, "--mailboxes must be at least 1");
    let traffic = Duration::from_secs_f64(args.minutes * 60.0);
    let cmd = WorkerCommand {
        exe: std::env::current_exe()?,
        args: vec!["--worker".into()],
    };
    let mut rows: Vec<Row> = Vec::new();
    for scenario in scenarios {
        eprintln!(
            "faults: {} (seed {}, {:.1} min, {} workers)...",
            scenario.name(),
            args.seed,
            args.minutes,
            args.workers
        );
        let label = format!("faults-{}-{}", scenario.name(), args.seed);
        let mut bed = Bed::start_on(&label, SimConfig::default(), scenario.redis()).await?;
        let names = driver::mailbox_names(&format!("{}-", scenario.name()), args.mailboxes);
        driver::prepare(&mut bed, &names);
        bed.add_mailboxes(&names).await?;
        let opts = RunOptions {
            scenario,
            seed: args.seed,
            traffic,
            workers: args.workers,
            rate: args.rate,
        };
        let row = driver::run(&bed, &names, &cmd, &opts).await?;
        for d in row.details.iter().take(10) {
            eprintln!("  {d}");
        }
        if row.resyncs > 0 {
            eprintln!("  {} resyncs listed {} messages", row.resyncs, row.listed);
        }
        eprint!("{}", faults::table(std::slice::from_ref(&row)));
        rows.push(row);
        // The bed (Redis, emulator, simulator) stops here, before the next one starts.
        drop(bed);
    }
    print!("{}", faults::table(&rows));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    let violations: u64 = rows.iter().map(|r| r.violations.total()).sum();
    if violations > 0 {
        eprintln!("faults: {violations} violations");
        std::process::exit(1);
    }
    Ok(())
}
