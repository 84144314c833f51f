//! Who the client is when a request comes through the gateway: the gateway vouches for the
//! address it limited, and the services believe it only with the deployment's gateway token.
//!
//! The gateway sends two metadata entries on every call it makes: [`HEADER_CLIENT_IP`], the
//! client's address, and [`HEADER_CLIENT_IP_TOKEN`], the gateway token (`auth.gateway_token`)
//! proving the address comes from the gateway. The token is not the service token: a service
//! that may call internal RPCs cannot thereby choose whose address it speaks for. The caller's own `authorization` is forwarded
//! unchanged beside them. A service compares the token in constant time; when it matches, the
//! request's [`ClientAddress`] is the vouched one and is marked attested, and the service skips
//! the per-IP limits (requests and failed authentications) the gateway already decided. A missing or wrong token changes nothing: the
//! socket peer is the client and is limited per IP as before.

use std::net::{IpAddr, SocketAddr};

use crate::auth::DeploymentSecret;

/// Metadata: the client address the gateway vouches for.
pub const HEADER_CLIENT_IP: &str = "x-aimesh-client-ip";
/// Metadata: the gateway token proving [`HEADER_CLIENT_IP`] comes from the gateway.
pub const HEADER_CLIENT_IP_TOKEN: &str = "x-aimesh-client-ip-token";

/// The client's address, in every request's extensions once the auth layer has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress {
    pub ip: IpAddr,
    /// Vouched for by the gateway (which limited it per IP already), not the socket peer.
    pub attested: bool,
}

impl ClientAddress {
    /// The client's address of a request, when the auth layer found one.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<IpAddr> {
        request.extensions().get::<Self>().map(|client| client.ip)
    }

    /// The client of `request`: the address the gateway vouched for with `token`, else the
    /// socket peer.
    pub(super) fn from_request<B>(request: &http::Request<B>, token: Option<&DeploymentSecret>) -> Option<Self> {
        attested_ip(request.headers(), token)
            .map(|ip| Self { ip, attested: true })
            .or_else(|| peer_ip(request).map(|ip| Self { ip, attested: false }))
    }
}

/// The vouched address, when the headers carry one with the right token.
fn attested_ip(headers: &http::HeaderMap, token: Option<&DeploymentSecret>) -> Option<IpAddr> {
    let token = token?;
    let presented = headers.get(HEADER_CLIENT_IP_TOKEN)?.to_str().ok()?;
    if !token.matches(presented) {
        tracing::debug!("ignoring a client address vouched for with a wrong token");
        return None;
    }
    headers.get(HEADER_CLIENT_IP)?.to_str().ok()?.parse().ok()
}

/// The socket peer: tonic's connection info, or axum's when behind an axum router.
fn peer_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .or_else(|| extensions.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|info| info.0))
        .map(|address| address.ip())
}

/// Vouches for client addresses on outgoing calls: what the gateway adds to each call. Made
/// once, so a call costs no parsing of the token.
#[derive(Clone)]
pub struct ClientVoucher {
    token: tonic::metadata::AsciiMetadataValue,
}

impl std::fmt::Debug for ClientVoucher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientVoucher(..)")
    }
}

impl ClientVoucher {
    /// A voucher presenting `token`; none when the token is not a valid header value.
    pub fn new(token: &DeploymentSecret) -> Option<Self> {
        token.expose().parse().ok().map(|token| Self { token })
    }

    /// Adds `client` and the token to `request`.
    pub fn vouch<T>(&self, request: &mut tonic::Request<T>, client: IpAddr) {
        let metadata = request.metadata_mut();
        if let Ok(ip) = client.to_string().parse() {
            metadata.insert(HEADER_CLIENT_IP, ip);
        }
        metadata.insert(HEADER_CLIENT_IP_TOKEN, self.token.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&'static str, &str)]) -> http::Request<()> {
        let mut request = http::Request::new(());
        let peer: SocketAddr = "10.0.0.7:40000".parse().expect("peer");
        request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.parse().expect("header value"));
        }
        request
    }

    #[test]
    fn only_the_gateway_token_makes_a_vouched_address_count() {
        let token = DeploymentSecret::generate();
        let client: IpAddr = "198.51.100.9".parse().expect("ip");
        let mut outgoing = tonic::Request::new(());
        ClientVoucher::new(&token).expect("a valid token").vouch(&mut outgoing, client);
        let vouched = request(&[
            (HEADER_CLIENT_IP, "198.51.100.9"),
            (
                HEADER_CLIENT_IP_TOKEN,
                outgoing.metadata().get(HEADER_CLIENT_IP_TOKEN).and_then(|v| v.to_str().ok()).expect("token"),
            ),
        ]);
        assert_eq!(
            ClientAddress::from_request(&vouched, Some(&token)),
            Some(ClientAddress { ip: client, attested: true })
        );

        let peer = Some(ClientAddress { ip: "10.0.0.7".parse().expect("ip"), attested: false });
        assert_eq!(ClientAddress::from_request(&vouched, None), peer, "a service without a token trusts nobody");
        let other = DeploymentSecret::generate();
        assert_eq!(ClientAddress::from_request(&vouched, Some(&other)), peer, "another deployment's token");
        let forged = request(&[(HEADER_CLIENT_IP, "198.51.100.9"), (HEADER_CLIENT_IP_TOKEN, "guess")]);
        assert_eq!(ClientAddress::from_request(&forged, Some(&token)), peer);
        let bare = request(&[(HEADER_CLIENT_IP, "198.51.100.9")]);
        assert_eq!(ClientAddress::from_request(&bare, Some(&token)), peer);
    }
}
