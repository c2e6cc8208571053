//! P1 (no lost change) and P2 (no duplicate) of the fault suite for change streams that may
//! hold full resyncs: Gmail answered 404 for a cursor older than its history, and the product
//! wrote a `resync` entry, the listed messages and moved the cursor to the profile's historyId
//! (README "Output"). Without a resync it is the exact ledger comparison of [`super::compare`],
//! bounded by the committed cursor.
//!
//! # What is checked, per mailbox
//! The mailbox's entries (lifecycle entries left out), in stream order, split at its `resync`
//! entries into history parts `H0, H1, …, Hn` and listings `L1, …, Ln` (`Li` = the
//! `message_listed` entries right after resync `i`). `s0` is the mailbox's baseline, `si` the
//! `history_id` of resync `i` (the profile historyId the product read before listing); a
//! *record* is a ledger change that `history.list` shows; a *witnessed cursor* is a cursor value
//! read from Redis during the run (the monitor's samples, the driver's reads at each history
//! fault): a committed cursor `c` means every record up to `c` had been written.
//!
//! 1. **History parts are exact.** `Hi` holds, in ledger order and each once, the records with
//!    `wi < id ≤ ei`, where `wi` = `si`, or the highest id of an earlier history entry if that
//!    is higher; `en` is the final cursor; an earlier part's `ei` is the highest of its own ids
//!    and of the witnessed cursors `c` with `si ≤ c < si+1`. So a change synced before an
//!    expiry stays in the stream exactly once, and the only records a part may lack are at its
//!    end, above every cursor committed before the resync (Gmail forgot them before any worker
//!    read them; the listing stands for them). A missing record is P1; an entry twice, not in
//!    the ledger, or above the cursor is P2; the same entries in another order count one P1.
//! 2. **A listing loses nothing.** Every message live at `si` (added at or below `si`, not
//!    deleted at or below it, not in SPAM or TRASH, which `messages.list` leaves out) is in
//!    `Li`, unless a record above `si` deletes it (it went before the listing read it; `Hi`
//!    carries the deletion by rule 1). Each one missing is P1 (also when the listing says
//!    `truncated`: a consumer never sees that message).
//! 3. **A listing writes nothing twice or foreign.** No message twice in `Li`; each listed
//!    message is one of the mailbox's in the ledger and was not deleted at or below `si`. A
//!    message added above `si` was delivered while the listing ran: it may be listed and
//!    arrives in `Hi` as well (the design's choice: nothing is lost, the consumer sees it
//!    twice). `listed` must equal `|Li|` (fewer entries: P1, more: P2); a `message_listed`
//!    entry outside a listing is P2.
//! 4. **Every resync answers a 404.** A mailbox has at most as many `resync` entries as
//!    `history.list` answered it 404 (ledger calls); each one beyond re-lists messages already
//!    written (P2). A run without history faults therefore accepts no resync at all.
//! 5. **A resync never restarts below history already written** (`si` below an earlier
//!    history entry's id: the listing is older than changes the consumer already has; P2).

use super::{StreamEntry, actual_line, expected_line, is_lifecycle};
use crate::gmail::{ChangeEntry, ChangeKind, Endpoint, Ledger};
use std::collections::{BTreeMap, BTreeSet};

/// Labels whose messages `messages.list` leaves out unless asked (the product does not ask).
const UNLISTED_LABELS: [&str; 2] = ["SPAM", "TRASH"];

/// What [`compare`] found over every mailbox.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// P1: records, listed messages or order missing.
    pub lost: u64,
    /// P2: entries written twice, foreign, above the cursor, or unjustified resyncs.
    pub duplicate: u64,
    /// `resync` entries seen.
    pub resyncs: u64,
    /// `message_listed` entries seen.
    pub listed: u64,
    /// One line per violation, prefixed `P1` or `P2`.
    pub details: Vec<String>,
}

