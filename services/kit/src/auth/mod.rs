//! Authentication and access, shared by every service: a bearer credential (a login session's
//! access token or an API key) becomes a [`Principal`] ([`CredentialVerifier`]), and a
//! principal's access to a project is checked against its role there ([`ProjectAccess`]).
//!
//! Verification is cached in two levels (in-process, then Redis) through the kit cache, so a
//! repeated credential costs no network round trip. Revocation: identity invalidates the cached
//! verification (a versioned Redis delete plus a broadcast that drops every replica's in-process
//! copy; see the cache for why a verification loading at that moment cannot bring it back). A
//! revoked credential therefore stops working at once in normal operation; if the broadcast is lost it
//! stops within `auth.local_ttl_secs`, and if Redis was unreachable at revocation time within
//! `1.1 × auth.shared_ttl_secs + auth.local_ttl_secs` (shared lifetimes are jittered by ±10%).

mod access;
mod credentials;
mod last_use;
mod stream_access;
mod verifier;

pub use access::*;
pub use credentials::*;
pub use last_use::*;
pub use stream_access::*;
pub use verifier::*;
