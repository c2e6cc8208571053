//! The change stream's schema, version 1: the only place that knows its field names.
//!
//! Every entry has `v` = `1`, `mailbox`, `kind`, `history_id` (commit.lua writes the first two;
//! a test keeps [`SCHEMA_VERSION`] and the script in step). By kind:
//! - `message_added`, `message_deleted`: `message_id`, `thread_id`, `label_ids` (comma-separated,
//!   the message's labels as Gmail reported them; may be empty);
//! - `labels_added`, `labels_removed`: `message_id`, `thread_id`, `label_ids` (the labels
//!   added/removed by this change);
//! - `resync`: Gmail no longer had history after the cursor; `history_id` is the profile's
//!   historyId the mailbox restarts from, `reason`, `listed` (messages listed after this entry),
//!   `truncated` (`1` if the listing stopped at GMAIL_SYNC_RESYNC_MAX_MESSAGES);
//! - `message_listed`: a message present at resync time: `message_id`, `thread_id`.
//!
//! Entries of one mailbox appear in history order; `history_id` is the Gmail history record's
//! id. New kinds and fields are only ever added (v1 stays readable by existing consumers).

use crate::history_id::HistoryId;

/// The schema version written in every change entry's `v` field (by commit.lua).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    MessageAdded,
    MessageDeleted,
    LabelsAdded,
    LabelsRemoved,
    Resync,
    MessageListed,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::MessageAdded => "message_added",
            ChangeKind::MessageDeleted => "message_deleted",
            ChangeKind::LabelsAdded => "labels_added",
            ChangeKind::LabelsRemoved => "labels_removed",
            ChangeKind::Resync => "resync",
            ChangeKind::MessageListed => "message_listed",
        }
    }
}

/// Why a `resync` entry was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// Gmail answered 404 for the stored cursor.
    HistoryGone,
    /// An operator asked for it (`mailbox resync`).
    Requested,
}

impl ResyncReason {
    fn as_str(self) -> &'static str {
        match self {
            ResyncReason::HistoryGone => "history_gone",
            ResyncReason::Requested => "requested",
        }
    }
}

/// One entry for the change stream, built only by the constructors below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEntry {
    pub(crate) kind: ChangeKind,
    pub(crate) history_id: HistoryId,
    /// Field/value pairs after `v`, `mailbox`, `kind`, `history_id`.
    pub(crate) fields: Vec<(&'static str, String)>,
}

impl ChangeEntry {
    /// A message change (`message_*` and `labels_*` kinds).
    pub fn message(
        kind: ChangeKind,
        history_id: HistoryId,
        message_id: &str,
        thread_id: &str,
        label_ids: &[String],
    ) -> ChangeEntry {
        ChangeEntry {
            kind,
            history_id,
            fields: vec![
                ("message_id", message_id.to_string()),
                ("thread_id", thread_id.to_string()),
                ("label_ids", label_ids.join(",")),
            ],
        }
    }

    /// The `resync` entry that precedes a listing of `listed` messages.
    pub fn resync(
        restart_from: HistoryId,
        reason: ResyncReason,
        listed: usize,
        truncated: bool,
    ) -> ChangeEntry {
        ChangeEntry {
            kind: ChangeKind::Resync,
            history_id: restart_from,
            fields: vec![
                ("reason", reason.as_str().to_string()),
                ("listed", listed.to_string()),
                ("truncated", if truncated { "1" } else { "0" }.to_string()),
            ],
        }
    }

    /// A message present when the resync listed the mailbox.
    pub fn listed(restart_from: HistoryId, message_id: &str, thread_id: &str) -> ChangeEntry {
        ChangeEntry {
            kind: ChangeKind::MessageListed,
            history_id: restart_from,
            fields: vec![
                ("message_id", message_id.to_string()),
                ("thread_id", thread_id.to_string()),
            ],
        }
    }

    pub fn kind(&self) -> ChangeKind {
        self.kind
    }

    pub fn history_id(&self) -> HistoryId {
        self.history_id
    }

    /// The value of a field after the common ones (e.g. `label_ids`), if present.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| *f == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_script_writes_the_schema_version() {
        let field = format!("'v', '{SCHEMA_VERSION}'");
        assert!(include_str!("commit.lua").contains(&field));
    }

    #[test]
    fn resync_entry_fields() {
        let e = ChangeEntry::resync(HistoryId(9), ResyncReason::HistoryGone, 3, true);
        assert_eq!(e.kind(), ChangeKind::Resync);
        assert_eq!(e.field("reason"), Some("history_gone"));
        assert_eq!(e.field("listed"), Some("3"));
        assert_eq!(e.field("truncated"), Some("1"));
    }
}
