//! The vault: small secrets (per-user OAuth refresh tokens) sealed with AES-256-GCM before they
//! are stored in Redis, with keys read from files (`GMAIL_SYNC_TOKEN_KEY_FILE`, and during a
//! rotation `GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE`).
//!
//! # Key file
//! One line: the standard base64 (with padding) of 32 random bytes, as `gmail-sync keys generate`
//! writes it (`openssl rand -base64 32` makes the same). Blanks around it are ignored. A key's
//! **id** is the first 4 bytes of HMAC-SHA256(key, `"gmail-sync token key id v1"`), shown as 8
//! hex digits: it names the key without revealing it, and it is what a sealed value carries.
//!
//! # Sealed value, layout v1 (raw bytes; Redis strings are binary-safe)
//! ```text
//! offset 0     1          5           17                    len-16
//!        | 0x01 | key id (4) | nonce (12) | ciphertext (n)    | GCM tag (16) |
//! ```
//! The nonce is random per seal (aws-lc's `RandomizedNonceKey`). The associated data is the
//! first 5 bytes (version and key id) followed by the mailbox's normalized address, so a value
//! opens only for the mailbox it was sealed for, and its header cannot be altered.
//!
//! New values are always sealed with the current key; values sealed with the previous key still
//! open, and [`Vault::reseal`] moves them to the current one (`gmail-sync keys rotate`). A
//! random 96-bit nonce keeps GCM's bound (about 2^32 seals per key) far away: one seal per
//! `mailbox add` and per rotation.

use crate::config::{
    ConfigError, Secret, TOKEN_KEY_FILE, TOKEN_KEY_PREVIOUS_FILE, TokenKeySettings,
};
use crate::mailbox::Mailbox;
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::fmt;
use std::io::Read;
use std::path::Path;
use zeroize::Zeroizing;

/// AES-256: 32 key bytes.
pub const KEY_LEN: usize = 32;
/// Bytes of a key id in a sealed value: enough to tell a deployment's few keys apart.
const KEY_ID_LEN: usize = 4;
/// First byte of a sealed value of the layout above.
const LAYOUT_V1: u8 = 1;
const HEADER_LEN: usize = 1 + KEY_ID_LEN;
const TAG_LEN: usize = 16;
/// The HMAC message a key id is derived from (versioned with the layout).
const KEY_ID_LABEL: &[u8] = b"gmail-sync token key id v1";
/// A key file is one short line; anything much longer is not a key file (and is not read whole).
const MAX_KEY_FILE_BYTES: u64 = 1024;

/// Which key sealed a value: 4 bytes derived from the key (never the key itself).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a sealed value did not open. None of them is retryable: the same value and keys give
/// the same answer; each needs an operator (configure the key, or store the token again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// Sealed with a key that is not configured. Key ids come from the keys, so this is also
    /// what a wrong key file looks like.
    #[error(
        "this value was sealed with key id {sealed_with}, which is neither {TOKEN_KEY_FILE} \
         (id {current}) nor {TOKEN_KEY_PREVIOUS_FILE} ({}): configure the key file it was sealed \
         with as {TOKEN_KEY_PREVIOUS_FILE}, or store the token again with `gmail-sync mailbox add \
         EMAIL --refresh-token-file FILE`",
        previous.map_or("not set".to_string(), |id| format!("id {id}"))
    )]
    UnknownKey {
        sealed_with: KeyId,
        current: KeyId,
        previous: Option<KeyId>,
    },
    /// The key is configured but the value does not authenticate: it was altered, or it was
    /// sealed for another mailbox (the address is part of the associated data).
    #[error(
        "the value sealed with key id {key_id} does not open: it was altered, or it belongs to \
         another mailbox; store the token again with `gmail-sync mailbox add EMAIL \
         --refresh-token-file FILE`"
    )]
    Tampered { key_id: KeyId },
    /// Not a sealed value of a layout this build knows.
    #[error(
        "not a sealed value (layout v1): {0}; store the token again with `gmail-sync mailbox add \
         EMAIL --refresh-token-file FILE`"
    )]
    Malformed(&'static str),
}

