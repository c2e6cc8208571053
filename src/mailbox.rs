//! A mailbox: a normalized Gmail address, its stable hash (shard choice, log pseudonym).

use std::fmt;

/// A Gmail address, trimmed and lower-cased (Gmail addresses are case-insensitive, and the same
/// mailbox must always map to the same Redis keys).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mailbox(String);

/// How logs show a mailbox (GMAIL_SYNC_LOG_MAILBOX): addresses are personal data, so the
/// default is a pseudonym.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxLogStyle {
    /// The 64-bit [`Mailbox::stable_hash`], in hex.
    Hash,
    /// The address itself.
    Plain,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid email address: {0}")]
pub struct InvalidMailbox(pub &'static str);

impl Mailbox {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Mailbox, InvalidMailbox> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(InvalidMailbox("empty"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(InvalidMailbox("longer than 254 bytes"));
        }
        let (local, domain) = s.split_once('@').ok_or(InvalidMailbox("no '@'"))?;
        if local.is_empty() || domain.is_empty() || domain.contains('@') {
            return Err(InvalidMailbox(
                "expected exactly one '@' between two non-empty parts",
            ));
        }
        // Keys embed the address: refuse what could break a key or a log line, and braces,
        // which would change the Redis Cluster hash tag.
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | '"' | '\\'))
        {
            return Err(InvalidMailbox(
                "contains whitespace, control characters or {}\"\\",
            ));
        }
        if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
            return Err(InvalidMailbox("malformed domain"));
        }
        Ok(Mailbox(s.to_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// FNV-1a 64 of the address. Stable across builds and platforms (unlike `DefaultHasher`),
    /// because shard placement in Redis depends on it.
    pub fn stable_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// The mailbox as logs show it: a pseudonym by default (addresses are personal data).
    pub fn for_log(&self, style: MailboxLogStyle) -> String {
        match style {
            MailboxLogStyle::Plain => self.0.clone(),
            MailboxLogStyle::Hash => format!("{:016x}", self.stable_hash()),
        }
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mailbox({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_validates() {
        assert_eq!(
            Mailbox::parse(" Alice@Example.COM ").unwrap().as_str(),
            "alice@example.com"
        );
        for bad in [
            "",
            "alice",
            "@x.com",
            "a@",
            "a@b@c",
            "a b@c.com",
            "a{x}@c.com",
            "a@.com",
            "a@c..com",
        ] {
            assert!(Mailbox::parse(bad).is_err(), "{bad}");
        }
        assert!(Mailbox::parse(&format!("{}@x.com", "a".repeat(260))).is_err());
    }

    #[test]
    fn hash_is_stable() {
        // Known FNV-1a 64 test vector: shard placement must never change between releases.
        assert_eq!(Mailbox("a".into()).stable_hash(), 0xaf63_dc4c_8601_ec8c);
    }
}
