//! Certificates made for one test: a CA of its own and a server certificate it signed.

use std::path::PathBuf;
use std::process::Command;

/// A certificate authority and a server certificate for `127.0.0.1` and `localhost` that it
/// signed (ECDSA P-256), as PEM files in a temporary directory removed on drop. Made by the
/// `openssl` command line (Debian's `openssl`, which scripts/deps.sh installs).
#[derive(Debug)]
pub struct TestCertificates {
    dir: PathBuf,
    /// The CA's certificate: what a client is told to trust.
    pub ca: PathBuf,
    /// The server's certificate.
    pub certificate: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TestCertificates {
    pub fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!("aimesh-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the certificates' directory");
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("run openssl (is it installed? scripts/deps.sh installs it)");
            assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        };
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let ca = ["req", "-x509", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=aimesh test CA"];
        openssl(&[&ca[..], &key[..]].concat());
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write the extensions");
        let request = ["req", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"];
        openssl(&[&request[..], &key[..]].concat());
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        Self { ca: dir.join("ca.crt"), certificate: dir.join("server.crt"), key: dir.join("server.key"), dir }
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
