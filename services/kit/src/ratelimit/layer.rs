//! The tower layer applying [`RateLimiter`] to gRPC services, after authentication.

use std::net::{IpAddr, SocketAddr};

use super::{Decision, RateLimiter};
use crate::auth::Principal;
use crate::gate::{Entered, Gate, GateLayer};

/// Limits each request by the [`Principal`] the auth layer put in it (or, without one, by the
/// peer address), so it must sit inside [`crate::auth::AuthLayer`]. A denial answers
/// RESOURCE_EXHAUSTED with a `RetryInfo` detail; every limited response carries the
/// `ratelimit-*` headers (see [`Decision::headers`]).
pub type RateLimitLayer = GateLayer<RateLimiter>;

/// The caller's address: tonic's connection info, or axum's when behind an axum router.
fn peer_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .or_else(|| extensions.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|info| info.0))
        .map(|address| address.ip())
}

impl Gate for RateLimiter {
    /// The decision, for the headers of the response.
    type Pass = Decision;

    fn enter<B: Send + 'static>(&self, request: http::Request<B>) -> Entered<B, Decision> {
        let limits = self.limits_for(request.extensions().get::<Principal>(), peer_ip(&request), request.uri().path());
        let limiter = self.clone();
        Box::pin(async move {
            let decision = limiter.decide(&limits).await?;
            if decision.allowed { Ok((request, decision)) } else { Err(decision.status()) }
        })
    }

    fn leave<B>(decision: Decision, response: &mut http::Response<B>) {
        decision.write_headers(response.headers_mut());
    }
}
