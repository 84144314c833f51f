//! TLS to the stores (`rediss://` Redis, `https://` ClickHouse): one way to decide whom a client
//! trusts, the public certificate authorities (Mozilla's list, built in, so a slim container
//! without a system store still connects) and, for a private CA, the certificates of a PEM file
//! the operator names.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why a TLS client could not be set up, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct TlsSetupError {
    pub setting: &'static str,
    pub message: String,
}

/// A client configuration trusting the public CAs and, when `ca_file` is given, every
/// certificate in it; `setting` names the option `ca_file` came from, for errors.
pub fn client_config(ca_file: Option<&Path>, setting: &'static str) -> Result<rustls::ClientConfig, TlsSetupError> {
    let error = |message: String| TlsSetupError { setting, message };
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certificates| certificates.collect())
            .map_err(|e| error(format!("cannot read certificates from {}: {e}", path.display())))?;
        if certificates.is_empty() {
            return Err(error(format!("{} holds no PEM certificate", path.display())));
        }
        for certificate in certificates {
            roots.add(certificate).map_err(|e| error(format!("a certificate in {}: {e}", path.display())))?;
        }
    }
    // Explicitly aws-lc-rs, the one crypto backend of the workspace, whether or not a process
    // default was installed.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_refused_naming_the_setting() {
        let missing = client_config(Some(Path::new("/nonexistent/ca.pem")), "redis.tls_ca_file");
        assert_eq!(missing.err().map(|e| e.setting), Some("redis.tls_ca_file"));
        let empty = std::env::temp_dir().join(format!("aimesh-empty-{}.pem", uuid::Uuid::new_v4().simple()));
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let refused = client_config(Some(&empty), "analytics.clickhouse_ca_file");
        let _ = std::fs::remove_file(&empty);
        let refused = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.starts_with("analytics.clickhouse_ca_file: ") && refused.contains("no PEM"), "{refused}");
        assert!(client_config(None, "redis.tls_ca_file").is_ok());
    }
}
