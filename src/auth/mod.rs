//! Where Gmail bearer tokens come from.
//!
//! Gmail requests take their token from a [`TokenSource`], per mailbox. In production that is a
//! [`TokenCache`] in front of a [`Grants`]: per mailbox, a stored per-user refresh token
//! ([`refresh`], consumer Gmail) or else a domain-wide delegation assertion ([`delegation`],
//! Workspace), exchanged at the OAuth token endpoint ([`endpoint`]). [`StaticToken`] serves one
//! token from `GMAIL_SYNC_DEV_ACCESS_TOKEN` for local runs only: a real deployment has no single
//! token valid for every mailbox.
//!
//! Errors say who must act: [`AuthError::scope`] separates a mailbox whose grant is gone (a
//! person must re-authorize it) from a deployment that is misconfigured (an operator must fix
//! it; no mailbox is to blame) and from a passing outage (retry).

mod cache;
pub(crate) mod delegation;
pub(crate) mod endpoint;
pub(crate) mod refresh;

pub(crate) use cache::TokenCache;

use crate::config::{AuthSettings, Secret};
use crate::mailbox::Mailbox;
use reqwest::header::HeaderValue;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// An OAuth access token, and the `Authorization` header value that carries it, built once:
/// every Gmail call sends it, and formatting `Bearer …` per call was an allocation (and a copy
/// of the secret) per request. Clones share both. `Debug` never shows it (invariant I7).
#[derive(Clone)]
pub struct AccessToken(Arc<TokenValue>);

struct TokenValue {
    token: Secret,
    /// `Bearer <token>`, marked sensitive (its `Debug` prints `Sensitive`, never the token).
    /// Not wiped on drop, as the per-request copies before it were not: one copy per token now
    /// instead of one per request.
    authorization: HeaderValue,
}

impl AccessToken {
    /// Fails if the token cannot travel in an HTTP header (only visible ASCII can): such a
    /// token would fail every request, so it is refused where it enters the process.
    pub fn new(token: impl Into<String>) -> Result<Self, InvalidAccessToken> {
        let token = Secret::new(token);
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| InvalidAccessToken)?;
        authorization.set_sensitive(true);
        Ok(AccessToken(Arc::new(TokenValue {
            token,
            authorization,
        })))
    }

    /// The `Authorization` header value of a request made with this token (shared, not copied).
    pub fn authorization(&self) -> HeaderValue {
        self.0.authorization.clone()
    }
}

impl PartialEq for AccessToken {
    fn eq(&self, other: &Self) -> bool {
        self.0.token == other.0.token
    }
}

impl Eq for AccessToken {}

/// A token with characters an HTTP header cannot carry (control characters, non-ASCII).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an access token must be visible ASCII (it travels in an HTTP header)")]
pub struct InvalidAccessToken;

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

/// A token the endpoint issued, with how long it is valid.
#[derive(Clone, Debug)]
pub(crate) struct Minted {
    pub token: AccessToken,
    pub lifetime: Duration,
}

/// Why no token could be had. No variant ever holds a secret: descriptions come from the token
/// endpoint's `error_description`, which names no credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// `invalid_grant`: the refresh token was revoked or expired, or the delegated user does
    /// not exist. A person must re-authorize this mailbox.
    #[error("grant revoked or expired (invalid_grant): {0}")]
    Revoked(String),
    /// `unauthorized_client` on the delegation grant: the Workspace admin has not authorized
    /// this client id for these scopes (or withdrew it).
    #[error("delegation not authorized for these scopes (unauthorized_client): {0}")]
    DelegationDenied(String),
    /// No credential covers this mailbox (no stored refresh token and delegation is off).
    #[error("no credential for this mailbox: {0}")]
    NoCredential(String),
    /// The deployment's own credentials are wrong (client id/secret, key, scopes, the token
    /// URL, a proxy in the way): nothing a mailbox's owner can fix.
    #[error("credentials misconfigured: {0}")]
    Misconfigured(String),
    /// The token endpoint or IAM failed transiently; retry later.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
}

/// Who has to act on an [`AuthError`] (or a Gmail error of the same nature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureScope {
    /// Try again later.
    Transient,
    /// This mailbox's authorization is gone: it needs re-authorization.
    Mailbox,
    /// The deployment is misconfigured: no mailbox is to blame.
    Deployment,
}

impl AuthError {
    pub fn is_retryable(&self) -> bool {
        self.scope() == FailureScope::Transient
    }

