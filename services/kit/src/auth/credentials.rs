//! What a caller presents and what it proves: the credential prefixes and shapes, the
//! [`Principal`] a verified credential becomes, the deployment's [`ServiceToken`], and the bearer
//! header. Plain types, with no store behind them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use aimesh_proto::identity::v1 as pb;

use crate::wire::error::ServiceError;
use crate::wire::proto_json;

/// Prefix of login-session access tokens.
pub const ACCESS_TOKEN_PREFIX: &str = "ams_";
/// Prefix of login-session refresh tokens (only `RefreshSession` accepts them).
pub const REFRESH_TOKEN_PREFIX: &str = "amr_";
/// Prefix of API keys.
pub const API_KEY_PREFIX: &str = "amk_";
/// Prefix of the service token, the credential services present to each other's internal RPCs.
pub const SERVICE_TOKEN_PREFIX: &str = "amsvc_";
/// No credential aimesh issues is longer; longer input is refused before hashing.
const MAX_CREDENTIAL_LEN: usize = 128;

/// The scopes an API key may carry. A session has them all; a key only those it was given.
pub const SCOPES: &[&str] = &[
    "identity:read",
    "chat:read",
    "chat:write",
    "usage:read",
    "usage:write",
    "files:read",
    "files:write",
    "analytics:read",
];

/// Who is calling, as verified from the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub user_id: Uuid,
    pub credential: CredentialRef,
    /// True for system administrators; never for API keys.
    pub system_admin: bool,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The credential a principal presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CredentialRef {
    Session {
        session_id: Uuid,
    },
    ApiKey {
        api_key_id: Uuid,
        project_id: Uuid,
        scopes: Vec<String>,
        /// Absent in verifications cached before limits existed: the defaults apply.
        #[serde(default)]
        rate_limits: KeyRateLimits,
    },
    /// Another aimesh service, holding the deployment's service token: accepted only by
    /// internal RPCs (see [`Principal::require_service`]), never by a project-scoped one.
    Service,
}

/// An API key's own rate limits and its project's, carried in the principal so the rate
/// limiter applies them without a lookup; none means the deployment's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyRateLimits {
    pub key_requests_per_minute: Option<u32>,
    pub project_requests_per_minute: Option<u32>,
}

impl Principal {
    /// The login session, when the caller used one.
    pub fn session_id(&self) -> Option<Uuid> {
        match &self.credential {
            CredentialRef::Session { session_id } => Some(*session_id),
            CredentialRef::ApiKey { .. } | CredentialRef::Service => None,
        }
    }

    /// The principal of a service presenting the service token.
    pub fn service() -> Self {
        Self { user_id: Uuid::nil(), credential: CredentialRef::Service, system_admin: false, expires_at: None }
    }

    /// Refuses everyone but another aimesh service: for internal RPCs.
    pub fn require_service(&self) -> Result<(), ServiceError> {
        match self.credential {
            CredentialRef::Service => Ok(()),
            _ => Err(ServiceError::permission_denied("this internal call is for aimesh services only")),
        }
    }

    /// Whether the credential allows `scope` at all (sessions allow every scope).
    pub fn has_scope(&self, scope: &str) -> bool {
        match &self.credential {
            CredentialRef::Session { .. } => true,
            CredentialRef::ApiKey { scopes, .. } => scopes.iter().any(|s| s == scope),
            CredentialRef::Service => false,
        }
    }

    /// Refuses API keys: for actions only a person logged in may take.
    pub fn require_session(&self) -> Result<Uuid, ServiceError> {
        self.session_id()
            .ok_or_else(|| ServiceError::permission_denied("this call needs a login session, not an API key"))
    }

