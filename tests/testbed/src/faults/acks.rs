//! P4 observed, not derived: the ack tap.
//!
//! Every worker reaches the emulator through the cut proxy ([`super::proxy`]). With a tap the
//! proxy also decodes what it forwards, without changing a byte: HTTP/2 DATA frames, gRPC's
//! length-prefixed messages, and the few protobuf fields of Pub/Sub's delivery and ack path.
//!
//! - emulator → worker: every `ReceivedMessage` (field 1 of `StreamingPullResponse`): its ack
//!   id, message id and data (the notification), recorded *before* the bytes are passed on, so
//!   a worker can never ack a delivery the tap has not seen;
//! - worker → emulator: the ack ids of `Acknowledge` (field 2; `StreamingPullRequest` uses the
//!   same number) and the ack ids and deadlines of `ModifyAckDeadline` (fields 4 and 3;
//!   deadline 0 is a nack, the client's drop).
//!
//! Before an ack leaves the proxy the tap judges it against Redis. The consumer acks for
//! exactly four reasons (`AckReason`, `Effect::Quarantine`), so an ack is legitimate only if
//! the mailbox's cursor covers the notification's historyId, or the message is in the
//! quarantine stream (I6: written first), or the mailbox is not registered, or it needs
//! attention. Anything else is an ack before its commit: a P4 violation. The read happens after
//! the worker sent the ack and before the emulator receives it, so an ack that raced its own
//! commit by less than one Redis round trip could pass; an ack sent before the sync committed,
//! whose window is a Gmail call and more, cannot (the README's "Fault suite" has the mutation
//! run that showed it).
//!
//! Headers need no HPACK: the tap ignores them and tells messages apart by their fields (a
//! `GetSubscription` request has only field 1, and its answer does not decode as a delivery: a
//! `ReceivedMessage` needs an ack id, a message id and data). A connection that is not HTTP/2
//! at all (the workers' subscription check speaks HTTP/1 JSON) is recognised by its first bytes
//! and left alone.
//!
//! The same record tells, at the end, which messages a live worker still holds without an ack
//! ([`AckTap::summary`]): after a drain every delivery to a live worker must have been acked
//! (or given back and delivered again), since nothing is left to sync.

use super::proxy::LaneId;
use crate::bed::{Connector, Keys, RawConnection};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex as SyncMutex;
use std::time::Duration;
use tokio::sync::Mutex;

/// One Redis read of the judge may take this long before the ack is passed on unchecked (the
/// lane's bytes wait meanwhile; Redis may be paused or restarting by a fault).
const JUDGE_BOUND: Duration = Duration::from_secs(2);
/// Held messages described in the details, at most (the counts are complete).
const DESCRIBED: usize = 10;
/// Early acks kept whole, at most (the count is complete).
const EARLY_KEPT: usize = 1_000;

/// A notification as the tap reads it from a delivery's data.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Notification {
    email: String,
    history_id: u64,
}

impl Notification {
    /// The `{emailAddress, historyId}` JSON Gmail publishes; `None` for anything else (poison).
    fn parse(data: &[u8]) -> Option<Notification> {
        let v: serde_json::Value = serde_json::from_slice(data).ok()?;
        let email = v.get("emailAddress")?.as_str()?.to_string();
        let history_id = match v.get("historyId")? {
            serde_json::Value::Number(n) => n.as_u64()?,
            serde_json::Value::String(s) => s.parse().ok()?,
            _ => return None,
        };
        Some(Notification { email, history_id })
    }
}

/// What the tap knows of one message (by message id).
#[derive(Debug)]
struct Message {
    notification: Option<Notification>,
    deliveries: u32,
    /// The lane and ack id of the latest delivery: only an ack of that one settles it.
    last_lane: LaneId,
    last_ack_id: String,
    /// The latest delivery was acked / given back (modack 0).
    acked: bool,
    given_back: bool,
}

/// How the judge found one ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The cursor covers the historyId.
    Covered,
    /// The message is in the quarantine stream.
    Quarantined,
    /// No such mailbox in Redis (the consumer acks and drops it).
    Unregistered,
    /// The mailbox needs attention (the consumer acks, keeping the cursor).
    Attention,
    /// None of the above: acked before its commit.
    Early { cursor: u64 },
}

