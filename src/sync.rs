//! The history sync of one mailbox: the use case at the heart of gmail-sync.
//!
//! 1. [`Store::begin`] decides in one script: unknown mailbox, disabled, cursor already past the
//!    target (no Gmail call), lease held elsewhere, or lease taken → sync.
//! 2. `users.history.list` from the cursor, page by page. Each page is committed with its
//!    entries and the cursor it reaches in one script ([`Store::commit`]); the last page moves
//!    the cursor to the mailbox's current historyId and releases the lease in the same step.
//! 3. Gmail answers 404 for a cursor older than its history: full resync (profile historyId
//!    first, then a bounded message listing, a `resync` entry, the listed messages), then the
//!    history from the profile's historyId.
//!
//! While the sync runs, the lease is renewed every third of its TTL; the commit script checks
//! it again, so a worker that lost its lease (paused, partitioned) can never write.

use crate::config::SyncSettings;
use crate::gmail::wire::HistoryRecord;
use crate::gmail::{GmailClient, GmailError, REQUESTS_IN_TASK};
use crate::history_id::HistoryId;
use crate::mailbox::{Mailbox, MailboxLogStyle};
use crate::store::{Begin, ChangeEntry, ChangeKind, Lease, Store, StoreError};
use crate::telemetry::Counters;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How a sync attempt ended. The consumer turns it into acks, retries or nacks.
#[derive(Debug)]
pub enum SyncOutcome {
    /// The stored cursor already covered the target: no Gmail call was made.
    UpToDate {
        cursor: HistoryId,
    },
    /// Gmail was read and everything up to `cursor` is committed.
    Synced {
        cursor: HistoryId,
        changes: u64,
    },
    /// The mailbox is not registered.
    Unknown,
    /// The mailbox needs attention; notifications are acked, the cursor is kept.
    Disabled {
        cursor: HistoryId,
    },
    /// Another worker holds the mailbox lease.
    Busy {
        cursor: HistoryId,
    },
    Failed(SyncError),
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("gmail: {0}")]
    Gmail(#[from] GmailError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("history still gone right after a full resync")]
    ResyncLoop,
    /// Shutdown cut the sync short; what was committed stays, the rest is redone later.
    #[error("cancelled by shutdown")]
    Cancelled,
}

impl SyncError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Gmail(e) => e.is_retryable(),
            SyncError::Store(e) => e.is_retryable(),
            SyncError::ResyncLoop | SyncError::Cancelled => true,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SyncError::Gmail(e) => e.retry_after(),
            _ => None,
        }
    }
}

pub struct Syncer {
    gmail: GmailClient,
    store: Store,
    settings: SyncSettings,
    counters: Arc<Counters>,
    log_style: MailboxLogStyle,
}

