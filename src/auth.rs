//! Where Gmail bearer tokens come from.
//!
//! Gmail requests take their token from a [`TokenSource`], per mailbox. The production sources
//! (domain-wide delegation, per-user refresh tokens) plug in here; until then
//! [`StaticToken`] serves one token from `GMAIL_SYNC_DEV_ACCESS_TOKEN` for local runs. It is
//! for development only: a real deployment has no single token valid for every mailbox.

use crate::config::Secret;
use crate::mailbox::Mailbox;
use std::future::Future;
use std::pin::Pin;

/// An OAuth access token. `Debug` never shows it (invariant I7).
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Secret);

impl AccessToken {
    pub fn new(token: impl Into<String>) -> Self {
        AccessToken(Secret::new(token))
    }
    pub fn bearer_value(&self) -> String {
        format!("Bearer {}", self.0.expose())
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The grant was revoked or expired (`invalid_grant`): a person must re-consent. Permanent.
    #[error("grant revoked or expired (invalid_grant)")]
    Revoked,
    /// No way to obtain a token for this mailbox (e.g. no credentials configured). Permanent.
    #[error("no credentials for this mailbox: {0}")]
    NotConfigured(String),
    /// The token endpoint failed transiently; retry later.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
}

impl AuthError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, AuthError::Transient(_))
    }
}

pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, AuthError>> + Send + 'a>>;

pub trait TokenSource: Send + Sync + 'static {
    /// A token for `mailbox`, from cache when still fresh.
    fn token<'a>(&'a self, mailbox: &'a Mailbox) -> TokenFuture<'a>;
    /// Gmail answered 401 with `token`: drop it from any cache so the next call refreshes.
    fn invalidate(&self, mailbox: &Mailbox, token: &AccessToken);
}

/// One fixed token for every mailbox (development and local test bed only).
pub struct StaticToken(AccessToken);

impl StaticToken {
    pub fn new(token: &Secret) -> Self {
        StaticToken(AccessToken(token.clone()))
    }
}

impl TokenSource for StaticToken {
    fn token<'a>(&'a self, _mailbox: &'a Mailbox) -> TokenFuture<'a> {
        let token = self.0.clone();
        Box::pin(async move { Ok(token) })
    }

    fn invalidate(&self, _mailbox: &Mailbox, _token: &AccessToken) {}
}

/// Used when no token source is configured: every call fails with a clear, permanent error.
pub struct NoCredentials;

impl TokenSource for NoCredentials {
    fn token<'a>(&'a self, _mailbox: &'a Mailbox) -> TokenFuture<'a> {
        Box::pin(async {
            Err(AuthError::NotConfigured(
                "set GMAIL_SYNC_DEV_ACCESS_TOKEN (development) — production token sources are not configured"
                    .into(),
            ))
        })
    }

    fn invalidate(&self, _mailbox: &Mailbox, _token: &AccessToken) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_debug_is_redacted() {
        let t = AccessToken::new("ya29.secret");
        assert!(!format!("{t:?}").contains("secret"));
    }
}
