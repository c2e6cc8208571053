//! `gmail-sync keys ...`: the token keys of the vault (see `vault` and README, "Keys and
//! rotation").
//!
//! - `generate --out FILE`: a new random key file, mode 0600, never over an existing file;
//! - `rotate`: reseals every stored refresh token with GMAIL_SYNC_TOKEN_KEY_FILE, online
//!   (workers keep running, they open both keys meanwhile), with progress on stderr and a
//!   summary on stdout (`--json`: one document).
//!
//! Exit codes: 0 done; 1 failed (the file could not be written; some credential could not be
//! resealed, and then GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE must stay configured; Redis failed);
//! 2 usage or configuration (no or bad key file).

use super::mailbox::OutputArgs;
use crate::config::{Config, TOKEN_KEY_FILE, TOKEN_KEY_PREVIOUS_FILE};
use crate::mailbox::Mailbox;
use crate::store::{Replaced, Store};
use crate::vault::{KeyId, Resealed, Vault, generate_key_file};
use clap::Subcommand;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Write a new random token key file (mode 0600); refuses to overwrite an existing file.
    Generate {
        /// Where to write the key file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Reseal every stored refresh token with GMAIL_SYNC_TOKEN_KEY_FILE (the ones sealed with
    /// GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE); workers keep running. Run it again to resume.
    Rotate {
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Key files are secrets: readable by their owner only.
const KEY_FILE_MODE: u32 = 0o600;
/// How often `rotate` reports progress when stderr is not a terminal.
const ROTATE_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Times one credential is re-read and resealed when `mailbox add` keeps replacing it meanwhile.
const RESEAL_ATTEMPTS: u32 = 3;

/// Runs a keys command; returns the exit code.
pub async fn execute(config: &Config, command: KeysCommand) -> i32 {
    let result = match command {
        KeysCommand::Generate { out, output } => generate(&out, output.json),
        KeysCommand::Rotate { output } => {
            let vault = match Vault::from_config(&config.token_keys) {
                Ok(Some(vault)) => vault,
                Ok(None) => {
                    eprintln!(
                        "gmail-sync: {TOKEN_KEY_FILE} is not set: `keys rotate` reseals with \
                         it (set it to the new key file, and {TOKEN_KEY_PREVIOUS_FILE} to the \
                         old one)"
                    );
                    return 2;
                }
                Err(e) => {
                    eprintln!("gmail-sync: {e}");
                    return 2;
                }
            };
            rotate(config, &vault, output.json).await
        }
    };
    match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("gmail-sync: {e:#}");
            1
        }
    }
}

fn generate(out: &Path, json: bool) -> anyhow::Result<bool> {
    let (contents, id) = generate_key_file();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .open(out)
        .and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        });
    if let Err(e) = written {
        let why = if e.kind() == std::io::ErrorKind::AlreadyExists {
            "it exists, and a key file is never overwritten (losing a key loses every token \
             sealed with it): choose another path"
                .to_string()
        } else {
            format!("{e} (choose a writable path)")
        };
        anyhow::bail!("cannot write {}: {why}", out.display());
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"file": out.display().to_string(), "key_id": id})
        );
    } else {
        println!(
            "{}: new token key, id {id} (mode 0600); store it as a Kubernetes Secret and point \
             {TOKEN_KEY_FILE} at it",
            out.display()
        );
    }
    Ok(true)
}

#[derive(serde::Serialize)]
struct RotateFailure {
    mailbox: String,
    reason: String,
}

#[derive(serde::Serialize)]
struct RotateSummary {
    current_key_id: KeyId,
    previous_key_id: Option<KeyId>,
    /// Credentials stored when the rotation started (HSCAN may show one twice, or a new one).
    total: u64,
    rotated: u64,
    already_current: u64,
    /// Removed (`mailbox remove`) while the rotation ran: nothing to reseal.
    removed_meanwhile: u64,
    failed: Vec<RotateFailure>,
}

impl RotateSummary {
    fn done(&self) -> u64 {
        self.rotated + self.already_current + self.removed_meanwhile + self.failed.len() as u64
    }
}

/// What happened to one credential.
enum Outcome {
    Rotated,
    AlreadyCurrent,
    Removed,
    Failed(String),
}

