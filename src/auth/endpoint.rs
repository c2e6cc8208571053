//! The OAuth 2.0 token endpoint (`oauth2.googleapis.com/token`): one form POST per exchange,
//! its answer turned into a [`Minted`] token or an [`AuthError`] saying who must act.

use super::{AccessToken, AuthError, Minted};
use serde::Deserialize;
use std::time::Duration;

/// What the endpoint is asked for (never logged: the form holds the credential).
pub(crate) enum Grant<'a> {
    /// `grant_type=refresh_token` with the app's client id and secret.
    RefreshToken {
        refresh_token: &'a str,
        client_id: &'a str,
        client_secret: &'a str,
    },
    /// `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` with a signed assertion.
    JwtBearer { assertion: &'a str },
}

/// Longest error description kept from an answer (they are one sentence).
const MAX_DESCRIPTION_CHARS: usize = 200;
/// Assumed lifetime when the answer omits `expires_in` (Google always sends it; 3600 s).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub(crate) struct TokenEndpoint {
    http: reqwest::Client,
    url: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
    error_description: Option<String>,
}

impl TokenEndpoint {
    pub fn new(http: reqwest::Client, url: &str) -> TokenEndpoint {
        TokenEndpoint {
            http,
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn exchange(&self, grant: Grant<'_>) -> Result<Minted, AuthError> {
        let form: Vec<(&str, &str)> = match grant {
            Grant::RefreshToken {
                refresh_token,
                client_id,
                client_secret,
            } => vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", client_id),
                ("client_secret", client_secret),
            ],
            Grant::JwtBearer { assertion } => vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion),
            ],
        };
        let response = self
            .http
            .post(&self.url)
            .form(&form)
            .send()
            .await
            // The URL is the endpoint's (no credential in it).
            .map_err(|e| AuthError::Transient(format!("{}: {e}", self.url)))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| AuthError::Transient(format!("{}: {e}", self.url)))?;
        classify(status, &body)
    }
}

/// Maps the endpoint's answer (RFC 6749 §5) to a token or to who must act.
pub(crate) fn classify(status: u16, body: &[u8]) -> Result<Minted, AuthError> {
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<TokenAnswer>(body) {
            Ok(answer) => match AccessToken::new(answer.access_token) {
                Ok(token) => Ok(Minted {
                    token,
                    lifetime: answer
                        .expires_in
                        .map_or(DEFAULT_LIFETIME, Duration::from_secs),
                }),
                Err(e) => Err(AuthError::Misconfigured(format!(
                    "the token endpoint answered HTTP {status} with an unusable token ({e}): \
                     is GMAIL_SYNC_TOKEN_URL right, or is a proxy answering instead?"
                ))),
            },
            Err(_) => Err(AuthError::Misconfigured(format!(
                "the token endpoint answered HTTP {status} without a token: is \
                 GMAIL_SYNC_TOKEN_URL right, or is a proxy answering instead?"
            ))),
        };
    }
    if status == 408 || status == 429 || status >= 500 {
        return Err(AuthError::Transient(format!(
            "token endpoint answered HTTP {status}"
        )));
    }
    let Ok(answer) = serde_json::from_slice::<ErrorAnswer>(body) else {
        return Err(AuthError::Misconfigured(format!(
            "the token endpoint answered HTTP {status} with something that is not an OAuth \
             error (a proxy or a wrong GMAIL_SYNC_TOKEN_URL?)"
        )));
    };
    let description: String = answer
        .error_description
        .unwrap_or_default()
        .chars()
        .take(MAX_DESCRIPTION_CHARS)
        .collect();
    Err(match answer.error.as_str() {
        "invalid_grant" => AuthError::Revoked(description),
        "unauthorized_client" => AuthError::DelegationDenied(description),
        "invalid_client" => AuthError::Misconfigured(format!(
            "invalid_client: the OAuth client id or secret is wrong \
             (GMAIL_SYNC_OAUTH_CLIENT_ID / GMAIL_SYNC_OAUTH_CLIENT_SECRET_FILE) {description}"
        )),
        "invalid_scope" => AuthError::Misconfigured(format!(
            "invalid_scope: check GMAIL_SYNC_GMAIL_SCOPES {description}"
        )),
        "temporarily_unavailable" => AuthError::Transient(description),
        other => AuthError::Misconfigured(format!("{other}: {description}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_who_acts() {
        let ok = classify(200, br#"{"access_token":"ya29.x","expires_in":1800}"#).unwrap();
        assert_eq!(ok.lifetime, Duration::from_secs(1800));
        assert_eq!(ok.token, AccessToken::new("ya29.x").unwrap());
        assert!(matches!(
            classify(200, b"{\"access_token\":\"ya29.\\u0000x\"}"),
            Err(AuthError::Misconfigured(d)) if d.contains("unusable token")
        ));
        let e = |status, body: &str| classify(status, body.as_bytes()).unwrap_err();
        assert!(matches!(
            e(400, r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#),
            AuthError::Revoked(d) if d.contains("revoked")
        ));
        assert!(matches!(
            e(401, r#"{"error":"unauthorized_client"}"#),
            AuthError::DelegationDenied(_)
        ));
        assert!(matches!(
            e(401, r#"{"error":"invalid_client"}"#),
            AuthError::Misconfigured(_)
        ));
        assert!(matches!(
            e(400, r#"{"error":"invalid_scope"}"#),
            AuthError::Misconfigured(_)
        ));
        assert!(matches!(e(503, "<html>"), AuthError::Transient(_)));
        assert!(matches!(e(429, ""), AuthError::Transient(_)));
        // A proxy answering HTML is the deployment's problem, not the mailbox's.
        assert!(matches!(
            e(403, "<html>blocked</html>"),
            AuthError::Misconfigured(_)
        ));
        assert!(matches!(
            e(200, "<html>login</html>"),
            AuthError::Misconfigured(_)
        ));
    }
}
