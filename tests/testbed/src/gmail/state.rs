//! The simulator's mutable state (all mailboxes, the seeded RNG and the ledger) and the changes
//! that can be made to it. One `std::sync::Mutex` guards it; it is never held across `.await`.

use super::config::SimConfig;
use super::ledger::{ChangeEntry, ChangeKind, LedgerEntry};
use super::mailbox::{Mailbox, Message, Record, Watch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::UnboundedSender;

/// A message id as Gmail spells it: 16 lowercase hex digits. A new thread's id is the id of its
/// first message (as in Gmail).
pub type MessageId = String;

/// Errors of the control API (the Rust API panics with them; the HTTP control API answers 4xx).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimError {
    UnknownMailbox(String),
    MailboxExists(String),
    UnknownMessage(String),
    UnknownThread(String),
    Invalid(String),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::UnknownMailbox(m) => write!(f, "gmail-sim: unknown mailbox {m}"),
            SimError::MailboxExists(m) => write!(f, "gmail-sim: mailbox {m} already exists"),
            SimError::UnknownMessage(m) => write!(f, "gmail-sim: unknown message {m}"),
            SimError::UnknownThread(t) => write!(f, "gmail-sim: unknown thread {t}"),
            SimError::Invalid(m) => write!(f, "gmail-sim: {m}"),
        }
    }
}

impl std::error::Error for SimError {}

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivered {
    pub id: MessageId,
    pub thread_id: String,
    #[serde(serialize_with = "ser_u64_str")]
    pub history_id: u64,
}

fn ser_u64_str<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Why a `watch` was refused before it was registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatchRefusal {
    UnknownMailbox,
    /// The one-push-client rule: another `watch` of the mailbox is in processing, or the
    /// mailbox has an active (unexpired) watch on another topic.
    Conflict,
}

/// A notification to send for `email` at `at` unless the watch changed (generation).
#[derive(Debug, Clone)]
pub(crate) struct NotifyJob {
    pub email: String,
    pub generation: u64,
    pub at: Instant,
}

pub(crate) struct SimState {
    pub mailboxes: HashMap<String, Mailbox>,
    pub rng: StdRng,
    /// Drops and delays of notifications (separate, so their timing never shifts historyIds).
    pub notify_rng: StdRng,
    pub ledger: Vec<LedgerEntry>,
    next_message_id: u64,
    watch_generation: u64,
    next_watch_claim: u64,
    gap: (u64, u64),
    initial_history_id: Option<u64>,
    pub retention: Option<Duration>,
    /// See `SimConfig::history_lag`.
    pub history_lag: Duration,
    min_interval: Duration,
    notify_tx: UnboundedSender<NotifyJob>,
}

