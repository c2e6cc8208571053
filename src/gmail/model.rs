//! What the Gmail client hands back: domain records, not wire types (those stay private in
//! `wire`, so Gmail's JSON shape is known in one file).

use super::wire;
use crate::history_id::HistoryId;
use std::sync::Arc;

/// One page of `users.history.list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The changes of the page's records, in history order.
    pub changes: Vec<HistoryChange>,
    /// The id of the page's last record. A record may hold no change we read (e.g. only its
    /// `messages` list), yet everything up to it has been read.
    pub last_record: Option<HistoryId>,
    /// The mailbox's current historyId when Gmail answered.
    pub mailbox_history_id: HistoryId,
    pub next_page_token: Option<String>,
}

/// One change to one message, from a history record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryChange {
    /// The id of the history record holding the change.
    pub history_id: HistoryId,
    pub kind: HistoryChangeKind,
    pub message_id: String,
    pub thread_id: String,
    /// For `MessageAdded`/`MessageDeleted`: the message's labels as Gmail reported them; for
    /// `LabelsAdded`/`LabelsRemoved`: the labels this change added or removed.
    pub label_ids: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryChangeKind {
    MessageAdded,
    MessageDeleted,
    LabelsAdded,
    LabelsRemoved,
}

/// `users.getProfile`: what a full resync needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub history_id: HistoryId,
}

/// One page of `users.messages.list` (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePage {
    pub messages: Vec<ListedMessage>,
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedMessage {
    pub id: String,
    pub thread_id: String,
}

/// What `users.messages.get` is asked for when enriching entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageFormat {
    /// `format=metadata` with `metadataHeaders` = these header names (never empty: Gmail would
    /// then answer every header).
    Metadata { headers: Arc<[String]> },
    /// `format=minimal`: snippet, size and internal date, no headers.
    Minimal,
}

/// A message's metadata, as `users.messages.get` answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMetadata {
    pub snippet: String,
    pub size_estimate: u64,
    /// When Gmail received the message (epoch milliseconds).
    pub internal_date_ms: u64,
    /// Name and value of each header Gmail returned, in message order (empty with
    /// [`MessageFormat::Minimal`]).
    pub headers: Vec<(String, String)>,
}

/// One message of a metadata fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchedMessage {
    Found(MessageMetadata),
    /// Gmail answered 404: the message was deleted before it could be fetched.
    Gone,
}

/// A `users.watch` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Watch {
    /// The mailbox's historyId when the watch was set.
    pub history_id: HistoryId,
    /// When Gmail stops notifying unless the watch is renewed (epoch milliseconds).
    pub expiration_ms: u64,
}

impl From<wire::HistoryPage> for HistoryPage {
    /// Within a record: added, deleted, labels added, labels removed (Gmail puts one kind of
    /// change in a record, so this order only matters for hand-made pages).
    fn from(page: wire::HistoryPage) -> HistoryPage {
        let last_record = page.history.last().map(|r| r.id);
        let mut changes = Vec::new();
        for r in page.history {
            let message = |kind, c: wire::MessageChange| HistoryChange {
                history_id: r.id,
                kind,
                message_id: c.message.id,
                thread_id: c.message.thread_id,
                label_ids: c.message.label_ids,
            };
            let label = |kind, c: wire::LabelChange| HistoryChange {
                history_id: r.id,
                kind,
                message_id: c.message.id,
                thread_id: c.message.thread_id,
                label_ids: c.label_ids,
            };
            changes.extend(
                r.messages_added
                    .into_iter()
                    .map(|c| message(HistoryChangeKind::MessageAdded, c)),
            );
            changes.extend(
                r.messages_deleted
                    .into_iter()
                    .map(|c| message(HistoryChangeKind::MessageDeleted, c)),
            );
            changes.extend(
                r.labels_added
                    .into_iter()
                    .map(|c| label(HistoryChangeKind::LabelsAdded, c)),
            );
            changes.extend(
                r.labels_removed
                    .into_iter()
                    .map(|c| label(HistoryChangeKind::LabelsRemoved, c)),
            );
        }
        HistoryPage {
            changes,
            last_record,
            mailbox_history_id: page.history_id,
            next_page_token: page.next_page_token,
        }
    }
}

impl From<wire::Profile> for Profile {
    fn from(p: wire::Profile) -> Profile {
        Profile {
            history_id: p.history_id,
        }
    }
}

impl From<wire::MessageList> for MessagePage {
    fn from(l: wire::MessageList) -> MessagePage {
        MessagePage {
            messages: l
                .messages
                .into_iter()
                .map(|m| ListedMessage {
                    id: m.id,
                    thread_id: m.thread_id,
                })
                .collect(),
            next_page_token: l.next_page_token,
        }
    }
}

impl From<wire::Message> for MessageMetadata {
    fn from(m: wire::Message) -> MessageMetadata {
        MessageMetadata {
            snippet: m.snippet,
            size_estimate: m.size_estimate,
            internal_date_ms: m.internal_date,
            headers: m
                .payload
                .unwrap_or_default()
                .headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
        }
    }
}

impl From<wire::WatchResponse> for Watch {
    fn from(w: wire::WatchResponse) -> Watch {
        Watch {
            history_id: w.history_id,
            expiration_ms: w.expiration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_changes_in_order() {
        let page: wire::HistoryPage = serde_json::from_str(
            r#"{"history":[{"id":"3","messagesAdded":[{"message":{"id":"a","threadId":"t","labelIds":["INBOX","UNREAD"]}}]},
                {"id":"7","labelsRemoved":[{"message":{"id":"a","threadId":"t"},"labelIds":["UNREAD"]}]},
                {"id":"9","messages":[{"id":"a","threadId":"t"}]},
                {"id":"12","messagesDeleted":[{"message":{"id":"a","threadId":"t"}}]}],
                "historyId":"20"}"#,
        )
        .unwrap();
        let page = HistoryPage::from(page);
        let kinds: Vec<_> = page
            .changes
            .iter()
            .map(|c| (c.kind, c.history_id.get()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (HistoryChangeKind::MessageAdded, 3),
                (HistoryChangeKind::LabelsRemoved, 7),
                (HistoryChangeKind::MessageDeleted, 12)
            ]
        );
        assert_eq!(page.changes[0].label_ids, vec!["INBOX", "UNREAD"]);
        assert_eq!(page.changes[1].label_ids, vec!["UNREAD"]);
        assert_eq!(page.last_record, Some(HistoryId(12)));
        assert_eq!(page.mailbox_history_id, HistoryId(20));
    }
}