impl VaultError {
    /// Always false: see the type's documentation.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// One key: its id and the AEAD key built from it (the raw bytes are not kept).
struct TokenKey {
    id: KeyId,
    aead: RandomizedNonceKey,
}

impl TokenKey {
    fn from_bytes(bytes: &[u8; KEY_LEN]) -> TokenKey {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, bytes), KEY_ID_LABEL);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&tag.as_ref()[..KEY_ID_LEN]);
        TokenKey {
            id: KeyId(id),
            aead: RandomizedNonceKey::new(&AES_256_GCM, bytes)
                .expect("AES-256-GCM accepts any 32-byte key"),
        }
    }

    /// A key file's contents; the error says what is expected, never what the file holds.
    fn parse(contents: &str) -> Result<TokenKey, String> {
        let expected = "expected one line, the base64 of 32 random bytes (make one with \
                        `gmail-sync keys generate --out FILE`)";
        let decoded = Zeroizing::new(
            BASE64
                .decode(contents.trim())
                .map_err(|_| format!("not base64: {expected}"))?,
        );
        let bytes: &[u8; KEY_LEN] = decoded.as_slice().try_into().map_err(|_| {
            format!(
                "holds {} bytes once decoded, not {KEY_LEN}: {expected}",
                decoded.len()
            )
        })?;
        Ok(TokenKey::from_bytes(bytes))
    }

    /// Reads and parses the file `variable` names; errors name the variable (exit 2).
    fn read(variable: &'static str, path: &Path) -> Result<TokenKey, ConfigError> {
        let refuse = |problem: String| ConfigError {
            name: variable,
            problem: format!("{}: {problem}", path.display()),
        };
        let mut contents = Zeroizing::new(Vec::new());
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut contents))
            .map_err(|e| refuse(format!("cannot read the key file: {e}")))?;
        if contents.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(refuse(format!(
                "longer than {MAX_KEY_FILE_BYTES} bytes: not a key file"
            )));
        }
        let text = std::str::from_utf8(&contents)
            .map_err(|_| refuse("not text: expected one line of base64".into()))?;
        TokenKey::parse(text).map_err(refuse)
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({})", self.id)
    }
}

/// What [`Vault::reseal`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resealed {
    /// It opens and is already sealed with the current key: nothing to write.
    AlreadyCurrent,
    /// It opened with the previous key; here it is sealed with the current one.
    Resealed(Vec<u8>),
}

/// Seals with the current key; opens with the current or the previous one. `Debug` shows key
/// ids only.
#[derive(Debug)]
pub struct Vault {
    current: TokenKey,
    previous: Option<TokenKey>,
}

impl Vault {
    /// The vault the configuration describes: `None` when no key file is configured. A file
    /// that is missing, unreadable or not a key stops startup naming its variable.
    pub fn from_config(settings: &TokenKeySettings) -> Result<Option<Vault>, ConfigError> {
        let Some(current_file) = &settings.current_file else {
            return match &settings.previous_file {
                None => Ok(None),
                Some(_) => Err(ConfigError {
                    name: TOKEN_KEY_PREVIOUS_FILE,
                    problem: format!("requires {TOKEN_KEY_FILE}"),
                }),
            };
        };
        let current = TokenKey::read(TOKEN_KEY_FILE, current_file)?;
        let previous = settings
            .previous_file
            .as_deref()
            .map(|path| TokenKey::read(TOKEN_KEY_PREVIOUS_FILE, path))
            .transpose()?;
        if let Some(previous) = &previous
            && previous.id == current.id
        {
            return Err(ConfigError {
                name: TOKEN_KEY_PREVIOUS_FILE,
                problem: format!(
                    "holds the same key as {TOKEN_KEY_FILE} (id {}): point it at the old key \
                     during a rotation, or unset it",
                    current.id
                ),
            });
        }
        Ok(Some(Vault { current, previous }))
    }

    /// A vault from key files' contents (tests and tools; the service uses `from_config`).
    pub fn from_key_texts(current: &str, previous: Option<&str>) -> Result<Vault, String> {
        Ok(Vault {
            current: TokenKey::parse(current)?,
            previous: previous.map(TokenKey::parse).transpose()?,
        })
    }

    pub fn current_key_id(&self) -> KeyId {
        self.current.id
    }

    pub fn previous_key_id(&self) -> Option<KeyId> {
        self.previous.as_ref().map(|k| k.id)
    }

