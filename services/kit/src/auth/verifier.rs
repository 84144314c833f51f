//! Turning a bearer credential into a [`Principal`], through the two-level cache: identity's
//! own store in the identity service, identity's `Authenticate` RPC everywhere else.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;

use aimesh_proto::identity::v1 as pb;

use super::credentials::{
    ACCESS_TOKEN_PREFIX, API_KEY_PREFIX, Principal, SERVICE_TOKEN_PREFIX, ServiceToken, check_credential_shape,
    credential_hash,
};
use super::last_use::LastUseRecorder;
use crate::config::AuthConfig;
use crate::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache};
use crate::data::redis::Redis;
use crate::wire::error::ServiceError;

/// Where verifications come from when no cache has them: identity's own store in the identity
/// service, identity's `Authenticate` RPC everywhere else. `Ok(None)`: unknown, revoked or expired.
pub trait CredentialSource: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, credential: &'a str) -> BoxFuture<'a, Result<Option<Principal>, ServiceError>>;
}

/// Asks the identity service over gRPC, presenting the service token (`Authenticate` is internal).
#[derive(Debug, Clone)]
pub struct RemoteCredentialSource {
    client: IdentityClient,
    token: ServiceToken,
}

/// A lazily connecting client of identity's `AuthService` at `url` (`services.identity`).
pub fn identity_client(url: &str) -> Result<IdentityClient, ServiceError> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| ServiceError::internal(format!("services.identity: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(pb::auth_service_client::AuthServiceClient::new(channel))
}

/// A client of identity's `AuthService`; clones share one connection.
pub type IdentityClient = pb::auth_service_client::AuthServiceClient<tonic::transport::Channel>;

impl RemoteCredentialSource {
    /// Asks identity through `client`, presenting `token`.
    pub fn new(client: IdentityClient, token: ServiceToken) -> Self {
        Self { client, token }
    }
}

impl CredentialSource for RemoteCredentialSource {
    fn authenticate<'a>(&'a self, credential: &'a str) -> BoxFuture<'a, Result<Option<Principal>, ServiceError>> {
        Box::pin(async move {
            let mut request = tonic::Request::new(pb::AuthenticateRequest { credential: credential.to_owned() });
            self.token.authorize(&mut request)?;
            crate::telemetry::inject_current_context(request.metadata_mut());
            match self.client.clone().authenticate(request).await {
                Ok(response) => Principal::try_from(response.into_inner()).map(Some),
                Err(status) if status.code() == tonic::Code::Unauthenticated => Ok(None),
                Err(status) => Err(ServiceError::from_status(&status)),
            }
        })
    }
}

/// Turns a bearer credential into a principal, through the two-level cache.
#[derive(Clone)]
pub struct CredentialVerifier {
    service_token: Option<ServiceToken>,
    cache: TwoLevelCache<Principal>,
    source: Arc<dyn CredentialSource>,
    last_use: LastUseRecorder,
}

impl std::fmt::Debug for CredentialVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialVerifier").finish_non_exhaustive()
    }
}

impl CredentialVerifier {
    pub fn new(redis: Redis, bus: &InvalidationBus, settings: &AuthConfig, source: Arc<dyn CredentialSource>) -> Self {
        let cache_settings = CacheSettings {
            local_ttl: Duration::from_secs(settings.local_ttl_secs),
            shared_ttl: Duration::from_secs(settings.shared_ttl_secs),
            negative_ttl: Duration::from_secs(settings.local_ttl_secs.min(5)),
            local_capacity: 100_000,
        };
        let last_use = LastUseRecorder::new(redis.clone());
        Self {
            service_token: settings.service_token.clone(),
            cache: TwoLevelCache::new("credentials", "identity", redis, bus, cache_settings),
            source,
            last_use,
        }
    }

    /// The principal `credential` stands for, or UNAUTHENTICATED.
    pub async fn verify(&self, credential: &str) -> Result<Principal, ServiceError> {
        if credential.starts_with(SERVICE_TOKEN_PREFIX) {
            return match &self.service_token {
                Some(token) if token.matches(credential) => Ok(Principal::service()),
                _ => Err(ServiceError::unauthenticated("the service token is not this deployment's")),
            };
        }
        check_credential_shape(credential, &[ACCESS_TOKEN_PREFIX, API_KEY_PREFIX])?;
        let key = credential_hash(credential);
        let source = Arc::clone(&self.source);
        let principal = self
            .cache
            .get_or_load(&key, || async move { source.authenticate(credential).await })
            .await?
            .ok_or_else(|| ServiceError::unauthenticated("the credential is unknown, expired or revoked"))?;
        if principal.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(ServiceError::unauthenticated("the credential has expired"));
        }
        self.last_use.record(&principal);
        Ok(Principal::clone(&principal))
    }

    /// The deployment's service token, when it has one.
    pub fn service_token(&self) -> Option<&ServiceToken> {
        self.service_token.as_ref()
    }

    /// Forgets the cached verification of the credential with this hash, on every replica.
    pub async fn invalidate(&self, hash: &str) {
        self.cache.invalidate_or_log(hash).await;
    }

    /// The recorder of last-use times, to flush at shutdown.
    pub fn last_use(&self) -> &LastUseRecorder {
        &self.last_use
    }
}
