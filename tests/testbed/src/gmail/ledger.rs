//! The ledger: an append-only, ordered record of every change the simulator made to a mailbox,
//! every API call it answered and every notification it decided to send. Tests (and the
//! product's fault suite) compare the product's output with it.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::SystemTime;

/// The kind of a mailbox change. Every kind except [`ChangeKind::Invisible`] produces exactly one
/// history record with the same historyId.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ChangeKind {
    /// A message was delivered (`messagesAdded`).
    MessageAdded,
    /// A message was deleted permanently (`messagesDeleted`).
    MessageDeleted,
    /// Labels were added to a message (`labelsAdded`).
    LabelAdded,
    /// Labels were removed from a message (`labelsRemoved`).
    LabelRemoved,
    /// The historyId advanced without a history record (what Gmail does for drafts, settings
    /// and other changes that `history.list` never shows). Made by [`super::GmailSim::touch`].
    Invisible,
}

impl ChangeKind {
    /// The `historyTypes` value that selects this kind (`None` for [`ChangeKind::Invisible`]).
    pub fn history_type(self) -> Option<&'static str> {
        match self {
            ChangeKind::MessageAdded => Some("messageAdded"),
            ChangeKind::MessageDeleted => Some("messageDeleted"),
            ChangeKind::LabelAdded => Some("labelAdded"),
            ChangeKind::LabelRemoved => Some("labelRemoved"),
            ChangeKind::Invisible => None,
        }
    }
}

/// One change made to a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeEntry {
    pub mailbox: String,
    /// The mailbox's historyId after the change (= the history record's id).
    #[serde(serialize_with = "u64_as_string")]
    pub history_id: u64,
    pub kind: ChangeKind,
    /// Empty for [`ChangeKind::Invisible`].
    pub message_id: String,
    /// Empty for [`ChangeKind::Invisible`].
    pub thread_id: String,
    /// Labels the change affected: the message's labels for added/deleted, the labels actually
    /// added/removed for label changes.
    pub label_ids: Vec<String>,
    /// The message's labels after the change (before it, for a deletion).
    pub labels_after: Vec<String>,
    /// For [`ChangeKind::MessageAdded`]: the message's metadata as `messages.get` answers it
    /// (headers, snippet, size, internal date; they never change afterwards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<super::metadata::MessageMeta>,
    #[serde(serialize_with = "time_ms")]
    pub at: SystemTime,
}

impl ChangeEntry {
    /// Whether `history.list` shows a record for this change.
    pub fn has_record(&self) -> bool {
        self.kind != ChangeKind::Invisible
    }
}

/// The API endpoint of a call. Also used to target fault rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Endpoint {
    /// `users.getProfile`
    GetProfile,
    /// `users.history.list`
    HistoryList,
    /// `users.messages.list`
    MessagesList,
    /// `users.messages.get`
    MessagesGet,
    /// `users.watch`
    Watch,
    /// `users.stop`
    Stop,
    /// The OAuth token endpoint (`POST /token`).
    Token,
    /// The fake IAM Credentials `signJwt` (keyless delegation signing).
    IamSignJwt,
    /// A batch request (`POST /batch/gmail/v1`) as a whole: free; each of its parts is a call
    /// of its own endpoint in the ledger, with [`CallEntry::batch`] set.
    Batch,
}

impl Endpoint {
    /// Gmail quota units of one call.
    pub fn cost(self) -> u64 {
        match self {
            Endpoint::GetProfile => 1,
            Endpoint::HistoryList => 2,
            Endpoint::MessagesList => 5,
            Endpoint::MessagesGet => 5,
            Endpoint::Watch => 100,
            Endpoint::Stop => 50,
            Endpoint::Token | Endpoint::IamSignJwt | Endpoint::Batch => 0,
        }
    }

    /// Gmail's method name.
    pub fn method_name(self) -> &'static str {
        match self {
            Endpoint::GetProfile => "users.getProfile",
            Endpoint::HistoryList => "users.history.list",
            Endpoint::MessagesList => "users.messages.list",
            Endpoint::MessagesGet => "users.messages.get",
            Endpoint::Watch => "users.watch",
            Endpoint::Stop => "users.stop",
            Endpoint::Token => "oauth2.token",
            Endpoint::IamSignJwt => "iam.serviceAccounts.signJwt",
            Endpoint::Batch => "batch",
        }
    }
}

/// One API call as the simulator answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallEntry {
    pub endpoint: Endpoint,
    /// The mailbox the call addressed (resolved from `me`); for the token endpoint the grant's
    /// mailbox when known. `None` when it could not be resolved (e.g. a 401).
    pub mailbox: Option<String>,
    /// The bearer token presented (`None` if absent; for the token endpoint, `None`).
    pub bearer: Option<String>,
    /// Quota units charged (0 for calls refused before the quota check: auth errors, injected
    /// faults, quota/concurrency refusals, and for the token endpoint).
    pub cost: u64,
    /// The HTTP status answered; 499 when the client gave up before the answer (e.g. a hang).
    pub status: u16,
    /// The `reason` of the error answered, if any (e.g. `notFound`, `rateLimitExceeded`,
    /// `invalid_grant`).
    pub error_reason: Option<String>,
    /// Whether an injected fault rule produced (or delayed) the answer.
    pub faulted: bool,
    /// For a part of a batch request, and for the batch's own [`Endpoint::Batch`] entry: the
    /// batch's number (1, 2, ... in arrival order). `None` for a direct call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
    #[serde(serialize_with = "time_ms")]
    pub started: SystemTime,
    #[serde(serialize_with = "time_ms")]
    pub ended: SystemTime,
}

