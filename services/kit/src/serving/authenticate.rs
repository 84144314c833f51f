//! The tower layer that authenticates every gRPC request: `authorization: Bearer <credential>`
//! becomes a [`crate::auth::Principal`] extension (and the credential a [`BearerCredential`] one).

use crate::auth::{BearerCredential, CredentialVerifier, bearer};
use crate::serving::gate::{Entered, Gate, GateLayer};
use crate::wire::error::ServiceError;

/// The tower layer: `authorization: Bearer <credential>` becomes a principal extension. A
/// request without one passes on without a principal (handlers that need one refuse it); a
/// credential that does not verify is refused here with UNAUTHENTICATED.
pub type AuthLayer = GateLayer<CredentialVerifier>;

impl Gate for CredentialVerifier {
    type Pass = ();

    fn enter<B: Send + 'static>(&self, mut request: http::Request<B>) -> Entered<B, ()> {
        let verifier = self.clone();
        Box::pin(async move {
            let credential = match request.headers().get(http::header::AUTHORIZATION) {
                None => return Ok((request, ())),
                Some(value) => bearer(value)
                    .map(str::to_owned)
                    .ok_or_else(|| ServiceError::unauthenticated("authorization must be \"Bearer <credential>\""))?,
            };
            let principal = verifier.verify(&credential).await?;
            tracing::Span::current().record("user_id", tracing::field::display(principal.user_id));
            request.extensions_mut().insert(principal);
            request.extensions_mut().insert(BearerCredential(credential));
            Ok((request, ()))
        })
    }
}