/// The counts the row reports (see [`AckTap::summary`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AckSummary {
    /// Deliveries the emulator sent (redeliveries included) and distinct messages.
    pub deliveries: u64,
    pub messages: u64,
    /// Acks forwarded to the emulator, and how many of them the judge read Redis for.
    pub acks: u64,
    pub judged: u64,
    /// Acks passed on unjudged (Redis did not answer within the bound).
    pub unjudged: u64,
    /// Acks of an ack id the tap never saw delivered, or of an older delivery of a message
    /// delivered again since (the emulator ignores those).
    pub unknown_acks: u64,
    pub stale_acks: u64,
    /// Modacks with deadline 0.
    pub nacks: u64,
    /// P4: acks sent while the cursor did not cover them (and nothing else allowed them).
    pub early_acks: u64,
    /// The first of them, for the checks that know more than the tap (a lossy kill may have
    /// taken the commit an ack followed with it) and for the details.
    pub early: Vec<EarlyAck>,
    /// Messages whose latest delivery went to a worker that is still running and that it has
    /// neither acked nor given back: held (a P5 violation after a drain).
    pub held_by_live: u64,
    /// Messages whose latest delivery went to a worker that is gone, not acked: with the
    /// emulator until their deadline or a stale stream lets go (see the emulator notes).
    pub with_dead_workers: u64,
    /// Given back by a live worker and not delivered again yet.
    pub given_back: u64,
    /// gRPC messages the tap could not read (compressed), and HTTP/2 connections it gave up
    /// on (bad framing); connections that are not HTTP/2 at all (the subscription check's
    /// HTTP/1 JSON) are not counted.
    pub undecoded: u64,
    /// What the held messages were.
    pub details: Vec<String>,
}

/// One ack the judge found nothing to justify.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EarlyAck {
    pub lane: u64,
    pub message_id: String,
    /// `None` for a message that is not a notification.
    pub mailbox: Option<String>,
    pub history_id: Option<u64>,
    /// The mailbox's cursor when the ack was judged (0 for a non-notification).
    pub cursor: u64,
}

impl std::fmt::Display for EarlyAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.mailbox, self.history_id) {
            (Some(m), Some(h)) => write!(
                f,
                "lane {}: message {} ({m} historyId {h}) acked while the cursor was {}, not in \
                 the quarantine stream",
                self.lane, self.message_id, self.cursor
            ),
            _ => write!(
                f,
                "lane {}: message {} (not a notification) acked, not in the quarantine stream",
                self.lane, self.message_id
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Record {
    /// Ack id → message id, every delivery.
    ack_ids: HashMap<String, String>,
    messages: HashMap<String, Message>,
    deliveries: u64,
    acks: u64,
    judged: u64,
    unjudged: u64,
    unknown_acks: u64,
    stale_acks: u64,
    nacks: u64,
    early_acks: u64,
    early: Vec<EarlyAck>,
    undecoded: u64,
}

/// The tap shared by every connection of the proxy (see the module docs).
pub struct AckTap {
    keys: Keys,
    redis: Connector,
    /// The judge's connection, made again after an error (Redis restarts in some scenarios).
    /// One at a time: acks of all lanes are judged in turn, which at the suite's rates costs
    /// each a fraction of a millisecond and keeps the order of the reads obvious.
    con: Mutex<Option<RawConnection>>,
    record: SyncMutex<Record>,
}

impl std::fmt::Debug for AckTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckTap").finish_non_exhaustive()
    }
}

/// One ack to judge: the message it settles and what it announced.
struct Pending {
    message_id: String,
    notification: Option<Notification>,
}

