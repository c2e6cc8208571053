//! `gmail-sync mailbox ...`: add, import, remove, list, status, resync.
//!
//! `add EMAIL --refresh-token-file FILE|-` first seals and stores the mailbox's refresh token
//! (`credential::store_refresh_token`), then registers it as without; `status` shows whether a
//! token is stored and which key sealed it, never the value.
//!
//! Human-readable output on stdout by default; `--json` prints JSON instead (one object per
//! mailbox and line for add/remove, one document otherwise). Progress and warnings go to
//! stderr. Exit code 0 when every mailbox succeeded, 1 when any failed (each failure says what
//! to do next), 2 for usage errors (clap's own).

use super::credential::store_refresh_token;
use crate::config::{Config, TOKEN_KEY_FILE};
use crate::gmail::{LabelFilter, LabelFilterBehavior};
use crate::mailbox::Mailbox;
use crate::registry::{Registry, RegistryError};
use crate::store::{ListCursor, MailboxStatus, now_ms};
use crate::sync::{SyncOutcome, Syncer};
use crate::telemetry::Counters;
use crate::vault::{Vault, sealed_key_id};
use clap::{Args, Subcommand, ValueEnum};
use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Subcommand, Debug)]
pub enum MailboxCommand {
    /// Watch mailboxes (users.watch on GMAIL_SYNC_TOPIC), store their baseline cursor, schedule
    /// their renewal. Idempotent: a registered mailbox keeps its cursor; an attention mark is
    /// cleared.
    Add {
        /// Gmail addresses.
        #[arg(required = true)]
        emails: Vec<String>,
        /// The mailbox's OAuth refresh token, read from FILE or `-` (stdin), never from the
        /// command line: sealed with GMAIL_SYNC_TOKEN_KEY_FILE and stored before users.watch.
        /// One EMAIL only.
        #[arg(long, value_name = "FILE|-")]
        refresh_token_file: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Add many mailboxes, one address per line (blank lines and `#` comments skipped), from
    /// FILE or `-` (stdin). Registered mailboxes are skipped, so a re-run resumes.
    Import {
        /// File with one address per line, or `-` for stdin.
        file: String,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// users.stop, then delete the mailbox's state, lease and schedule (its change entries
    /// stay). Later notifications for it are acked as unknown.
    Remove {
        #[arg(required = true)]
        emails: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Registered mailboxes, a page at a time.
    List {
        /// Only mailboxes in this state.
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Mailboxes per page (1-10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// Where to continue, as printed by the previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Everything stored about one mailbox: cursor, watch, syncs, schedule, attention, lease.
    Status {
        email: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A full resync now (the same path as after Gmail's 404): a `resync` entry, the listed
    /// messages, then history from the profile's historyId.
    Resync {
        email: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Args, Debug)]
pub struct FilterArgs {
    /// Watch only these labels (comma-separated ids); default: the whole mailbox, which is
    /// recommended (label-scoped watches miss replies).
    #[arg(long, value_delimiter = ',')]
    label_ids: Vec<String>,
    /// Whether --label-ids are the labels to include or to exclude.
    #[arg(long, value_enum, requires = "label_ids")]
    label_filter: Option<FilterBehavior>,
}

#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FilterBehavior {
    Include,
    Exclude,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusFilter {
    /// Registered, renewing normally.
    Ok,
    /// Marked as needing attention (permanent error): no syncs, no renewals.
    Attention,
    /// The watch expires within GMAIL_SYNC_WATCH_WARN_HORIZON_SECS.
    Expiring,
}

impl FilterArgs {
    fn filter(&self) -> Option<LabelFilter> {
        (!self.label_ids.is_empty()).then(|| LabelFilter {
            behavior: match self.label_filter.unwrap_or(FilterBehavior::Include) {
                FilterBehavior::Include => LabelFilterBehavior::Include,
                FilterBehavior::Exclude => LabelFilterBehavior::Exclude,
            },
            label_ids: self.label_ids.clone(),
        })
    }
}

/// Runs a mailbox command; returns the exit code.
pub async fn execute(config: &Config, command: MailboxCommand) -> i32 {
    let result = match command {
        MailboxCommand::Add {
            emails,
            refresh_token_file,
            filter,
            output,
        } => {
            let token = match refresh_token_file {
                None => None,
                Some(source) => match token_vault(config, &emails) {
                    Ok(vault) => Some((source, vault)),
                    Err(code) => return code,
                },
            };
            add(config, &emails, token, filter.filter(), output.json).await
        }
        MailboxCommand::Import {
            file,
            filter,
            output,
        } => import(config, &file, filter.filter(), output.json).await,
        MailboxCommand::Remove { emails, output } => remove(config, &emails, output.json).await,
        MailboxCommand::List {
            status,
            limit,
            cursor,
            output,
        } => {
            list(
                config,
                status,
                limit as usize,
                cursor.as_deref(),
                output.json,
            )
            .await
        }
        MailboxCommand::Status { email, output } => status(config, &email, output.json).await,
        MailboxCommand::Resync { email, output } => resync(config, &email, output.json).await,
    };
    match result {
        Ok(Done::AllOk) => 0,
        Ok(Done::SomeFailed) => 1,
        Err(e) => {
            eprintln!("gmail-sync: {e:#}");
            1
        }
    }
}

/// The vault `add --refresh-token-file` seals with, or the exit code of a usage or
/// configuration error (2), already explained on stderr.
fn token_vault(config: &Config, emails: &[String]) -> Result<Vault, i32> {
    if emails.len() != 1 {
        eprintln!(
            "gmail-sync: --refresh-token-file holds the token of one mailbox: give exactly one \
             EMAIL (run `mailbox add` once per mailbox)"
        );
        return Err(2);
    }
    match Vault::from_config(&config.token_keys) {
        Ok(Some(vault)) => Ok(vault),
        Ok(None) => {
            eprintln!(
                "gmail-sync: {TOKEN_KEY_FILE} is not set: --refresh-token-file needs the key \
                 that seals the token (make one with `gmail-sync keys generate --out FILE`)"
            );
            Err(2)
        }
        Err(e) => {
            eprintln!("gmail-sync: {e}");
            Err(2)
        }
    }
}

/// How a command that handles several mailboxes ended.
enum Done {
    AllOk,
    SomeFailed,
}

fn parse_mailbox(raw: &str) -> anyhow::Result<Mailbox> {
    Mailbox::parse(raw).map_err(|e| anyhow::anyhow!("{raw:?}: {e}"))
}

impl Done {
    fn from_failed(failed: bool) -> Done {
        if failed {
            Done::SomeFailed
        } else {
            Done::AllOk
        }
    }
}

/// A mailbox's failure: on stderr with what to do next, and as a JSON line with `--json`.
fn report_failure(m: &Mailbox, e: &RegistryError, json: bool) {
    eprintln!("gmail-sync: {m}: {e} ({})", next_step(e));
    if json {
        println!(
            "{}",
            serde_json::json!({"mailbox": m.as_str(), "error": e.to_string(), "retryable": e.is_retryable()})
        );
    }
}

/// What to do after a mailbox's failure.
fn next_step(e: &RegistryError) -> &'static str {
    if e.is_retryable() {
        "transient: run the command again"
    } else {
        "permanent: fix the cause (grant, topic, Gmail API access), then run the command again"
    }
}

/// `token`: where the (one) mailbox's refresh token is read from, and the vault that seals it.
async fn add(
    config: &Config,
    emails: &[String],
    token: Option<(String, Vault)>,
    filter: Option<LabelFilter>,
    json: bool,
) -> anyhow::Result<Done> {
    let mailboxes = emails
        .iter()
        .map(|e| parse_mailbox(e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let registry = Registry::from_config(config).await?;
    // Stored first: users.watch below authenticates as the mailbox with this token.
    if let (Some((source, vault)), [m]) = (&token, mailboxes.as_slice()) {
        let key_id = store_refresh_token(registry.store(), vault, m, source).await?;
        eprintln!("{m}: refresh token stored, sealed with key id {key_id}");
    }
    let mut failed = false;
    for m in &mailboxes {
        match registry.add(m, filter.as_ref()).await {
            Ok(r) if json => println!("{}", serde_json::to_string(&r)?),
            Ok(r) => println!(
                "{}: {} (cursor {}, watch expires {}, next renewal {})",
                r.mailbox,
                if r.created {
                    "added"
                } else {
                    "already registered, cursor kept, watch renewed"
                },
                r.cursor,
                time_of_ms(r.watch_expiration_ms),
                time_of_s(r.next_renewal_s),
            ),
            Err(e) => {
                failed = true;
                report_failure(m, &e, json);
            }
        }
    }
    Ok(Done::from_failed(failed))
}

#[derive(serde::Serialize)]
struct ImportFailure {
    line: usize,
    input: String,
    reason: String,
    retryable: bool,
}

#[derive(serde::Serialize, Default)]
struct ImportSummary {
    total: usize,
    added: usize,
    skipped: usize,
    failed: Vec<ImportFailure>,
}

/// How often import reports progress when stderr is not a terminal.
const IMPORT_PROGRESS_EVERY: Duration = Duration::from_secs(5);

async fn import(
    config: &Config,
    file: &str,
    filter: Option<LabelFilter>,
    json: bool,
) -> anyhow::Result<Done> {
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(
            |e| anyhow::anyhow!("cannot read {file}: {e} (give a readable file, or - for stdin)"),
        )?))
    };
    let mut lines = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| anyhow::anyhow!("reading {file}: {e}"))?;
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            lines.push((i + 1, trimmed.to_string()));
        }
    }
    let registry = Registry::from_config(config).await?;
    let mut summary = ImportSummary {
        total: lines.len(),
        ..ImportSummary::default()
    };
    let tty = std::io::stderr().is_terminal();
    let mut last_report = Instant::now();
    for (done, (line, input)) in lines.into_iter().enumerate() {
        let outcome = match Mailbox::parse(&input) {
            Err(e) => Err((e.to_string(), false)),
            Ok(m) => match registry.store().is_active(&m).await {
                Ok(true) => Ok(false),
                Ok(false) => match registry.add(&m, filter.as_ref()).await {
                    Ok(_) => Ok(true),
                    Err(e) => Err((format!("{e} ({})", next_step(&e)), e.is_retryable())),
                },
                Err(e) => Err((format!("redis: {e}"), true)),
            },
        };
        match outcome {
            Ok(true) => summary.added += 1,
            Ok(false) => summary.skipped += 1,
            Err((reason, retryable)) => summary.failed.push(ImportFailure {
                line,
                input,
                reason,
                retryable,
            }),
        }
        let n = done + 1;
        if tty {
            eprint!("\r{}", progress_line(&summary, n));
            let _ = std::io::stderr().flush();
        } else if last_report.elapsed() >= IMPORT_PROGRESS_EVERY || n == summary.total {
            last_report = Instant::now();
            eprintln!("{}", progress_line(&summary, n));
        }
    }
    if tty {
        eprintln!();
    }
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "imported: {} added, {} already registered (skipped), {} failed, of {}",
            summary.added,
            summary.skipped,
            summary.failed.len(),
            summary.total
        );
        for f in &summary.failed {
            println!("  line {}: {}: {}", f.line, f.input, f.reason);
        }
        if !summary.failed.is_empty() {
            println!("run the same import again to retry the failures (done lines are skipped)");
        }
    }
    Ok(Done::from_failed(!summary.failed.is_empty()))
}

