//! Workspace domain-wide delegation: a JWT assertion `{iss, sub = mailbox, scope, aud, iat,
//! exp}` signed RS256 by the deployment's service account, exchanged at the token endpoint
//! (JWT-bearer grant) for a token that acts as the mailbox's user.
//!
//! `google-cloud-auth` has no subject option, so the assertion is built here and signed by
//! either of two [`AssertionSigner`]s:
//! - [`AssertionSigner::KeyFile`]: locally, with the private key of a service-account key file,
//!   through `google-cloud-auth`'s `Signer` (RS256);
//! - [`AssertionSigner::Iam`]: keyless, by IAM Credentials `signJwt`, called with Application
//!   Default Credentials (on GKE, Workload Identity: no key in the pod). The pod's identity
//!   needs `roles/iam.serviceAccountTokenCreator` on the delegating service account.

use super::endpoint::{Grant, TokenEndpoint};
use super::{AuthError, Minted};
use crate::config::{DelegationSettings, DelegationSigning};
use crate::mailbox::Mailbox;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lifetime asked for in the assertion: Google's maximum, one hour. The assertion is used once,
/// right away; the token it buys lives an hour regardless.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// The scope ADC's token needs to call IAM Credentials.
const IAM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Longest IAM error text kept (it is one JSON error object).
const MAX_IAM_ERROR_CHARS: usize = 300;

pub(crate) enum AssertionSigner {
    KeyFile {
        signer: google_cloud_auth::signer::Signer,
        key_id: String,
    },
    Iam {
        adc: google_cloud_auth::credentials::AccessTokenCredentials,
        http: reqwest::Client,
        /// `{iam_url}/v1/projects/-/serviceAccounts/{email}:signJwt`
        sign_jwt_url: String,
    },
}

pub(crate) struct DelegationGrant {
    service_account: String,
    scope: String,
    signer: AssertionSigner,
    endpoint: TokenEndpoint,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl DelegationGrant {
    /// Builds the signer. Must run inside the tokio runtime (ADC credentials start a refresh
    /// task when built).
    pub fn new(
        settings: &DelegationSettings,
        scopes: &[String],
        endpoint: TokenEndpoint,
        http: reqwest::Client,
    ) -> Result<DelegationGrant, AuthError> {
        let (service_account, signer) = match &settings.signing {
            DelegationSigning::KeyFile(key) => {
                let json: serde_json::Value = serde_json::from_str(key.json.expose())
                    .map_err(|_| misconfigured_key("is not JSON"))?;
                let signer = google_cloud_auth::credentials::service_account::Builder::new(json)
                    .build_signer()
                    .map_err(|e| misconfigured_key(&e.to_string()))?;
                (
                    key.client_email.clone(),
                    AssertionSigner::KeyFile {
                        signer,
                        key_id: key.private_key_id.clone(),
                    },
                )
            }
            DelegationSigning::Iam {
                service_account,
                iam_url,
            } => {
                let adc = google_cloud_auth::credentials::Builder::default()
                    .with_scopes([IAM_SCOPE])
                    .build_access_token_credentials()
                    .map_err(|e| {
                        AuthError::Misconfigured(format!(
                            "Application Default Credentials are not usable for keyless \
                             signing: {e}"
                        ))
                    })?;
                (
                    service_account.clone(),
                    AssertionSigner::Iam {
                        adc,
                        http,
                        sign_jwt_url: format!(
                            "{iam_url}/v1/projects/-/serviceAccounts/{service_account}:signJwt"
                        ),
                    },
                )
            }
        };
        Ok(DelegationGrant {
            service_account,
            scope: scopes.join(" "),
            signer,
            endpoint,
        })
    }

    pub async fn mint(&self, mailbox: &Mailbox) -> Result<Minted, AuthError> {
        let assertion = self.assertion(mailbox).await?;
        self.endpoint
            .exchange(Grant::JwtBearer {
                assertion: &assertion,
            })
            .await
    }

    async fn assertion(&self, mailbox: &Mailbox) -> Result<String, AuthError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            iss: &self.service_account,
            sub: mailbox.as_str(),
            scope: &self.scope,
            aud: self.endpoint.url(),
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let claims = serde_json::to_string(&claims).expect("claims serialize");
        match &self.signer {
            AssertionSigner::KeyFile { signer, key_id } => {
                let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": key_id});
                let signing_input = format!(
                    "{}.{}",
                    URL_SAFE_NO_PAD.encode(header.to_string()),
                    URL_SAFE_NO_PAD.encode(&claims)
                );
                let signature = signer
                    .sign(signing_input.as_bytes())
                    .await
                    .map_err(|e| misconfigured_key(&e.to_string()))?;
                Ok(format!(
                    "{signing_input}.{}",
                    URL_SAFE_NO_PAD.encode(signature)
                ))
            }
            AssertionSigner::Iam {
                adc,
                http,
                sign_jwt_url,
            } => sign_with_iam(adc, http, sign_jwt_url, &self.service_account, &claims).await,
        }
    }
}

fn misconfigured_key(why: &str) -> AuthError {
    AuthError::Misconfigured(format!(
        "GMAIL_SYNC_DELEGATION_KEY_FILE cannot sign: {why} (use a JSON key of the delegating \
         service account, as downloaded from the Cloud console)"
    ))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignJwtAnswer {
    signed_jwt: String,
}

async fn sign_with_iam(
    adc: &google_cloud_auth::credentials::AccessTokenCredentials,
    http: &reqwest::Client,
    url: &str,
    service_account: &str,
    claims: &str,
) -> Result<String, AuthError> {
    let token = adc.access_token().await.map_err(|e| {
        let detail = format!("Application Default Credentials gave no token: {e}");
        if e.is_transient() {
            AuthError::Transient(detail)
        } else {
            AuthError::Misconfigured(detail)
        }
    })?;
    let response = http
        .post(url)
        .bearer_auth(&token.token)
        .json(&serde_json::json!({ "payload": claims }))
        .send()
        .await
        .map_err(|e| AuthError::Transient(format!("IAM signJwt: {}", e.without_url())))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|e| AuthError::Transient(format!("IAM signJwt: {}", e.without_url())))?;
    if (200..300).contains(&status) {
        return serde_json::from_str::<SignJwtAnswer>(&body)
            .map(|a| a.signed_jwt)
            .map_err(|_| {
                AuthError::Misconfigured(format!(
                    "IAM signJwt answered HTTP {status} without a signed JWT (check \
                     GMAIL_SYNC_IAM_CREDENTIALS_URL)"
                ))
            });
    }
    let detail: String = body.chars().take(MAX_IAM_ERROR_CHARS).collect();
    if status == 408 || status == 429 || status >= 500 {
        return Err(AuthError::Transient(format!("IAM signJwt HTTP {status}")));
    }
    Err(AuthError::Misconfigured(match status {
        401 | 403 => format!(
            "IAM signJwt refused (HTTP {status}): the pod's identity needs \
             roles/iam.serviceAccountTokenCreator on {service_account} and the IAM Credentials \
             API enabled: {detail}"
        ),
        404 => format!(
            "IAM signJwt: service account {service_account} not found (check \
             GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT): {detail}"
        ),
        _ => format!("IAM signJwt HTTP {status}: {detail}"),
    }))
}
