//! `gmail-sim`: the Gmail API simulator as a standalone server (demo, benchmarks, manual tests).
//! Control it through its JSON API under `/_sim/...` (see `gmail_sync_testbed::gmail::control`).

use gmail_sync_testbed::gmail::{GmailSim, QuotaConfig, QuotaErrorStyle, SimConfig};
use std::time::Duration;

const HELP: &str = "\
gmail-sim: a Gmail API simulator (test support; never for production)

USAGE: gmail-sim [OPTIONS]

OPTIONS:
  --port P                      listen on 127.0.0.1:P (default: a free port)
  --pubsub-endpoint URL         Pub/Sub emulator for watch notifications (http://127.0.0.1:PORT);
                                default: $PUBSUB_EMULATOR_HOST if set, else none (nothing published)
  --static-token T              a bearer token valid for every mailbox (repeatable)
  --refresh-token T=EMAIL       a valid refresh token for a mailbox (repeatable)
  --mailbox EMAIL[=HISTORYID]   create a mailbox at start (repeatable)
  --service-account-key FILE    PEM public key that verifies delegation JWTs
  --service-account-email E     required `iss` of delegation JWTs
  --history-id-as-number        publish \"historyId\": 123 instead of \"123\"
  --notify-drop P               drop each notification with probability P (0..1)
  --notify-delay-ms LO,HI       delay each notification by a random LO..HI ms
  --notify-interval-ms N        at most one notification per mailbox per N ms (default 1000)
  --quota-user N                units per user per minute (default: unlimited)
  --quota-project N             units per project per minute (default: unlimited)
  --max-concurrent N            calls in flight per user (default: unlimited)
  --quota-project-day N         units per project per 24 h (default: unlimited)
  --gmail-quota                 Gmail's limits: 15000/user/min, 1200000/project/min, 10 concurrent
  --gmail-quota-2026            Gmail's 2026 table: 6000/user/min, 80M/project/day, messages.get 20
  --quota-403                   answer quota refusals 403 (userRateLimitExceeded) instead of 429
  --token-lifetime-secs N       access token lifetime (default 3600)
  --retention-secs N            drop history older than N seconds (default: keep)
  --project P                   watch accepts only projects/P/topics/*
  --watch-processing-ms N       hold each users.watch in processing for N ms; a watch for the
                                same mailbox meanwhile answers 400 (default 0: atomic)
  --watch-lifetime-secs N       how long a watch lasts (default 604800, 7 days)
  --seed N                      RNG seed (default fixed)
  -h, --help                    this help

Prints `gmail-sim listening on http://127.0.0.1:P` and serves until Ctrl-C / SIGTERM.";

/// Mailboxes to create at start: (email, initial historyId).
type StartMailboxes = Vec<(String, Option<u64>)>;

fn parse_args() -> anyhow::Result<(SimConfig, StartMailboxes)> {
    let mut cfg = SimConfig {
        pubsub_endpoint: std::env::var("PUBSUB_EMULATOR_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}")),
        ..SimConfig::default()
    };
    let mut mailboxes = Vec::new();
    let mut args = std::env::args().skip(1);
    let value = |args: &mut dyn Iterator<Item = String>, flag: &str| {
        args.next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value (see --help)"))
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = || match &inline {
            Some(v) => Ok(v.clone()),
            None => value(&mut args, &flag),
        };
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--port" => cfg.port = val()?.parse()?,
            "--pubsub-endpoint" => {
                let v = val()?;
                cfg.pubsub_endpoint = if v.starts_with("http") {
                    Some(v)
                } else {
                    Some(format!("http://{v}"))
                };
            }
            "--static-token" => cfg.static_tokens.push(val()?),
            "--refresh-token" => {
                let v = val()?;
                let (t, e) = v
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--refresh-token wants TOKEN=EMAIL"))?;
                cfg.refresh_tokens.push((t.to_string(), e.to_string()));
            }
            "--mailbox" => {
                let v = val()?;
                match v.split_once('=') {
                    Some((e, h)) => mailboxes.push((e.to_string(), Some(h.parse()?))),
                    None => mailboxes.push((v, None)),
                }
            }
            "--service-account-key" => {
                cfg.service_account_public_key_pem = Some(std::fs::read_to_string(val()?)?)
            }
            "--service-account-email" => cfg.service_account_email = Some(val()?),
            "--history-id-as-number" => cfg.notify_history_id_as_number = true,
            "--notify-drop" => cfg.notify_drop_probability = val()?.parse()?,
            "--notify-delay-ms" => {
                let v = val()?;
                let (lo, hi) = v.split_once(',').unwrap_or((&v, &v));
                cfg.notify_delay = Some((
                    Duration::from_millis(lo.parse()?),
                    Duration::from_millis(hi.parse()?),
                ));
            }
            "--notify-interval-ms" => {
                cfg.notify_min_interval = Duration::from_millis(val()?.parse()?)
            }
            "--quota-user" => cfg.quota.per_user_per_minute = Some(val()?.parse()?),
            "--quota-project" => cfg.quota.per_project_per_minute = Some(val()?.parse()?),
            "--max-concurrent" => cfg.quota.max_concurrent_per_user = Some(val()?.parse()?),
            "--quota-project-day" => cfg.quota.per_project_per_day = Some(val()?.parse()?),
            "--gmail-quota" => cfg.quota = QuotaConfig::gmail(),
            "--gmail-quota-2026" => cfg.quota = QuotaConfig::gmail_2026(),
            "--quota-403" => cfg.quota_error_style = QuotaErrorStyle::Forbidden,
            "--token-lifetime-secs" => cfg.token_lifetime = Duration::from_secs(val()?.parse()?),
            "--retention-secs" => {
                cfg.history_retention = Some(Duration::from_secs(val()?.parse()?))
            }
            "--project" => cfg.project = Some(val()?),
            "--watch-processing-ms" => {
                cfg.watch_processing = Duration::from_millis(val()?.parse()?)
            }
            "--watch-lifetime-secs" => cfg.watch_lifetime = Duration::from_secs(val()?.parse()?),
            "--seed" => cfg.seed = val()?.parse()?,
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok((cfg, mailboxes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (cfg, mailboxes) = match parse_args() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("gmail-sim: {e}");
            std::process::exit(2);
        }
    };
    let sim = GmailSim::start(cfg).await?;
    for (email, h) in mailboxes {
        match h {
            Some(h) => sim.add_mailbox_at(&email, h),
            None => {
                sim.add_mailbox(&email);
            }
        }
    }
    println!("gmail-sim listening on {}", sim.base_url());
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    sim.shutdown();
    Ok(())
}