impl AckTap {
    pub fn new(keys: Keys, redis: Connector) -> AckTap {
        AckTap {
            keys,
            redis,
            con: Mutex::new(None),
            record: SyncMutex::new(Record::default()),
        }
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deliveries on their way to the worker of `lane` (called before they are forwarded).
    pub(super) fn delivered(&self, lane: LaneId, deliveries: Vec<Delivered>) {
        let mut rec = self.record();
        for d in deliveries {
            rec.deliveries += 1;
            rec.ack_ids.insert(d.ack_id.clone(), d.message_id.clone());
            let notification = Notification::parse(&d.data);
            let m = rec.messages.entry(d.message_id).or_insert(Message {
                notification,
                deliveries: 0,
                last_lane: lane,
                last_ack_id: String::new(),
                acked: false,
                given_back: false,
            });
            m.deliveries += 1;
            m.last_lane = lane;
            m.last_ack_id = d.ack_id;
            m.acked = false;
            m.given_back = false;
        }
    }

    pub(super) fn undecoded(&self, n: u64) {
        if n > 0 {
            self.record().undecoded += n;
        }
    }

    /// Judges the acks and nacks of `ops`, then records them as forwarded. The caller forwards
    /// the bytes after this returns, never before.
    pub(super) async fn forwarding(&self, lane: LaneId, ops: ClientOps) {
        if ops.acks.is_empty() && ops.nacks.is_empty() {
            return;
        }
        let pending: Vec<Pending> = {
            let mut rec = self.record();
            rec.nacks += ops.nacks.len() as u64;
            for id in &ops.nacks {
                if let Some(m) = rec.ack_ids.get(id).cloned()
                    && let Some(m) = rec.messages.get_mut(&m)
                    && m.last_ack_id == *id
                {
                    m.given_back = true;
                }
            }
            let mut pending = Vec::new();
            for id in &ops.acks {
                rec.acks += 1;
                let Some(message_id) = rec.ack_ids.get(id).cloned() else {
                    rec.unknown_acks += 1;
                    continue;
                };
                let m = rec
                    .messages
                    .get(&message_id)
                    .expect("every ack id names a message");
                let stale = m.last_ack_id != *id;
                pending.push(Pending {
                    message_id,
                    notification: m.notification.clone(),
                });
                if stale {
                    rec.stale_acks += 1;
                }
            }
            pending
        };
        for p in pending {
            let verdict = tokio::time::timeout(JUDGE_BOUND, self.judge(&p)).await;
            let judged = matches!(verdict, Ok(Ok(_)));
            self.note(lane, &p, verdict.ok().and_then(Result::ok));
            if !judged {
                // The connection may be broken for good (a restarted Redis): a new one for
                // the next ack.
                *self.con.lock().await = None;
            }
        }
        let mut rec = self.record();
        for id in &ops.acks {
            if let Some(m) = rec.ack_ids.get(id).cloned()
                && let Some(m) = rec.messages.get_mut(&m)
                && m.last_ack_id == *id
            {
                m.acked = true;
            }
        }
    }

    /// Records one ack's verdict (`None`: Redis did not answer in time).
    fn note(&self, lane: LaneId, p: &Pending, verdict: Option<Verdict>) {
        let mut rec = self.record();
        match verdict {
            Some(Verdict::Early { cursor }) => {
                rec.judged += 1;
                rec.early_acks += 1;
                if rec.early.len() < EARLY_KEPT {
                    rec.early.push(EarlyAck {
                        lane: lane.0,
                        message_id: p.message_id.clone(),
                        mailbox: p.notification.as_ref().map(|n| n.email.clone()),
                        history_id: p.notification.as_ref().map(|n| n.history_id),
                        cursor,
                    });
                }
            }
            Some(_) => rec.judged += 1,
            None => rec.unjudged += 1,
        }
    }

    /// Reads Redis for one ack (see [`Verdict`]).
    async fn judge(&self, p: &Pending) -> anyhow::Result<Verdict> {
        let mut guard = self.con.lock().await;
        if guard.is_none() {
            *guard = Some(self.redis.connect().await?);
        }
        let con = guard.as_mut().expect("connected above");
        let mut cursor = 0;
        if let Some(n) = &p.notification {
            let (stored, attention): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(self.keys.state(&n.email))
                .arg("cursor")
                .arg("attention")
                .query_async(con)
                .await?;
            let Some(stored) = stored else {
                return Ok(Verdict::Unregistered);
            };
            if attention.is_some_and(|a| !a.is_empty()) {
                return Ok(Verdict::Attention);
            }
            cursor = stored.parse::<u64>()?;
            if cursor >= n.history_id {
                return Ok(Verdict::Covered);
            }
        }
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(self.keys.quarantine())
            .arg("-")
            .arg("+")
            .query_async(con)
            .await?;
        if entries
            .iter()
            .any(|(_, fields)| fields.get("message_id") == Some(&p.message_id))
        {
            return Ok(Verdict::Quarantined);
        }
        Ok(Verdict::Early { cursor })
    }

    /// The counts so far; `live` are the lanes of the workers still running.
    pub fn summary(&self, live: &HashSet<LaneId>) -> AckSummary {
        let rec = self.record();
        let mut s = AckSummary {
            deliveries: rec.deliveries,
            messages: rec.messages.len() as u64,
            acks: rec.acks,
            judged: rec.judged,
            unjudged: rec.unjudged,
            unknown_acks: rec.unknown_acks,
            stale_acks: rec.stale_acks,
            nacks: rec.nacks,
            early_acks: rec.early_acks,
            early: rec.early.clone(),
            undecoded: rec.undecoded,
            ..AckSummary::default()
        };
        let mut held = Vec::new();
        for (id, m) in &rec.messages {
            if m.acked {
                continue;
            }
            if !live.contains(&m.last_lane) {
                s.with_dead_workers += 1;
            } else if m.given_back {
                s.given_back += 1;
            } else {
                s.held_by_live += 1;
                held.push(format!(
                    "P5 message {id} ({}, {} deliveries) held unacked by the worker of lane {:?}",
                    m.notification
                        .as_ref()
                        .map_or("not a notification".to_string(), |n| {
                            format!("{} historyId {}", n.email, n.history_id)
                        }),
                    m.deliveries,
                    m.last_lane
                ));
            }
        }
        held.sort();
        s.details.extend(held.into_iter().take(DESCRIBED));
        s
    }
}

// ---- the wire: HTTP/2 frames → gRPC messages → the protobuf fields the tap needs ----

/// The client connection preface (RFC 9113 §3.4), sent once before the first frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const PADDED: u8 = 0x8;
/// gRPC's message prefix: a compressed flag and a 4-byte length.
const GRPC_PREFIX: usize = 5;
/// A reader that has buffered this much without a whole frame gives up (not HTTP/2, or lost
/// track): forwarding goes on, only the decoding stops, and the summary says so.
const GIVE_UP_AT: usize = 32 << 20;

/// Which end of the connection a [`GrpcReader`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// worker → emulator: begins with the connection preface.
    Client,
    /// emulator → worker.
    Server,
}

