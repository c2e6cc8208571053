//! One simulated mailbox: its messages, threads, history records, retention horizon and watch.

use super::ledger::ChangeKind;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

/// Gmail system labels (any other string is accepted as a user label id).
pub const SYSTEM_LABELS: &[&str] = &[
    "INBOX",
    "UNREAD",
    "STARRED",
    "IMPORTANT",
    "SENT",
    "DRAFT",
    "SPAM",
    "TRASH",
    "CATEGORY_PERSONAL",
    "CATEGORY_SOCIAL",
    "CATEGORY_PROMOTIONS",
    "CATEGORY_UPDATES",
    "CATEGORY_FORUMS",
];

/// A live message.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub id: String,
    pub thread_id: String,
    /// In the order they were added.
    pub labels: Vec<String>,
    /// The id of the last history record that modified the message.
    pub history_id: u64,
    pub internal_date_ms: u64,
    pub size_estimate: u64,
    pub snippet: String,
    /// All its headers, in order (see [`super::metadata::simulated_headers`]).
    pub headers: Vec<(String, String)>,
}

impl Message {
    /// What `messages.get?format=metadata` answers about it (and the ledger records).
    pub fn meta(&self) -> super::metadata::MessageMeta {
        super::metadata::MessageMeta {
            headers: self.headers.clone(),
            snippet: self.snippet.clone(),
            size_estimate: self.size_estimate,
            internal_date_ms: self.internal_date_ms,
        }
    }
}

/// One history record (one change).
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub id: u64,
    pub kind: ChangeKind,
    pub message_id: String,
    pub thread_id: String,
    /// Labels added/removed (label changes) or empty.
    pub changed: Vec<String>,
    /// The message's labels after the change (at deletion for a delete).
    pub labels: Vec<String>,
    pub at: Instant,
}

impl Record {
    /// The `labelId` filter: the message carried `label` before or after the change.
    pub fn touches_label(&self, label: &str) -> bool {
        self.labels.iter().any(|l| l == label) || self.changed.iter().any(|l| l == label)
    }
}

/// A `users.watch` registration.
#[derive(Debug, Clone)]
pub(crate) struct Watch {
    pub topic: String,
    pub label_ids: Vec<String>,
    /// `labelFilterBehavior` = exclude.
    pub exclude: bool,
    /// Increases with every watch/stop so stale scheduled notifications are recognised.
    pub generation: u64,
    pub expires: Instant,
    /// `expires` as epoch ms: the `expiration` the watch call answered.
    pub expiration_ms: u64,
    /// When the last notification was sent (folding window start).
    pub last_sent: Option<Instant>,
    /// A notification is scheduled and not yet sent: further changes fold into it.
    pub scheduled: bool,
}

impl Watch {
    /// Whether a change touching these labels (before ∪ after) triggers a notification.
    pub fn matches(&self, labels: &[String], changed: &[String]) -> bool {
        if self.label_ids.is_empty() {
            return true;
        }
        let hit = self
            .label_ids
            .iter()
            .any(|w| labels.contains(w) || changed.contains(w));
        if self.exclude { !hit } else { hit }
    }
}

/// Why `history.list` refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HistoryError {
    /// startHistoryId (or the page token's position) is older than the retention horizon.
    NotFound,
}

/// One page of `history.list`.
#[derive(Debug, Clone)]
pub(crate) struct HistoryPage {
    pub records: Vec<Record>,
    /// The position to continue after, if more matching records exist.
    pub next_after: Option<u64>,
    pub current: u64,
}

