//! Constants and helpers of the credential tests. No key material is committed: tests make
//! their keys at run time with [`crate::keys::ServiceAccount::generate`].

/// The `client_email` of the fake delegation service account in the simulator's tests.
pub const SERVICE_ACCOUNT_EMAIL: &str = "gmail-sync-test@gmail-sync-test.iam.gserviceaccount.com";
/// The Gmail scope delegation tokens are usually asked for.
pub const GMAIL_METADATA_SCOPE: &str = "https://www.googleapis.com/auth/gmail.metadata";

/// Signs a delegation assertion (RS256) as the product would: `{iss, sub, scope, aud, iat,
/// exp}`. `iat_offset_secs` shifts `iat`/`exp` (negative = in the past).
pub fn sign_delegation_jwt(
    private_key_pem: &str,
    iss: &str,
    sub: &str,
    scope: &str,
    aud: &str,
    iat_offset_secs: i64,
    lifetime_secs: u64,
) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let iat = now + iat_offset_secs;
    let claims = serde_json::json!({
        "iss": iss,
        "sub": sub,
        "scope": scope,
        "aud": aud,
        "iat": iat,
        "exp": iat + lifetime_secs as i64,
    });
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem.as_bytes())?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("test-only-key-1".to_string());
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}