/// Reassembles the gRPC messages of one direction of one HTTP/2 connection, per stream.
#[derive(Debug)]
pub(super) struct GrpcReader {
    pending: Vec<u8>,
    side: Side,
    /// Until the connection shows it is HTTP/2: the client's preface, the server's first
    /// frame (always SETTINGS on stream 0).
    opening: bool,
    streams: HashMap<u32, Vec<u8>>,
    gave_up: bool,
    /// The connection is not HTTP/2 (the workers' subscription check speaks HTTP/1 JSON):
    /// nothing to read, and nothing wrong.
    other_protocol: bool,
    /// Compressed messages seen (never by this client: it does not compress), plus 1 if the
    /// reader gave up; taken by [`GrpcReader::take_undecoded`].
    undecoded: u64,
}

impl GrpcReader {
    pub(super) fn new(side: Side) -> GrpcReader {
        GrpcReader {
            pending: Vec::new(),
            side,
            opening: true,
            streams: HashMap::new(),
            gave_up: false,
            other_protocol: false,
            undecoded: 0,
        }
    }

    pub(super) fn take_undecoded(&mut self) -> u64 {
        std::mem::take(&mut self.undecoded)
    }

    /// Feeds the next bytes of the direction; returns the gRPC messages they completed.
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if self.gave_up || self.other_protocol {
            return out;
        }
        self.pending.extend_from_slice(bytes);
        if self.opening {
            match self.side {
                Side::Client => {
                    let n = self.pending.len().min(PREFACE.len());
                    if self.pending[..n] != PREFACE[..n] {
                        self.other_protocol();
                        return out;
                    }
                    if n < PREFACE.len() {
                        return out;
                    }
                    self.pending.drain(..PREFACE.len());
                }
                Side::Server => {
                    if self.pending.len() < FRAME_HEADER {
                        return out;
                    }
                    let h = &self.pending[..FRAME_HEADER];
                    if h[3] != SETTINGS || h[5..9] != [0, 0, 0, 0] {
                        self.other_protocol();
                        return out;
                    }
                }
            }
            self.opening = false;
        }
        let mut at = 0;
        while self.pending.len() - at >= FRAME_HEADER {
            let h = &self.pending[at..at + FRAME_HEADER];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if self.pending.len() - at < FRAME_HEADER + len {
                break;
            }
            let payload = &self.pending[at + FRAME_HEADER..at + FRAME_HEADER + len];
            match kind {
                DATA => {
                    let body = if flags & PADDED != 0 {
                        let pad = usize::from(*payload.first().unwrap_or(&0));
                        if 1 + pad > payload.len() {
                            self.give_up();
                            return out;
                        }
                        &payload[1..payload.len() - pad]
                    } else {
                        payload
                    };
                    let buf = self.streams.entry(stream).or_default();
                    buf.extend_from_slice(body);
                    self.undecoded += drain_messages(buf, &mut out);
                    if flags & END_STREAM != 0 {
                        self.streams.remove(&stream);
                    }
                }
                // Trailers end a stream too; a reset drops what it had.
                HEADERS if flags & END_STREAM != 0 => {
                    self.streams.remove(&stream);
                }
                RST_STREAM => {
                    self.streams.remove(&stream);
                }
                _ => {}
            }
            at += FRAME_HEADER + len;
        }
        self.pending.drain(..at);
        if self.pending.len() > GIVE_UP_AT {
            self.give_up();
        }
        out
    }

    fn other_protocol(&mut self) {
        self.other_protocol = true;
        self.pending = Vec::new();
    }

    fn give_up(&mut self) {
        self.gave_up = true;
        self.undecoded += 1;
        self.pending = Vec::new();
        self.streams.clear();
    }
}