    /// Refuses an API key of another project, or one without `scope`. Sessions pass; their
    /// project role is the owning service's to check.
    pub fn require_key_access(&self, project_id: Uuid, scope: &str) -> Result<(), ServiceError> {
        match &self.credential {
            CredentialRef::Session { .. } => Ok(()),
            CredentialRef::Service => {
                Err(ServiceError::permission_denied("the service token is for internal calls only"))
            }
            CredentialRef::ApiKey { project_id: own, .. } if *own != project_id => {
                Err(ServiceError::permission_denied("the API key belongs to another project"))
            }
            CredentialRef::ApiKey { .. } if !self.has_scope(scope) => {
                Err(ServiceError::permission_denied(format!("the API key lacks the scope {scope}")))
            }
            CredentialRef::ApiKey { .. } => Ok(()),
        }
    }
}

impl From<&Principal> for pb::Principal {
    fn from(p: &Principal) -> Self {
        let mut out = pb::Principal {
            user_id: p.user_id.to_string(),
            system_admin: p.system_admin,
            expire_time: proto_json::opt_timestamp(p.expires_at),
            ..Default::default()
        };
        match &p.credential {
            CredentialRef::Session { session_id } => {
                out.kind = pb::CredentialKind::Session.into();
                out.session_id = session_id.to_string();
            }
            CredentialRef::ApiKey { api_key_id, project_id, scopes, rate_limits } => {
                out.kind = pb::CredentialKind::ApiKey.into();
                out.api_key_id = api_key_id.to_string();
                out.project_id = project_id.to_string();
                out.scopes = scopes.clone();
                out.key_requests_per_minute = rate_limits.key_requests_per_minute.unwrap_or(0);
                out.project_requests_per_minute = rate_limits.project_requests_per_minute.unwrap_or(0);
            }
            CredentialRef::Service => out.kind = pb::CredentialKind::Service.into(),
        }
        out
    }
}

impl TryFrom<pb::Principal> for Principal {
    type Error = ServiceError;

    fn try_from(p: pb::Principal) -> Result<Self, ServiceError> {
        let uuid = |s: &str| Uuid::parse_str(s).map_err(|e| ServiceError::internal(format!("bad principal: {e}")));
        let credential = match p.kind() {
            pb::CredentialKind::Session => CredentialRef::Session { session_id: uuid(&p.session_id)? },
            pb::CredentialKind::ApiKey => CredentialRef::ApiKey {
                api_key_id: uuid(&p.api_key_id)?,
                project_id: uuid(&p.project_id)?,
                scopes: p.scopes,
                rate_limits: KeyRateLimits {
                    key_requests_per_minute: Some(p.key_requests_per_minute).filter(|&n| n > 0),
                    project_requests_per_minute: Some(p.project_requests_per_minute).filter(|&n| n > 0),
                },
            },
            pb::CredentialKind::Service => CredentialRef::Service,
            pb::CredentialKind::Unspecified => return Err(ServiceError::internal("principal without a kind")),
        };
        Ok(Self {
            user_id: uuid(&p.user_id)?,
            credential,
            system_admin: p.system_admin,
            expires_at: p.expire_time.as_ref().and_then(proto_json::from_timestamp),
        })
    }
}

/// The SHA-256 (hex) of a credential: what is stored and what caches are keyed by, never the
/// credential itself. Credentials are 256-bit random, so a fast hash is enough.
pub fn credential_hash(credential: &str) -> String {
    hex_encode(&Sha256::digest(credential.as_bytes()))
}

fn hex_encode(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Checks the outward shape of a credential before anything is looked up.
pub fn check_credential_shape(credential: &str, prefixes: &[&str]) -> Result<(), ServiceError> {
    let malformed = || ServiceError::unauthenticated("the credential is malformed");
    if credential.len() > MAX_CREDENTIAL_LEN || !prefixes.iter().any(|p| credential.starts_with(p)) {
        return Err(malformed());
    }
    if !credential.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(malformed());
    }
    Ok(())
}

/// The deployment's service token (`auth.service_token`): a shared secret every service holds,
/// presented as a bearer credential on service-to-service calls to internal RPCs. Never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServiceToken(String);

