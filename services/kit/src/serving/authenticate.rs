//! The tower layer that authenticates every gRPC request: `authorization: Bearer <credential>`
//! becomes a [`crate::auth::Principal`] extension (and the credential a [`BearerCredential`] one).
//!
//! Before any credential is looked up, the client address must have failed authentications left
//! (`rate_limit.per_ip_failed_auth`); a credential that does not verify costs it one. The
//! address is the one the gateway vouched for, else the socket peer; an address the gateway
//! vouched for is the gateway's to count (see [`crate::serving::ratelimit`]).
//!
//! A call presenting the service token is marked [`MeshCall`]. When it also carries
//! [`HEADER_ON_BEHALF_OF`], the end user's credential, that one is verified too and the request's
//! principal is the end user's: internal RPCs made on a user's behalf act as that user.

use crate::auth::{
    BearerCredential, CredentialRef, CredentialVerifier, HEADER_ON_BEHALF_OF, MeshCall, SERVICE_TOKEN_PREFIX, bearer,
};
use crate::serving::gate::{Entered, Gate, GateLayer};
use crate::serving::ratelimit::RateLimiter;
use crate::wire::error::{ErrorCode, ServiceError};

/// The tower layer: `authorization: Bearer <credential>` becomes a principal extension. A
/// request without one passes on without a principal (handlers that need one refuse it); a
/// credential that does not verify is refused here with UNAUTHENTICATED, and a client address
/// out of failed authentications with RESOURCE_EXHAUSTED before its credential is looked at.
pub type AuthLayer = GateLayer<Authenticator>;

/// What the auth layer verifies with: the credential verifier, and the limiter counting the
/// failed authentications of each client address.
#[derive(Clone, Debug)]
pub struct Authenticator {
    verifier: CredentialVerifier,
    limiter: RateLimiter,
}

impl Authenticator {
    /// Verifies with `verifier`, counting failures in `limiter` (which knows whose vouched
    /// client addresses to believe).
    pub fn new(verifier: CredentialVerifier, limiter: RateLimiter) -> Self {
        Self { verifier, limiter }
    }

    /// Puts the principal (and credential) of the request's credentials in its extensions.
    async fn authenticate<B>(&self, request: &mut http::Request<B>) -> Result<(), Refusal> {
        let headers = request.headers();
        let credential = match headers.get(http::header::AUTHORIZATION) {
            Some(value) => bearer(value).map(str::to_owned).ok_or_else(|| {
                Refusal::failed(ServiceError::unauthenticated("authorization must be \"Bearer <credential>\""))
            })?,
            None => {
                let message = format!("{HEADER_ON_BEHALF_OF} needs the service token as authorization");
                return Err(Refusal::failed(ServiceError::unauthenticated(message)));
            }
        };
        let on_behalf = headers.get(HEADER_ON_BEHALF_OF).cloned();
        let principal = self.verifier.verify(&credential).await.map_err(Refusal::failed)?;
        let from_mesh = principal.credential == CredentialRef::Service;
        let (principal, credential) = match on_behalf {
            None => (principal, credential),
            Some(_) if !from_mesh => {
                let message = format!("{HEADER_ON_BEHALF_OF} is only for calls presenting the service token");
                return Err(Refusal::failed(ServiceError::unauthenticated(message)));
            }
            // Another service vouches for having verified the user already: a failure here is
            // a revocation racing the call, not an attack from the calling service's address.
            Some(value) => {
                let user_credential = bearer(&value)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        ServiceError::unauthenticated(format!("{HEADER_ON_BEHALF_OF} must be \"Bearer <credential>\""))
                    })
                    .map_err(Refusal::trusted)?;
                let user = self.verifier.verify(&user_credential).await.map_err(Refusal::trusted)?;
                (user, user_credential)
            }
        };
        tracing::Span::current().record("user_id", tracing::field::display(principal.user_id));
        let extensions = request.extensions_mut();
        if from_mesh {
            extensions.insert(MeshCall);
        }
        extensions.insert(principal);
        extensions.insert(BearerCredential(credential));
        Ok(())
    }
}

/// Why a request was refused, and whether it counts as a failed authentication of its client.
struct Refusal {
    error: ServiceError,
    counts: bool,
}

impl Refusal {
    /// A refusal that costs the client one failed authentication when it is UNAUTHENTICATED
    /// (other errors, such as identity being unreachable, are not the client's failure).
    fn failed(error: ServiceError) -> Self {
        let counts = error.code == ErrorCode::Unauthenticated;
        Self { error, counts }
    }

    /// A refusal of a call that presented the service token: never counted.
    fn trusted(error: ServiceError) -> Self {
        Self { error, counts: false }
    }
}

impl Gate for Authenticator {
    type Pass = ();

    fn enter<B: Send + 'static>(&self, mut request: http::Request<B>) -> Entered<B, ()> {
        let auth = self.clone();
        Box::pin(async move {
            let client = auth.limiter.client_of(&request);
            if let Some(client) = client {
                request.extensions_mut().insert(client);
            }
            let headers = request.headers();
            if !headers.contains_key(http::header::AUTHORIZATION) && !headers.contains_key(HEADER_ON_BEHALF_OF) {
                return Ok((request, ()));
            }
            // The gateway looks at and counts the failures of an address it vouched for.
            let counted = client.filter(|client| !client.attested).map(|client| client.ip);
            // The service token is checked without a lookup, so the mesh's own calls need no
            // budget (and a flood from a service's address does not stop them); a wrong one
            // still counts as a failure below.
            let presents_service_token = headers
                .get(http::header::AUTHORIZATION)
                .and_then(bearer)
                .is_some_and(|credential| credential.starts_with(SERVICE_TOKEN_PREFIX));
            if let Some(ip) = counted.filter(|_| !presents_service_token) {
                let decision = auth.limiter.admit_credential(ip).await?;
                if !decision.allowed {
                    return Err(decision.status());
                }
            }
            match auth.authenticate(&mut request).await {
                Ok(()) => Ok((request, ())),
                Err(refusal) => {
                    if let Some(ip) = counted.filter(|_| refusal.counts) {
                        auth.limiter.charge_failed_auth(ip).await;
                    }
                    Err(refusal.error.into())
                }
            }
        })
    }
}
