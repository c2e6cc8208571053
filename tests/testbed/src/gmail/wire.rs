//! Gmail's JSON response shapes (empty repeated fields are omitted, as Google's JSON mapping
//! does; int64 values such as historyId are decimal strings).

use super::ledger::ChangeKind;
use super::mailbox::{Message, Record};
use serde::Serialize;

fn is_empty<T>(v: &[T]) -> bool {
    v.is_empty()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProfileJson<'a> {
    pub email_address: &'a str,
    pub messages_total: usize,
    pub threads_total: usize,
    pub history_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageRefJson<'a> {
    pub id: &'a str,
    pub thread_id: &'a str,
    #[serde(skip_serializing_if = "is_empty")]
    pub label_ids: &'a [String],
}

#[derive(Serialize)]
pub(crate) struct MessageChangeJson<'a> {
    pub message: MessageRefJson<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LabelChangeJson<'a> {
    pub message: MessageRefJson<'a>,
    pub label_ids: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HistoryRecordJson<'a> {
    pub id: String,
    pub messages: [MessageRefJson<'a>; 1],
    #[serde(skip_serializing_if = "is_empty")]
    pub messages_added: Vec<MessageChangeJson<'a>>,
    #[serde(skip_serializing_if = "is_empty")]
    pub messages_deleted: Vec<MessageChangeJson<'a>>,
    #[serde(skip_serializing_if = "is_empty")]
    pub labels_added: Vec<LabelChangeJson<'a>>,
    #[serde(skip_serializing_if = "is_empty")]
    pub labels_removed: Vec<LabelChangeJson<'a>>,
}

impl<'a> HistoryRecordJson<'a> {
    pub fn from_record(r: &'a Record) -> Self {
        let msg = || MessageRefJson {
            id: &r.message_id,
            thread_id: &r.thread_id,
            label_ids: &r.labels,
        };
        let mut out = HistoryRecordJson {
            id: r.id.to_string(),
            messages: [MessageRefJson {
                id: &r.message_id,
                thread_id: &r.thread_id,
                label_ids: &[],
            }],
            messages_added: Vec::new(),
            messages_deleted: Vec::new(),
            labels_added: Vec::new(),
            labels_removed: Vec::new(),
        };
        match r.kind {
            ChangeKind::MessageAdded => out
                .messages_added
                .push(MessageChangeJson { message: msg() }),
            ChangeKind::MessageDeleted => out
                .messages_deleted
                .push(MessageChangeJson { message: msg() }),
            ChangeKind::LabelAdded => out.labels_added.push(LabelChangeJson {
                message: msg(),
                label_ids: &r.changed,
            }),
            ChangeKind::LabelRemoved => out.labels_removed.push(LabelChangeJson {
                message: msg(),
                label_ids: &r.changed,
            }),
            ChangeKind::Invisible => {}
        }
        out
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HistoryListJson<'a> {
    #[serde(skip_serializing_if = "is_empty")]
    pub history: Vec<HistoryRecordJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
    pub history_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageListJson<'a> {
    #[serde(skip_serializing_if = "is_empty")]
    pub messages: Vec<MessageRefJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
    pub result_size_estimate: usize,
}

#[derive(Serialize)]
pub(crate) struct HeaderJson<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PayloadJson<'a> {
    pub mime_type: &'static str,
    pub headers: Vec<HeaderJson<'a>>,
}

/// What `messages.get` returns, by its `format` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GetFormat {
    /// `minimal`: no payload.
    Minimal,
    /// `metadata` (`full` and `raw` answer like it: bodies are not modelled): the headers named
    /// by `metadataHeaders` (case-insensitive), or all of them when none is named.
    Metadata { headers: Vec<String> },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageJson<'a> {
    pub id: &'a str,
    pub thread_id: &'a str,
    #[serde(skip_serializing_if = "is_empty")]
    pub label_ids: &'a [String],
    pub snippet: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadJson<'a>>,
    pub size_estimate: u64,
    pub history_id: String,
    pub internal_date: String,
}

impl<'a> MessageJson<'a> {
    pub fn new(m: &'a Message, format: &GetFormat) -> Self {
        let payload = match format {
            GetFormat::Minimal => None,
            GetFormat::Metadata { headers: wanted } => Some(PayloadJson {
                mime_type: "text/plain",
                headers: m
                    .headers
                    .iter()
                    .filter(|(n, _)| {
                        wanted.is_empty() || wanted.iter().any(|w| w.eq_ignore_ascii_case(n))
                    })
                    .map(|(name, value)| HeaderJson { name, value })
                    .collect(),
            }),
        };
        MessageJson {
            id: &m.id,
            thread_id: &m.thread_id,
            label_ids: &m.labels,
            snippet: &m.snippet,
            payload,
            size_estimate: m.size_estimate,
            history_id: m.history_id.to_string(),
            internal_date: m.internal_date_ms.to_string(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WatchJson {
    pub history_id: String,
    pub expiration: String,
}