impl std::fmt::Debug for ServiceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceToken(..)")
    }
}

impl ServiceToken {
    /// A new random token, for a mesh running in one process with none configured.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(format!("{SERVICE_TOKEN_PREFIX}{}", hex_encode(&bytes)))
    }

    /// Refuses a token too short to be secret or without the prefix, naming the setting.
    pub fn validate(&self) -> Result<(), ServiceError> {
        if !self.0.starts_with(SERVICE_TOKEN_PREFIX) || self.0.len() < SERVICE_TOKEN_PREFIX.len() + 32 {
            return Err(ServiceError::invalid_field(
                "auth.service_token",
                format!("must be \"{SERVICE_TOKEN_PREFIX}\" followed by at least 32 random characters"),
            ));
        }
        check_credential_shape(&self.0, &[SERVICE_TOKEN_PREFIX])
            .map_err(|_| ServiceError::invalid_field("auth.service_token", "may hold only letters, digits, _ and -"))
    }

    /// The secret itself, to present it. Never log it, nor derive other keys from it: each
    /// purpose has its own secret ([`DeploymentSecret`]).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in constant time, so response times leak nothing of the token.
    pub(crate) fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }

    /// Adds the token as the bearer credential of an outgoing request.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), ServiceError> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| ServiceError::internal("auth.service_token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(())
    }

    /// Adds the token as the bearer credential of an outgoing request made on behalf of the end
    /// user holding `credential`, which goes in [`HEADER_ON_BEHALF_OF`]: the called service
    /// verifies both and acts as that user (see [`require_internal`]).
    pub fn authorize_on_behalf<T>(
        &self,
        request: &mut tonic::Request<T>,
        credential: &str,
    ) -> Result<(), ServiceError> {
        self.authorize(request)?;
        let value = format!("Bearer {credential}")
            .parse()
            .map_err(|_| ServiceError::unauthenticated("the credential is malformed"))?;
        request.metadata_mut().insert(HEADER_ON_BEHALF_OF, value);
        Ok(())
    }
}

/// Metadata: the end user's credential (`Bearer <credential>`) on a call another service makes
/// on that user's behalf, with the service token as `authorization`.
pub const HEADER_ON_BEHALF_OF: &str = "x-aimesh-on-behalf-of";

/// In the extensions of a request that presented the deployment's service token: the call came
/// from inside the mesh. Its principal is the end user's when the call was made on their behalf,
/// else [`Principal::service`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshCall;

/// Refuses a call that did not present the service token: the first check of every internal RPC.
pub fn require_internal<T>(request: &tonic::Request<T>) -> Result<(), ServiceError> {
    if request.extensions().get::<MeshCall>().is_some() {
        return Ok(());
    }
    if request.extensions().get::<Principal>().is_none() {
        return Err(ServiceError::unauthenticated("this internal call needs the service token"));
    }
    Err(ServiceError::permission_denied(format!(
        "this internal call is for aimesh services only: it needs the service token as authorization \
         (and the user's credential in {HEADER_ON_BEHALF_OF})"
    )))
}

/// A deployment-wide secret other than the service token (`auth.gateway_token`,
/// `auth.link_signing_key`): at least [`MIN_SECRET_LEN`] letters, digits, `_` or `-`. Each
/// purpose has its own, so one leaked secret does not open the others. Never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeploymentSecret(String);

/// The shortest [`DeploymentSecret`] accepted.
pub const MIN_SECRET_LEN: usize = 32;

impl std::fmt::Debug for DeploymentSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeploymentSecret(..)")
    }
}

