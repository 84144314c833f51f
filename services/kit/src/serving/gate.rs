//! One tower layer for the steps every request passes before its handler (authentication, rate
//! limiting): a [`Gate`] may refuse a request with a gRPC status, let it pass (changed or not),
//! and amend the response of a request it let pass.

use std::task::{Context, Poll};

use futures::future::BoxFuture;

/// What [`Gate::enter`] answers: the request that passed with what it leaves for
/// [`Gate::leave`], or the status refusing it.
pub type Entered<B, P> = BoxFuture<'static, Result<(http::Request<B>, P), tonic::Status>>;

/// A step before the handler.
pub trait Gate: Clone + Send + Sync + 'static {
    /// What a passed request leaves for [`Gate::leave`].
    type Pass: Send + 'static;

    /// Lets `request` pass (returning it, possibly changed) or refuses it.
    fn enter<B: Send + 'static>(&self, request: http::Request<B>) -> Entered<B, Self::Pass>;

    /// Amends the handler's response to a request that passed.
    fn leave<B>(pass: Self::Pass, response: &mut http::Response<B>) {
        let _ = (pass, response);
    }
}

/// The layer putting `G` in front of a service.
#[derive(Clone, Debug)]
pub struct GateLayer<G> {
    gate: G,
}

impl<G> GateLayer<G> {
    pub fn new(gate: G) -> Self {
        Self { gate }
    }
}

impl<S, G: Clone> tower::Layer<S> for GateLayer<G> {
    type Service = Gated<S, G>;

    fn layer(&self, inner: S) -> Self::Service {
        Gated { inner, gate: self.gate.clone() }
    }
}

/// A service behind a gate.
#[derive(Clone, Debug)]
pub struct Gated<S, G> {
    inner: S,
    gate: G,
}

impl<S, G, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Gated<S, G>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    G: Gate,
    ReqBody: Send + 'static,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The clone is not ready; the ready one serves this request (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let entered = self.gate.enter(request);
        Box::pin(async move {
            let (request, pass) = match entered.await {
                Ok(passed) => passed,
                Err(status) => return Ok(status.into_http()),
            };
            let mut response = inner.call(request).await?;
            G::leave(pass, &mut response);
            Ok(response)
        })
    }
}
