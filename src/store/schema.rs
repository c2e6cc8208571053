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
//! Enrichment (optional fields of `message_added` and `message_listed`, GMAIL_SYNC_ENRICHMENT):
//! - `internal_date` (epoch ms, when Gmail received the message), `size_estimate` (bytes),
//!   `snippet`: present when the message was fetched (`metadata` or `minimal`);
//! - `header_NAME` per header of GMAIL_SYNC_ENRICHMENT_HEADERS the message has (`metadata`):
//!   NAME lower-cased with `-` as `_` (`header_from`, `header_message_id`,
//!   `header_in_reply_to`); a header the message has several times is written once, its values
//!   joined by a line feed; values longer than [`HEADER_VALUE_MAX_BYTES`] are cut (at a
//!   character boundary) and `headers_cut` = `1` says so;
//! - `gone` = `1`: the message was deleted before it could be fetched (Gmail answered 404, or
//!   the same history page deletes it): no metadata follows, and none will.
//!
//! Without enrichment (`off`) none of these fields is written.
//!
//! Entries of one mailbox appear in history order; `history_id` is the Gmail history record's
//! id. New kinds and fields are only ever added (v1 stays readable by existing consumers).

use crate::gmail::MessageMetadata;
use crate::history_id::HistoryId;
use std::borrow::Cow;

/// Longest header value written, in bytes: a header is a field of every entry, and a To of a
/// thousand recipients would otherwise cost tens of KiB of Redis memory per entry.
pub const HEADER_VALUE_MAX_BYTES: usize = 2048;

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
    /// Field/value pairs after `v`, `mailbox`, `kind`, `history_id` (header fields are named
    /// after the configured headers, hence not always static).
    pub(crate) fields: Vec<(Cow<'static, str>, String)>,
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
                ("message_id".into(), message_id.to_string()),
                ("thread_id".into(), thread_id.to_string()),
                ("label_ids".into(), label_ids.join(",")),
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
                ("reason".into(), reason.as_str().to_string()),
                ("listed".into(), listed.to_string()),
                (
                    "truncated".into(),
                    if truncated { "1" } else { "0" }.to_string(),
                ),
            ],
        }
    }

    /// A message present when the resync listed the mailbox.
    pub fn listed(restart_from: HistoryId, message_id: &str, thread_id: &str) -> ChangeEntry {
        ChangeEntry {
            kind: ChangeKind::MessageListed,
            history_id: restart_from,
            fields: vec![
                ("message_id".into(), message_id.to_string()),
                ("thread_id".into(), thread_id.to_string()),
            ],
        }
    }

    /// Adds a fetched message's metadata: snippet, size, internal date, and the headers among
    /// `wanted` (matched case-insensitively, named after `wanted`) that the message has.
    pub fn with_metadata(mut self, meta: &MessageMetadata, wanted: &[String]) -> ChangeEntry {
        self.fields
            .push(("internal_date".into(), meta.internal_date_ms.to_string()));
        self.fields
            .push(("size_estimate".into(), meta.size_estimate.to_string()));
        self.fields.push(("snippet".into(), meta.snippet.clone()));
        let mut cut = false;
        for name in wanted {
            let values: Vec<&str> = meta
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect();
            if values.is_empty() {
                continue;
            }
            let mut value = values.join("\n");
            if value.len() > HEADER_VALUE_MAX_BYTES {
                let mut end = HEADER_VALUE_MAX_BYTES;
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                value.truncate(end);
                cut = true;
            }
            self.fields.push((header_field(name).into(), value));
        }
        if cut {
            self.fields.push(("headers_cut".into(), "1".into()));
        }
        self
    }

    /// Marks the message as deleted before its metadata could be fetched.
    pub fn gone(mut self) -> ChangeEntry {
        self.fields.push(("gone".into(), "1".into()));
        self
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

/// The field of header `name`: `header_` + the name lower-cased, `-` as `_`.
pub fn header_field(name: &str) -> String {
    format!("header_{}", name.to_ascii_lowercase().replace('-', "_"))
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
    fn enrichment_fields() {
        let meta = MessageMetadata {
            snippet: "Hi".into(),
            size_estimate: 42,
            internal_date_ms: 1_700_000_000_000,
            headers: vec![
                ("From".into(), "a@x".into()),
                ("To".into(), "b@x".into()),
                ("to".into(), "c@x".into()),
                ("Subject".into(), "é".repeat(HEADER_VALUE_MAX_BYTES)),
                ("Received".into(), "not asked for".into()),
            ],
        };
        let wanted: Vec<String> = ["from", "To", "Cc", "Subject", "In-Reply-To"]
            .map(String::from)
            .to_vec();
        let e = ChangeEntry::message(ChangeKind::MessageAdded, HistoryId(1), "m", "t", &[])
            .with_metadata(&meta, &wanted);
        assert_eq!(e.field("header_from"), Some("a@x"));
        assert_eq!(
            e.field("header_to"),
            Some("b@x\nc@x"),
            "repeated header: one field"
        );
        assert_eq!(e.field("header_cc"), None, "absent header: no field");
        assert_eq!(e.field("header_received"), None);
        let subject = e.field("header_subject").unwrap();
        assert_eq!(
            subject.len(),
            HEADER_VALUE_MAX_BYTES,
            "é is 2 bytes: cut evenly"
        );
        assert_eq!(e.field("headers_cut"), Some("1"));
        assert_eq!(e.field("internal_date"), Some("1700000000000"));
        assert_eq!(e.field("size_estimate"), Some("42"));
        assert_eq!(e.field("snippet"), Some("Hi"));
        assert_eq!(e.field("gone"), None);
        let g = ChangeEntry::listed(HistoryId(1), "m", "t").gone();
        assert_eq!(g.field("gone"), Some("1"));
        assert_eq!(header_field("In-Reply-To"), "header_in_reply_to");
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