fn progress_line(s: &ImportSummary, done: usize) -> String {
    let width = 30;
    let filled = (done * width).checked_div(s.total).unwrap_or(width);
    format!(
        "[{}{}] {done}/{} added {} skipped {} failed {}",
        "#".repeat(filled),
        " ".repeat(width - filled),
        s.total,
        s.added,
        s.skipped,
        s.failed.len()
    )
}

async fn remove(config: &Config, emails: &[String], json: bool) -> anyhow::Result<Done> {
    let mailboxes = emails
        .iter()
        .map(|e| parse_mailbox(e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let registry = Registry::from_config(config).await?;
    let mut failed = false;
    for m in &mailboxes {
        match registry.remove(m).await {
            Ok(r) => {
                if let Some(w) = &r.warning {
                    eprintln!("gmail-sync: warning: {m}: {w}; removed anyway");
                }
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else if r.was_registered {
                    println!("{m}: removed");
                } else {
                    println!("{m}: was not registered (users.stop sent anyway)");
                }
            }
            Err(e) => {
                failed = true;
                report_failure(m, &e, json);
            }
        }
    }
    Ok(Done::from_failed(failed))
}

/// One mailbox as `list` and `status` show it.
#[derive(serde::Serialize)]
struct Shown {
    #[serde(flatten)]
    stored: MailboxStatus,
    status: StatusFilter,
    /// When the next fallback sync is due if no sync happens before (epoch s).
    next_fallback_sync_s: Option<u64>,
    credential: CredentialShown,
}

/// Whether a refresh token is stored, and which key sealed it; never the value.
#[derive(serde::Serialize)]
struct CredentialShown {
    stored: bool,
    key_id: Option<String>,
    /// Set when the stored value's header is not one this build reads.
    problem: Option<String>,
}

impl CredentialShown {
    fn of(sealed: Option<&[u8]>) -> CredentialShown {
        let parsed = sealed.map(sealed_key_id);
        CredentialShown {
            stored: sealed.is_some(),
            key_id: parsed
                .as_ref()
                .and_then(|p| p.as_ref().ok())
                .map(ToString::to_string),
            problem: parsed.and_then(|p| p.err()).map(|e| e.to_string()),
        }
    }

    fn describe(&self) -> String {
        match (&self.key_id, &self.problem) {
            (Some(id), _) => format!("stored (sealed with key id {id})"),
            (None, Some(problem)) => format!("stored, unreadable: {problem}"),
            (None, None) => "none".to_string(),
        }
    }
}

fn shown(config: &Config, stored: MailboxStatus) -> Shown {
    let horizon_s = (now_ms() / 1000) + config.scheduler.warn_horizon.as_secs();
    let status = if stored.attention.is_some() {
        StatusFilter::Attention
    } else if stored.watch_expiration_s.is_some_and(|w| w <= horizon_s) {
        StatusFilter::Expiring
    } else {
        StatusFilter::Ok
    };
    let next_fallback_sync_s = match status {
        StatusFilter::Attention => None,
        _ => stored
            .last_sync_s
            .map(|s| s + config.scheduler.fallback_silence.as_secs()),
    };
    let credential = CredentialShown::of(stored.credential.as_deref());
    Shown {
        stored,
        status,
        next_fallback_sync_s,
        credential,
    }
}

async fn list(
    config: &Config,
    status: Option<StatusFilter>,
    limit: usize,
    cursor: Option<&str>,
    json: bool,
) -> anyhow::Result<Done> {
    let from: ListCursor = match cursor {
        Some(c) => c.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        None => ListCursor::default(),
    };
    let store = crate::app::connect_store(config).await?;
    let (page, next) = store.list(from, limit).await?;
    let rows: Vec<Shown> = page
        .into_iter()
        .map(|s| shown(config, s))
        .filter(|s| status.is_none_or(|want| s.status == want))
        .collect();
    let next = next.map(|c| c.to_string());
    if json {
        println!(
            "{}",
            serde_json::json!({"mailboxes": rows, "next_cursor": next})
        );
    } else {
        println!(
            "{:<40} {:<9} {:>20} {:<20} {:<20}",
            "MAILBOX", "STATUS", "CURSOR", "WATCH EXPIRES", "LAST SYNC"
        );
        for r in &rows {
            println!(
                "{:<40} {:<9} {:>20} {:<20} {:<20}",
                r.stored.mailbox,
                format!("{:?}", r.status).to_lowercase(),
                r.stored.cursor.to_string(),
                r.stored.watch_expiration_s.map_or("-".into(), time_of_s),
                r.stored.last_sync_s.map_or("-".into(), time_of_s),
            );
        }
        match next {
            Some(c) => println!("more: gmail-sync mailbox list --cursor {c}"),
            None => println!("(end of list)"),
        }
    }
    Ok(Done::AllOk)
}

async fn status(config: &Config, email: &str, json: bool) -> anyhow::Result<Done> {
    let m = parse_mailbox(email)?;
    let store = crate::app::connect_store(config).await?;
    let Some(stored) = store.status(&m).await? else {
        anyhow::bail!("{m} is not registered (add it with `gmail-sync mailbox add {m}`)");
    };
    let s = shown(config, stored);
    if json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(Done::AllOk);
    }
    let opt_s = |v: Option<u64>| v.map_or("-".to_string(), time_of_s);
    println!("mailbox:           {}", s.stored.mailbox);
    println!("status:            {:?}", s.status);
    println!("cursor:            {}", s.stored.cursor);
    println!("watch expires:     {}", opt_s(s.stored.watch_expiration_s));
    println!("last sync:         {}", opt_s(s.stored.last_sync_s));
    println!("next renewal:      {}", opt_s(s.stored.next_renewal_s));
    println!("next fallback:     {}", opt_s(s.next_fallback_sync_s));
    println!(
        "scheduler looks:   {}",
        s.stored.next_look_ms.map_or("-".to_string(), time_of_ms)
    );
    println!("failed renewals:   {}", s.stored.failed_renewals);
    println!(
        "label filter:      {}",
        s.stored.labels.as_deref().unwrap_or("(whole mailbox)")
    );
    match (&s.stored.attention_kind, &s.stored.attention) {
        (Some(kind), Some(reason)) if kind == "needs_reauthorization" => println!(
            "attention:         needs reauthorization: {reason}\n                   \
             (re-authorize it, then `gmail-sync mailbox add {}`: it resumes from its cursor)",
            s.stored.mailbox
        ),
        (_, reason) => println!("attention:         {}", reason.as_deref().unwrap_or("-")),
    }
    println!(
        "lease holder:      {}",
        s.stored.lease_holder.as_deref().unwrap_or("-")
    );
    println!(
        "claim holder:      {}",
        s.stored.claim_holder.as_deref().unwrap_or("-")
    );
    println!("refresh token:     {}", s.credential.describe());
    Ok(Done::AllOk)
}

async fn resync(config: &Config, email: &str, json: bool) -> anyhow::Result<Done> {
    let m = parse_mailbox(email)?;
    let store = crate::app::connect_store(config).await?;
    let counters = Arc::new(Counters::default());
    let gmail = crate::app::gmail_client(config, &store, counters.clone())?;
    let syncer = Syncer::new(
        gmail,
        store,
        config.sync.clone(),
        counters,
        config.log_mailbox,
    );
    eprintln!(
        "resyncing {m}: listing up to {} messages...",
        config.sync.resync_max_messages
    );
    let outcome = syncer.resync(&m, &CancellationToken::new()).await;
    let (ok, detail) = match &outcome {
        SyncOutcome::Synced { cursor, changes } => (
            true,
            serde_json::json!({"mailbox": m.as_str(), "cursor": cursor, "entries_written": changes}),
        ),
        SyncOutcome::Unknown => (
            false,
            serde_json::json!({"mailbox": m.as_str(), "error": format!("not registered (add it with `gmail-sync mailbox add {m}`)")}),
        ),
        SyncOutcome::NeedsAttention { .. } => (
            false,
            serde_json::json!({"mailbox": m.as_str(), "error": "needs attention: fix the cause, run `gmail-sync mailbox add` to clear the mark, then resync"}),
        ),
        SyncOutcome::Busy { .. } => (
            false,
            serde_json::json!({"mailbox": m.as_str(), "error": "a worker is syncing it right now: run the command again in a moment"}),
        ),
        SyncOutcome::UpToDate { .. } => (
            true,
            serde_json::json!({"mailbox": m.as_str(), "entries_written": 0}),
        ),
        SyncOutcome::Failed(e) => (
            false,
            serde_json::json!({"mailbox": m.as_str(), "error": e.to_string(), "retryable": e.is_retryable()}),
        ),
        SyncOutcome::Deferred(d) => (
            false,
            serde_json::json!({"mailbox": m.as_str(), "error": format!("the Gmail quota ({}) is spent for now: run the command again in {} s", d.reason.as_str(), d.after.as_secs().max(1)), "retryable": true}),
        ),
        SyncOutcome::Held { error, .. } => (
            false,
            serde_json::json!({"mailbox": m.as_str(), "error": format!("{error} (not marked: check the credentials and scopes, then run the command again)"), "retryable": true}),
        ),
    };
    if json {
        println!("{detail}");
    } else if ok {
        println!(
            "{m}: resynced, {} entries written, cursor {}",
            detail["entries_written"], detail["cursor"]
        );
    } else {
        eprintln!(
            "gmail-sync: {m}: {}",
            detail["error"].as_str().unwrap_or("")
        );
    }
    Ok(Done::from_failed(!ok))
}

fn time_of_s(epoch_s: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(epoch_s as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| epoch_s.to_string())
}

fn time_of_ms(epoch_ms: u64) -> String {
    time_of_s(epoch_ms / 1000)
}
