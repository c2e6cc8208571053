//! Every Redis key name, derived from the prefix and the shard count.
//!
//! Mailboxes are spread over `S` shards (`GMAIL_SYNC_SHARDS`) by a stable hash. Everything one
//! script touches shares the shard's hash tag `{PREFIX:sN}`, so it lives in one cluster slot.

use crate::mailbox::Mailbox;

#[derive(Clone, Debug)]
pub struct KeyLayout {
    prefix: String,
    shards: u32,
}

impl KeyLayout {
    pub fn new(prefix: &str, shards: u32) -> KeyLayout {
        KeyLayout {
            prefix: prefix.to_string(),
            shards: shards.max(1),
        }
    }

    pub fn shard_of(&self, mailbox: &Mailbox) -> u32 {
        (mailbox.stable_hash() % u64::from(self.shards)) as u32
    }

    fn tag(&self, shard: u32) -> String {
        format!("{{{}:s{}}}", self.prefix, shard)
    }

    pub fn state(&self, mailbox: &Mailbox) -> String {
        format!("{}:mb:{}", self.tag(self.shard_of(mailbox)), mailbox)
    }

    pub fn lease(&self, mailbox: &Mailbox) -> String {
        format!("{}:lease:{}", self.tag(self.shard_of(mailbox)), mailbox)
    }

    pub fn stream_of(&self, mailbox: &Mailbox) -> String {
        self.stream(self.shard_of(mailbox))
    }

    pub fn stream(&self, shard: u32) -> String {
        format!("{}:changes", self.tag(shard))
    }

    /// The shard's schedule: every registered mailbox, scored by when the scheduler must next
    /// look at it (epoch ms; `+inf` while it needs attention).
    pub fn schedule(&self, shard: u32) -> String {
        format!("{}:schedule", self.tag(shard))
    }

    pub fn schedule_of(&self, mailbox: &Mailbox) -> String {
        self.schedule(self.shard_of(mailbox))
    }

    /// The shard's mailboxes whose last renewal failed, scored by watch expiration (epoch ms):
    /// the index behind the "watches expiring soon" warning, empty while renewals succeed.
    pub fn renewal_failing(&self, shard: u32) -> String {
        format!("{}:renew-failing", self.tag(shard))
    }

    pub fn renewal_failing_of(&self, mailbox: &Mailbox) -> String {
        self.renewal_failing(self.shard_of(mailbox))
    }

    /// Renewals claimed in the shard during the current budget window (expires with it).
    pub fn renewal_budget(&self, shard: u32) -> String {
        format!("{}:renew-budget", self.tag(shard))
    }

    /// The scheduler claim on a mailbox: `HOST:PID:RANDOM` of the replica renewing or
    /// fallback-syncing it (PX TTL).
    pub fn claim(&self, mailbox: &Mailbox) -> String {
        format!("{}:claim:{}", self.tag(self.shard_of(mailbox)), mailbox)
    }

    /// The shard's sealed refresh tokens (`vault`): a hash, field = mailbox, value = the sealed
    /// bytes. One hash per shard rather than a key per mailbox, so `keys rotate` walks every
    /// credential with HSCAN per shard (no cluster-wide SCAN, no index to keep in step).
    pub fn credentials(&self, shard: u32) -> String {
        format!("{}:credentials", self.tag(shard))
    }

    pub fn credentials_of(&self, mailbox: &Mailbox) -> String {
        self.credentials(self.shard_of(mailbox))
    }

    /// A user's quota window (`store::quota`): bucket → units of the last minute, and `b` =
    /// blocked until (a per-user rate limit); expires a minute after its last charge.
    pub fn quota_user(&self, mailbox: &Mailbox) -> String {
        format!("{}:quota:{}", self.tag(self.shard_of(mailbox)), mailbox)
    }

    /// A user's syncs and renewals in flight: a zset of slot tokens scored by their expiry.
    pub fn in_flight(&self, mailbox: &Mailbox) -> String {
        format!("{}:inflight:{}", self.tag(self.shard_of(mailbox)), mailbox)
    }

    /// The project's quota window of the last minute, under one hash tag of its own
    /// (`{PREFIX:quota}`): every replica's charges meet in it.
    pub fn quota_project_minute(&self) -> String {
        format!("{{{}:quota}}:minute", self.prefix)
    }

    /// The project's quota window of the last 24 hours (hour buckets), same tag.
    pub fn quota_project_day(&self) -> String {
        format!("{{{}:quota}}:day", self.prefix)
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// All change streams, for consumers (one consumer group per stream).
    pub fn streams(&self) -> Vec<String> {
        (0..self.shards).map(|s| self.stream(s)).collect()
    }

    pub fn quarantine(&self) -> String {
        format!("{{{}}}:quarantine", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_mailbox_share_one_hash_tag() {
        let k = KeyLayout::new("gs", 16);
        let m = Mailbox::parse("alice@example.com").unwrap();
        let tag = format!("{{gs:s{}}}", k.shard_of(&m));
        for key in [
            k.state(&m),
            k.lease(&m),
            k.stream_of(&m),
            k.schedule_of(&m),
            k.renewal_failing_of(&m),
            k.claim(&m),
            k.credentials_of(&m),
            k.quota_user(&m),
            k.in_flight(&m),
        ] {
            assert!(key.starts_with(&tag), "{key}");
        }
        assert_eq!(k.streams().len(), 16);
        assert_eq!(k.quarantine(), "{gs}:quarantine");
        assert!(k.quota_project_minute().starts_with("{gs:quota}"));
        assert!(k.quota_project_day().starts_with("{gs:quota}"));
    }
}
