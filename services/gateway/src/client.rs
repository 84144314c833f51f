//! Who the client is: the socket peer, or, when the peer is a trusted proxy (an ingress, a load
//! balancer), the address it saw, from `X-Forwarded-For`. Like Envoy's `xff_num_trusted_hops`
//! and nginx's `real_ip_recursive`, the list is read from the right and every hop that is
//! itself a trusted proxy is passed over: the first address that is not is the client, so a
//! client cannot choose its address by sending a header of its own.

use std::net::IpAddr;

use ipnet::IpNet;

use aimesh_kit::ServiceError;

/// The proxies whose `X-Forwarded-For` the gateway believes (`gateway.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses addresses (`10.0.0.7`) and ranges (`10.0.0.0/8`), naming the setting on error.
    pub fn parse(entries: &[String]) -> Result<Self, ServiceError> {
        entries
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry.parse::<IpNet>().or_else(|_| entry.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                    ServiceError::invalid_field(
                        "gateway.trusted_proxies",
                        format!("{entry:?} is neither an IP address nor a CIDR range"),
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        let mut client = peer;
        if !self.trusts(peer) {
            return client;
        }
        // Several X-Forwarded-For fields are one list, in order.
        let hops = headers.get_all("x-forwarded-for").iter().filter_map(|value| value.to_str().ok());
        let hops: Vec<&str> = hops.flat_map(|value| value.split(',')).map(str::trim).collect();
        for hop in hops.iter().rev() {
            // A hop that is not an address ends the trust: the proxy that wrote it is the client.
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, possibly with a port (`[::1]:80`, `1.2.3.4:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|address| address.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn forwarded(values: &[&str]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().expect("header value"));
        }
        headers
    }

    #[test]
    fn only_trusted_proxies_are_believed() {
        let none = TrustedProxies::default();
        assert_eq!(none.client_ip(ip("10.0.0.1"), &forwarded(&["203.0.113.5"])), ip("10.0.0.1"));

        let ingress = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.1".into()]).expect("valid");
        let headers = forwarded(&["203.0.113.5"]);
        assert_eq!(ingress.client_ip(ip("10.1.2.3"), &headers), ip("203.0.113.5"));
        assert_eq!(ingress.client_ip(ip("198.51.100.1"), &headers), ip("198.51.100.1"), "untrusted peer");
        // A client's own X-Forwarded-For ends up left of the address the ingress saw.
        let spoofed = forwarded(&["1.1.1.1, 203.0.113.5"]);
        assert_eq!(ingress.client_ip(ip("10.1.2.3"), &spoofed), ip("203.0.113.5"));
        // Chained trusted proxies are passed over, across several fields, ports allowed.
        let chained = forwarded(&["1.1.1.1", "203.0.113.5:4711, 192.0.2.1"]);
        assert_eq!(ingress.client_ip(ip("10.1.2.3"), &chained), ip("203.0.113.5"));
        let garbage = forwarded(&["203.0.113.5, not-an-ip"]);
        assert_eq!(ingress.client_ip(ip("10.1.2.3"), &garbage), ip("10.1.2.3"));
        assert_eq!(ingress.client_ip(ip("10.1.2.3"), &http::HeaderMap::new()), ip("10.1.2.3"));
    }

    #[test]
    fn a_bad_entry_names_the_setting() {
        let error = TrustedProxies::parse(&["10.0.0.0/33".into()]).expect_err("invalid");
        assert_eq!(error.field.as_deref(), Some("gateway.trusted_proxies"));
    }
}
