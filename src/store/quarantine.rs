//! The quarantine stream's entries, bounded in size whatever the publisher sent.
//!
//! A [`Quarantined`] entry can only be built by [`Quarantined::new`], which cuts every field the
//! outside world controls to a fixed number of bytes: the payload to its first
//! [`QUARANTINE_DATA_BYTES`] (its original length is kept in `data_len`), the reason to
//! [`QUARANTINE_TEXT_BYTES`], the message id and publish time to [`QUARANTINE_ID_BYTES`]. An entry therefore costs at most [`QUARANTINE_ENTRY_MEMORY`] of
//! Redis memory, and the stream, trimmed to `GMAIL_SYNC_QUARANTINE_MAXLEN` entries, at most
//! [`quarantine_memory_cap`] (checked by `tests/integration/bad_input.rs` with `MEMORY USAGE`).
//!
//! Fields: `reason`, `data` (the payload's first bytes), `data_len` (its length in bytes),
//! `message_id`, `publish_time` (epoch seconds with nanoseconds), `received_at` (epoch ms).

/// Payload bytes kept. A real notification is under 200 bytes, so it is kept whole; an
/// oversize or garbage payload keeps enough to recognise its publisher.
pub const QUARANTINE_DATA_BYTES: usize = 256;
/// Bytes kept of the reason (reasons may quote the payload, e.g. a serde error naming a bad
/// value).
pub const QUARANTINE_TEXT_BYTES: usize = 256;
/// Bytes kept of the message id and the publish time (Pub/Sub ids are about 16 digits; the
/// publish time is ours, 20 characters).
pub const QUARANTINE_ID_BYTES: usize = 64;
/// Redis memory one entry may cost at most: the bounded values (256 + 256 + 64 + 64 + 20 for
/// `data_len` + 13 for `received_at` = 673 bytes at the very worst) plus the stream's per-entry
/// and per-node overhead (field names are stored once per node), with margin. Measured: 490 B per entry for a stream of worst-case
/// payloads on Redis 7.0.15 (`tests/integration/bad_input.rs`, the flood test).
pub const QUARANTINE_ENTRY_MEMORY: u64 = 1024;
/// Entries `XADD MAXLEN ~` may keep beyond the cap: it trims whole stream nodes only, and a node
/// holds at most `stream-node-max-entries` entries (Redis default 100).
pub const QUARANTINE_TRIM_SLACK: u64 = 100;

/// The most Redis memory the quarantine stream can take with `maxlen` entries (plus a few
/// hundred bytes for the key itself).
pub const fn quarantine_memory_cap(maxlen: u64) -> u64 {
    (maxlen + QUARANTINE_TRIM_SLACK) * QUARANTINE_ENTRY_MEMORY
}

/// A rejected message on its way to the quarantine stream, every field bounded.
#[derive(Debug, Clone)]
pub struct Quarantined<'a> {
    reason: &'a str,
    data: &'a [u8],
    data_len: usize,
    message_id: &'a str,
    publish_time: &'a str,
}

impl<'a> Quarantined<'a> {
    /// Keeps the first bytes of each field (see the module doc); never copies the payload.
    pub fn new(
        reason: &'a str,
        data: &'a [u8],
        message_id: &'a str,
        publish_time: &'a str,
    ) -> Quarantined<'a> {
        Quarantined {
            reason: prefix_str(reason, QUARANTINE_TEXT_BYTES),
            data: &data[..data.len().min(QUARANTINE_DATA_BYTES)],
            data_len: data.len(),
            message_id: prefix_str(message_id, QUARANTINE_ID_BYTES),
            publish_time: prefix_str(publish_time, QUARANTINE_ID_BYTES),
        }
    }

    pub fn reason(&self) -> &'a str {
        self.reason
    }

    /// The payload's first bytes (all of it if it is short).
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The original payload's length.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    pub fn message_id(&self) -> &'a str {
        self.message_id
    }

    pub fn publish_time(&self) -> &'a str {
        self.publish_time
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn prefix_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_are_kept_whole() {
        let data = br#"{"emailAddress":"a@b.c","historyId":"1"}"#;
        let q = Quarantined::new("bad", data, "123", "1.000000000");
        assert_eq!(q.data(), data);
        assert_eq!(q.data_len(), data.len());
        assert_eq!(q.reason(), "bad");
    }

    #[test]
    fn every_field_is_cut_to_its_bound() {
        let data = vec![b'x'; 10 * 1024 * 1024];
        let long = "r".repeat(5000);
        let q = Quarantined::new(&long, &data, &long, &long);
        assert_eq!(q.data(), &data[..QUARANTINE_DATA_BYTES]);
        assert_eq!(q.data_len(), 10 * 1024 * 1024);
        assert_eq!(q.reason().len(), QUARANTINE_TEXT_BYTES);
        assert_eq!(q.message_id().len(), QUARANTINE_ID_BYTES);
        assert_eq!(q.publish_time().len(), QUARANTINE_ID_BYTES);
        let exactly = vec![b'y'; QUARANTINE_DATA_BYTES];
        let q = Quarantined::new("", &exactly, "", "");
        assert_eq!(q.data().len(), QUARANTINE_DATA_BYTES);
    }

    #[test]
    fn text_is_cut_on_a_character_boundary() {
        // 'é' is two bytes: a cut at an odd byte backs off to the boundary before it.
        let s = "é".repeat(200);
        let cut = prefix_str(&s, 255);
        assert_eq!(cut.len(), 254);
        assert!(s.starts_with(cut));
        assert_eq!(prefix_str("short", 255), "short");
        assert_eq!(prefix_str("abc", 0), "");
    }

    #[test]
    fn the_memory_cap_counts_the_trimming_slack() {
        assert_eq!(quarantine_memory_cap(10_000), 10_100 * 1024);
    }
}