/// Filters of `history.list`.
#[derive(Debug, Clone, Default)]
pub(crate) struct HistoryQuery {
    pub start: u64,
    /// Continue strictly after this id (page token) instead of `start`.
    pub after: Option<u64>,
    pub max_results: usize,
    /// `None` = all types.
    pub types: Option<Vec<ChangeKind>>,
    pub label: Option<String>,
    /// Records that happened after this instant are not visible yet (`SimConfig::history_lag`);
    /// `None`: all are.
    pub visible_until: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Mailbox {
    pub email: String,
    pub history_id: u64,
    /// The oldest startHistoryId still accepted (ids below → 404).
    pub horizon: u64,
    pub records: VecDeque<Record>,
    /// Live messages by id (fixed-width hex ids: key order = delivery order).
    pub messages: BTreeMap<String, Message>,
    /// Live message count per thread.
    pub threads: HashMap<String, usize>,
    pub watch: Option<Watch>,
    /// The `watch` call currently in processing for this mailbox (its claim id), if any.
    pub watch_claim: Option<u64>,
    /// Per-mailbox override of the time-based retention.
    pub retention: Option<Duration>,
}

impl Mailbox {
    pub fn new(email: &str, initial_history_id: u64) -> Self {
        Mailbox {
            email: email.to_string(),
            history_id: initial_history_id,
            horizon: initial_history_id,
            records: VecDeque::new(),
            messages: BTreeMap::new(),
            threads: HashMap::new(),
            watch: None,
            watch_claim: None,
            retention: None,
        }
    }

    /// Drops records older than `retention` (time-based horizon).
    pub fn apply_retention(&mut self, retention: Option<Duration>, now: Instant) {
        let Some(retention) = self.retention.or(retention) else {
            return;
        };
        let Some(cutoff) = now.checked_sub(retention) else {
            return;
        };
        while let Some(front) = self.records.front() {
            if front.at >= cutoff {
                break;
            }
            self.horizon = self.horizon.max(front.id);
            self.records.pop_front();
        }
    }

    /// Drops all history up to now: any startHistoryId below the current id answers 404.
    pub fn expire_all(&mut self) {
        self.records.clear();
        self.horizon = self.history_id;
    }

    /// Drops history up to and including `history_id`.
    pub fn expire_up_to(&mut self, history_id: u64) {
        while let Some(front) = self.records.front() {
            if front.id > history_id {
                break;
            }
            self.records.pop_front();
        }
        self.horizon = self.horizon.max(history_id.min(self.history_id));
    }

    pub fn list_history(&self, q: &HistoryQuery) -> Result<HistoryPage, HistoryError> {
        let after = q.after.unwrap_or(q.start).max(q.start);
        if q.start < self.horizon || after < self.horizon {
            return Err(HistoryError::NotFound);
        }
        let matches = |r: &Record| {
            q.types.as_ref().is_none_or(|t| t.contains(&r.kind))
                && q.label.as_deref().is_none_or(|l| r.touches_label(l))
        };
        let idx = self.records.partition_point(|r| r.id <= after);
        let mut out = Vec::with_capacity(q.max_results.min(64));
        let mut next_after = None;
        // A lagging history answers as of just before its first invisible record.
        let mut current = self.history_id;
        for r in self.records.range(idx..) {
            if q.visible_until.is_some_and(|until| r.at > until) {
                current = current.min(r.id - 1).max(after);
                break;
            }
            if !matches(r) {
                continue;
            }
            if out.len() == q.max_results {
                next_after = out.last().map(|r: &Record| r.id);
                break;
            }
            out.push(r.clone());
        }
        Ok(HistoryPage {
            records: out,
            next_after,
            current,
        })
    }

    pub fn threads_total(&self) -> usize {
        self.threads.len()
    }

    pub fn push_record(&mut self, record: Record) {
        debug_assert!(self.records.back().is_none_or(|b| b.id < record.id));
        self.records.push_back(record);
    }

    pub fn insert_message(&mut self, msg: Message) {
        *self.threads.entry(msg.thread_id.clone()).or_insert(0) += 1;
        self.messages.insert(msg.id.clone(), msg);
    }

    pub fn remove_message(&mut self, id: &str) -> Option<Message> {
        let msg = self.messages.remove(id)?;
        if let Some(n) = self.threads.get_mut(&msg.thread_id) {
            *n -= 1;
            if *n == 0 {
                self.threads.remove(&msg.thread_id);
            }
        }
        Some(msg)
    }

    /// Whether `thread_id` is a thread of this mailbox (it has at least one live message).
    pub fn has_thread(&self, thread_id: &str) -> bool {
        self.threads.contains_key(thread_id)
    }
}

pub(crate) fn now_ms() -> u64 {
    super::ledger::epoch_ms(SystemTime::now())
}
