//! OAuth: the token endpoint's grants (refresh token, delegation JWT) and issued access tokens.

use super::config::SimConfig;
use super::errors::{ApiError, OAuthError};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Longest accepted `exp - iat` (Google: one hour).
const MAX_JWT_LIFETIME_SECS: u64 = 3600;
/// Clock skew tolerated on `iat`/`exp`.
const SKEW_SECS: u64 = 30;

/// Who a bearer token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// A static development token: every mailbox.
    Any,
    /// An issued access token bound to one mailbox.
    Mailbox(String),
}

#[derive(Debug, Clone)]
struct AccessToken {
    mailbox: String,
    scope: String,
    expires: Instant,
    /// The refresh token it came from (revoking that revokes this).
    refresh: Option<String>,
}

/// Claims of a delegation assertion.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DelegationClaims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub scope: Option<String>,
    pub aud: Option<serde_json::Value>,
    pub exp: Option<u64>,
    pub iat: Option<u64>,
}

/// A token the endpoint issued.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    pub expires_in: u64,
    pub token_type: &'static str,
    pub scope: String,
}

pub(crate) struct Auth {
    access: HashMap<String, AccessToken>,
    refresh: HashMap<String, String>,
    static_tokens: HashSet<String>,
    key: Option<DecodingKey>,
    service_account_email: Option<String>,
    client: Option<(String, String)>,
    pub lifetime: Duration,
    /// Mailboxes whose delegation was withdrawn (JWT grant → `unauthorized_client`).
    denied_delegation: HashSet<String>,
    delegation_scopes: Option<Vec<String>>,
    iam: Option<Iam>,
    rng: StdRng,
    pub issued: u64,
}

