//! Per-user OAuth refresh tokens (consumer Gmail, or apps without delegation): the owner of the
//! mailbox authorized this app's OAuth client once; the refresh token that consent produced is
//! stored encrypted in Redis (see `vault`) and exchanged here for access tokens.

use super::endpoint::{Grant, TokenEndpoint};
use super::{AuthError, Minted};
use crate::config::{OAuthClient, Secret};
use crate::mailbox::Mailbox;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub(crate) type LookupFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Secret>, AuthError>> + Send + 'a>>;

/// Where stored refresh tokens are read from (Redis + the vault in production).
pub(crate) trait StoredRefreshTokens: Send + Sync + 'static {
    /// The mailbox's refresh token in clear, or None if it has none.
    fn refresh_token<'a>(&'a self, mailbox: &'a Mailbox) -> LookupFuture<'a>;
}

pub(crate) struct RefreshGrant {
    client: OAuthClient,
    endpoint: TokenEndpoint,
    stored: Arc<dyn StoredRefreshTokens>,
}

impl RefreshGrant {
    pub fn new(
        client: OAuthClient,
        endpoint: TokenEndpoint,
        stored: Arc<dyn StoredRefreshTokens>,
    ) -> RefreshGrant {
        RefreshGrant {
            client,
            endpoint,
            stored,
        }
    }

    /// Exchanges the mailbox's stored refresh token; None if it has none (then delegation, if
    /// configured, is tried).
    pub async fn mint_if_stored(&self, mailbox: &Mailbox) -> Result<Option<Minted>, AuthError> {
        let Some(refresh_token) = self.stored.refresh_token(mailbox).await? else {
            return Ok(None);
        };
        self.endpoint
            .exchange(Grant::RefreshToken {
                refresh_token: refresh_token.expose(),
                client_id: &self.client.id,
                client_secret: self.client.secret.expose(),
            })
            .await
            .map(Some)
    }

    /// Checks the client id and secret without any user's token: Google (like the simulator)
    /// authenticates the client before it looks at the grant, so a made-up refresh token gets
    /// `invalid_grant` from a valid client and `invalid_client` from a wrong one.
    pub async fn check_client(&self) -> Result<(), AuthError> {
        match self
            .endpoint
            .exchange(Grant::RefreshToken {
                refresh_token: "gmail-sync-startup-check",
                client_id: &self.client.id,
                client_secret: self.client.secret.expose(),
            })
            .await
        {
            Err(AuthError::Revoked(_)) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(AuthError::Misconfigured(
                "the token endpoint accepted a made-up refresh token: is GMAIL_SYNC_TOKEN_URL \
                 Google's?"
                    .into(),
            )),
        }
    }
}
