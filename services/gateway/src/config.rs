//! Settings of the REST gateway (`[gateway]` in the config file, `AIMESH_GATEWAY__*`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Where the HTTP server listens.
    pub listen: SocketAddr,
    /// Where each service answers gRPC; `aimesh all` points them at its own listeners.
    pub identity_url: String,
    pub chat_url: String,
    pub usage_url: String,
    pub files_url: String,
    pub analytics_url: String,
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
            identity_url: "http://127.0.0.1:7101".into(),
            chat_url: "http://127.0.0.1:7102".into(),
            usage_url: "http://127.0.0.1:7103".into(),
            files_url: "http://127.0.0.1:7104".into(),
            analytics_url: "http://127.0.0.1:7105".into(),
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout_secs: 30,
            cors_allowed_origins: Vec::new(),
            sse_keep_alive_secs: 15,
            trusted_proxies: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// The upstream URL of every service, by short name.
    pub fn upstream_urls(&self) -> Vec<(String, String)> {
        vec![
            ("identity".into(), self.identity_url.clone()),
            ("chat".into(), self.chat_url.clone()),
            ("usage".into(), self.usage_url.clone()),
            ("files".into(), self.files_url.clone()),
            ("analytics".into(), self.analytics_url.clone()),
        ]
    }
}