impl Syncer {
    pub fn new(
        gmail: GmailClient,
        store: Store,
        settings: SyncSettings,
        counters: Arc<Counters>,
        log_style: MailboxLogStyle,
    ) -> Syncer {
        Syncer {
            gmail,
            store,
            settings,
            counters,
            log_style,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Brings `mailbox` to at least `target` if it can. Never panics, never leaves the lease
    /// held on return (except when the task is dropped mid-way: the TTL frees it then).
    /// `cancel` stops the sync at its next await point (shutdown); committed pages stay.
    pub async fn sync(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        cancel: &CancellationToken,
    ) -> SyncOutcome {
        let lease = Lease::new(self.settings.mailbox_lease);
        let cursor = match self.store.begin(mailbox, target, &lease).await {
            Err(e) => return SyncOutcome::Failed(e.into()),
            Ok(Begin::Unknown) => return SyncOutcome::Unknown,
            Ok(Begin::Disabled { cursor }) => return SyncOutcome::Disabled { cursor },
            Ok(Begin::UpToDate { cursor }) => return SyncOutcome::UpToDate { cursor },
            Ok(Begin::Busy { cursor }) => {
                Counters::inc(&self.counters.lease_busy);
                return SyncOutcome::Busy { cursor };
            }
            Ok(Begin::Leased { cursor }) => cursor,
        };
        let span = tracing::info_span!(
            "sync",
            mailbox = %mailbox.for_log(self.log_style),
            from = %cursor,
            target = %target,
        );
        let work = self.run(mailbox, &lease, cursor);
        let (result, gmail_calls) = REQUESTS_IN_TASK
            .scope(std::cell::Cell::new(0), async {
                let result = tokio::select! {
                    result = self.holding_lease(mailbox, &lease, work) => result,
                    _ = cancel.cancelled() => Err(SyncError::Cancelled),
                };
                (result, REQUESTS_IN_TASK.with(|n| n.get()))
            })
            .instrument(span.clone())
            .await;
        match result {
            Ok(progress) => {
                Counters::inc(&self.counters.syncs);
                span.in_scope(|| {
                    tracing::debug!(
                        to = %progress.cursor,
                        pages = progress.pages,
                        changes = progress.changes,
                        gmail_calls,
                        "sync committed"
                    )
                });
                SyncOutcome::Synced {
                    cursor: progress.cursor,
                    changes: progress.changes,
                }
            }
            Err(e) => {
                // Best effort: the TTL frees the lease anyway if this fails.
                let _ = self.store.release_lease(mailbox, &lease).await;
                let permanent = !e.is_retryable();
                let marked = if permanent {
                    self.store.mark_attention(mailbox, &e.to_string()).await
                } else {
                    Ok(())
                };
                span.in_scope(|| {
                    if matches!(e, SyncError::Cancelled) {
                        tracing::info!(gmail_calls, "sync cancelled by shutdown");
                    } else if !permanent {
                        Counters::inc(&self.counters.sync_errors_retryable);
                        tracing::warn!(error = %e, gmail_calls, "sync failed, will retry");
                    } else {
                        Counters::inc(&self.counters.sync_errors_permanent);
                        tracing::error!(
                            error = %e,
                            gmail_calls,
                            "sync failed permanently; mailbox marked as needing attention"
                        );
                    }
                    if let Err(mark) = marked {
                        tracing::warn!(error = %mark, "could not mark the mailbox as needing attention");
                    }
                });
                SyncOutcome::Failed(e)
            }
        }
    }

    /// Runs `work` while renewing the lease every third of its TTL. If the lease is lost the
    /// work is dropped at its next await point; nothing it had not committed is written.
    async fn holding_lease<T>(
        &self,
        mailbox: &Mailbox,
        lease: &Lease,
        work: impl Future<Output = Result<T, SyncError>>,
    ) -> Result<T, SyncError> {
        let renew = async {
            let period = lease.ttl / 3;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                match self.store.renew_lease(mailbox, lease).await {
                    Ok(true) => {}
                    Ok(false) => return SyncError::Store(StoreError::LeaseLost),
                    // Keep going: the commit script checks the lease itself.
                    Err(e) => tracing::warn!(error = %e, "could not renew the mailbox lease"),
                }
            }
        };
        // `biased`: when the final commit (which releases the lease) and a renewal race, the
        // work's result is read first; replies arrive in order on the connection.
        tokio::select! {
            biased;
            result = work => result,
            lost = renew => Err(lost),
        }
    }

    async fn run(
        &self,
        mailbox: &Mailbox,
        lease: &Lease,
        cursor: HistoryId,
    ) -> Result<Progress, SyncError> {
        let mut progress = Progress {
            cursor,
            pages: 0,
            changes: 0,
        };
        let mut start = cursor;
        let mut page_token: Option<String> = None;
        let mut resynced = false;
        loop {
            let page = match self
                .gmail
                .history_page(
                    mailbox,
                    start,
                    page_token.as_deref(),
                    self.settings.history_page_size,
                )
                .await
            {
                Ok(page) => page,
                Err(GmailError::HistoryGone) if !resynced => {
                    resynced = true;
                    let written;
                    (progress.cursor, written) =
                        self.full_resync(mailbox, lease, progress.cursor).await?;
                    progress.changes += written;
                    start = progress.cursor;
                    page_token = None;
                    continue;
                }
                Err(GmailError::HistoryGone) => return Err(SyncError::ResyncLoop),
                Err(e) => return Err(e.into()),
            };
            progress.pages += 1;
            Counters::inc(&self.counters.history_pages);
            let last_page = page.next_page_token.is_none();
            let last_record = page.history.last().map(|r| r.id);
            let entries = entries_of(&page.history);
            // Records are chronological: after a page, everything up to its last record is
            // read. After the last page, the mailbox's current historyId is.
            let to = match (last_page, last_record) {
                (true, r) => page.history_id.max(r.unwrap_or_default()),
                (false, Some(r)) => r,
                (false, None) => progress.cursor,
            }
            .max(progress.cursor);
            if last_page || !entries.is_empty() || to > progress.cursor {
                progress.cursor = self
                    .store
                    .commit(mailbox, lease, progress.cursor, to, &entries, last_page)
                    .await?;
                progress.changes += entries.len() as u64;
                Counters::add(&self.counters.changes_written, entries.len() as u64);
            }
            if last_page {
                return Ok(progress);
            }
            page_token = page.next_page_token;
        }
    }

    /// After a 404: profile historyId H0 first, then the newest messages (bounded), written as a
    /// `resync` entry followed by `message_listed` entries, with cursor = H0. Changes made while
    /// listing are after H0, so the history read that follows picks them up (invariant I5).
    async fn full_resync(
        &self,
        mailbox: &Mailbox,
        lease: &Lease,
        from: HistoryId,
    ) -> Result<(HistoryId, u64), SyncError> {
        Counters::inc(&self.counters.resyncs);
        let profile = self.gmail.profile(mailbox).await?;
        let h0 = profile.history_id;
        tracing::warn!(profile_history_id = %h0, "history no longer available, full resync");
        let max = self.settings.resync_max_messages as usize;
        let mut listed = Vec::new();
        let mut truncated = false;
        let mut page_token: Option<String> = None;
        while listed.len() < max {
            let want = (max - listed.len()).min(500) as u32;
            let page = self
                .gmail
                .list_messages(mailbox, page_token.as_deref(), want)
                .await?;
            listed.extend(page.messages);
            match page.next_page_token {
                Some(t) => page_token = Some(t),
                None => break,
            }
        }
        if listed.len() > max || (listed.len() == max && page_token.is_some()) {
            truncated = true;
            listed.truncate(max);
        }
        let mut entries = Vec::with_capacity(listed.len() + 1);
        entries.push(ChangeEntry {
            kind: ChangeKind::Resync,
            history_id: h0,
            fields: vec![
                ("reason", "history_gone".to_string()),
                ("listed", listed.len().to_string()),
                ("truncated", if truncated { "1" } else { "0" }.to_string()),
            ],
        });
        for m in &listed {
            entries.push(ChangeEntry {
                kind: ChangeKind::MessageListed,
                history_id: h0,
                fields: vec![
                    ("message_id", m.id.clone()),
                    ("thread_id", m.thread_id.clone()),
                ],
            });
        }
        let to = h0.max(from);
        let cursor = self
            .store
            .commit(mailbox, lease, from, to, &entries, false)
            .await?;
        Counters::add(&self.counters.changes_written, entries.len() as u64);
        Ok((cursor, entries.len() as u64))
    }
}

struct Progress {
    cursor: HistoryId,
    pages: u32,
    changes: u64,
}

/// History records → change entries, in history order (within a record: added, deleted,
/// labels added, labels removed; Gmail puts one kind of change in a record).
pub fn entries_of(records: &[HistoryRecord]) -> Vec<ChangeEntry> {
    let mut out = Vec::new();
    for r in records {
        let added = r
            .messages_added
            .iter()
            .map(|c| (ChangeKind::MessageAdded, &c.message, &c.message.label_ids));
        let deleted = r
            .messages_deleted
            .iter()
            .map(|c| (ChangeKind::MessageDeleted, &c.message, &c.message.label_ids));
        let labeled = r
            .labels_added
            .iter()
            .map(|c| (ChangeKind::LabelsAdded, &c.message, &c.label_ids));
        let unlabeled = r
            .labels_removed
            .iter()
            .map(|c| (ChangeKind::LabelsRemoved, &c.message, &c.label_ids));
        for (kind, m, labels) in added.chain(deleted).chain(labeled).chain(unlabeled) {
            out.push(ChangeEntry::message(
                kind,
                r.id,
                &m.id,
                &m.thread_id,
                labels,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_entries_in_order() {
        let records: Vec<HistoryRecord> = serde_json::from_str(
            r#"[{"id":"3","messagesAdded":[{"message":{"id":"a","threadId":"t","labelIds":["INBOX","UNREAD"]}}]},
                {"id":"7","labelsRemoved":[{"message":{"id":"a","threadId":"t"},"labelIds":["UNREAD"]}]},
                {"id":"9","messages":[{"id":"a","threadId":"t"}]},
                {"id":"12","messagesDeleted":[{"message":{"id":"a","threadId":"t"}}]}]"#,
        )
        .unwrap();
        let e = entries_of(&records);
        let kinds: Vec<_> = e.iter().map(|e| (e.kind, e.history_id.get())).collect();
        assert_eq!(
            kinds,
            vec![
                (ChangeKind::MessageAdded, 3),
                (ChangeKind::LabelsRemoved, 7),
                (ChangeKind::MessageDeleted, 12)
            ]
        );
        assert_eq!(e[0].fields[2], ("label_ids", "INBOX,UNREAD".to_string()));
        assert_eq!(e[1].fields[2], ("label_ids", "UNREAD".to_string()));
    }
}
