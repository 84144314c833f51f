//! Settings of the REST gateway (`[gateway]` in the config file, `AIMESH_GATEWAY__*`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Where the HTTP server listens.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// Upper bound of a unary call, passed to the service as its gRPC deadline.
    pub request_timeout_secs: u64,
    /// Origins allowed by CORS (`*` for any); empty turns CORS off.
    pub cors_allowed_origins: Vec<String>,
    /// How often an idle Server-Sent Events stream sends a comment, so proxies keep it open.
    pub sse_keep_alive_secs: u64,
    /// Proxies in front of the gateway (an ingress), as addresses or CIDR ranges, whose
    /// `X-Forwarded-For` names the client; empty: the socket peer is the client.
    pub trusted_proxies: Vec<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout_secs: 30,
            cors_allowed_origins: Vec::new(),
            sse_keep_alive_secs: 15,
            trusted_proxies: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// Refuses settings the gateway could not start with, naming the first bad one.
    pub fn validate(&self) -> Result<(), aimesh_kit::ServiceError> {
        crate::client::TrustedProxies::parse(&self.trusted_proxies)?;
        for origin in self.cors_allowed_origins.iter().filter(|origin| *origin != "*") {
            if http::HeaderValue::from_str(origin).is_err() {
                let message = format!("{origin:?} is not an origin (scheme://host[:port])");
                return Err(aimesh_kit::ServiceError::invalid_field("gateway.cors_allowed_origins", message));
            }
        }
        Ok(())
    }
}
