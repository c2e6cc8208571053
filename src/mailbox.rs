//! A mailbox: a normalized Gmail address, its stable hash (shard choice) and its keyed log
//! pseudonym ([`LogHashKey`]).

use aws_lc_rs::{digest, hmac};
use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;

/// A Gmail address, trimmed and lower-cased (Gmail addresses are case-insensitive, and the same
/// mailbox must always map to the same Redis keys).
///
/// Shared, not copied, when cloned: one notification's mailbox is handed to the coalescer, the
/// sync task, its report and the failure guard, and a `String` made that an allocation and a
/// copy each (about two per notification at 1,000/s).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mailbox(Arc<str>);

/// How logs show a mailbox (GMAIL_SYNC_LOG_MAILBOX): addresses are personal data, so the
/// default is a keyed pseudonym. The style carries its key, so every place that already passes
/// the style around (syncer, scheduler) hashes with the deployment's key, without a global.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxLogStyle {
    /// HMAC-SHA256 of the address under the key, truncated to 64 bits, in hex
    /// ([`LogHashKey::pseudonym`]).
    Hash(LogHashKey),
    /// The address itself.
    Plain,
}

/// The secret key of the log pseudonyms (GMAIL_SYNC_LOG_HASH_KEY_FILE).
///
/// An unkeyed hash of an address can be reversed by hashing a list of candidate addresses; an
/// HMAC cannot without the key. The key is kept inline (at most one SHA-256 block, 64 bytes), so
/// the style stays `Copy`: a longer key is replaced by its SHA-256, exactly as HMAC itself does
/// (RFC 2104), so the pseudonym is always HMAC-SHA256(file's key, address) and an operator can
/// recompute it (`printf %s ADDRESS | openssl dgst -sha256 -hmac KEY`, first 16 hex digits;
/// README.md, "Logs").
/// `Debug` never shows the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LogHashKey {
    bytes: [u8; LogHashKey::BLOCK],
    len: u8,
    origin: KeyOrigin,
}

/// Where a [`LogHashKey`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// The deployment's key file: pseudonyms agree between replicas and restarts.
    File,
    /// Drawn at startup because no key file is configured: pseudonyms differ per process.
    Random,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogHashKeyError {
    #[error("the key is {0} bytes; at least {min} are required", min = LogHashKey::MIN_LEN)]
    TooShort(usize),
}

impl LogHashKey {
    /// SHA-256's block size: longer HMAC keys are hashed first.
    const BLOCK: usize = 64;
    /// Shortest key accepted from a file: 32 bytes (e.g. 16 random bytes in hex, or 32 raw).
    pub const MIN_LEN: usize = 32;
    /// Hex digits of a pseudonym: 64 bits, as before (no collision among millions of mailboxes).
    pub const PSEUDONYM_HEX: usize = 16;

    /// The key from a key file's content; surrounding ASCII whitespace (a trailing newline from
    /// `echo` or an editor) is not part of it.
    pub fn from_secret(secret: &[u8]) -> Result<LogHashKey, LogHashKeyError> {
        let secret = secret.trim_ascii();
        if secret.len() < Self::MIN_LEN {
            return Err(LogHashKeyError::TooShort(secret.len()));
        }
        let mut bytes = [0u8; Self::BLOCK];
        let len = if secret.len() > Self::BLOCK {
            let d = digest::digest(&digest::SHA256, secret);
            bytes[..d.as_ref().len()].copy_from_slice(d.as_ref());
            d.as_ref().len()
        } else {
            bytes[..secret.len()].copy_from_slice(secret);
            secret.len()
        };
        Ok(LogHashKey {
            bytes,
            len: len as u8,
            origin: KeyOrigin::File,
        })
    }

    /// A random 32-byte key from the operating system's generator, for this process only.
    pub fn random() -> LogHashKey {
        let mut bytes = [0u8; Self::BLOCK];
        aws_lc_rs::rand::fill(&mut bytes[..32]).expect("the system random generator works");
        LogHashKey {
            bytes,
            len: 32,
            origin: KeyOrigin::Random,
        }
    }

    pub fn origin(&self) -> KeyOrigin {
        self.origin
    }

    /// HMAC-SHA256(key, text), the first [`Self::PSEUDONYM_HEX`] hex digits.
    pub fn pseudonym(&self, text: &str) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.bytes[..usize::from(self.len)]);
        let tag = hmac::sign(&key, text.as_bytes());
        // Into one string of the final size: a sync's log span names its mailbox, so this
        // runs once per sync (a string per byte was 8 allocations of a sync's ~60).
        let mut hex = String::with_capacity(Self::PSEUDONYM_HEX);
        for b in &tag.as_ref()[..Self::PSEUDONYM_HEX / 2] {
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }
}