impl Auth {
    pub fn new(cfg: &SimConfig) -> anyhow::Result<Self> {
        let key = match &cfg.service_account_public_key_pem {
            Some(pem) => Some(DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                anyhow::anyhow!("gmail-sim: service_account_public_key_pem is not an RSA PEM: {e}")
            })?),
            None => None,
        };
        Ok(Auth {
            access: HashMap::new(),
            refresh: cfg.refresh_tokens.iter().cloned().collect(),
            static_tokens: cfg.static_tokens.iter().cloned().collect(),
            key,
            service_account_email: cfg.service_account_email.clone(),
            client: cfg.oauth_client.clone(),
            lifetime: cfg.token_lifetime,
            denied_delegation: HashSet::new(),
            delegation_scopes: cfg.delegation_scopes.clone(),
            iam: cfg.iam_signer.as_ref().map(Iam::new).transpose()?,
            rng: StdRng::seed_from_u64(cfg.seed ^ 0xA11C_E5E5_70CE_4E11),
            issued: 0,
        })
    }

    /// Checks a bearer token (401 bodies for unknown, revoked or expired tokens).
    pub fn principal(&self, bearer: &str) -> Result<Principal, ApiError> {
        if self.static_tokens.contains(bearer) {
            return Ok(Principal::Any);
        }
        match self.access.get(bearer) {
            Some(t) if t.expires > Instant::now() => Ok(Principal::Mailbox(t.mailbox.clone())),
            _ => Err(ApiError::invalid_credentials()),
        }
    }

    /// The scope an issued token was granted (static tokens: every scope).
    pub fn scope_of(&self, bearer: &str) -> Option<&str> {
        self.access.get(bearer).map(|t| t.scope.as_str())
    }

    /// The fake IAM Credentials `signJwt` (keyless signing): checks the caller's bearer and that
    /// it names the configured service account, then signs `payload` (a JSON claim set) RS256.
    /// Returns `(keyId, signedJwt)`.
    pub fn sign_jwt(
        &self,
        bearer: Option<&str>,
        service_account: &str,
        payload: &str,
    ) -> Result<(String, String), ApiError> {
        let Some(iam) = &self.iam else {
            return Err(ApiError::new(
                404,
                "global",
                "notFound",
                "gmail-sim: no IAM signer configured",
            ));
        };
        iam.sign_jwt(bearer, service_account, payload)
    }

    pub fn add_static_token(&mut self, token: &str) {
        self.static_tokens.insert(token.to_string());
    }

    pub fn add_refresh_token(&mut self, token: &str, email: &str) {
        self.refresh.insert(token.to_string(), email.to_string());
    }

    /// Revokes a refresh token and every access token issued from it.
    pub fn revoke_refresh_token(&mut self, token: &str) {
        self.refresh.remove(token);
        self.access
            .retain(|_, t| t.refresh.as_deref() != Some(token));
    }

    /// Withdraws (or restores) domain-wide delegation for a mailbox.
    pub fn set_delegation_allowed(&mut self, email: &str, allowed: bool) {
        if allowed {
            self.denied_delegation.remove(email);
        } else {
            self.denied_delegation.insert(email.to_string());
        }
    }

    /// Makes issued access tokens (of one mailbox, or all) expire now.
    pub fn expire_access_tokens(&mut self, email: Option<&str>) {
        let now = Instant::now();
        for t in self.access.values_mut() {
            if email.is_none_or(|e| e == t.mailbox) {
                t.expires = now;
            }
        }
    }

    /// Revokes every access token of a mailbox (or all).
    pub fn revoke_access_tokens(&mut self, email: Option<&str>) {
        self.access
            .retain(|_, t| email.is_some_and(|e| e != t.mailbox));
    }

    /// The mailbox a refresh token maps to (for fault matching and the ledger).
    pub fn refresh_mailbox(&self, token: &str) -> Option<String> {
        self.refresh.get(token).cloned()
    }

    /// `grant_type=refresh_token`.
    pub fn refresh_grant(
        &mut self,
        form: &HashMap<String, String>,
    ) -> Result<(String, TokenResponse), OAuthError> {
        let token = form
            .get("refresh_token")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                OAuthError::invalid_request("Missing required parameter: refresh_token")
            })?;
        let client_id = form.get("client_id").map(String::as_str).unwrap_or("");
        let client_secret = form.get("client_secret").map(String::as_str).unwrap_or("");
        if client_id.is_empty() {
            return Err(OAuthError::invalid_request(
                "Missing required parameter: client_id",
            ));
        }
        if let Some((id, secret)) = &self.client
            && (id != client_id || secret != client_secret)
        {
            return Err(OAuthError::new(401, "invalid_client", "Unauthorized"));
        }
        let email = self
            .refresh
            .get(token)
            .cloned()
            .ok_or_else(|| OAuthError::invalid_grant("Token has been expired or revoked."))?;
        let scope = form
            .get("scope")
            .cloned()
            .unwrap_or_else(|| "https://www.googleapis.com/auth/gmail.metadata".to_string());
        let resp = self.issue(&email, scope, Some(token.clone()));
        Ok((email, resp))
    }

    /// Verifies a delegation assertion (signature, aud, iat/exp, iss); returns the claims.
    pub fn verify_assertion(
        &self,
        assertion: &str,
        token_url: &str,
    ) -> Result<DelegationClaims, OAuthError> {
        let Some(key) = &self.key else {
            return Err(OAuthError::invalid_grant(
                "Invalid JWT Signature. (gmail-sim: no service account key configured)",
            ));
        };
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let claims = match jsonwebtoken::decode::<DelegationClaims>(assertion, key, &validation) {
            Ok(d) => d.claims,
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                let msg = match e.kind() {
                    K::InvalidSignature | K::InvalidAlgorithm => "Invalid JWT Signature.",
                    _ => "Invalid JWT: malformed assertion.",
                };
                return Err(OAuthError::invalid_grant(msg));
            }
        };
        let aud_ok = match &claims.aud {
            Some(serde_json::Value::String(a)) => a == token_url,
            Some(serde_json::Value::Array(v)) => v.iter().any(|a| a.as_str() == Some(token_url)),
            _ => false,
        };
        if !aud_ok {
            return Err(OAuthError::invalid_grant(format!(
                "Invalid JWT: Failed audience check. The right audience is {token_url}"
            )));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let timeframe = || {
            OAuthError::invalid_grant(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable \
                 timeframe. Check your iat and exp values in the JWT claim.",
            )
        };
        let (Some(exp), Some(iat)) = (claims.exp, claims.iat) else {
            return Err(timeframe());
        };
        if exp + SKEW_SECS <= now || iat > now + SKEW_SECS || exp < iat {
            return Err(timeframe());
        }
        if exp - iat > MAX_JWT_LIFETIME_SECS {
            return Err(timeframe());
        }
        if let Some(want) = &self.service_account_email
            && claims.iss.as_deref() != Some(want.as_str())
        {
            return Err(OAuthError::invalid_grant(
                "Invalid JWT: iss is not the service account.",
            ));
        }
        if claims.iss.as_deref().is_none_or(str::is_empty) {
            return Err(OAuthError::invalid_request("Invalid JWT: missing iss."));
        }
        if claims.scope.as_deref().is_none_or(|s| s.trim().is_empty()) {
            return Err(OAuthError::new(
                400,
                "invalid_scope",
                "Empty or missing scope not allowed.",
            ));
        }
        Ok(claims)
    }

    /// Issues a token for a verified delegation (the caller checked the mailbox exists).
    pub fn delegation_grant(
        &mut self,
        email: &str,
        scope: String,
    ) -> Result<TokenResponse, OAuthError> {
        if let Some(allowed) = &self.delegation_scopes
            && scope.split(' ').any(|s| !allowed.iter().any(|a| a == s))
        {
            return Err(OAuthError::new(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client \
                 not authorized for any of the scopes requested.",
            ));
        }
        if self.denied_delegation.contains(email) {
            return Err(OAuthError::new(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client \
                 not authorized for any of the scopes requested.",
            ));
        }
        Ok(self.issue(email, scope, None))
    }

    fn issue(&mut self, email: &str, scope: String, refresh: Option<String>) -> TokenResponse {
        let token = format!(
            "ya29.sim-{:016x}{:016x}",
            self.rng.random::<u64>(),
            self.rng.random::<u64>()
        );
        self.access.insert(
            token.clone(),
            AccessToken {
                scope: scope.clone(),
                mailbox: email.to_string(),
                expires: Instant::now() + self.lifetime,
                refresh,
            },
        );
        self.issued += 1;
        TokenResponse {
            access_token: token,
            expires_in: self.lifetime.as_secs(),
            token_type: "Bearer",
            scope,
        }
    }
}

