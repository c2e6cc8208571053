//! Redis memory per change entry, with and without enrichment.
//!
//! ```sh
//! cargo run --release --example entry_size    # ENTRY_SIZE_MESSAGES=2000
//! ```
//! Delivers `ENTRY_SIZE_MESSAGES` messages (every other one a reply) to one mailbox before a
//! worker starts, once per `GMAIL_SYNC_ENRICHMENT` mode (`off`, `minimal`, `metadata`, each with
//! a fresh mailbox and key prefix), lets the worker write them, and prints `MEMORY USAGE` (all
//! samples) of the change streams divided by their entries.

#[path = "support/mod.rs"]
mod support;

use gmail_sync_testbed::gmail::SimConfig;
use std::time::Duration;
use support::{Bed, env_or, stop_worker};

fn main() -> anyhow::Result<()> {
    support::main(measure)
}

async fn measure() -> anyhow::Result<()> {
    let n: usize = env_or("ENTRY_SIZE_MESSAGES", 2000);
    println!("{n} message_added entries per mode, one mailbox");
    println!(
        "{:<9} {:>8} {:>14} {:>15}",
        "mode", "entries", "stream bytes", "bytes/entry"
    );
    for mode in ["off", "minimal", "metadata"] {
        let mut bed = Bed::start(&format!("size-{mode}"), SimConfig::default()).await?;
        let email = format!("size-{mode}@bench.example");
        bed.add_mailboxes(std::slice::from_ref(&email)).await?;
        let mut root: Option<String> = None;
        for i in 0..n {
            match (i % 2, root.as_deref()) {
                (1, Some(r)) => {
                    bed.sim.reply(&email, r, &["INBOX", "UNREAD"]);
                }
                _ => root = Some(bed.sim.deliver(&email, &["INBOX", "UNREAD"])),
            }
        }
        let worker = bed
            .spawn_worker(mode, &[("GMAIL_SYNC_ENRICHMENT", mode)])
            .await?;
        bed.wait_caught_up(Duration::from_secs(120))
            .await
            .map_err(anyhow::Error::msg)?;
        stop_worker(&worker).await;
        let mut con = bed.connect_single().await?;
        let (mut bytes, mut entries) = (0u64, 0u64);
        for stream in bed.keys().streams() {
            let len: u64 = redis::cmd("XLEN")
                .arg(&stream)
                .query_async(&mut con)
                .await?;
            if len == 0 {
                continue;
            }
            let usage: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&stream)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut con)
                .await?;
            bytes += usage;
            entries += len;
        }
        println!(
            "{mode:<9} {entries:>8} {bytes:>14} {:>15.0}",
            bytes as f64 / entries.max(1) as f64
        );
    }
    Ok(())
}
