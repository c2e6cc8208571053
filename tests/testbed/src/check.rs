//! The oracle check: compares gmail-sync's change streams with the simulator's ledger.
//!
//! It reads the streams as any consumer would (schema v1 fields, see README.md), independent of
//! the product's own types, so a bug in the product's encoding cannot hide itself.
//!
//! [`compare`] wants the stream to be exactly the ledger's history; [`resync::compare`] also
//! accepts full resyncs (after a Gmail 404) and says what it then checks (the fault suite's
//! P1/P2).

pub mod resync;

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
    // One pass over the ledger, not one per mailbox: a scale run has 10^5 mailboxes and 10^6
    // ledger entries.
    let mut changes_by_mailbox: BTreeMap<&str, Vec<&ChangeEntry>> = BTreeMap::new();
    for c in ledger.changes() {
        changes_by_mailbox
            .entry(c.mailbox.as_str())
            .or_default()
            .push(c);
    }
    let mut total = 0;
    for (email, baseline) in baselines {
        let expected: Vec<String> = changes_by_mailbox
            .get(email.as_str())
            .into_iter()
            .flatten()
            .copied()
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

pub(crate) fn expected_line(c: &ChangeEntry) -> String {
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

pub(crate) fn actual_line(e: &StreamEntry) -> String {
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

/// What [`compare_metadata`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetadataCheck {
    /// `message_added` / `message_listed` entries carrying their message's metadata.
    pub enriched: usize,
    /// Entries marked `gone` (their message was deleted, as the ledger confirms).
    pub gone: usize,
}

/// The field of header `name` as README.md documents it: `header_` + lower-cased, `-` as `_`.
pub fn header_field(name: &str) -> String {
    format!("header_{}", name.to_ascii_lowercase().replace('-', "_"))
}

/// Every `message_added` and `message_listed` entry of the mailboxes in `baselines` carries its
/// message's metadata exactly as the simulator holds it (see `gmail::metadata`): `snippet`,
/// `size_estimate`, `internal_date`, and for each of `headers` the field `header_*` when the
/// message has that header (values joined by a line feed), absent otherwise, and no other
/// header field; or it is marked `gone` = `1` without metadata, and the ledger shows the
/// message deleted. With `headers` empty (`minimal`) no header field may appear.
pub fn compare_metadata(
    ledger: &Ledger,
    entries: &[StreamEntry],
    baselines: &BTreeMap<String, u64>,
    headers: &[&str],
) -> Result<MetadataCheck, String> {
    let mut meta = BTreeMap::new();
    let mut deleted = std::collections::BTreeSet::new();
    for c in ledger.changes() {
        match c.kind {
            ChangeKind::MessageAdded => {
                if let Some(m) = &c.message {
                    meta.insert((c.mailbox.as_str(), c.message_id.as_str()), m);
                }
            }
            ChangeKind::MessageDeleted => {
                deleted.insert((c.mailbox.as_str(), c.message_id.as_str()));
            }
            _ => {}
        }
    }
    let wanted: Vec<String> = headers.iter().map(|h| header_field(h)).collect();
    let mut found = MetadataCheck::default();
    for e in entries {
        let get = |f: &str| e.get(f).map(String::as_str);
        let mailbox = get("mailbox").unwrap_or("");
        if !baselines.contains_key(mailbox)
            || !matches!(get("kind"), Some("message_added" | "message_listed"))
        {
            continue;
        }
        let id = get("message_id").unwrap_or("");
        let what = format!("{mailbox} {} {id}", get("kind").unwrap_or(""));
        let metadata_fields = e
            .keys()
            .filter(|k| {
                k.starts_with("header")
                    || ["snippet", "size_estimate", "internal_date"].contains(&k.as_str())
            })
            .cloned()
            .collect::<Vec<_>>();
        if get("gone") == Some("1") {
            if !deleted.contains(&(mailbox, id)) {
                return Err(format!(
                    "{what}: marked gone, but the ledger never deleted it"
                ));
            }
            if !metadata_fields.is_empty() {
                return Err(format!("{what}: gone, yet carries {metadata_fields:?}"));
            }
            found.gone += 1;
            continue;
        }
        let m = meta
            .get(&(mailbox, id))
            .ok_or_else(|| format!("{what}: no delivery with metadata in the ledger"))?;
        let mut expected: BTreeMap<String, String> = BTreeMap::from([
            ("snippet".to_string(), m.snippet.clone()),
            ("size_estimate".to_string(), m.size_estimate.to_string()),
            ("internal_date".to_string(), m.internal_date_ms.to_string()),
        ]);
        for (name, field) in headers.iter().zip(&wanted) {
            let values: Vec<&str> = m
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect();
            if !values.is_empty() {
                expected.insert(field.clone(), values.join("\n"));
            }
        }
        let actual: BTreeMap<String, String> = metadata_fields
            .iter()
            .map(|k| (k.clone(), e[k].clone()))
            .collect();
        if actual != expected {
            return Err(format!(
                "{what}: metadata differs:\n  expected {expected:?}\n  got      {actual:?}"
            ));
        }
        found.enriched += 1;
    }
    Ok(found)
}
