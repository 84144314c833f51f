//! Proxies a test puts between a client and a server.

/// A TCP proxy in front of a server that a test can cut or stall. Cut (down), it drops new
/// connections as soon as it accepts them and closes the open ones, which is what a client sees
/// of a stopped or restarting server. Stalled, it keeps every connection open and passes
/// nothing, which is what a client sees of a partition or a server that stopped answering:
/// the connections open at the time stay silent for good (until the proxy is cut or dropped),
/// new ones wait and are served once the stall ends. The shared server itself never notices,
/// so other tests keep using it. Stops with the test's runtime.
#[derive(Debug)]
pub struct CuttableProxy {
    /// The proxy's `host:port`.
    pub address: std::net::SocketAddr,
    link: std::sync::Arc<tokio::sync::watch::Sender<Link>>,
}

/// What a [`CuttableProxy`] does with the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Down,
    Stalled,
}

impl CuttableProxy {
    /// A proxy on a free loopback port forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let upstream = upstream.to_owned();
        let link = std::sync::Arc::new(tokio::sync::watch::channel(Link::Up).0);
        let state = std::sync::Arc::clone(&link);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *state.borrow() == Link::Down {
                    continue;
                }
                let (mut down, mut stalled) = (state.subscribe(), state.subscribe());
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(link) = down.wait_for(|link| *link != Link::Stalled).await.map(|link| *link) else { return };
                    if link == Link::Down {
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let stalled = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        _ = down.wait_for(|link| *link == Link::Down) => false,
                        _ = stalled.wait_for(|link| *link == Link::Stalled) => true,
                    };
                    if stalled {
                        // Silent, both ends open, until the link goes down or the proxy is gone.
                        let _ = down.wait_for(|link| *link == Link::Down).await.map(drop);
                    }
                });
            }
        });
        Self { address, link }
    }

    /// `url` with its `host:port` (that of `upstream`) replaced by the proxy's.
    pub fn rewrite(&self, url: &str, upstream: &str) -> String {
        assert!(url.contains(upstream), "{url} does not name {upstream}");
        url.replacen(upstream, &self.address.to_string(), 1)
    }

    /// Cuts (`true`) or restores (`false`) the connection to the server.
    pub fn set_down(&self, down: bool) {
        self.link.send_replace(if down { Link::Down } else { Link::Up });
    }

    /// Stalls (`true`) the connections to the server, or lets new ones through again (`false`).
    pub fn set_stalled(&self, stalled: bool) {
        self.link.send_replace(if stalled { Link::Stalled } else { Link::Up });
    }
}

/// The `host:port` of a URL such as `postgres://postgres@127.0.0.1:55432/db` or
/// `http://127.0.0.1:18123`.
pub fn authority_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// TLS in front of a plain TCP server (ClickHouse's HTTP port), as a terminating load balancer
/// or ingress puts it there: it accepts TLS with a certificate of [`TestCertificates`] on a
/// free loopback port and passes the plain bytes on to `upstream`. Stops with the test's runtime.
#[derive(Debug)]
pub struct TlsProxy {
    /// The proxy's `host:port`.
    pub address: std::net::SocketAddr,
}

impl TlsProxy {
    /// A proxy to `upstream` (`host:port`) showing `certificates`' server certificate.
    pub async fn start(upstream: &str, certificates: &super::TestCertificates) -> Self {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let chain = CertificateDer::pem_file_iter(&certificates.certificate)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .expect("read the server certificate");
        let key = PrivateKeyDer::from_pem_file(&certificates.key).expect("read the server key");
        let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
            .expect("a TLS server configuration");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends its handshake here.
                    let Ok(mut client) = acceptor.accept(client).await else { return };
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Self { address }
    }
}
