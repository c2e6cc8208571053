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
//! 4. Before each commit, the entries of new messages (`message_added`, and `message_listed`
//!    after a resync) are enriched with the messages' metadata (GMAIL_SYNC_ENRICHMENT): one
//!    `users.messages.get` per message, in batches, retried per part. A message already gone is
//!    written with `gone`; a fetch still failing after its retries fails the sync (retryable),
//!    so nothing of that page is committed and an ack always means "written with metadata".
//!
//! While the sync runs, the lease is renewed every third of its TTL; the commit script checks
//! it again, so a worker that lost its lease (paused, partitioned) can never write.

use crate::config::{Enrichment, SyncSettings};
use crate::failure_guard::{Blame, SharedGuard, Verdict};
use crate::gmail::{
    FetchedMessage, GmailClient, GmailError, HistoryChange, HistoryChangeKind, HistoryPage,
    ListedMessage, MessageFormat, Method, REQUESTS_IN_TASK,
};
use crate::history_id::HistoryId;
use crate::mailbox::{Mailbox, MailboxLogStyle};
use crate::quota::{Admission, Deferral, Permit, Priority, QuotaError};
use crate::store::{
    AttentionKind, AttentionSource, Begin, ChangeEntry, ChangeKind, Lease, LeaseAfterCommit,
    ResyncReason, Store, StoreError,
};
use crate::telemetry::Counters;
use std::collections::{HashMap, HashSet};
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
    NeedsAttention {
        cursor: HistoryId,
    },
    /// Another worker holds the mailbox lease.
    Busy {
        cursor: HistoryId,
    },
    /// Failed for good, but the mailbox is not marked yet (see `failure_guard`): keep the
    /// notification and try again after `retry_after`.
    Held {
        error: SyncError,
        retry_after: Duration,
    },
    /// The quota governor said wait (before the first call, before a later one, or after a
    /// rate-limit answer it turned into a block): lease and slot are given back, whatever was
    /// committed stays; ask again after `after`. Not a failure.
    Deferred(Deferral),
    Failed(SyncError),
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("gmail: {0}")]
    Gmail(#[from] GmailError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Quota(#[from] QuotaError),
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
            SyncError::Quota(e) => e.is_retryable(),
            SyncError::ResyncLoop | SyncError::Cancelled => true,
        }
    }

    /// The governor's deferral this failure is (see [`GmailError::deferral`]).
    fn deferral(&self) -> Option<Deferral> {
        match self {
            SyncError::Gmail(e) => e.deferral(),
            _ => None,
        }
    }

    /// What a permanent failure says: its cause (mass failures are recognised by it), whose it
    /// may be, and what marking the mailbox would mean.
    pub(crate) fn permanent_failure(&self) -> PermanentFailure {
        match self {
            SyncError::Gmail(e) => PermanentFailure::of_gmail(e),
            SyncError::Store(_)
            | SyncError::Quota(_)
            | SyncError::ResyncLoop
            | SyncError::Cancelled => PermanentFailure {
                cause: self.to_string(),
                blame: Blame::Mailbox,
                kind: AttentionKind::Failed,
            },
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SyncError::Gmail(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// See [`SyncError::permanent_failure`].
#[derive(Debug, Clone)]
pub(crate) struct PermanentFailure {
    pub cause: String,
    pub blame: Blame,
    pub kind: AttentionKind,
}

impl PermanentFailure {
    pub(crate) fn of_gmail(e: &GmailError) -> PermanentFailure {
        let deployment =
            matches!(e, GmailError::Auth(a) if a.scope() == crate::auth::FailureScope::Deployment);
        PermanentFailure {
            cause: e.cause(),
            blame: if deployment {
                Blame::Deployment
            } else {
                Blame::Mailbox
            },
            kind: if e.needs_reauthorization() {
                AttentionKind::NeedsReauthorization
            } else {
                AttentionKind::Failed
            },
        }
    }
}

pub struct Syncer {
    guard: SharedGuard,
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
            guard: SharedGuard::new(settings.failure_settle),
            gmail,
            store,
            settings,
            counters,
            log_style,
        }
    }

    /// The process's failure guard (the scheduler judges renewal failures with it too).
    pub(crate) fn guard(&self) -> &SharedGuard {
        &self.guard
    }

    /// Brings `mailbox` up to its latest history (the scheduler's fallback sync of a silent
    /// mailbox: there is no notification, so no target historyId).
    pub async fn sync_latest(&self, mailbox: &Mailbox, cancel: &CancellationToken) -> SyncOutcome {
        self.sync_from(mailbox, LATEST, Start::History, Priority::Fallback, cancel)
            .await
    }

    /// A full resync now (`mailbox resync`): the same path as after a 404.
    pub async fn resync(&self, mailbox: &Mailbox, cancel: &CancellationToken) -> SyncOutcome {
        self.sync_from(
            mailbox,
            LATEST,
            Start::FullResync(ResyncReason::Requested),
            Priority::Notification,
            cancel,
        )
        .await
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
        self.sync_from(
            mailbox,
            target,
            Start::History,
            Priority::Notification,
            cancel,
        )
        .await
    }

    async fn sync_from(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        start: Start,
        priority: Priority,
        cancel: &CancellationToken,
    ) -> SyncOutcome {
        let lease = Lease::new(self.settings.mailbox_lease);
        let started = std::time::Instant::now();
        // Asked only with the lease taken: a covered target, a busy lease or an unknown
        // mailbox makes no Gmail call and so costs no quota. A wait gives the lease back at
        // once, so nothing is held while the work waits (in the coalescer, as a deferral).
        let prepaid = self.gmail.quota_units(match start {
            Start::History => Method::HistoryList,
            Start::FullResync(_) => Method::GetProfile,
        });
        let (cursor, permit) = match self.open(mailbox, target, &lease, priority, prepaid).await {
            Err(e) => {
                // Every opening step (begin, the admission, or both in one script) is counted
                // here, so Redis refusing a begin shows in the metrics like any failed sync.
                if !matches!(e, SyncError::Cancelled) {
                    Counters::inc(&self.counters.sync_errors_retryable);
                }
                // Best effort: whatever the failed step took, the TTLs free it anyway.
                let _ = self.store.release_lease(mailbox, &lease).await;
                return SyncOutcome::Failed(e);
            }
            Ok(Opening::Closed(outcome)) => return outcome,
            Ok(Opening::Admitted { cursor, permit }) => (cursor, permit),
        };
        // historyIds as numbers: the JSON field formatter writes a u64 as it is, where a
        // Display field is first formatted into a string of its own (this span opens once per
        // sync).
        let span = tracing::info_span!(
            "sync",
            mailbox = %mailbox.for_log(self.log_style),
            from = cursor.get(),
            target = target.get(),
        );
        // Boxed: the Gmail and commit part is by far the largest state machine of a sync
        // (about 14 KiB: HTTP request futures, enrichment, a resync), and a future is moved by
        // value into its task and through its stages. Unboxed, every spawned sync copied it
        // several times (memmove was 11 % of the worker's CPU samples at 1,000 syncs/s); boxed,
        // the sync task holds a pointer and the large part is allocated once, in place.
        let work = Box::pin(crate::quota::within(
            priority,
            prepaid,
            self.run(mailbox, &lease, &permit, cursor, start),
        ));
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
                self.counters.sync_committed(started.elapsed());
                self.guard.succeeded(mailbox);
                span.in_scope(|| {
                    tracing::debug!(
                        to = progress.cursor.get(),
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
                if let Some(deferral) = e.deferral() {
                    span.in_scope(|| {
                        tracing::debug!(
                            reason = deferral.reason.as_str(),
                            after_ms = deferral.after.as_millis() as u64,
                            gmail_calls,
                            "sync deferred by the quota governor"
                        )
                    });
                    return SyncOutcome::Deferred(deferral);
                }
                if e.is_retryable() {
                    span.in_scope(|| {
                        if matches!(e, SyncError::Cancelled) {
                            tracing::info!(gmail_calls, "sync cancelled by shutdown");
                        } else {
                            Counters::inc(&self.counters.sync_errors_retryable);
                            tracing::warn!(error = %e, gmail_calls, "sync failed, will retry");
                        }
                    });
                    return SyncOutcome::Failed(e);
                }
                Counters::inc(&self.counters.sync_errors_permanent);
                let failure = e.permanent_failure();
                match self.guard.judge(mailbox, &failure.cause, failure.blame) {
                    Verdict::Mark => {
                        let marked = self
                            .store
                            .mark_attention(
                                mailbox,
                                failure.kind,
                                &e.to_string(),
                                AttentionSource::Sync,
                            )
                            .await;
                        span.in_scope(|| {
                            tracing::error!(
                                error = %e,
                                attention = failure.kind.as_str(),
                                gmail_calls,
                                "sync failed permanently; mailbox marked as needing attention"
                            );
                            if let Err(mark) = marked {
                                tracing::warn!(error = %mark, "could not mark the mailbox as needing attention");
                            }
                        });
                        SyncOutcome::Failed(e)
                    }
                    Verdict::Defer { retry_after } | Verdict::Hold { retry_after } => {
                        span.in_scope(|| {
                            tracing::warn!(
                                error = %e,
                                cause = %failure.cause,
                                retry_in_s = retry_after.as_secs(),
                                gmail_calls,
                                "sync failed permanently; not marking the mailbox yet (telling a \
                                 broken mailbox from a broken deployment)"
                            )
                        });
                        SyncOutcome::Held {
                            error: e,
                            retry_after,
                        }
                    }
                }
            }
        }
    }

    /// `begin` (take the lease if `target` is not covered yet), then the quota admission of the
    /// first call: in one script where the store allows it (a single Redis), else one after
    /// the other (a cluster: the project's budget is in a slot of its own; or the governor is
    /// off: no admission). A refused admission has given the lease back when this returns.
    async fn open(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        lease: &Lease,
        priority: Priority,
        prepaid: u64,
    ) -> Result<Opening, SyncError> {
        let governor = self.gmail.governor();
        let request = governor.request(mailbox, priority, prepaid);
        if let Some(request) = request.filter(|_| self.store.can_begin_admit()) {
            let (begin, reply) = self
                .store
                .begin_admit(
                    mailbox,
                    target,
                    lease,
                    prepaid,
                    &request.windows,
                    request.slot(),
                )
                .await?;
            let cursor = match self.leased(begin) {
                Ok(cursor) => cursor,
                Err(outcome) => return Ok(Opening::Closed(outcome)),
            };
            let reply = reply.ok_or_else(|| {
                StoreError::Protocol("begin_admit: a lease taken without its charge".into())
            })?;
            return Ok(match request.decide(reply) {
                Admission::Granted(permit) => Opening::Admitted { cursor, permit },
                // The script gave the lease back with the refusal.
                Admission::Wait(deferral) => Opening::Closed(SyncOutcome::Deferred(deferral)),
            });
        }
        let cursor = match self.leased(self.store.begin(mailbox, target, lease).await?) {
            Ok(cursor) => cursor,
            Err(outcome) => return Ok(Opening::Closed(outcome)),
        };
        match governor.admit(mailbox, priority, prepaid).await {
            Ok(Admission::Granted(permit)) => Ok(Opening::Admitted { cursor, permit }),
            Ok(Admission::Wait(deferral)) => {
                let _ = self.store.release_lease(mailbox, lease).await;
                Ok(Opening::Closed(SyncOutcome::Deferred(deferral)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The cursor to sync from if `begin` took the lease, else what the sync comes to.
    fn leased(&self, begin: Begin) -> Result<HistoryId, SyncOutcome> {
        match begin {
            Begin::Leased { cursor } => Ok(cursor),
            Begin::Unknown => Err(SyncOutcome::Unknown),
            Begin::NeedsAttention { cursor } => Err(SyncOutcome::NeedsAttention { cursor }),
            Begin::UpToDate { cursor } => Err(SyncOutcome::UpToDate { cursor }),
            Begin::Busy { cursor } => {
                Counters::inc(&self.counters.lease_busy);
                Err(SyncOutcome::Busy { cursor })
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
            // A third of the TTL: two renewals may fail (a Redis blip) before the lease lapses.
            let period = lease.ttl() / 3;
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
        permit: &Permit,
        cursor: HistoryId,
        how: Start,
    ) -> Result<Progress, SyncError> {
        let mut progress = Progress {
            cursor,
            pages: 0,
            changes: 0,
        };
        let mut resynced = false;
        if let Start::FullResync(reason) = how {
            resynced = true;
            let written;
            (progress.cursor, written) = self
                .full_resync(mailbox, lease, progress.cursor, reason)
                .await?;
            progress.changes += written;
        }
        let mut start = progress.cursor;
        let mut page_token: Option<String> = None;
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
                    (progress.cursor, written) = self
                        .full_resync(mailbox, lease, progress.cursor, ResyncReason::HistoryGone)
                        .await?;
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
            match page_commit(progress.cursor, &page) {
                PageCommit::Commit { to, lease_after } => {
                    // In parts of at most `fetches` new messages, each committed up to its
                    // last record: a quota deferral (or failure) in the middle of a big page
                    // loses one part's fetches, never the whole page, so a page that costs more
                    // than a minute's budget still gets through, part by part.
                    let targets = page_targets(&page.changes);
                    let fetches = self.gmail.governor().fetches_per_commit(
                        self.gmail.quota_units(Method::MessagesGet),
                        crate::gmail::BATCH_MAX_CALLS,
                    );
                    let mut entries = entries_of(&page.changes);
                    let ends = part_ends(&page.changes, &targets, fetches);
                    let mut start = 0;
                    for (k, &end) in ends.iter().enumerate() {
                        let last_part = k + 1 == ends.len();
                        let (part_to, part_lease) = if last_part {
                            (to, lease_after)
                        } else {
                            (page.changes[end - 1].history_id, LeaseAfterCommit::Keep)
                        };
                        let part: Vec<ChangeEntry> = entries.drain(..end - start).collect();
                        let part = self.enrich(mailbox, part, &targets[start..end]).await?;
                        // The step that gives the lease back gives the quota slot back too.
                        progress.cursor = self
                            .store
                            .commit(
                                mailbox,
                                lease,
                                progress.cursor,
                                part_to,
                                &part,
                                part_lease,
                                permit.slot_token(),
                            )
                            .await?;
                        if part_lease == LeaseAfterCommit::Release {
                            permit.given_back();
                        }
                        progress.changes += part.len() as u64;
                        Counters::add(&self.counters.changes_written, part.len() as u64);
                        start = end;
                    }
                    if lease_after == LeaseAfterCommit::Release {
                        return Ok(progress);
                    }
                }
                PageCommit::NextPage => {}
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
        reason: ResyncReason,
    ) -> Result<(HistoryId, u64), SyncError> {
        Counters::inc(&self.counters.resyncs);
        let profile = self.gmail.profile(mailbox).await?;
        let h0 = profile.history_id;
        tracing::warn!(profile_history_id = h0.get(), reason = ?reason, "full resync");
        let max = self.settings.resync_max_messages as usize;
        let mut listed: Vec<ListedMessage> = Vec::new();
        let mut page_token: Option<String> = None;
        while listed.len() < max {
            let want = (max - listed.len()).min(MESSAGES_LIST_MAX_RESULTS) as u32;
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
        let truncated = cut_listing(&mut listed, max, page_token.is_some());
        let mut entries = Vec::with_capacity(listed.len() + 1);
        entries.push(ChangeEntry::resync(h0, reason, listed.len(), truncated));
        entries.extend(
            listed
                .iter()
                .map(|m| ChangeEntry::listed(h0, &m.id, &m.thread_id)),
        );
        // The same bound as the listing (GMAIL_SYNC_RESYNC_MAX_MESSAGES): one fetch per listed
        // message, none for the `resync` entry.
        let targets: Vec<Target> = std::iter::once(Target::None)
            .chain(listed.iter().map(|m| Target::Fetch(&m.id)))
            .collect();
        let entries = self.enrich(mailbox, entries, &targets).await?;
        let to = h0.max(from);
        let cursor = self
            .store
            .commit(
                mailbox,
                lease,
                from,
                to,
                &entries,
                LeaseAfterCommit::Keep,
                None,
            )
            .await?;
        Counters::add(&self.counters.changes_written, entries.len() as u64);
        Ok((cursor, entries.len() as u64))
    }
}

impl Syncer {
    /// Enriches `entries` (`targets[i]` says what to do with `entries[i]`) with the metadata
    /// of their messages, fetched in batches, or marks them `gone`. Off: unchanged, no call.
    async fn enrich(
        &self,
        mailbox: &Mailbox,
        entries: Vec<ChangeEntry>,
        targets: &[Target<'_>],
    ) -> Result<Vec<ChangeEntry>, SyncError> {
        let (format, headers): (MessageFormat, &[String]) = match &self.settings.enrichment {
            Enrichment::Off => return Ok(entries),
            Enrichment::Minimal => (MessageFormat::Minimal, &[]),
            Enrichment::Metadata { headers } => (
                MessageFormat::Metadata {
                    headers: headers.clone(),
                },
                headers,
            ),
        };
        let mut seen = HashSet::new();
        let ids: Vec<String> = targets
            .iter()
            .filter_map(|t| match t {
                Target::Fetch(id) if seen.insert(*id) => Some(id.to_string()),
                _ => None,
            })
            .collect();
        let fetched = if ids.is_empty() {
            Vec::new()
        } else {
            self.gmail.messages_metadata(mailbox, &ids, &format).await?
        };
        let by_id: HashMap<&str, &FetchedMessage> =
            ids.iter().map(String::as_str).zip(&fetched).collect();
        let mut gone = 0u32;
        let entries = entries
            .into_iter()
            .zip(targets)
            .map(|(entry, target)| match target {
                Target::None => entry,
                Target::Gone => {
                    gone += 1;
                    entry.gone()
                }
                Target::Fetch(id) => match by_id.get(id) {
                    Some(FetchedMessage::Found(meta)) => entry.with_metadata(meta, headers),
                    Some(FetchedMessage::Gone) | None => {
                        gone += 1;
                        entry.gone()
                    }
                },
            })
            .collect();
        if gone > 0 {
            tracing::debug!(
                fetched = ids.len(),
                gone,
                "messages deleted before their metadata was fetched"
            );
        }
        Ok(entries)
    }
}

/// What enrichment does with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    /// Not a new message (`message_deleted`, `labels_*`, `resync`): left as it is.
    None,
    /// A new message: fetch the metadata of this id.
    Fetch(&'a str),
    /// A new message the same page deletes: `gone` without a call (Gmail would answer 404).
    Gone,
}

/// The enrichment targets of a history page's entries (one per change, in order).
fn page_targets(changes: &[HistoryChange]) -> Vec<Target<'_>> {
    let deleted: HashSet<&str> = changes
        .iter()
        .filter(|c| c.kind == HistoryChangeKind::MessageDeleted)
        .map(|c| c.message_id.as_str())
        .collect();
    changes
        .iter()
        .map(|c| match c.kind {
            HistoryChangeKind::MessageAdded if deleted.contains(c.message_id.as_str()) => {
                Target::Gone
            }
            HistoryChangeKind::MessageAdded => Target::Fetch(&c.message_id),
            _ => Target::None,
        })
        .collect()
}

/// Where a page's changes are cut into parts (exclusive ends, the last one `changes.len()`;
/// `[0]` for an empty page): at most `max_fetches` messages to fetch per part, cut only between
/// records (changes of one record share its historyId, and a part is committed up to its last
/// record), so a record with more new messages than that is one part.
fn part_ends(changes: &[HistoryChange], targets: &[Target<'_>], max_fetches: usize) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut fetches = 0;
    for (i, target) in targets.iter().enumerate() {
        let fetch = matches!(target, Target::Fetch(_));
        let new_record = i > 0 && changes[i].history_id != changes[i - 1].history_id;
        if fetch && fetches >= max_fetches.max(1) && new_record {
            ends.push(i);
            fetches = 0;
        }
        fetches += usize::from(fetch);
    }
    ends.push(changes.len());
    ends
}

struct Progress {
    cursor: HistoryId,
    pages: u32,
    changes: u64,
}

/// How the opening of a sync ([`Syncer::open`]) went.
enum Opening {
    /// The sync ends here (nothing held): not registered, needs attention, covered, leased
    /// elsewhere, or deferred by the quota governor.
    Closed(SyncOutcome),
    /// The lease is ours, from `cursor`, and the first Gmail call is paid for.
    Admitted { cursor: HistoryId, permit: Permit },
}

/// The target of a sync that has no notification to satisfy: every historyId is below it, so
/// `begin` always takes the lease and the sync reads up to the mailbox's current history.
const LATEST: HistoryId = HistoryId(u64::MAX);

/// How a sync starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// `history.list` from the cursor (a 404 still turns into a full resync).
    History,
    /// A full resync first (profile, listing, `resync` entry), then history from there.
    FullResync(ResyncReason),
}

/// `maxResults` ceiling of `users.messages.list`.
const MESSAGES_LIST_MAX_RESULTS: usize = 500;

/// What one history page does to the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageCommit {
    /// Commit the page's entries and move the cursor to `to`; `Release` ends the sync.
    Commit {
        to: HistoryId,
        lease_after: LeaseAfterCommit,
    },
    /// Nothing to write and the cursor stays: read the next page.
    NextPage,
}

/// The page-cursor rule. Records are chronological: after a page, everything up to its last
/// record has been read; after the last page, everything up to the mailbox's current historyId
/// has. The cursor never moves back, and a page that neither writes nor advances is not
/// committed (one round trip saved).
fn page_commit(cursor: HistoryId, page: &HistoryPage) -> PageCommit {
    let last_page = page.next_page_token.is_none();
    let to = if last_page {
        page.mailbox_history_id
            .max(page.last_record.unwrap_or_default())
    } else {
        page.last_record.unwrap_or(cursor)
    }
    .max(cursor);
    if last_page {
        PageCommit::Commit {
            to,
            lease_after: LeaseAfterCommit::Release,
        }
    } else if !page.changes.is_empty() || to > cursor {
        PageCommit::Commit {
            to,
            lease_after: LeaseAfterCommit::Keep,
        }
    } else {
        PageCommit::NextPage
    }
}

/// Cuts a resync listing to `max` messages; true if messages were left out (more than `max`
/// listed, or exactly `max` with another page waiting).
fn cut_listing(listed: &mut Vec<ListedMessage>, max: usize, more_pages: bool) -> bool {
    let truncated = listed.len() > max || (listed.len() == max && more_pages);
    listed.truncate(max);
    truncated
}

/// History changes → change entries, in history order.
fn entries_of(changes: &[HistoryChange]) -> Vec<ChangeEntry> {
    changes
        .iter()
        .map(|c| {
            let kind = match c.kind {
                HistoryChangeKind::MessageAdded => ChangeKind::MessageAdded,
                HistoryChangeKind::MessageDeleted => ChangeKind::MessageDeleted,
                HistoryChangeKind::LabelsAdded => ChangeKind::LabelsAdded,
                HistoryChangeKind::LabelsRemoved => ChangeKind::LabelsRemoved,
            };
            ChangeEntry::message(
                kind,
                c.history_id,
                &c.message_id,
                &c.thread_id,
                &c.label_ids,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(changes: &[u64], last: Option<u64>, current: u64, more: bool) -> HistoryPage {
        HistoryPage {
            changes: changes
                .iter()
                .map(|&h| HistoryChange {
                    history_id: HistoryId(h),
                    kind: HistoryChangeKind::MessageAdded,
                    message_id: format!("m{h}"),
                    thread_id: "t".into(),
                    label_ids: vec!["INBOX".into()],
                })
                .collect(),
            last_record: last.map(HistoryId),
            mailbox_history_id: HistoryId(current),
            next_page_token: more.then(|| "next".to_string()),
        }
    }

    fn commit(to: u64, lease_after: LeaseAfterCommit) -> PageCommit {
        PageCommit::Commit {
            to: HistoryId(to),
            lease_after,
        }
    }

    #[test]
    fn page_cursor_rule() {
        use LeaseAfterCommit::{Keep, Release};
        let c = HistoryId(10);
        // Last page: to the mailbox's current historyId, releasing the lease.
        assert_eq!(
            page_commit(c, &page(&[12], Some(12), 20, false)),
            commit(20, Release)
        );
        // Last page, empty: still committed (it releases the lease and stamps synced_at).
        assert_eq!(
            page_commit(c, &page(&[], None, 10, false)),
            commit(10, Release)
        );
        // A current historyId behind the cursor never moves it back.
        assert_eq!(
            page_commit(c, &page(&[], None, 7, false)),
            commit(10, Release)
        );
        // More pages: up to the page's last record, keeping the lease.
        assert_eq!(
            page_commit(c, &page(&[11, 13], Some(14), 30, true)),
            commit(14, Keep)
        );
        // A record without changes we read still advances the cursor.
        assert_eq!(
            page_commit(c, &page(&[], Some(15), 30, true)),
            commit(15, Keep)
        );
        // Nothing read and nothing advanced: no round trip.
        assert_eq!(
            page_commit(c, &page(&[], None, 30, true)),
            PageCommit::NextPage
        );
    }

    #[test]
    fn resync_listing_truncation() {
        let listed = |n: usize| -> Vec<ListedMessage> {
            (0..n)
                .map(|i| ListedMessage {
                    id: format!("m{i}"),
                    thread_id: "t".into(),
                })
                .collect()
        };
        let mut l = listed(5);
        assert!(!cut_listing(&mut l, 5, false), "exactly max, nothing more");
        let mut l = listed(5);
        assert!(
            cut_listing(&mut l, 5, true),
            "exactly max, another page waits"
        );
        let mut l = listed(7);
        assert!(cut_listing(&mut l, 5, false));
        assert_eq!(l.len(), 5);
        let mut l = listed(3);
        assert!(!cut_listing(&mut l, 5, false));
        let mut l = listed(0);
        assert!(
            !cut_listing(&mut l, 0, false),
            "listing disabled, empty mailbox"
        );
    }

    fn change(h: u64, kind: HistoryChangeKind, id: &str) -> HistoryChange {
        HistoryChange {
            history_id: HistoryId(h),
            kind,
            message_id: id.into(),
            thread_id: "t".into(),
            label_ids: vec![],
        }
    }

    #[test]
    fn only_new_messages_are_fetched_and_a_deletion_in_the_page_means_gone() {
        use HistoryChangeKind::*;
        let changes = vec![
            change(1, MessageAdded, "a"),
            change(2, LabelsAdded, "a"),
            change(3, MessageAdded, "b"),
            change(4, MessageDeleted, "b"),
            change(5, LabelsRemoved, "c"),
        ];
        assert_eq!(
            page_targets(&changes),
            [
                Target::Fetch("a"),
                Target::None,
                Target::Gone,
                Target::None,
                Target::None
            ]
        );
    }

    #[test]
    fn pages_are_cut_into_parts_between_records() {
        use HistoryChangeKind::*;
        let changes = vec![
            change(1, MessageAdded, "a"),
            change(2, MessageAdded, "b"),
            change(2, MessageAdded, "c"),
            change(3, LabelsAdded, "a"),
            change(4, MessageAdded, "d"),
            change(5, MessageAdded, "e"),
        ];
        let targets = page_targets(&changes);
        assert_eq!(part_ends(&changes, &targets, 50), vec![6]);
        // Record 2's two messages stay together; label changes ride along.
        assert_eq!(part_ends(&changes, &targets, 1), vec![1, 4, 5, 6]);
        assert_eq!(part_ends(&changes, &targets, 2), vec![4, 6]);
        assert_eq!(part_ends(&changes, &targets, 3), vec![4, 6]);
        assert_eq!(part_ends(&[], &[], 3), vec![0]);
        assert_eq!(
            part_ends(&changes, &targets, 0),
            vec![1, 4, 5, 6],
            "0 means 1"
        );
    }

    #[test]
    fn changes_become_entries() {
        let p = page(&[3], Some(3), 3, false);
        let e = entries_of(&p.changes);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].kind(), ChangeKind::MessageAdded);
        assert_eq!(e[0].history_id(), HistoryId(3));
        assert_eq!(e[0].field("label_ids"), Some("INBOX"));
    }
}