/// Moves every whole gRPC message of `buf` to `out`; returns how many were compressed (and
/// skipped).
fn drain_messages(buf: &mut Vec<u8>, out: &mut Vec<Vec<u8>>) -> u64 {
    let mut at = 0;
    let mut compressed = 0;
    while buf.len() - at >= GRPC_PREFIX {
        let n = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if buf.len() - at < GRPC_PREFIX + n {
            break;
        }
        if buf[at] == 0 {
            out.push(buf[at + GRPC_PREFIX..at + GRPC_PREFIX + n].to_vec());
        } else {
            compressed += 1;
        }
        at += GRPC_PREFIX + n;
    }
    buf.drain(..at);
    compressed
}

/// One protobuf field value (groups, long deprecated, are treated as malformed).
#[derive(Debug, PartialEq, Eq)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Every field of a message, in wire order; `None` if it does not parse.
fn fields(mut buf: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut buf)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                buf = buf.get(n..)?;
                Value::Fixed
            }
            2 => {
                let n = usize::try_from(varint(&mut buf)?).ok()?;
                let (v, rest) = (buf.get(..n)?, buf.get(n..)?);
                buf = rest;
                Value::Bytes(v)
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

fn text(v: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(v).ok()?;
    (!s.is_empty() && s.chars().all(|c| c.is_ascii_graphic())).then(|| s.to_string())
}

/// One delivery read from the emulator's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Delivered {
    pub ack_id: String,
    pub message_id: String,
    pub data: Vec<u8>,
}

