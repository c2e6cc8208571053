//! A mailbox's refresh token from the operator to Redis: read from a file or stdin (never from
//! the command line, which `ps` and shell history show), sealed by the vault, stored. This is
//! what `mailbox add --refresh-token-file` does before users.watch, which then authenticates
//! with the stored token.

use crate::config::Secret;
use crate::mailbox::Mailbox;
use crate::store::Store;
use crate::vault::{KeyId, Vault};
use std::io::Read;

/// Longest refresh token accepted: Google's are about 100 bytes; a larger input is a wrong file.
const MAX_REFRESH_TOKEN_BYTES: u64 = 4096;

/// Reads one refresh token from `source` (a file, or `-` for stdin): blanks around it, such as
/// the trailing newline, are dropped; empty input, several lines or blanks inside are refused.
/// Errors never contain the input.
fn read_refresh_token(source: &str) -> anyhow::Result<Secret> {
    let what = if source == "-" { "stdin" } else { source };
    let mut raw = zeroize::Zeroizing::new(Vec::new());
    let read = if source == "-" {
        std::io::stdin()
            .take(MAX_REFRESH_TOKEN_BYTES + 1)
            .read_to_end(&mut raw)
    } else {
        std::fs::File::open(source)
            .and_then(|f| f.take(MAX_REFRESH_TOKEN_BYTES + 1).read_to_end(&mut raw))
    };
    read.map_err(|e| {
        anyhow::anyhow!(
            "cannot read the refresh token from {what}: {e} (give a readable file, or - for stdin)"
        )
    })?;
    if raw.len() as u64 > MAX_REFRESH_TOKEN_BYTES {
        anyhow::bail!(
            "{what} holds more than {MAX_REFRESH_TOKEN_BYTES} bytes: not a refresh token (give a \
             file holding just the token)"
        );
    }
    let text = std::str::from_utf8(&raw)
        .map_err(|_| anyhow::anyhow!("{what} is not text: expected one refresh token"))?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("{what} is empty: expected one refresh token");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!(
            "{what} holds more than one line or word: expected just the refresh token on one line"
        );
    }
    Ok(Secret::new(token))
}

/// Reads the refresh token from `source`, seals it for `mailbox` with the current key and
/// stores it (replacing an earlier one); returns the key id it was sealed with.
pub(crate) async fn store_refresh_token(
    store: &Store,
    vault: &Vault,
    mailbox: &Mailbox,
    source: &str,
) -> anyhow::Result<KeyId> {
    let token = read_refresh_token(source)?;
    store
        .put_credential(mailbox, &vault.seal(mailbox, &token))
        .await
        .map_err(|e| anyhow::anyhow!("{mailbox}: storing the refresh token: {e} (run again)"))?;
    Ok(vault.current_key_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_and_bad_files_refused_without_echo() {
        let dir = std::env::temp_dir().join(format!("gmail-sync-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let ok = file("ok", "1//0g-secret-token\r\n");
        assert_eq!(
            read_refresh_token(&ok).unwrap().expose(),
            "1//0g-secret-token"
        );
        for (name, text) in [
            ("empty", "\n"),
            ("two", "1//0g-secret-one\n1//0g-secret-two\n"),
            ("big", &"x".repeat(5000)),
        ] {
            let err = read_refresh_token(&file(name, text))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("secret"), "{err}");
            assert!(
                err.contains("expected") || err.contains("not a refresh token"),
                "{err}"
            );
        }
        let missing = dir.join("missing").display().to_string();
        assert!(read_refresh_token(&missing).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