    /// Seals `plaintext` for `mailbox` with the current key (layout v1).
    pub fn seal(&self, mailbox: &Mailbox, plaintext: &Secret) -> Vec<u8> {
        let header = header(self.current.id);
        let mut body = Zeroizing::new(plaintext.expose().as_bytes().to_vec());
        let nonce = self
            .current
            .aead
            .seal_in_place_append_tag(Aad::from(associated_data(&header, mailbox)), &mut *body)
            // aws-lc refuses only inputs beyond GCM's 64 GiB limit, or a failing system RNG
            // (which aborts the process first); a refresh token is neither.
            .expect("AES-256-GCM seals a small value");
        let mut sealed = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len());
        sealed.extend_from_slice(&header);
        sealed.extend_from_slice(nonce.as_ref());
        sealed.extend_from_slice(&body);
        sealed
    }

    /// Opens a value sealed for `mailbox` with the current or the previous key.
    pub fn open(&self, mailbox: &Mailbox, sealed: &[u8]) -> Result<Secret, VaultError> {
        let parts = Parts::of(sealed)?;
        let key = self.key(parts.key_id)?;
        let mut body = Zeroizing::new(parts.body.to_vec());
        let plaintext = key
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(parts.nonce),
                Aad::from(associated_data(parts.header, mailbox)),
                &mut body[..],
            )
            .map_err(|_| VaultError::Tampered {
                key_id: parts.key_id,
            })?;
        // Only `seal` makes values, from a `Secret` (UTF-8): an authentic value is UTF-8.
        let text = std::str::from_utf8(plaintext)
            .map_err(|_| VaultError::Malformed("the opened value is not text"))?;
        Ok(Secret::new(text))
    }

    /// Checks that `sealed` opens, and seals it again with the current key unless it already
    /// is (what `keys rotate` does to each stored value).
    pub fn reseal(&self, mailbox: &Mailbox, sealed: &[u8]) -> Result<Resealed, VaultError> {
        let plaintext = self.open(mailbox, sealed)?;
        if Parts::of(sealed)?.key_id == self.current.id {
            Ok(Resealed::AlreadyCurrent)
        } else {
            Ok(Resealed::Resealed(self.seal(mailbox, &plaintext)))
        }
    }

    fn key(&self, id: KeyId) -> Result<&TokenKey, VaultError> {
        if id == self.current.id {
            return Ok(&self.current);
        }
        match &self.previous {
            Some(previous) if previous.id == id => Ok(previous),
            _ => Err(VaultError::UnknownKey {
                sealed_with: id,
                current: self.current.id,
                previous: self.previous_key_id(),
            }),
        }
    }
}

/// The key id a sealed value names, read from its header without any key (`mailbox status`).
pub fn sealed_key_id(sealed: &[u8]) -> Result<KeyId, VaultError> {
    Parts::of(sealed).map(|parts| parts.key_id)
}

/// A new key file's contents (one line of base64, newline-terminated) and the key's id.
pub fn generate_key_file() -> (Zeroizing<String>, KeyId) {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    aws_lc_rs::rand::fill(&mut bytes[..]).expect("the system random generator works");
    let id = TokenKey::from_bytes(&bytes).id;
    let mut line = Zeroizing::new(BASE64.encode(&bytes[..]));
    line.push('\n');
    (line, id)
}

fn header(id: KeyId) -> [u8; HEADER_LEN] {
    let mut header = [LAYOUT_V1; HEADER_LEN];
    header[1..].copy_from_slice(&id.0);
    header
}

/// The header, then the normalized address: binds a value to its mailbox and its header.
fn associated_data(header: &[u8], mailbox: &Mailbox) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + mailbox.as_str().len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(mailbox.as_str().as_bytes());
    aad
}

/// A sealed value cut along layout v1.
struct Parts<'a> {
    header: &'a [u8],
    key_id: KeyId,
    nonce: [u8; NONCE_LEN],
    /// Ciphertext and tag.
    body: &'a [u8],
}

