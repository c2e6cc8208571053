//! Service-account keys made on the spot for credential tests: an RSA key pair, its PEMs, and
//! the JSON key file Google would let one download (with `token_uri` pointing where the test
//! says). Nothing here is a fixture: every test run has keys of its own.

use anyhow::{Context, Result};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::path::{Path, PathBuf};

/// A generated service account.
#[derive(Clone)]
pub struct ServiceAccount {
    pub email: String,
    pub key_id: String,
    /// PKCS#8 PEM of the private key.
    pub private_key_pem: String,
    /// SubjectPublicKeyInfo PEM of the public key.
    pub public_key_pem: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl ServiceAccount {
    /// A new RSA-2048 key for `email`.
    pub fn generate(email: &str) -> Result<ServiceAccount> {
        let pair = KeyPair::generate(KeySize::Rsa2048).context("generating an RSA key")?;
        let private: Pkcs8V1Der = pair.as_der().context("PKCS#8 export")?;
        let public: PublicKeyX509Der = pair.public_key().as_der().context("SPKI export")?;
        let key_id = format!("{:016x}", rand::random::<u64>());
        Ok(ServiceAccount {
            email: email.to_string(),
            key_id,
            private_key_pem: pem("PRIVATE KEY", private.as_ref()),
            public_key_pem: pem("PUBLIC KEY", public.as_ref()),
        })
    }

    /// The JSON key file, as the Cloud console downloads it.
    pub fn key_json(&self, token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "testbed",
            "private_key_id": self.key_id,
            "private_key": self.private_key_pem,
            "client_email": self.email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        })
        .to_string()
    }

    /// Writes [`Self::key_json`] to `dir/name` (mode 0600) and returns its path.
    pub fn write_key_file(&self, dir: &Path, name: &str, token_uri: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        std::fs::write(&path, self.key_json(token_uri))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }
}
