//! Gmail REST wire types: only the fields gmail-sync reads. Unknown fields are ignored so that
//! Gmail adding fields never breaks decoding.

use crate::history_id::HistoryId;
use serde::Deserialize;

/// One `users.history.list` page. `history` is absent when empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    #[serde(default)]
    pub history: Vec<HistoryRecord>,
    /// The mailbox's current historyId.
    pub history_id: HistoryId,
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryRecord {
    pub id: HistoryId,
    #[serde(default)]
    pub messages_added: Vec<MessageChange>,
    #[serde(default)]
    pub messages_deleted: Vec<MessageChange>,
    #[serde(default)]
    pub labels_added: Vec<LabelChange>,
    #[serde(default)]
    pub labels_removed: Vec<LabelChange>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageRef {
    pub id: String,
    #[serde(default)]
    pub thread_id: String,
    #[serde(default)]
    pub label_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageChange {
    pub message: MessageRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelChange {
    pub message: MessageRef,
    /// The labels added or removed by this change (not the message's full label set).
    #[serde(default)]
    pub label_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub email_address: String,
    pub history_id: HistoryId,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageList {
    #[serde(default)]
    pub messages: Vec<MessageRef>,
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchResponse {
    pub history_id: HistoryId,
    /// Epoch milliseconds, sent as a string.
    #[serde(deserialize_with = "epoch_ms")]
    pub expiration: u64,
}

/// A `users.messages.get` answer (`format=metadata` or `minimal`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    #[serde(default)]
    pub snippet: String,
    #[serde(default)]
    pub size_estimate: u64,
    /// Epoch milliseconds, sent as a string (int64).
    #[serde(default, deserialize_with = "epoch_ms")]
    pub internal_date: u64,
    /// Absent with `format=minimal`.
    #[serde(default)]
    pub payload: Option<Payload>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Payload {
    #[serde(default)]
    pub headers: Vec<Header>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

fn epoch_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    HistoryId::deserialize(d).map(|h| h.get())
}

/// Gmail's error body: `{"error": {"code", "message", "errors": [{"domain", "reason"}], "status"}}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorDetail {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub errors: Vec<ErrorItem>,
    #[serde(default)]
    pub status: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorItem {
    #[serde(default)]
    pub reason: String,
}

impl ErrorDetail {
    pub fn reason(&self) -> &str {
        self.errors
            .first()
            .map(|e| e.reason.as_str())
            .unwrap_or(self.status.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_field_absent_means_empty() {
        let p: HistoryPage = serde_json::from_str(r#"{"historyId":"42"}"#).unwrap();
        assert!(p.history.is_empty());
        assert_eq!(p.history_id, HistoryId(42));
        assert!(p.next_page_token.is_none());
    }

    #[test]
    fn decodes_a_metadata_message() {
        let m: Message = serde_json::from_str(
            r#"{"id":"18c2","threadId":"18c1","labelIds":["INBOX"],"snippet":"Hi &amp; bye",
                "payload":{"partId":"","mimeType":"multipart/alternative","headers":[
                  {"name":"From","value":"A <a@x.com>"},{"name":"Subject","value":"Re: x"}]},
                "sizeEstimate":5120,"historyId":"99","internalDate":"1700000000123"}"#,
        )
        .unwrap();
        assert_eq!(m.internal_date, 1_700_000_000_123);
        assert_eq!(m.size_estimate, 5120);
        assert_eq!(m.payload.unwrap().headers[1].value, "Re: x");
        let minimal: Message = serde_json::from_str(
            r#"{"id":"1","threadId":"1","sizeEstimate":1,"internalDate":"2"}"#,
        )
        .unwrap();
        assert!(minimal.payload.is_none());
        assert_eq!(minimal.snippet, "");
    }

    #[test]
    fn decodes_all_four_kinds() {
        let p: HistoryPage = serde_json::from_str(
            r#"{"history":[{"id":"5","messages":[{"id":"m","threadId":"t"}],
                "messagesAdded":[{"message":{"id":"m","threadId":"t","labelIds":["INBOX"]}}],
                "messagesDeleted":[{"message":{"id":"m2","threadId":"t"}}],
                "labelsAdded":[{"message":{"id":"m","threadId":"t"},"labelIds":["STARRED"]}],
                "labelsRemoved":[{"message":{"id":"m","threadId":"t"},"labelIds":["UNREAD"]}]}],
                "historyId":"9","nextPageToken":"abc"}"#,
        )
        .unwrap();
        let r = &p.history[0];
        assert_eq!(r.messages_added[0].message.label_ids, vec!["INBOX"]);
        assert_eq!(r.messages_deleted[0].message.id, "m2");
        assert_eq!(r.labels_added[0].label_ids, vec!["STARRED"]);
        assert_eq!(r.labels_removed[0].label_ids, vec!["UNREAD"]);
    }
}