impl<'a> Parts<'a> {
    fn of(sealed: &'a [u8]) -> Result<Parts<'a>, VaultError> {
        match sealed.first() {
            None => return Err(VaultError::Malformed("empty")),
            Some(&LAYOUT_V1) => {}
            Some(_) => return Err(VaultError::Malformed("unknown layout version")),
        }
        if sealed.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(VaultError::Malformed("too short"));
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        Ok(Parts {
            header,
            key_id: KeyId(header[1..].try_into().expect("4 bytes")),
            nonce: nonce.try_into().expect("12 bytes"),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_text(byte: u8) -> String {
        BASE64.encode([byte; KEY_LEN])
    }

    fn vault(current: u8, previous: Option<u8>) -> Vault {
        Vault::from_key_texts(&key_text(current), previous.map(key_text).as_deref()).unwrap()
    }

    fn alice() -> Mailbox {
        Mailbox::parse("Alice@Example.com").unwrap()
    }

    const TOKEN: &str = "1//0g-refresh-token-that-must-stay-secret";

    #[test]
    fn round_trip_and_the_value_hides_the_token() {
        let v = vault(1, None);
        let sealed = v.seal(&alice(), &Secret::new(TOKEN));
        assert_eq!(v.open(&alice(), &sealed).unwrap().expose(), TOKEN);
        assert!(
            !sealed
                .windows(8)
                .any(|w| TOKEN.as_bytes().windows(8).any(|t| t == w))
        );
        assert_eq!(sealed.len(), HEADER_LEN + NONCE_LEN + TOKEN.len() + TAG_LEN);
        // A random nonce per seal: the same token never gives the same value twice.
        assert_ne!(sealed, v.seal(&alice(), &Secret::new(TOKEN)));
    }

    #[test]
    fn layout_names_version_and_key_id() {
        let v = vault(1, None);
        let sealed = v.seal(&alice(), &Secret::new(TOKEN));
        assert_eq!(sealed[0], LAYOUT_V1);
        assert_eq!(&sealed[1..5], &v.current_key_id().0);
        assert_eq!(sealed_key_id(&sealed).unwrap(), v.current_key_id());
        assert_eq!(v.current_key_id().to_string().len(), 8);
        // The id is derived from the key: same key, same id; another key, another id.
        assert_eq!(vault(1, None).current_key_id(), v.current_key_id());
        assert_ne!(vault(2, None).current_key_id(), v.current_key_id());
    }

    #[test]
    fn a_wrong_key_names_both_variables_and_ids() {
        let sealed = vault(1, None).seal(&alice(), &Secret::new(TOKEN));
        let other = vault(2, Some(3));
        let err = other.open(&alice(), &sealed).unwrap_err();
        assert_eq!(
            err,
            VaultError::UnknownKey {
                sealed_with: vault(1, None).current_key_id(),
                current: other.current_key_id(),
                previous: other.previous_key_id(),
            }
        );
        let text = err.to_string();
        for needle in [
            TOKEN_KEY_FILE,
            TOKEN_KEY_PREVIOUS_FILE,
            &vault(1, None).current_key_id().to_string(),
            &other.current_key_id().to_string(),
            "mailbox add",
        ] {
            assert!(text.contains(needle), "{text} lacks {needle}");
        }
        let err = vault(2, None).open(&alice(), &sealed).unwrap_err();
        assert!(err.to_string().contains("(not set)"), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn the_previous_key_opens_and_reseal_moves_to_the_current_one() {
        let old = vault(1, None);
        let sealed = old.seal(&alice(), &Secret::new(TOKEN));
        let rotating = vault(2, Some(1));
        assert_eq!(rotating.open(&alice(), &sealed).unwrap().expose(), TOKEN);
        let Resealed::Resealed(new) = rotating.reseal(&alice(), &sealed).unwrap() else {
            panic!("sealed with the previous key");
        };
        assert_eq!(sealed_key_id(&new).unwrap(), rotating.current_key_id());
        assert_eq!(
            rotating.reseal(&alice(), &new).unwrap(),
            Resealed::AlreadyCurrent
        );
        // After the rotation the old key is no longer needed.
        assert_eq!(vault(2, None).open(&alice(), &new).unwrap().expose(), TOKEN);
    }

    #[test]
    fn a_value_opens_only_for_its_mailbox() {
        let v = vault(1, None);
        let sealed = v.seal(&alice(), &Secret::new(TOKEN));
        let bob = Mailbox::parse("bob@example.com").unwrap();
        assert_eq!(
            v.open(&bob, &sealed).unwrap_err(),
            VaultError::Tampered {
                key_id: v.current_key_id()
            }
        );
        // The normalized address is what counts.
        let same = Mailbox::parse(" ALICE@example.COM").unwrap();
        assert_eq!(v.open(&same, &sealed).unwrap().expose(), TOKEN);
    }

    #[test]
    fn any_altered_byte_is_refused() {
        let v = vault(1, Some(2));
        let sealed = v.seal(&alice(), &Secret::new(TOKEN));
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x01;
            let err = v.open(&alice(), &altered).unwrap_err();
            match i {
                0 => assert!(matches!(err, VaultError::Malformed(_)), "{i}: {err:?}"),
                1..5 => assert!(matches!(err, VaultError::UnknownKey { .. }), "{i}: {err:?}"),
                _ => assert!(matches!(err, VaultError::Tampered { .. }), "{i}: {err:?}"),
            }
        }
        // A header copied from the other configured key does not open either.
        let mut swapped = sealed.clone();
        swapped[1..5].copy_from_slice(&v.previous_key_id().unwrap().0);
        assert!(matches!(
            v.open(&alice(), &swapped),
            Err(VaultError::Tampered { .. })
        ));
        assert!(matches!(
            v.open(&alice(), &sealed[..sealed.len() - 1]),
            Err(VaultError::Tampered { .. })
        ));
    }

    #[test]
    fn malformed_values_say_so() {
        let v = vault(1, None);
        for (value, why) in [
            (&b""[..], "empty"),
            (&[2u8; 40][..], "unknown layout version"),
            (&[1u8; 20][..], "too short"),
        ] {
            assert_eq!(
                v.open(&alice(), value).unwrap_err(),
                VaultError::Malformed(why)
            );
            assert_eq!(
                sealed_key_id(value).unwrap_err(),
                VaultError::Malformed(why)
            );
        }
    }

    #[test]
    fn key_texts_are_checked_without_echoing_them() {
        for bad in [
            "",
            "not base64!",
            &BASE64.encode([7u8; 16]),
            &BASE64.encode([7u8; 33]),
        ] {
            let err = TokenKey::parse(bad).unwrap_err();
            assert!(err.contains("keys generate"), "{err}");
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        // Blanks around the line are fine.
        let padded = format!("  {}\n\n", key_text(1));
        assert_eq!(
            TokenKey::parse(&padded).unwrap().id,
            vault(1, None).current_key_id()
        );
    }

    #[test]
    fn generated_key_files_parse_to_their_id() {
        let (text, id) = generate_key_file();
        assert!(text.ends_with('\n') && text.trim().len() == 44);
        assert_eq!(TokenKey::parse(&text).unwrap().id, id);
        assert_ne!(generate_key_file().1, id);
    }

    #[test]
    fn key_files_are_read_and_refused_naming_the_variable() {
        let dir = std::env::temp_dir().join(format!("gmail-sync-vault-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Some(path)
        };
        let current = write("current", &key_text(1));
        let previous = write("previous", &key_text(2));
        let short = write("short", &BASE64.encode([9u8; 31]));
        let settings = |current_file, previous_file| TokenKeySettings {
            current_file,
            previous_file,
        };
        assert!(Vault::from_config(&settings(None, None)).unwrap().is_none());
        let v = Vault::from_config(&settings(current.clone(), previous.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(v.current_key_id(), vault(1, None).current_key_id());
        assert_eq!(v.previous_key_id(), Some(vault(2, None).current_key_id()));
        let shown = format!("{v:?}");
        assert!(!shown.contains(&key_text(1)) && shown.contains(&v.current_key_id().to_string()));
        for (s, name) in [
            (settings(short.clone(), None), TOKEN_KEY_FILE),
            (
                settings(current.clone(), short.clone()),
                TOKEN_KEY_PREVIOUS_FILE,
            ),
            (settings(Some(dir.join("missing")), None), TOKEN_KEY_FILE),
            (settings(None, previous.clone()), TOKEN_KEY_PREVIOUS_FILE),
            (
                settings(current.clone(), current.clone()),
                TOKEN_KEY_PREVIOUS_FILE,
            ),
        ] {
            let err = Vault::from_config(&s).unwrap_err();
            assert_eq!(err.name, name, "{err}");
            assert!(
                !err.to_string().contains(&BASE64.encode([9u8; 31])),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