impl fmt::Debug for LogHashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogHashKey([redacted], {:?})", self.origin)
    }
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
        // Checked again after lowercasing, which can lengthen it ('İ' is 2 bytes, "i̇" 3): the
        // stored form is what keys and limits see (found by fuzzing).
        let lower = s.to_lowercase();
        if lower.len() > Self::MAX_LEN {
            return Err(InvalidMailbox("longer than 254 bytes"));
        }
        Ok(Mailbox(lower.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// FNV-1a 64 of the address. Stable across builds and platforms (unlike `DefaultHasher`),
    /// because shard placement in Redis depends on it (`store::keys`): it must never change.
    /// Not for logs: it is unkeyed, so reversible with a list of candidate addresses.
    pub fn stable_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// The mailbox as logs show it: a keyed pseudonym by default (addresses are personal data).
    pub fn for_log(&self, style: MailboxLogStyle) -> String {
        match style {
            MailboxLogStyle::Plain => self.0.to_string(),
            MailboxLogStyle::Hash(key) => key.pseudonym(&self.0),
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
        // And the log pseudonym is no longer that hash.
        let m = Mailbox::parse("alice@example.com").unwrap();
        let key = LogHashKey::from_secret(&[7u8; 32]).unwrap();
        assert_ne!(
            m.for_log(MailboxLogStyle::Hash(key)),
            format!("{:016x}", m.stable_hash())
        );
    }

    #[test]
    fn log_pseudonym_is_hmac_sha256_truncated() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?" gives
        // 5bdcc146bf60754e6a042426089575c7... (the key check is bypassed to use the vector).
        let mut bytes = [0u8; 64];
        bytes[..4].copy_from_slice(b"Jefe");
        let key = LogHashKey {
            bytes,
            len: 4,
            origin: KeyOrigin::File,
        };
        assert_eq!(
            key.pseudonym("what do ya want for nothing?"),
            "5bdcc146bf60754e"
        );
    }

    #[test]
    fn log_pseudonym_is_stable_per_key_and_differs_between_keys() {
        let m = Mailbox::parse("alice@example.com").unwrap();
        let k1 = LogHashKey::from_secret(b"0123456789abcdef0123456789abcdef\n").unwrap();
        let k1_again = LogHashKey::from_secret(b"  0123456789abcdef0123456789abcdef").unwrap();
        let k2 = LogHashKey::from_secret(b"0123456789abcdef0123456789abcdeF").unwrap();
        let shown = m.for_log(MailboxLogStyle::Hash(k1));
        assert_eq!(shown.len(), LogHashKey::PSEUDONYM_HEX);
        assert!(shown.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            shown,
            m.for_log(MailboxLogStyle::Hash(k1_again)),
            "whitespace ignored"
        );
        assert_ne!(shown, m.for_log(MailboxLogStyle::Hash(k2)), "another key");
        let other = Mailbox::parse("bob@example.com").unwrap();
        assert_ne!(shown, other.for_log(MailboxLogStyle::Hash(k1)));
        // Two random keys (two processes without a key file) disagree.
        assert_ne!(
            m.for_log(MailboxLogStyle::Hash(LogHashKey::random())),
            m.for_log(MailboxLogStyle::Hash(LogHashKey::random()))
        );
        assert_eq!(m.for_log(MailboxLogStyle::Plain), "alice@example.com");
    }

    #[test]
    fn long_keys_are_hashed_as_hmac_does_and_short_ones_refused() {
        let m = Mailbox::parse("alice@example.com").unwrap();
        let long = [b'k'; 100];
        let hashed = digest::digest(&digest::SHA256, &long);
        let direct = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &long),
            m.as_str().as_bytes(),
        );
        let via_hash = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, hashed.as_ref()),
            m.as_str().as_bytes(),
        );
        assert_eq!(
            direct.as_ref(),
            via_hash.as_ref(),
            "RFC 2104: long keys are hashed"
        );
        let key = LogHashKey::from_secret(&long).unwrap();
        let expected: String = direct.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(m.for_log(MailboxLogStyle::Hash(key)), expected);
        assert_eq!(
            LogHashKey::from_secret(b"short\n"),
            Err(LogHashKeyError::TooShort(5))
        );
    }

    #[test]
    fn key_never_shows_in_debug() {
        let key = LogHashKey::from_secret(b"super-secret-key-material-0123456789").unwrap();
        let shown = format!("{:?}", MailboxLogStyle::Hash(key));
        assert!(!shown.contains("super"), "{shown}");
        assert!(!shown.contains("115"), "no byte values either: {shown}");
    }

    // Fuzzing (issue 10): every address from a notification or the CLI passes here, and the
    // result is embedded in Redis keys (hash tags) and log lines.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn key_safe(c: char) -> bool {
            !(c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | '"' | '\\'))
        }

        proptest! {
            #[test]
            fn fuzz_a_parsed_mailbox_is_canonical_and_key_safe(
                raw in prop_oneof![".{0,300}", "[ -~İẞΣ]{0,120}@[a-zİ.]{0,140}", "[aİ]{100,127}@[a-z]{2,5}\\.com"],
            ) {
                if let Ok(m) = Mailbox::parse(&raw) {
                    let s = m.as_str();
                    prop_assert!(s.len() <= Mailbox::MAX_LEN, "{} bytes", s.len());
                    prop_assert_eq!(s.matches('@').count(), 1);
                    prop_assert!(s.chars().all(key_safe), "{s:?}");
                    prop_assert_eq!(Mailbox::parse(s), Ok(m.clone()), "not idempotent");
                }
            }
        }
    }
}