impl SimState {
    pub fn new(cfg: &SimConfig, notify_tx: UnboundedSender<NotifyJob>) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let next_message_id = 0x18a0_0000_0000_0000 + (u64::from(rng.random::<u32>()) << 16);
        let (lo, hi) = cfg.history_id_gap;
        let gap = (lo.max(1), hi.max(lo.max(1)));
        SimState {
            mailboxes: HashMap::new(),
            rng,
            notify_rng: StdRng::seed_from_u64(cfg.seed ^ 0x0071_F1CA_7105_0000),
            ledger: Vec::new(),
            next_message_id,
            watch_generation: 0,
            next_watch_claim: 0,
            gap,
            initial_history_id: cfg.initial_history_id,
            retention: cfg.history_retention,
            history_lag: cfg.history_lag,
            min_interval: cfg.notify_min_interval,
            notify_tx,
        }
    }

    pub fn mailbox(&self, email: &str) -> Result<&Mailbox, SimError> {
        self.mailboxes
            .get(email)
            .ok_or_else(|| SimError::UnknownMailbox(email.to_string()))
    }

    pub fn mailbox_mut(&mut self, email: &str) -> Result<&mut Mailbox, SimError> {
        self.mailboxes
            .get_mut(email)
            .ok_or_else(|| SimError::UnknownMailbox(email.to_string()))
    }

    pub fn add_mailbox(&mut self, email: &str, initial: Option<u64>) -> Result<u64, SimError> {
        if self.mailboxes.contains_key(email) {
            return Err(SimError::MailboxExists(email.to_string()));
        }
        if email.is_empty() || email == "me" {
            return Err(SimError::Invalid(format!("invalid mailbox name {email:?}")));
        }
        let initial = match initial.or(self.initial_history_id) {
            Some(h) => h,
            None => self.rng.random_range(1_000..=10_000_000),
        };
        if initial == 0 || initial > u64::MAX / 2 {
            return Err(SimError::Invalid(format!(
                "initial historyId {initial} must be in 1..=u64::MAX/2"
            )));
        }
        self.mailboxes
            .insert(email.to_string(), Mailbox::new(email, initial));
        Ok(initial)
    }

    fn new_message_id(&mut self) -> String {
        self.next_message_id += self.rng.random_range(1..=4096);
        format!("{:016x}", self.next_message_id)
    }

    /// Advances the mailbox's historyId by a random gap and returns the new id.
    fn advance(&mut self, email: &str) -> Result<u64, SimError> {
        let gap = self.rng.random_range(self.gap.0..=self.gap.1);
        let mb = self.mailbox_mut(email)?;
        mb.history_id = mb
            .history_id
            .checked_add(gap)
            .expect("gmail-sim: historyId overflow");
        Ok(mb.history_id)
    }

    /// Records one change: history record (unless invisible), ledger entry, notification.
    fn record(
        &mut self,
        email: &str,
        id: u64,
        kind: ChangeKind,
        msg: Option<(&str, &str)>,
        changed: Vec<String>,
        labels: Vec<String>,
    ) {
        let now = Instant::now();
        let (message_id, thread_id) = msg.unwrap_or(("", ""));
        let min_interval = self.min_interval;
        let mb = self.mailboxes.get_mut(email).expect("mailbox checked");
        if kind != ChangeKind::Invisible {
            mb.push_record(Record {
                id,
                kind,
                message_id: message_id.to_string(),
                thread_id: thread_id.to_string(),
                changed: changed.clone(),
                labels: labels.clone(),
                at: now,
            });
        }
        let job = mb
            .watch
            .as_mut()
            .and_then(|w| schedule(email, w, &labels, &changed, now, min_interval));
        let label_ids = match kind {
            ChangeKind::MessageAdded | ChangeKind::MessageDeleted => labels.clone(),
            _ => changed,
        };
        // A delivery records the message's metadata (it is inserted before its record).
        let message = (kind == ChangeKind::MessageAdded)
            .then(|| mb.messages.get(message_id).map(Message::meta))
            .flatten();
        self.ledger.push(LedgerEntry::Change(ChangeEntry {
            mailbox: email.to_string(),
            history_id: id,
            kind,
            message_id: message_id.to_string(),
            thread_id: thread_id.to_string(),
            label_ids,
            labels_after: labels,
            message,
            at: SystemTime::now(),
        }));
        if let Some(job) = job {
            let _ = self.notify_tx.send(job);
        }
    }

    pub fn deliver(
        &mut self,
        email: &str,
        labels: &[&str],
        thread: Option<&str>,
    ) -> Result<Delivered, SimError> {
        let mb = self.mailbox(email)?;
        if let Some(t) = thread
            && !mb.has_thread(t)
        {
            return Err(SimError::UnknownThread(t.to_string()));
        }
        let id = self.new_message_id();
        let thread_id = thread.map_or_else(|| id.clone(), str::to_string);
        let labels = dedup(labels.iter().map(|s| s.to_string()));
        let size_estimate = self.rng.random_range(800..=120_000);
        let hid = self.advance(email)?;
        let mb = self.mailbox_mut(email)?;
        let snippet = format!("Simulated message {} of {}", mb.messages.len() + 1, email);
        let internal_date_ms = super::mailbox::now_ms();
        mb.insert_message(Message {
            id: id.clone(),
            thread_id: thread_id.clone(),
            labels: labels.clone(),
            history_id: hid,
            internal_date_ms,
            size_estimate,
            snippet,
            headers: super::metadata::simulated_headers(email, &id, &thread_id, internal_date_ms),
        });
        self.record(
            email,
            hid,
            ChangeKind::MessageAdded,
            Some((&id, &thread_id)),
            Vec::new(),
            labels,
        );
        Ok(Delivered {
            id,
            thread_id,
            history_id: hid,
        })
    }

    pub fn delete(&mut self, email: &str, id: &str) -> Result<u64, SimError> {
        if !self.mailbox(email)?.messages.contains_key(id) {
            return Err(SimError::UnknownMessage(id.to_string()));
        }
        let hid = self.advance(email)?;
        let msg = self
            .mailbox_mut(email)?
            .remove_message(id)
            .expect("message checked");
        self.record(
            email,
            hid,
            ChangeKind::MessageDeleted,
            Some((&msg.id, &msg.thread_id)),
            Vec::new(),
            msg.labels,
        );
        Ok(hid)
    }

    /// Adds labels; only labels the message did not carry count. `None` if nothing changed
    /// (no record, no new historyId — like Gmail's modify with labels already present).
    pub fn add_labels(
        &mut self,
        email: &str,
        id: &str,
        labels: &[&str],
    ) -> Result<Option<u64>, SimError> {
        self.change_labels(email, id, labels, ChangeKind::LabelAdded)
    }

    /// Removes labels; only labels the message carried count. `None` if nothing changed.
    pub fn remove_labels(
        &mut self,
        email: &str,
        id: &str,
        labels: &[&str],
    ) -> Result<Option<u64>, SimError> {
        self.change_labels(email, id, labels, ChangeKind::LabelRemoved)
    }

    /// `kind` is `LabelAdded` or `LabelRemoved`: the labels that actually change make one
    /// record; none make nothing.
    fn change_labels(
        &mut self,
        email: &str,
        id: &str,
        labels: &[&str],
        kind: ChangeKind,
    ) -> Result<Option<u64>, SimError> {
        let adding = kind == ChangeKind::LabelAdded;
        let msg = self
            .mailbox(email)?
            .messages
            .get(id)
            .ok_or_else(|| SimError::UnknownMessage(id.to_string()))?;
        let changed = dedup(
            labels
                .iter()
                .filter(|l| msg.labels.iter().any(|m| m == *l) != adding)
                .map(|s| s.to_string()),
        );
        if changed.is_empty() {
            return Ok(None);
        }
        let hid = self.advance(email)?;
        let msg = self
            .mailbox_mut(email)?
            .messages
            .get_mut(id)
            .expect("message checked");
        if adding {
            msg.labels.extend(changed.iter().cloned());
        } else {
            msg.labels.retain(|l| !changed.contains(l));
        }
        msg.history_id = hid;
        let (mid, tid, after) = (msg.id.clone(), msg.thread_id.clone(), msg.labels.clone());
        self.record(email, hid, kind, Some((&mid, &tid)), changed, after);
        Ok(Some(hid))
    }

    /// Advances the historyId without a history record (drafts, settings...).
    pub fn touch(&mut self, email: &str) -> Result<u64, SimError> {
        let hid = self.advance(email)?;
        self.record(
            email,
            hid,
            ChangeKind::Invisible,
            None,
            Vec::new(),
            Vec::new(),
        );
        Ok(hid)
    }

    /// `n` random changes of all four kinds (every one makes a record).
    pub fn burst(&mut self, email: &str, n: usize) -> Result<Vec<u64>, SimError> {
        self.mailbox(email)?;
        const EXTRA: &[&str] = &["STARRED", "IMPORTANT", "Label_1", "Label_2", "UNREAD"];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let roll: f64 = self.rng.random();
            let count = self.mailbox(email)?.messages.len();
            let pick = if count == 0 {
                None
            } else {
                let i = self.rng.random_range(0..count);
                self.mailbox(email)?.messages.keys().nth(i).cloned()
            };
            let hid = match pick {
                None => self.burst_deliver(email)?,
                Some(_) if roll < 0.4 => self.burst_deliver(email)?,
                Some(id) if roll < 0.6 => {
                    let label = EXTRA[self.rng.random_range(0..EXTRA.len())];
                    match self.add_labels(email, &id, &[label])? {
                        Some(h) => h,
                        None => self.remove_labels(email, &id, &[label])?.expect("present"),
                    }
                }
                Some(id) if roll < 0.85 => {
                    let msg = &self.mailbox(email)?.messages[&id];
                    match msg.labels.first().cloned() {
                        Some(l) => self.remove_labels(email, &id, &[&l])?.expect("present"),
                        None => self.add_labels(email, &id, &["INBOX"])?.expect("absent"),
                    }
                }
                Some(id) => self.delete(email, &id)?,
            };
            out.push(hid);
        }
        Ok(out)
    }

    fn burst_deliver(&mut self, email: &str) -> Result<u64, SimError> {
        let threads = self.mailbox(email)?.threads.len();
        let thread = if threads > 0 && self.rng.random_bool(0.3) {
            let i = self.rng.random_range(0..threads);
            let mut keys: Vec<&String> = self.mailbox(email)?.threads.keys().collect();
            keys.sort();
            keys.get(i).map(|k| (*k).clone())
        } else {
            None
        };
        Ok(self
            .deliver(email, &["INBOX", "UNREAD"], thread.as_deref())?
            .history_id)
    }

    /// The one-push-client rule for a `watch` on `topic`: refused while another `watch` of the
    /// mailbox is in processing, or while the mailbox has an unexpired watch on another topic.
    pub fn check_watch(&self, email: &str, topic: &str) -> Result<(), WatchRefusal> {
        let mb = self
            .mailboxes
            .get(email)
            .ok_or(WatchRefusal::UnknownMailbox)?;
        let other_topic = mb
            .watch
            .as_ref()
            .is_some_and(|w| w.topic != topic && Instant::now() < w.expires);
        if mb.watch_claim.is_some() || other_topic {
            return Err(WatchRefusal::Conflict);
        }
        Ok(())
    }

    /// [`Self::check_watch`], then marks the mailbox's watch as in processing; returns the claim
    /// (give it back with [`Self::release_watch_claim`]).
    pub fn claim_watch(&mut self, email: &str, topic: &str) -> Result<u64, WatchRefusal> {
        self.check_watch(email, topic)?;
        self.next_watch_claim += 1;
        let claim = self.next_watch_claim;
        self.mailboxes
            .get_mut(email)
            .expect("mailbox checked")
            .watch_claim = Some(claim);
        Ok(claim)
    }

    /// Ends the processing of a watch (no-op unless `claim` is the mailbox's current claim).
    pub fn release_watch_claim(&mut self, email: &str, claim: u64) {
        if let Some(mb) = self.mailboxes.get_mut(email)
            && mb.watch_claim == Some(claim)
        {
            mb.watch_claim = None;
        }
    }

    /// Registers (or renews) a watch; schedules the immediate notification Gmail sends.
    /// Returns `(historyId, expiration epoch ms)`.
    pub fn watch(
        &mut self,
        email: &str,
        topic: &str,
        label_ids: Vec<String>,
        exclude: bool,
        lifetime: Duration,
    ) -> Result<(u64, u64), SimError> {
        self.watch_generation += 1;
        let generation = self.watch_generation;
        let min_interval = self.min_interval;
        let now = Instant::now();
        let mb = self.mailbox_mut(email)?;
        let last_sent = mb.watch.as_ref().and_then(|w| w.last_sent);
        let at = next_slot(last_sent, now, min_interval);
        let expiration_ms = super::mailbox::now_ms().saturating_add(lifetime.as_millis() as u64);
        let w = Watch {
            topic: topic.to_string(),
            label_ids,
            exclude,
            generation,
            expires: now + lifetime,
            expiration_ms,
            last_sent,
            // The watch's own notification (not subject to the label filter).
            scheduled: true,
        };
        mb.watch = Some(w);
        let hid = mb.history_id;
        let _ = self.notify_tx.send(NotifyJob {
            email: email.to_string(),
            generation,
            at,
        });
        Ok((hid, expiration_ms))
    }

    pub fn stop(&mut self, email: &str) -> Result<(), SimError> {
        self.watch_generation += 1;
        self.mailbox_mut(email)?.watch = None;
        Ok(())
    }

    /// Claims a scheduled notification: `(topic, current historyId)` unless the watch changed.
    pub fn take_notification(
        &mut self,
        email: &str,
        generation: u64,
        now: Instant,
    ) -> Option<(String, u64)> {
        let mb = self.mailboxes.get_mut(email)?;
        let hid = mb.history_id;
        let w = mb.watch.as_mut()?;
        if w.generation != generation || !w.scheduled {
            return None;
        }
        w.scheduled = false;
        w.last_sent = Some(now);
        if now >= w.expires {
            return None;
        }
        Some((w.topic.clone(), hid))
    }
}

fn next_slot(last_sent: Option<Instant>, now: Instant, min_interval: Duration) -> Instant {
    match last_sent {
        Some(t) if now < t + min_interval => t + min_interval,
        _ => now,
    }
}

/// Folding: the first change after a quiet interval is sent at once; later ones within the
/// interval fold into one notification sent when the interval is over.
fn schedule(
    email: &str,
    w: &mut Watch,
    labels: &[String],
    changed: &[String],
    now: Instant,
    min_interval: Duration,
) -> Option<NotifyJob> {
    if now >= w.expires || w.scheduled || !w.matches(labels, changed) {
        return None;
    }
    w.scheduled = true;
    Some(NotifyJob {
        email: email.to_string(),
        generation: w.generation,
        at: next_slot(w.last_sent, now, min_interval),
    })
}

fn dedup(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in it {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}
