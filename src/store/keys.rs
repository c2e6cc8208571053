//! Every Redis key name, derived from the prefix and the shard count.
//!
//! Mailboxes are spread over `S` shards (`GMAIL_SYNC_SHARDS`) by a stable hash. Everything one
//! script touches shares the shard's hash tag `{PREFIX:sN}`, so it lives in one cluster slot.

use crate::mailbox::Mailbox;
use std::fmt;

#[derive(Clone, Debug)]
pub struct KeyLayout {
    prefix: String,
    shards: u32,
}

/// One key's name, written where it is used (into a Redis command's buffer, or a `String` with
/// `to_string`) rather than built as a `String` first: a sync names eight keys across its two
/// scripts, and formatting each into a string of its own was two allocations per key on the
/// hot path.
#[derive(Clone, Copy, Debug)]
pub struct Key<'a> {
    prefix: &'a str,
    name: Name<'a>,
}

/// What a key belongs to, and so how its name is spelled.
#[derive(Clone, Copy, Debug)]
enum Name<'a> {
    /// `{PREFIX:sN}:KIND:EMAIL`
    Mailbox {
        shard: u32,
        kind: &'static str,
        mailbox: &'a Mailbox,
    },
    /// `{PREFIX:sN}:KIND`
    Shard { shard: u32, kind: &'static str },
    /// `{PREFIX:quota}:KIND`
    Quota { kind: &'static str },
    /// `{PREFIX}:KIND`
    Global { kind: &'static str },
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = self.prefix;
        match self.name {
            Name::Mailbox {
                shard,
                kind,
                mailbox,
            } => write!(f, "{{{prefix}:s{shard}}}:{kind}:{mailbox}"),
            Name::Shard { shard, kind } => write!(f, "{{{prefix}:s{shard}}}:{kind}"),
            Name::Quota { kind } => write!(f, "{{{prefix}:quota}}:{kind}"),
            Name::Global { kind } => write!(f, "{{{prefix}}}:{kind}"),
        }
    }
}

impl redis::ToRedisArgs for Key<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        // A `Cmd` formats straight into its own buffer: no intermediate string.
        out.write_arg_fmt(self)
    }
}

impl redis::ToSingleRedisArg for Key<'_> {}

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

    fn of_mailbox<'a>(&'a self, kind: &'static str, mailbox: &'a Mailbox) -> Key<'a> {
        Key {
            prefix: &self.prefix,
            name: Name::Mailbox {
                shard: self.shard_of(mailbox),
                kind,
                mailbox,
            },
        }
    }

    fn of_shard(&self, kind: &'static str, shard: u32) -> Key<'_> {
        Key {
            prefix: &self.prefix,
            name: Name::Shard { shard, kind },
        }
    }

    pub fn state<'a>(&'a self, mailbox: &'a Mailbox) -> Key<'a> {
        self.of_mailbox("mb", mailbox)
    }

    pub fn lease<'a>(&'a self, mailbox: &'a Mailbox) -> Key<'a> {
        self.of_mailbox("lease", mailbox)
    }

    pub fn stream_of(&self, mailbox: &Mailbox) -> Key<'_> {
        self.stream(self.shard_of(mailbox))
    }

    pub fn stream(&self, shard: u32) -> Key<'_> {
        self.of_shard("changes", shard)
    }

    /// The shard's schedule: every registered mailbox, scored by when the scheduler must next
    /// look at it (epoch ms; `+inf` while it needs attention).
    pub fn schedule(&self, shard: u32) -> Key<'_> {
        self.of_shard("schedule", shard)
    }

    pub fn schedule_of(&self, mailbox: &Mailbox) -> Key<'_> {
        self.schedule(self.shard_of(mailbox))
    }

    /// The shard's mailboxes whose last renewal failed, scored by watch expiration (epoch ms):
    /// the index behind the "watches expiring soon" warning, empty while renewals succeed.
    pub fn renewal_failing(&self, shard: u32) -> Key<'_> {
        self.of_shard("renew-failing", shard)
    }

    pub fn renewal_failing_of(&self, mailbox: &Mailbox) -> Key<'_> {
        self.renewal_failing(self.shard_of(mailbox))
    }

    /// Renewals claimed in the shard during the current budget window (expires with it).
    pub fn renewal_budget(&self, shard: u32) -> Key<'_> {
        self.of_shard("renew-budget", shard)
    }

    /// The scheduler claim on a mailbox: `HOST:PID:RANDOM` of the replica renewing or
    /// fallback-syncing it (PX TTL).
    pub fn claim<'a>(&'a self, mailbox: &'a Mailbox) -> Key<'a> {
        self.of_mailbox("claim", mailbox)
    }

    /// The shard's sealed refresh tokens (`vault`): a hash, field = mailbox, value = the sealed
    /// bytes. One hash per shard rather than a key per mailbox, so `keys rotate` walks every
    /// credential with HSCAN per shard (no cluster-wide SCAN, no index to keep in step).
    pub fn credentials(&self, shard: u32) -> Key<'_> {
        self.of_shard("credentials", shard)
    }

    pub fn credentials_of(&self, mailbox: &Mailbox) -> Key<'_> {
        self.credentials(self.shard_of(mailbox))
    }

    /// A user's quota window (`store::quota`): bucket → units of the last minute, and `b` =
    /// blocked until (a per-user rate limit); expires a minute after its last charge.
    pub fn quota_user<'a>(&'a self, mailbox: &'a Mailbox) -> Key<'a> {
        self.of_mailbox("quota", mailbox)
    }

    /// A user's syncs and renewals in flight: a zset of slot tokens scored by their expiry.
    pub fn in_flight<'a>(&'a self, mailbox: &'a Mailbox) -> Key<'a> {
        self.of_mailbox("inflight", mailbox)
    }

    /// The project's quota window of the last minute, under one hash tag of its own
    /// (`{PREFIX:quota}`): every replica's charges meet in it.
    pub fn quota_project_minute(&self) -> Key<'_> {
        Key {
            prefix: &self.prefix,
            name: Name::Quota { kind: "minute" },
        }
    }

    /// The project's quota window of the last 24 hours (hour buckets), same tag.
    pub fn quota_project_day(&self) -> Key<'_> {
        Key {
            prefix: &self.prefix,
            name: Name::Quota { kind: "day" },
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// All change streams, for consumers (one consumer group per stream).
    pub fn streams(&self) -> Vec<String> {
        (0..self.shards)
            .map(|s| self.stream(s).to_string())
            .collect()
    }

    pub fn quarantine(&self) -> Key<'_> {
        Key {
            prefix: &self.prefix,
            name: Name::Global { kind: "quarantine" },
        }
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
            let key = key.to_string();
            assert!(key.starts_with(&tag), "{key}");
        }
        assert_eq!(k.streams().len(), 16);
        assert_eq!(k.quarantine().to_string(), "{gs}:quarantine");
        assert_eq!(k.quota_project_minute().to_string(), "{gs:quota}:minute");
        assert_eq!(k.quota_project_day().to_string(), "{gs:quota}:day");
        assert_eq!(
            k.state(&m).to_string(),
            format!("{tag}:mb:alice@example.com")
        );
        assert_eq!(k.stream(3).to_string(), "{gs:s3}:changes");
    }
}