    pub fn scope(&self) -> FailureScope {
        match self {
            AuthError::Transient(_) => FailureScope::Transient,
            AuthError::Revoked(_) | AuthError::DelegationDenied(_) | AuthError::NoCredential(_) => {
                FailureScope::Mailbox
            }
            AuthError::Misconfigured(_) => FailureScope::Deployment,
        }
    }

    /// A short, stable name of the cause: mass failures are recognised by it.
    pub fn cause(&self) -> &'static str {
        match self {
            AuthError::Revoked(_) => "invalid_grant",
            AuthError::DelegationDenied(_) => "unauthorized_client",
            AuthError::NoCredential(_) => "no_credential",
            AuthError::Misconfigured(_) => "misconfigured",
            AuthError::Transient(_) => "token_endpoint_unavailable",
        }
    }
}

pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, AuthError>> + Send + 'a>>;
pub(crate) type MintFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Minted, AuthError>> + Send + 'a>>;

pub trait TokenSource: Send + Sync + 'static {
    /// A token for `mailbox`, from cache when still fresh.
    fn token<'a>(&'a self, mailbox: &'a Mailbox) -> TokenFuture<'a>;
    /// Gmail answered 401 with `token`: drop it from any cache so the next call refreshes.
    fn invalidate(&self, mailbox: &Mailbox, token: &AccessToken);
}

/// Obtains a new access token for a mailbox (one token endpoint exchange). Behind a
/// [`TokenCache`], which decides when to call it.
pub(crate) trait Mint: Send + Sync + 'static {
    fn mint<'a>(&'a self, mailbox: &'a Mailbox) -> MintFuture<'a>;
}

/// The grants a deployment can use, per mailbox: its stored refresh token if it has one (the
/// owner authorized this app), else domain-wide delegation if configured.
pub(crate) struct Grants {
    pub refresh: Option<refresh::RefreshGrant>,
    pub delegation: Option<delegation::DelegationGrant>,
}

impl Mint for Grants {
    fn mint<'a>(&'a self, mailbox: &'a Mailbox) -> MintFuture<'a> {
        Box::pin(async move {
            if let Some(refresh) = &self.refresh
                && let Some(minted) = refresh.mint_if_stored(mailbox).await?
            {
                return Ok(minted);
            }
            match &self.delegation {
                Some(delegation) => delegation.mint(mailbox).await,
                None if self.refresh.is_some() => Err(AuthError::NoCredential(
                    "no refresh token is stored for it and domain-wide delegation is off: \
                     register it with `gmail-sync mailbox add EMAIL --refresh-token-file FILE`"
                        .into(),
                )),
                None => Err(AuthError::Misconfigured(
                    "no Gmail credential is configured (see README, \"Gmail credentials\")".into(),
                )),
            }
        })
    }
}

/// One fixed token for every mailbox (development and local test bed only).
pub struct StaticToken(AccessToken);

impl StaticToken {
    pub fn new(token: &Secret) -> Result<Self, InvalidAccessToken> {
        AccessToken::new(token.expose()).map(StaticToken)
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
            Err(AuthError::Misconfigured(
                "no Gmail credential is configured: set GMAIL_SYNC_DELEGATION_KEY_FILE or \
                 GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT (Workspace), GMAIL_SYNC_OAUTH_CLIENT_ID \
                 (per-user refresh tokens), or GMAIL_SYNC_DEV_ACCESS_TOKEN (development)"
                    .into(),
            ))
        })
    }

    fn invalidate(&self, _mailbox: &Mailbox, _token: &AccessToken) {}
}

/// How long one token endpoint or IAM request may take. The endpoint answers in well under a
/// second; a minute-long hang would hold every sync of the mailbox (they share the flight).
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The Gmail credentials a deployment runs with, built once from [`AuthSettings`].
pub(crate) enum Credentials {
    /// `GMAIL_SYNC_DEV_ACCESS_TOKEN`: one token for everything (development).
    Development(Arc<StaticToken>),
    /// Refresh tokens and/or delegation, behind the token cache.
    Grants(Arc<TokenCache<Grants>>),
    None,
}