/// The deliveries of one emulator → worker message (`StreamingPullResponse.received_messages`:
/// `ReceivedMessage { ack_id = 1, message = 2 }`, `PubsubMessage { data = 1, message_id = 3 }`).
pub(super) fn deliveries(message: &[u8]) -> Vec<Delivered> {
    let Some(top) = fields(message) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (number, value) in top {
        let (1, Value::Bytes(received)) = (number, value) else {
            continue;
        };
        let Some(received) = fields(received) else {
            continue;
        };
        let (mut ack_id, mut message_id, mut data) = (None, None, None);
        for (n, v) in received {
            match (n, v) {
                (1, Value::Bytes(b)) => ack_id = text(b),
                (2, Value::Bytes(pm)) => {
                    for (n, v) in fields(pm).unwrap_or_default() {
                        match (n, v) {
                            (1, Value::Bytes(b)) => data = Some(b.to_vec()),
                            (3, Value::Bytes(b)) => message_id = text(b),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if let (Some(ack_id), Some(message_id), Some(data)) = (ack_id, message_id, data) {
            out.push(Delivered {
                ack_id,
                message_id,
                data,
            });
        }
    }
    out
}

/// The acks and nacks of one worker → emulator message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ClientOps {
    pub acks: Vec<String>,
    pub nacks: Vec<String>,
}

/// `AcknowledgeRequest { ack_ids = 2 }` (and `StreamingPullRequest { ack_ids = 2,
/// modify_deadline_seconds = 3 (packed), modify_deadline_ack_ids = 4 }`),
/// `ModifyAckDeadlineRequest { ack_deadline_seconds = 3, ack_ids = 4 }`.
pub(super) fn client_ops(message: &[u8]) -> ClientOps {
    let Some(top) = fields(message) else {
        return ClientOps::default();
    };
    let mut ops = ClientOps::default();
    let mut modack_ids = Vec::new();
    let mut deadlines = Vec::new();
    for (n, v) in top {
        match (n, v) {
            (2, Value::Bytes(b)) => ops.acks.extend(text(b)),
            (3, Value::Varint(d)) => deadlines.push(d),
            (3, Value::Bytes(mut packed)) => {
                while let Some(d) = varint(&mut packed) {
                    deadlines.push(d);
                }
            }
            (4, Value::Bytes(b)) => modack_ids.extend(text(b)),
            _ => {}
        }
    }
    // One deadline for all (the unary RPC) or one per id (the stream's parallel lists).
    for (i, id) in modack_ids.into_iter().enumerate() {
        let deadline = if deadlines.len() == 1 {
            deadlines[0]
        } else {
            deadlines.get(i).copied().unwrap_or(u64::MAX)
        };
        if deadline == 0 {
            ops.nacks.push(id);
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(out: &mut Vec<u8>, n: u64, v: &[u8]) {
        put_varint(out, (n << 3) | 2);
        put_varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }

    fn received(ack_id: &str, message_id: &str, data: &[u8]) -> Vec<u8> {
        let mut pm = Vec::new();
        bytes_field(&mut pm, 1, data);
        bytes_field(&mut pm, 3, message_id.as_bytes());
        let mut rm = Vec::new();
        bytes_field(&mut rm, 1, ack_id.as_bytes());
        bytes_field(&mut rm, 2, &pm);
        rm
    }

    fn grpc(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn messages_split_across_frames_and_reads_come_out_whole_per_stream() {
        let note = br#"{"emailAddress":"a@example.com","historyId":9007199254740993}"#;
        let mut response = Vec::new();
        bytes_field(&mut response, 1, &received("ack-1", "m-1", note));
        bytes_field(&mut response, 1, &received("ack-2", "m-2", b"\xff poison"));
        let message = grpc(&response);
        let (a, b) = message.split_at(7);
        // A padded first half, a SETTINGS frame of another stream between the halves.
        let mut padded = vec![3];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut wire = frame(SETTINGS, 0, 0, &[]);
        wire.extend(frame(DATA, PADDED, 1, &padded));
        wire.extend(frame(0x4, 0, 0, &[]));
        wire.extend(frame(DATA, END_STREAM, 1, b));
        let mut reader = GrpcReader::new(Side::Server);
        let mut got = Vec::new();
        // Byte by byte: no read boundary may matter.
        for byte in &wire {
            got.extend(reader.push(std::slice::from_ref(byte)));
        }
        assert_eq!(got.len(), 1);
        let d = deliveries(&got[0]);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].ack_id, "ack-1");
        assert_eq!(d[0].message_id, "m-1");
        assert_eq!(
            Notification::parse(&d[0].data),
            Some(Notification {
                email: "a@example.com".into(),
                history_id: 9_007_199_254_740_993
            })
        );
        assert_eq!(Notification::parse(&d[1].data), None);
        assert_eq!(reader.take_undecoded(), 0);
    }

    #[test]
    fn the_client_side_skips_the_preface_and_reads_acks_and_nacks() {
        let mut ack = Vec::new();
        bytes_field(&mut ack, 1, b"projects/p/subscriptions/s");
        bytes_field(&mut ack, 2, b"ack-1");
        bytes_field(&mut ack, 2, b"ack-2");
        // ModifyAckDeadline(0): a nack of two.
        let mut nack = Vec::new();
        bytes_field(&mut nack, 1, b"projects/p/subscriptions/s");
        put_varint(&mut nack, 3 << 3);
        put_varint(&mut nack, 0);
        bytes_field(&mut nack, 4, b"ack-3");
        bytes_field(&mut nack, 4, b"ack-4");
        // An extension (deadline 10) is not a nack.
        let mut extend = Vec::new();
        put_varint(&mut extend, 3 << 3);
        put_varint(&mut extend, 10);
        bytes_field(&mut extend, 4, b"ack-5");
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        wire.extend(frame(DATA, END_STREAM, 1, &grpc(&ack)));
        wire.extend(frame(DATA, 0, 3, &grpc(&nack)));
        wire.extend(frame(DATA, 0, 5, &grpc(&extend)));
        let mut reader = GrpcReader::new(Side::Client);
        let got = reader.push(&wire);
        assert_eq!(got.len(), 3);
        assert_eq!(client_ops(&got[0]).acks, vec!["ack-1", "ack-2"]);
        assert_eq!(
            client_ops(&got[1]),
            ClientOps {
                acks: vec![],
                nacks: vec!["ack-3".into(), "ack-4".into()]
            }
        );
        assert_eq!(client_ops(&got[2]), ClientOps::default());
    }

    #[test]
    fn the_streams_packed_deadlines_pair_with_their_ids() {
        let mut req = Vec::new();
        let mut packed = Vec::new();
        put_varint(&mut packed, 0);
        put_varint(&mut packed, 60);
        bytes_field(&mut req, 3, &packed);
        bytes_field(&mut req, 4, b"gone");
        bytes_field(&mut req, 4, b"kept");
        assert_eq!(client_ops(&req).nacks, vec!["gone"]);
    }

    #[test]
    fn http1_is_left_alone_and_bad_frames_are_given_up_on() {
        // The subscription check speaks HTTP/1 JSON: not HTTP/2, nothing to read, no error.
        let mut client = GrpcReader::new(Side::Client);
        assert!(
            client
                .push(b"GET /v1/projects/p/subscriptions/s HTTP/1.1\r\n")
                .is_empty()
        );
        assert!(client.push(&grpc(b"\x12\x03abc")).is_empty());
        assert_eq!(client.take_undecoded(), 0);
        let mut server = GrpcReader::new(Side::Server);
        assert!(server.push(b"HTTP/1.1 200 OK\r\n\r\n").is_empty());
        assert_eq!(server.take_undecoded(), 0);
        // HTTP/2 whose DATA frame claims more padding than it has: the reader stops.
        let mut reader = GrpcReader::new(Side::Server);
        let mut wire = frame(SETTINGS, 0, 0, &[]);
        wire.extend(frame(DATA, PADDED, 1, &[9, 1, 2]));
        assert!(reader.push(&wire).is_empty());
        assert_eq!(reader.take_undecoded(), 1);
        assert!(reader.push(&[0u8; 100]).is_empty());
        assert!(deliveries(b"\x0a\x05hello").is_empty());
        assert_eq!(client_ops(b"\xff\xff\xff"), ClientOps::default());
    }

    #[test]
    fn a_subscription_answer_is_not_a_delivery() {
        // GetSubscription's answer: Subscription { name = 1, topic = 2, ack_deadline_seconds = 5 }.
        let mut sub = Vec::new();
        bytes_field(&mut sub, 1, b"projects/p/subscriptions/s");
        bytes_field(&mut sub, 2, b"projects/p/topics/t");
        put_varint(&mut sub, 5 << 3);
        put_varint(&mut sub, 10);
        assert!(deliveries(&sub).is_empty());
    }
}
