//! The oracle check: compares gmail-sync's change streams with the simulator's ledger.
//!
//! It reads the streams as any consumer would (schema v1 fields, see README.md), independent of
//! the product's own types, so a bug in the product's encoding cannot hide itself.

use crate::gmail::{ChangeEntry, ChangeKind, Ledger};
use std::collections::BTreeMap;

/// One stream entry: its field/value pairs.
pub type StreamEntry = BTreeMap<String, String>;

/// Reads every entry of `streams` (XRANGE - +), in stream order per stream.
pub async fn read_streams<C: redis::aio::ConnectionLike + Send>(
    con: &mut C,
    streams: &[String],
) -> redis::RedisResult<Vec<StreamEntry>> {
    let mut out = Vec::new();
    for stream in streams {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(con)
            .await?;
        for id in reply.ids {
            let mut fields = BTreeMap::new();
            for (k, v) in id.map {
                fields.insert(k, redis::from_redis_value::<String>(v)?);
            }
            out.push(fields);
        }
    }
    Ok(out)
}

/// Whether `e` is a lifecycle entry (kind `mailbox_*`) rather than a mail change.
pub fn is_lifecycle(e: &StreamEntry) -> bool {
    e.get("kind").is_some_and(|k| k.starts_with("mailbox_"))
}

/// The lifecycle entries of `mailbox`, as (kind, reason) in stream order.
pub fn lifecycle_entries(entries: &[StreamEntry], mailbox: &str) -> Vec<(String, String)> {
    entries
        .iter()
        .filter(|e| is_lifecycle(e) && e.get("mailbox").map(String::as_str) == Some(mailbox))
        .map(|e| {
            (
                e.get("kind").cloned().unwrap_or_default(),
                e.get("reason").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

/// For every mailbox in `baselines` (mailbox → baseline cursor), the entries must be exactly
/// the ledger's visible changes after the baseline, in order, none twice (I4, I5); and no entry
/// may belong to another mailbox. Returns the number of entries checked.
pub fn compare(
    ledger: &Ledger,
    entries: &[StreamEntry],
    baselines: &BTreeMap<String, u64>,
) -> Result<usize, String> {
    let mut by_mailbox: BTreeMap<&str, Vec<&StreamEntry>> = BTreeMap::new();
    // Lifecycle entries (`mailbox_attention`, `mailbox_removed`) say what happened to the
    // mailbox, not to its mail: the ledger has no counterpart. `lifecycle_entries` lists them.
    for e in entries.iter().filter(|e| !is_lifecycle(e)) {
        let mailbox = e.get("mailbox").map(String::as_str).unwrap_or("");
        by_mailbox.entry(mailbox).or_default().push(e);
    }
    let mut total = 0;
    for (email, baseline) in baselines {
        let expected: Vec<String> = ledger
            .changes_for(email)
            .into_iter()
            .filter(|c| c.has_record() && c.history_id > *baseline)
            .map(expected_line)
            .collect();
        let actual: Vec<String> = by_mailbox
            .get(email.as_str())
            .map(|es| es.iter().map(|e| actual_line(e)).collect())
            .unwrap_or_default();
        if expected != actual {
            let first = expected
                .iter()
                .zip(&actual)
                .position(|(a, b)| a != b)
                .unwrap_or(expected.len().min(actual.len()));
            return Err(format!(
                "{email}: expected {} entries, got {}; first difference at #{first}: expected {:?}, got {:?}",
                expected.len(),
                actual.len(),
                expected.get(first),
                actual.get(first)
            ));
        }
        total += actual.len();
    }
    if let Some(stranger) = by_mailbox.keys().find(|m| !baselines.contains_key(**m)) {
        return Err(format!(
            "entries for a mailbox that was never registered: {stranger:?}"
        ));
    }
    Ok(total)
}

fn sorted_labels<'a>(labels: impl Iterator<Item = &'a str>) -> String {
    let mut l: Vec<&str> = labels.filter(|s| !s.is_empty()).collect();
    l.sort_unstable();
    l.join(",")
}

fn expected_line(c: &ChangeEntry) -> String {
    let (kind, labels) = match c.kind {
        ChangeKind::MessageAdded => ("message_added", String::new()),
        ChangeKind::MessageDeleted => ("message_deleted", String::new()),
        ChangeKind::LabelAdded => (
            "labels_added",
            sorted_labels(c.label_ids.iter().map(String::as_str)),
        ),
        ChangeKind::LabelRemoved => (
            "labels_removed",
            sorted_labels(c.label_ids.iter().map(String::as_str)),
        ),
        ChangeKind::Invisible => ("invisible", String::new()),
    };
    format!("{kind} {} {} {labels}", c.history_id, c.message_id)
}

fn actual_line(e: &StreamEntry) -> String {
    let get = |f: &str| e.get(f).map(String::as_str).unwrap_or("");
    let kind = get("kind");
    let labels = if kind.starts_with("labels_") {
        sorted_labels(get("label_ids").split(','))
    } else {
        String::new()
    };
    format!(
        "{kind} {} {} {labels}",
        get("history_id"),
        get("message_id")
    )
}