impl Credentials {
    /// Builds the configured grants. Runs inside the tokio runtime (ADC starts a task).
    pub fn new(
        settings: &AuthSettings,
        stored: Arc<dyn refresh::StoredRefreshTokens>,
    ) -> Result<Credentials, AuthError> {
        if let Some(token) = &settings.dev_access_token {
            let token = StaticToken::new(token).map_err(|e| {
                AuthError::Misconfigured(format!("GMAIL_SYNC_DEV_ACCESS_TOKEN: {e}"))
            })?;
            return Ok(Credentials::Development(Arc::new(token)));
        }
        if settings.delegation.is_none() && settings.oauth_client.is_none() {
            return Ok(Credentials::None);
        }
        let http = reqwest::Client::builder()
            .timeout(TOKEN_REQUEST_TIMEOUT)
            .user_agent(concat!("gmail-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AuthError::Misconfigured(format!("HTTP client: {e}")))?;
        let endpoint = endpoint::TokenEndpoint::new(http.clone(), &settings.token_url);
        let delegation = settings
            .delegation
            .as_ref()
            .map(|d| delegation::DelegationGrant::new(d, &settings.scopes, endpoint.clone(), http))
            .transpose()?;
        let refresh = settings
            .oauth_client
            .clone()
            .map(|client| refresh::RefreshGrant::new(client, endpoint, stored));
        Ok(Credentials::Grants(Arc::new(TokenCache::new(
            Grants {
                refresh,
                delegation,
            },
            cache::DEFAULT_CAPACITY,
        ))))
    }

    pub fn token_source(&self) -> Arc<dyn TokenSource> {
        match self {
            Credentials::Development(t) => t.clone(),
            Credentials::Grants(g) => g.clone(),
            Credentials::None => Arc::new(NoCredentials),
        }
    }

    /// The startup check: proves each configured grant works before anything is consumed.
    /// Returns what was verified, for the log and `check-config`.
    pub async fn check(&self, probe: Option<&Mailbox>) -> Result<Vec<String>, AuthError> {
        let grants = match self {
            Credentials::Development(_) => {
                return Ok(vec!["development token (not checked)".into()]);
            }
            Credentials::None => {
                return Err(AuthError::Misconfigured(
                    "no Gmail credential is configured (see README, \"Gmail credentials\")".into(),
                ));
            }
            Credentials::Grants(cache) => cache.mint_ref(),
        };
        let mut verified = Vec::new();
        if let Some(refresh) = &grants.refresh {
            refresh.check_client().await?;
            verified.push("OAuth client id and secret accepted by the token endpoint".into());
        }
        match (&grants.delegation, probe) {
            (Some(delegation), Some(probe)) => {
                delegation.mint(probe).await.map_err(|e| match &e {
                    AuthError::Revoked(d) | AuthError::DelegationDenied(d) => {
                        AuthError::Misconfigured(format!(
                            "delegation refused ({}) for the probe mailbox \
                             GMAIL_SYNC_PROBE_MAILBOX: {d} (authorize the service account's client id for the scopes \
                             GMAIL_SYNC_GMAIL_SCOPES in the Admin console, Security > API \
                             controls > Domain-wide delegation)",
                            e.cause()
                        ))
                    }
                    _ => e.clone(),
                })?;
                verified.push("a delegation token was minted for the probe mailbox".into());
            }
            (Some(_), None) => verified.push(
                "delegation signer built (set GMAIL_SYNC_PROBE_MAILBOX to mint a token at startup)"
                    .into(),
            ),
            (None, _) => {}
        }
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_debug_is_redacted() {
        let t = AccessToken::new("ya29.secret").unwrap();
        assert!(!format!("{t:?}").contains("secret"));
        assert!(!format!("{:?}", t.authorization()).contains("secret"));
        assert_eq!(t.authorization().to_str().unwrap(), "Bearer ya29.secret");
        assert_eq!(
            AccessToken::new("ya29.line\nbreak"),
            Err(InvalidAccessToken)
        );
    }

    #[test]
    fn scopes_say_who_acts() {
        assert_eq!(
            AuthError::Transient("x".into()).scope(),
            FailureScope::Transient
        );
        assert_eq!(
            AuthError::Revoked("x".into()).scope(),
            FailureScope::Mailbox
        );
        assert_eq!(
            AuthError::DelegationDenied("x".into()).scope(),
            FailureScope::Mailbox
        );
        assert_eq!(
            AuthError::Misconfigured("x".into()).scope(),
            FailureScope::Deployment
        );
        assert!(AuthError::Transient("x".into()).is_retryable());
        assert!(!AuthError::Revoked("x".into()).is_retryable());
    }
}