impl Verdict {
    fn add_lost(&mut self, n: u64, what: String) {
        if n > 0 {
            self.lost += n;
            self.details.push(format!("P1 {what}"));
        }
    }

    fn add_duplicate(&mut self, n: u64, what: String) {
        if n > 0 {
            self.duplicate += n;
            self.details.push(format!("P2 {what}"));
        }
    }
}

/// The check described in the module docs. `baselines`: mailbox → cursor at registration;
/// `cursors`: mailbox → committed cursor now (absent = the baseline); `witnessed`: mailbox →
/// cursor values read while the run went on.
pub fn compare(
    ledger: &Ledger,
    entries: &[StreamEntry],
    baselines: &BTreeMap<String, u64>,
    cursors: &BTreeMap<String, u64>,
    witnessed: &BTreeMap<String, BTreeSet<u64>>,
) -> Verdict {
    let mut verdict = Verdict::default();
    let mut by_mailbox: BTreeMap<&str, Vec<&StreamEntry>> = BTreeMap::new();
    for e in entries.iter().filter(|e| !is_lifecycle(e)) {
        let mailbox = e.get("mailbox").map(String::as_str).unwrap_or("");
        by_mailbox.entry(mailbox).or_default().push(e);
    }
    for (mailbox, es) in &by_mailbox {
        if !baselines.contains_key(*mailbox) {
            verdict.add_duplicate(
                es.len() as u64,
                format!(
                    "{} entries of a mailbox never registered: {mailbox:?}",
                    es.len()
                ),
            );
        }
    }
    // One pass over the ledger (a scale run has 10^6 entries).
    let mut records: BTreeMap<&str, Vec<&ChangeEntry>> = BTreeMap::new();
    for c in ledger.changes() {
        if c.has_record() {
            records.entry(c.mailbox.as_str()).or_default().push(c);
        }
    }
    let mut not_found: BTreeMap<&str, u64> = BTreeMap::new();
    for call in ledger.calls() {
        if call.endpoint == Endpoint::HistoryList
            && call.status == 404
            && let Some(m) = &call.mailbox
        {
            *not_found.entry(m.as_str()).or_default() += 1;
        }
    }
    let no_witness = BTreeSet::new();
    for (email, baseline) in baselines {
        let stream = split(
            by_mailbox
                .get(email.as_str())
                .map_or(&[][..], Vec::as_slice),
        );
        let mailbox = Mailbox {
            email,
            baseline: *baseline,
            cursor: cursors.get(email).copied().unwrap_or(*baseline),
            records: records.get(email.as_str()).map_or(&[][..], Vec::as_slice),
            witnessed: witnessed.get(email).unwrap_or(&no_witness),
            not_found: not_found.get(email.as_str()).copied().unwrap_or(0),
        };
        mailbox.check(&stream, &mut verdict);
    }
    verdict
}

/// One mailbox's inputs.
struct Mailbox<'a> {
    email: &'a str,
    baseline: u64,
    cursor: u64,
    /// Its ledger records, in ledger (= historyId) order.
    records: &'a [&'a ChangeEntry],
    witnessed: &'a BTreeSet<u64>,
    /// `history.list` calls answered 404.
    not_found: u64,
}

/// A history entry: its id (`None` if not a u64) and its comparison line.
struct HistoryEntry {
    id: Option<u64>,
    line: String,
}

/// A `resync` entry and the `message_listed` entries right after it.
struct Listing {
    at: u64,
    announced: Option<usize>,
    truncated: bool,
    messages: Vec<String>,
}

/// A mailbox's stream split at its resyncs: `parts[0]` before the first, `parts[i]` after
/// `listings[i - 1]`.
struct Split {
    parts: Vec<Vec<HistoryEntry>>,
    listings: Vec<Listing>,
    /// `message_listed` entries that follow no resync directly (P2).
    stray_listed: Vec<String>,
}

