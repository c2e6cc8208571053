//! Certificates made at test time (rcgen, aws-lc-rs): a CA of its own and a server
//! certificate it signed for `127.0.0.1` and `localhost`, written as PEM files for
//! `redis-server --tls-*-file` and for gmail-sync's `GMAIL_SYNC_REDIS_CA_FILE`.

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};

/// One CA and one server certificate, as files in `dir`.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate (PEM), what a client must trust.
    pub ca_pem: String,
    pub ca_file: PathBuf,
    /// The server certificate (PEM, SANs `127.0.0.1` and `localhost`) and its key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestPki {
    /// A fresh CA (so two calls never trust each other's certificates) named `label`, and a
    /// server certificate signed by it, written to `dir/{label}-ca.pem`, `-server.pem` and
    /// `-server.key`.
    pub fn generate(dir: &Path, label: &str) -> Result<TestPki> {
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("gmail-sync test CA {label}"));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).context("CA certificate")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("server key")?;
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        // No extended key usage: the cluster bus presents this certificate as a client too.
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("server certificate")?;

        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = dir.join(format!("{label}-{name}"));
            std::fs::write(&path, contents).with_context(|| format!("writing {path:?}"))?;
            Ok(path)
        };
        let ca_pem = ca_cert.pem();
        Ok(TestPki {
            ca_file: write("ca.pem", &ca_pem)?,
            cert_file: write("server.pem", &server_cert.pem())?,
            key_file: write("server.key", &server_key.serialize_pem())?,
            ca_pem,
        })
    }
}
