//! Mailbox registration (minimal): `users.watch` on the configured topic, then the mailbox is
//! stored with the watch response's historyId as its baseline cursor.
//!
//! Idempotent: adding a registered mailbox renews its watch and keeps its cursor (so nothing
//! between the old cursor and now is skipped), and clears an `attention` mark (re-enable after
//! a permanent error was fixed).

use crate::gmail::GmailClient;
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use crate::store::Store;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Registered {
    pub mailbox: String,
    pub created: bool,
    pub cursor: HistoryId,
    pub watch_history_id: HistoryId,
    pub watch_expiration_ms: u64,
}

pub async fn add_mailbox(
    gmail: &GmailClient,
    store: &Store,
    topic: &str,
    mailbox: &Mailbox,
) -> anyhow::Result<Registered> {
    let watch = gmail
        .watch(mailbox, topic)
        .await
        .map_err(|e| anyhow::anyhow!("users.watch for {mailbox} failed: {e}"))?;
    let (created, cursor) = store
        .register(mailbox, watch.history_id, watch.expiration_ms)
        .await?;
    Ok(Registered {
        mailbox: mailbox.to_string(),
        created,
        cursor,
        watch_history_id: watch.history_id,
        watch_expiration_ms: watch.expiration_ms,
    })
}