/// The fake IAM Credentials API's signer.
struct Iam {
    service_account: String,
    key: jsonwebtoken::EncodingKey,
    key_id: String,
    caller: DecodingKey,
}

impl Iam {
    fn new(cfg: &super::config::IamSigner) -> anyhow::Result<Iam> {
        Ok(Iam {
            service_account: cfg.service_account.clone(),
            key: jsonwebtoken::EncodingKey::from_rsa_pem(cfg.private_key_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("gmail-sim: iam_signer.private_key_pem: {e}"))?,
            key_id: cfg.key_id.clone(),
            caller: DecodingKey::from_rsa_pem(cfg.caller_public_key_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("gmail-sim: iam_signer.caller_public_key_pem: {e}"))?,
        })
    }

    fn sign_jwt(
        &self,
        bearer: Option<&str>,
        service_account: &str,
        payload: &str,
    ) -> Result<(String, String), ApiError> {
        let unauthenticated = || {
            ApiError::new(
                401,
                "global",
                "authError",
                "Request had invalid authentication credentials.",
            )
            .with_status("UNAUTHENTICATED")
        };
        let bearer = bearer.ok_or_else(unauthenticated)?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims = HashSet::new();
        validation.validate_aud = false;
        jsonwebtoken::decode::<serde_json::Value>(bearer, &self.caller, &validation)
            .map_err(|_| unauthenticated())?;
        if service_account != self.service_account {
            return Err(ApiError::new(
                403,
                "global",
                "forbidden",
                format!(
                    "Permission 'iam.serviceAccounts.signJwt' denied on resource (or it may not \
                     exist): {service_account}"
                ),
            )
            .with_status("PERMISSION_DENIED"));
        }
        let claims: serde_json::Value = serde_json::from_str(payload).map_err(|_| {
            ApiError::invalid("Invalid JSON payload: the payload must be a JSON claim set")
        })?;
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some(self.key_id.clone());
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| ApiError::invalid(format!("gmail-sim: cannot sign: {e}")))?;
        Ok((self.key_id.clone(), jwt))
    }
}