impl DeploymentSecret {
    /// A new random secret (64 hex digits), for a mesh running in one process with none configured.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(hex_encode(&bytes))
    }

    /// A secret of `value`, unchecked: see [`DeploymentSecret::validate`].
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Refuses a secret too short or of other characters, naming the setting `field`.
    pub fn validate(&self, field: &'static str) -> Result<(), ServiceError> {
        if self.0.len() < MIN_SECRET_LEN {
            let message = format!("must be at least {MIN_SECRET_LEN} random characters");
            return Err(ServiceError::invalid_field(field, message));
        }
        if !self.0.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(ServiceError::invalid_field(field, "may hold only letters, digits, _ and -"));
        }
        Ok(())
    }

    /// The secret itself, to present or to key a MAC with. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in constant time, so response times leak nothing of the secret.
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The principal the auth layer put in the request, or UNAUTHENTICATED.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<&Principal, ServiceError> {
    request.extensions().get::<Principal>().ok_or_else(|| ServiceError::unauthenticated("this call needs a credential"))
}

/// The bearer credential of a request, as the auth layer found it.
#[derive(Clone)]
pub struct BearerCredential(pub String);

impl std::fmt::Debug for BearerCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerCredential(..)")
    }
}

/// The credential of an `authorization: Bearer <credential>` header (scheme case-insensitive,
/// surrounding spaces dropped), or `None` for any other shape.
pub fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credential.trim()).filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let ok = format!("{API_KEY_PREFIX}0123abcd_{}", "x".repeat(43));
        assert!(check_credential_shape(&ok, &[API_KEY_PREFIX]).is_ok());
        assert!(check_credential_shape(&ok, &[ACCESS_TOKEN_PREFIX]).is_err());
        assert!(check_credential_shape("amk_a b", &[API_KEY_PREFIX]).is_err());
        assert!(check_credential_shape(&format!("amk_{}", "a".repeat(200)), &[API_KEY_PREFIX]).is_err());
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(&http::HeaderValue::from_static("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&http::HeaderValue::from_static("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&http::HeaderValue::from_static("Basic abc")), None);
        assert_eq!(bearer(&http::HeaderValue::from_static("Bearer ")), None);
    }

    #[test]
    fn service_token() {
        let token = ServiceToken::generate();
        assert!(token.validate().is_ok());
        assert!(token.matches(&token.0));
        assert!(!token.matches(&ServiceToken::generate().0));
        assert!(!token.matches(SERVICE_TOKEN_PREFIX));
        let short = ServiceToken(format!("{SERVICE_TOKEN_PREFIX}abc"));
        assert_eq!(short.validate().map_err(|e| e.field), Err(Some("auth.service_token".into())));
        assert!(ServiceToken(format!("{API_KEY_PREFIX}{}", "a".repeat(40))).validate().is_err());
        assert!(format!("{token:?}").contains(".."), "the token never reaches a log");

        let service = Principal::service();
        assert!(service.require_service().is_ok());
        assert!(service.require_key_access(Uuid::new_v4(), "chat:read").is_err());
        assert!(!service.has_scope("chat:read"));
        assert_eq!(Principal::try_from(pb::Principal::from(&service)).ok(), Some(service));
    }

    #[test]
    fn api_key_scope_and_project() {
        let project = Uuid::new_v4();
        let principal = Principal {
            user_id: Uuid::new_v4(),
            credential: CredentialRef::ApiKey {
                api_key_id: Uuid::new_v4(),
                project_id: project,
                scopes: vec!["chat:read".into()],
                rate_limits: KeyRateLimits { key_requests_per_minute: Some(7), project_requests_per_minute: None },
            },
            system_admin: false,
            expires_at: None,
        };
        assert!(principal.require_key_access(project, "chat:read").is_ok());
        assert!(principal.require_key_access(project, "chat:write").is_err());
        assert!(principal.require_key_access(Uuid::new_v4(), "chat:read").is_err());
        assert!(principal.require_session().is_err());
        assert!(principal.require_service().is_err());
        let round = Principal::try_from(pb::Principal::from(&principal)).ok();
        assert_eq!(round, Some(principal));
    }
}