/// What became of a notification the simulator decided to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "outcome", content = "detail")]
pub enum NotificationOutcome {
    /// Published to the Pub/Sub emulator (carries the Pub/Sub message id).
    Published(String),
    /// Dropped on purpose (`notify_drop_probability`).
    Dropped,
    /// Publishing failed (e.g. the topic does not exist).
    Failed(String),
    /// No `pubsub_endpoint` configured: nothing was published.
    NoEndpoint,
}

/// One notification (after folding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationEntry {
    pub mailbox: String,
    pub topic: String,
    #[serde(serialize_with = "u64_as_string")]
    pub history_id: u64,
    /// The exact payload (JSON) that was (or would have been) published.
    pub payload: String,
    pub outcome: NotificationOutcome,
    #[serde(serialize_with = "time_ms")]
    pub at: SystemTime,
}

/// One ledger entry, in the order the simulator made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum LedgerEntry {
    Change(ChangeEntry),
    Call(CallEntry),
    Notification(NotificationEntry),
}

/// A snapshot of the ledger (a clone; later activity does not show in it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ledger {
    pub entries: Vec<LedgerEntry>,
}

impl Ledger {
    /// All changes, in order.
    pub fn changes(&self) -> Vec<&ChangeEntry> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                LedgerEntry::Change(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// The changes of one mailbox, in order (strictly increasing historyIds).
    pub fn changes_for(&self, email: &str) -> Vec<&ChangeEntry> {
        self.changes()
            .into_iter()
            .filter(|c| c.mailbox == email)
            .collect()
    }

    /// All calls, in the order they completed.
    pub fn calls(&self) -> Vec<&CallEntry> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                LedgerEntry::Call(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// The calls addressed to one mailbox.
    pub fn calls_for(&self, email: &str) -> Vec<&CallEntry> {
        self.calls()
            .into_iter()
            .filter(|c| c.mailbox.as_deref() == Some(email))
            .collect()
    }

    /// The calls to one endpoint.
    pub fn calls_to(&self, endpoint: Endpoint) -> Vec<&CallEntry> {
        self.calls()
            .into_iter()
            .filter(|c| c.endpoint == endpoint)
            .collect()
    }

    /// The calls to one endpoint addressed to one mailbox, in the order they completed.
    pub fn calls_to_for(&self, endpoint: Endpoint, email: &str) -> Vec<&CallEntry> {
        self.calls()
            .into_iter()
            .filter(|c| c.endpoint == endpoint && c.mailbox.as_deref() == Some(email))
            .collect()
    }

    /// The `users.watch` calls of one mailbox (every answer: 200, 400 conflicts, faults, 499).
    pub fn watch_calls_for(&self, email: &str) -> Vec<&CallEntry> {
        self.calls_to_for(Endpoint::Watch, email)
    }

    /// The calls to one endpoint grouped by mailbox (calls without a resolved mailbox left out),
    /// each group in completion order. E.g. `calls_by_mailbox(Endpoint::Watch)` = the watch
    /// calls per mailbox.
    pub fn calls_by_mailbox(&self, endpoint: Endpoint) -> BTreeMap<String, Vec<&CallEntry>> {
        let mut out: BTreeMap<String, Vec<&CallEntry>> = BTreeMap::new();
        for c in self.calls_to(endpoint) {
            if let Some(m) = &c.mailbox {
                out.entry(m.clone()).or_default().push(c);
            }
        }
        out
    }

    /// Pairs of calls to `endpoint` for the same mailbox that were in flight at the same time:
    /// `(mailbox, earlier-started, later-started)` with `later.started < earlier.ended`
    /// (intervals that only touch do not overlap). Every answered call counts, refused ones
    /// too (they were in flight). Sorted by mailbox, then by the first call's start.
    pub fn overlapping_calls(&self, endpoint: Endpoint) -> Vec<(String, CallEntry, CallEntry)> {
        let mut out = Vec::new();
        for (mailbox, mut calls) in self.calls_by_mailbox(endpoint) {
            calls.sort_by_key(|c| c.started);
            for (i, a) in calls.iter().enumerate() {
                for b in &calls[i + 1..] {
                    if b.started >= a.ended {
                        break; // sorted by start: no later call overlaps `a` either
                    }
                    out.push((mailbox.clone(), (*a).clone(), (*b).clone()));
                }
            }
        }
        out
    }

    /// All notifications (published, dropped, failed), in order.
    pub fn notifications(&self) -> Vec<&NotificationEntry> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                LedgerEntry::Notification(n) => Some(n),
                _ => None,
            })
            .collect()
    }

    /// The notifications of one mailbox.
    pub fn notifications_for(&self, email: &str) -> Vec<&NotificationEntry> {
        self.notifications()
            .into_iter()
            .filter(|n| n.mailbox == email)
            .collect()
    }

    /// Total quota units charged.
    pub fn quota_units(&self) -> u64 {
        self.calls().iter().map(|c| c.cost).sum()
    }

    /// Quota units charged to one mailbox.
    pub fn quota_units_for(&self, email: &str) -> u64 {
        self.calls_for(email).iter().map(|c| c.cost).sum()
    }

    /// The last historyId of a mailbox according to the ledger (`None` without changes).
    pub fn last_history_id(&self, email: &str) -> Option<u64> {
        self.changes_for(email).last().map(|c| c.history_id)
    }
}

pub(crate) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn time_ms<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(epoch_ms(*t))
}

fn u64_as_string<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}