fn split(entries: &[&StreamEntry]) -> Split {
    let mut out = Split {
        parts: vec![Vec::new()],
        listings: Vec::new(),
        stray_listed: Vec::new(),
    };
    let mut in_listing = false;
    for e in entries {
        let get = |f: &str| e.get(f).map(String::as_str).unwrap_or("");
        match get("kind") {
            "resync" => {
                out.listings.push(Listing {
                    // An unreadable restart point restarts nowhere: every record after it is
                    // expected again, so the problem shows as lost or duplicate changes.
                    at: get("history_id").parse().unwrap_or(0),
                    announced: get("listed").parse().ok(),
                    truncated: get("truncated") == "1",
                    messages: Vec::new(),
                });
                out.parts.push(Vec::new());
                in_listing = true;
            }
            "message_listed" if in_listing => {
                let listing = out.listings.last_mut().expect("in a listing");
                listing.messages.push(get("message_id").to_string());
            }
            "message_listed" => out.stray_listed.push(actual_line(e)),
            _ => {
                in_listing = false;
                out.parts.last_mut().expect("a part").push(HistoryEntry {
                    id: get("history_id").parse().ok(),
                    line: actual_line(e),
                });
            }
        }
    }
    out
}

impl Mailbox<'_> {
    fn check(&self, stream: &Split, verdict: &mut Verdict) {
        let email = self.email;
        verdict.resyncs += stream.listings.len() as u64;
        let resyncs = stream.listings.len() as u64;
        verdict.add_duplicate(
            resyncs.saturating_sub(self.not_found),
            format!(
                "{email}: {resyncs} resyncs, but history.list answered 404 only {} times",
                self.not_found
            ),
        );
        for line in &stream.stray_listed {
            verdict.add_duplicate(
                1,
                format!("{email}: message_listed outside a listing: {line}"),
            );
        }
        let mut written = self.baseline;
        for (i, part) in stream.parts.iter().enumerate() {
            let start = if i == 0 {
                self.baseline
            } else {
                stream.listings[i - 1].at
            };
            if i > 0 && start < written {
                verdict.add_duplicate(
                    1,
                    format!(
                        "{email}: resync {i} restarts at {start}, below history entry {written}"
                    ),
                );
            }
            let from = start.max(written);
            let own = part.iter().filter_map(|e| e.id).max().unwrap_or(from);
            let end = match stream.listings.get(i) {
                None => self.cursor,
                Some(next) => self
                    .witnessed
                    .range(start..next.at.max(start))
                    .next_back()
                    .copied()
                    .unwrap_or(from)
                    .max(own),
            };
            self.check_part(i, from, end, part, verdict);
            written = written.max(own);
        }
        for (i, listing) in stream.listings.iter().enumerate() {
            self.check_listing(i + 1, listing, verdict);
        }
    }

    /// Rule 1 for one part: the records in `(from, end]`, in order, each once.
    fn check_part(
        &self,
        i: usize,
        from: u64,
        end: u64,
        part: &[HistoryEntry],
        verdict: &mut Verdict,
    ) {
        let email = self.email;
        let expected: Vec<String> = self
            .records
            .iter()
            .filter(|c| c.history_id > from && c.history_id <= end)
            .map(|c| expected_line(c))
            .collect();
        let mut balance: BTreeMap<&str, i64> = BTreeMap::new();
        for line in &expected {
            *balance.entry(line).or_default() += 1;
        }
        for e in part {
            *balance.entry(&e.line).or_default() -= 1;
        }
        let mut even = true;
        for (line, n) in balance {
            if n > 0 {
                verdict.add_lost(
                    n as u64,
                    format!("{email} part {i} ({from}, {end}]: missing {line}"),
                );
            } else if n < 0 {
                verdict.add_duplicate(
                    n.unsigned_abs(),
                    format!("{email} part {i} ({from}, {end}]: extra {line} ×{}", -n),
                );
            }
            even &= n == 0;
        }
        if even && part.iter().map(|e| &e.line).ne(expected.iter()) {
            verdict.add_lost(
                1,
                format!("{email} part {i}: the ledger's changes in another order"),
            );
        }
    }

    /// Rules 2 and 3 for listing `i` (1-based).
    fn check_listing(&self, i: usize, listing: &Listing, verdict: &mut Verdict) {
        let email = self.email;
        let at = listing.at;
        verdict.listed += listing.messages.len() as u64;
        let n = listing.messages.len();
        match listing.announced {
            Some(a) if a > n => verdict.add_lost(
                (a - n) as u64,
                format!("{email} resync {i}: says listed={a}, followed by {n}"),
            ),
            Some(a) if a < n => verdict.add_duplicate(
                (n - a) as u64,
                format!("{email} resync {i}: says listed={a}, followed by {n}"),
            ),
            Some(_) => {}
            None => verdict.add_lost(1, format!("{email} resync {i}: no readable `listed` field")),
        }
        // Each message's life from the ledger: live ones at `at` with their labels, and where
        // each was added and deleted.
        let mut live: BTreeMap<&str, &[String]> = BTreeMap::new();
        let mut added: BTreeMap<&str, u64> = BTreeMap::new();
        let mut deleted: BTreeMap<&str, u64> = BTreeMap::new();
        for c in self.records {
            let id = c.message_id.as_str();
            match c.kind {
                ChangeKind::MessageAdded => {
                    added.insert(id, c.history_id);
                }
                ChangeKind::MessageDeleted => {
                    deleted.insert(id, c.history_id);
                }
                _ => {}
            }
            if c.history_id > at {
                continue;
            }
            match c.kind {
                ChangeKind::MessageDeleted => {
                    live.remove(id);
                }
                ChangeKind::MessageAdded | ChangeKind::LabelAdded | ChangeKind::LabelRemoved => {
                    live.insert(id, &c.labels_after);
                }
                ChangeKind::Invisible => {}
            }
        }
        let mut listed: BTreeMap<&str, u64> = BTreeMap::new();
        for m in &listing.messages {
            *listed.entry(m.as_str()).or_default() += 1;
        }
        let truncated = if listing.truncated {
            " (truncated)"
        } else {
            ""
        };
        for (id, labels) in &live {
            let unlisted = labels.iter().any(|l| UNLISTED_LABELS.contains(&l.as_str()));
            let went_after = deleted.get(id).is_some_and(|d| *d > at);
            if !unlisted && !went_after && !listed.contains_key(id) {
                verdict.add_lost(
                    1,
                    format!("{email} resync {i} at {at}{truncated}: live message {id} not listed"),
                );
            }
        }
        for (id, times) in listed {
            verdict.add_duplicate(
                times - 1,
                format!("{email} resync {i}: {id} listed {times} times"),
            );
            match (added.get(id), deleted.get(id)) {
                (None, _) => verdict.add_duplicate(
                    1,
                    format!("{email} resync {i}: listed {id}, which the ledger never added"),
                ),
                (Some(_), Some(d)) if *d <= at => verdict.add_duplicate(
                    1,
                    format!("{email} resync {i} at {at}: listed {id}, deleted at {d}"),
                ),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmail::{CallEntry, LedgerEntry};
    use std::time::SystemTime;

    const M: &str = "a@x.example";

    fn change(id: u64, kind: ChangeKind, message: &str, labels: &[&str]) -> LedgerEntry {
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        LedgerEntry::Change(ChangeEntry {
            mailbox: M.into(),
            history_id: id,
            kind,
            message_id: message.into(),
            thread_id: message.into(),
            label_ids: if matches!(kind, ChangeKind::LabelAdded | ChangeKind::LabelRemoved) {
                labels.clone()
            } else {
                Vec::new()
            },
            labels_after: labels,
            message: None,
            at: SystemTime::now(),
        })
    }

    fn not_found() -> LedgerEntry {
        LedgerEntry::Call(CallEntry {
            endpoint: Endpoint::HistoryList,
            mailbox: Some(M.into()),
            bearer: None,
            cost: 2,
            status: 404,
            error_reason: Some("notFound".into()),
            faulted: false,
            batch: None,
            started: SystemTime::now(),
            ended: SystemTime::now(),
        })
    }

    fn entry(fields: &[(&str, &str)]) -> StreamEntry {
        let mut e: StreamEntry = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        e.insert("mailbox".into(), M.into());
        e
    }

    fn added(id: &str, message: &str) -> StreamEntry {
        entry(&[
            ("kind", "message_added"),
            ("history_id", id),
            ("message_id", message),
        ])
    }

    fn resync(at: &str, listed: &str) -> StreamEntry {
        entry(&[
            ("kind", "resync"),
            ("history_id", at),
            ("listed", listed),
            ("truncated", "0"),
            ("reason", "history_gone"),
        ])
    }

    fn listed(at: &str, message: &str) -> StreamEntry {
        entry(&[
            ("kind", "message_listed"),
            ("history_id", at),
            ("message_id", message),
        ])
    }

    /// Messages m1..m4 at 11, 12, 13, 14; m2 deleted at 15; history forgotten after 12 was
    /// synced, so 13..15 were never read; the resync at 15 lists m1, m3, m4; then m5 at 16.
    fn resync_ledger() -> Ledger {
        Ledger {
            entries: vec![
                change(11, ChangeKind::MessageAdded, "m1", &["INBOX"]),
                change(12, ChangeKind::MessageAdded, "m2", &["INBOX"]),
                change(13, ChangeKind::MessageAdded, "m3", &["INBOX"]),
                change(14, ChangeKind::MessageAdded, "m4", &["INBOX"]),
                change(15, ChangeKind::MessageDeleted, "m2", &["INBOX"]),
                not_found(),
                change(16, ChangeKind::MessageAdded, "m5", &["INBOX"]),
            ],
        }
    }

    fn run(ledger: &Ledger, entries: &[StreamEntry], cursor: u64, witnessed: &[u64]) -> Verdict {
        compare(
            ledger,
            entries,
            &BTreeMap::from([(M.to_string(), 10)]),
            &BTreeMap::from([(M.to_string(), cursor)]),
            &BTreeMap::from([(M.to_string(), witnessed.iter().copied().collect())]),
        )
    }

    fn good_stream() -> Vec<StreamEntry> {
        vec![
            added("11", "m1"),
            added("12", "m2"),
            resync("15", "3"),
            listed("15", "m4"),
            listed("15", "m3"),
            listed("15", "m1"),
            added("16", "m5"),
        ]
    }

    #[test]
    fn a_resync_that_lists_every_live_message_passes() {
        let v = run(&resync_ledger(), &good_stream(), 16, &[11, 12, 15, 16]);
        assert_eq!((v.lost, v.duplicate), (0, 0), "{:?}", v.details);
        assert_eq!((v.resyncs, v.listed), (1, 3));
    }

    #[test]
    fn without_resync_it_is_the_exact_comparison_below_the_cursor() {
        let ledger = Ledger {
            entries: vec![
                change(11, ChangeKind::MessageAdded, "m1", &["INBOX"]),
                change(12, ChangeKind::LabelAdded, "m1", &["STARRED"]),
                change(13, ChangeKind::MessageAdded, "m2", &["INBOX"]),
            ],
        };
        let labels = entry(&[
            ("kind", "labels_added"),
            ("history_id", "12"),
            ("message_id", "m1"),
            ("label_ids", "STARRED"),
        ]);
        let ok = run(&ledger, &[added("11", "m1"), labels.clone()], 12, &[]);
        assert_eq!((ok.lost, ok.duplicate), (0, 0), "{:?}", ok.details);
        let lost = run(&ledger, &[added("11", "m1")], 12, &[]);
        assert_eq!((lost.lost, lost.duplicate), (1, 0));
        let twice = run(
            &ledger,
            &[added("11", "m1"), labels.clone(), labels.clone()],
            12,
            &[],
        );
        assert_eq!((twice.lost, twice.duplicate), (0, 1));
        let order = run(&ledger, &[labels, added("11", "m1")], 12, &[]);
        assert_eq!((order.lost, order.duplicate), (1, 0), "{:?}", order.details);
    }

    #[test]
    fn a_live_message_the_listing_left_out_is_lost() {
        let mut s = good_stream();
        s.remove(4); // m3
        s[2] = resync("15", "2");
        let v = run(&resync_ledger(), &s, 16, &[]);
        assert_eq!((v.lost, v.duplicate), (1, 0), "{:?}", v.details);
        assert!(v.details[0].contains("m3"), "{:?}", v.details);
    }

    #[test]
    fn a_synced_change_missing_before_the_resync_is_lost() {
        // 12 was committed (the cursor was seen at 12), yet the stream lacks it.
        let mut s = good_stream();
        s.remove(1);
        let v = run(&resync_ledger(), &s, 16, &[12]);
        assert_eq!((v.lost, v.duplicate), (1, 0), "{:?}", v.details);
        // Unwitnessed, the same stream is a forgotten tail (m2 is deleted at 15: not listed).
        let v = run(&resync_ledger(), &s, 16, &[11]);
        assert_eq!((v.lost, v.duplicate), (0, 0), "{:?}", v.details);
    }

    #[test]
    fn history_written_again_after_a_resync_is_a_duplicate() {
        let mut s = good_stream();
        s.insert(6, added("12", "m2"));
        let v = run(&resync_ledger(), &s, 16, &[]);
        assert_eq!((v.lost, v.duplicate), (0, 1), "{:?}", v.details);
    }

    #[test]
    fn a_resync_without_a_404_is_a_duplicate() {
        let mut ledger = resync_ledger();
        ledger
            .entries
            .retain(|e| !matches!(e, LedgerEntry::Call(_)));
        let v = run(&ledger, &good_stream(), 16, &[]);
        assert_eq!((v.lost, v.duplicate), (0, 1), "{:?}", v.details);
    }

    #[test]
    fn listing_a_deleted_message_twice_or_an_unknown_one_is_a_duplicate() {
        let mut s = good_stream();
        s[2] = resync("15", "6");
        s.insert(3, listed("15", "m2")); // deleted at 15
        s.insert(3, listed("15", "m1")); // twice
        s.insert(3, listed("15", "zz")); // never added
        let v = run(&resync_ledger(), &s, 16, &[]);
        assert_eq!((v.lost, v.duplicate), (0, 3), "{:?}", v.details);
    }

    #[test]
    fn a_message_delivered_during_the_listing_may_be_listed_and_added() {
        // The profile read 14; m5 (16) arrived while listing: listed and in history.
        let mut ledger = resync_ledger();
        ledger.entries.remove(4); // no deletion of m2
        let s = vec![
            added("11", "m1"),
            resync("14", "5"),
            listed("14", "m5"),
            listed("14", "m4"),
            listed("14", "m3"),
            listed("14", "m2"),
            listed("14", "m1"),
            added("16", "m5"),
        ];
        let v = run(&ledger, &s, 16, &[11, 14]);
        assert_eq!((v.lost, v.duplicate), (0, 0), "{:?}", v.details);
    }

    #[test]
    fn a_stray_listing_entry_and_a_foreign_mailbox_are_duplicates() {
        let mut s = good_stream();
        s.push(listed("16", "m5"));
        let mut stranger = added("11", "m1");
        stranger.insert("mailbox".into(), "b@x.example".into());
        s.push(stranger);
        let v = run(&resync_ledger(), &s, 16, &[]);
        assert_eq!((v.lost, v.duplicate), (0, 2), "{:?}", v.details);
    }
}
