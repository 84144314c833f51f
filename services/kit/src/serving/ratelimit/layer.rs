//! The tower layer applying [`RateLimiter`] to gRPC services, after authentication.

use super::{ClientAddress, Decision, RateLimiter};
use crate::auth::{MeshCall, Principal};
use crate::serving::gate::{Entered, Gate, GateLayer};

/// Limits each request by the [`Principal`] the auth layer put in it (or, without one, by the
/// client address: see [`super::client`]), so it must sit inside
/// [`crate::serving::authenticate::AuthLayer`], which also found the [`ClientAddress`]. Calls
/// from the mesh ([`MeshCall`]) are not limited: their caller was. A denial answers RESOURCE_EXHAUSTED
/// with a `RetryInfo` detail; every limited response carries the `ratelimit-*` headers (see
/// [`Decision::headers`]).
pub type RateLimitLayer = GateLayer<RateLimiter>;

impl Gate for RateLimiter {
    /// The decision, for the headers of the response.
    type Pass = Decision;

    fn enter<B: Send + 'static>(&self, mut request: http::Request<B>) -> Entered<B, Decision> {
        let client = match request.extensions().get::<ClientAddress>() {
            Some(client) => Some(*client),
            None => self.client_of(&request),
        };
        // The gateway limited an attested address per IP already; counting it again here would
        // halve the budget.
        let unlimited_ip = client.filter(|client| !client.attested).map(|client| client.ip);
        let limits = if request.extensions().get::<MeshCall>().is_some() {
            Vec::new()
        } else {
            self.limits_for(request.extensions().get::<Principal>(), unlimited_ip, request.uri().path())
        };
        if let Some(client) = client {
            request.extensions_mut().insert(client);
        }
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