async fn rotate(config: &Config, vault: &Vault, json: bool) -> anyhow::Result<bool> {
    let store = crate::app::connect_store(config).await?;
    let mut summary = RotateSummary {
        current_key_id: vault.current_key_id(),
        previous_key_id: vault.previous_key_id(),
        total: store.credential_count().await?,
        rotated: 0,
        already_current: 0,
        removed_meanwhile: 0,
        failed: Vec::new(),
    };
    eprintln!(
        "resealing {} stored refresh tokens with key id {} ({TOKEN_KEY_FILE}); previous key: {}",
        summary.total,
        summary.current_key_id,
        summary
            .previous_key_id
            .map_or("not set".to_string(), |id| format!("id {id}"))
    );
    let tty = std::io::stderr().is_terminal();
    let mut last_report = Instant::now();
    for shard in 0..store.keys().shards() {
        let mut scan = 0;
        loop {
            let (next, page) = store.credentials_page(shard, scan).await.map_err(|e| {
                anyhow::anyhow!("reading stored credentials: {e} (run `keys rotate` again)")
            })?;
            for (field, sealed) in page {
                match reseal_one(&store, vault, &field, sealed).await {
                    Outcome::Rotated => summary.rotated += 1,
                    Outcome::AlreadyCurrent => summary.already_current += 1,
                    Outcome::Removed => summary.removed_meanwhile += 1,
                    Outcome::Failed(reason) => summary.failed.push(RotateFailure {
                        mailbox: field,
                        reason,
                    }),
                }
                if tty {
                    eprint!("\r{}", progress_line(&summary));
                    let _ = std::io::stderr().flush();
                } else if last_report.elapsed() >= ROTATE_PROGRESS_EVERY {
                    last_report = Instant::now();
                    eprintln!("{}", progress_line(&summary));
                }
            }
            if next == 0 {
                break;
            }
            scan = next;
        }
    }
    if tty {
        eprintln!();
    } else {
        eprintln!("{}", progress_line(&summary));
    }
    let ok = summary.failed.is_empty();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "rotated: {} resealed with key id {}, {} already current, {} removed meanwhile, {} \
             failed",
            summary.rotated,
            summary.current_key_id,
            summary.already_current,
            summary.removed_meanwhile,
            summary.failed.len()
        );
        for f in &summary.failed {
            println!("  {}: {}", f.mailbox, f.reason);
        }
    }
    if ok {
        eprintln!(
            "every stored refresh token is sealed with key id {}: {TOKEN_KEY_PREVIOUS_FILE} is \
             no longer needed (unset it, then roll the Deployment)",
            summary.current_key_id
        );
    } else {
        eprintln!(
            "gmail-sync: {} credentials were not resealed: keep {TOKEN_KEY_PREVIOUS_FILE} \
             configured; fix each one (a transient failure: run `keys rotate` again; a broken \
             value: store its token again with `gmail-sync mailbox add EMAIL \
             --refresh-token-file FILE`), then run `keys rotate` again",
            summary.failed.len()
        );
    }
    Ok(ok)
}

/// Reseals one stored credential with the current key, unless it already is; a value replaced
/// meanwhile (compare and set refused) is re-read and looked at again.
async fn reseal_one(store: &Store, vault: &Vault, field: &str, mut sealed: Vec<u8>) -> Outcome {
    let Ok(mailbox) = Mailbox::parse(field) else {
        return Outcome::Failed("stored under a field that is not a mailbox address".into());
    };
    for _ in 0..RESEAL_ATTEMPTS {
        let resealed = match vault.reseal(&mailbox, &sealed) {
            Ok(Resealed::AlreadyCurrent) => return Outcome::AlreadyCurrent,
            Ok(Resealed::Resealed(resealed)) => resealed,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        match store.replace_credential(&mailbox, &sealed, &resealed).await {
            Ok(Replaced::Replaced) => return Outcome::Rotated,
            Ok(Replaced::Gone) => return Outcome::Removed,
            Ok(Replaced::Changed) => match store.credential(&mailbox).await {
                Ok(Some(now)) => sealed = now,
                Ok(None) => return Outcome::Removed,
                Err(e) => return Outcome::Failed(transient(&e)),
            },
            Err(e) => return Outcome::Failed(transient(&e)),
        }
    }
    Outcome::Failed(format!(
        "replaced {RESEAL_ATTEMPTS} times while resealing it: run `keys rotate` again"
    ))
}

fn transient(e: &crate::store::StoreError) -> String {
    format!("redis: {e} (transient: run `keys rotate` again)")
}

fn progress_line(s: &RotateSummary) -> String {
    format!(
        "{}/{} rotated {} already current {} removed {} failed {}",
        s.done(),
        s.total,
        s.rotated,
        s.already_current,
        s.removed_meanwhile,
        s.failed.len()
    )
}
