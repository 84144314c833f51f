//! Calling the services: one HTTP/2 connection per service, opened on first use and shared by
//! every call, and a codec that sends and receives dynamic messages, so any RPC in the
//! descriptor set can be called.
//!
//! The connection is hyper's HTTP/2 client, not tonic's `Channel`: a `Channel` queues every call
//! through a buffer task before it reaches the connection, one more task hop per request on the
//! gateway's hot path; hyper's client hands the request to the connection directly.

use std::collections::HashMap;
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_health::pb::health_client::HealthClient;

use aimesh_kit::ServiceError;
use aimesh_kit::config::{ServiceUrls, service_origin};

/// The HTTP/2 client every service is called through, failures already classified as statuses.
pub type Connection = tower::util::MapErr<
    Client<HttpConnector, tonic::body::Body>,
    fn(hyper_util::client::legacy::Error) -> tonic::Status,
>;

/// The service of each REST route, by short name (`identity`, `chat`, ...).
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    upstreams: HashMap<String, Upstream>,
}

/// One service: the connection to it and where it is.
#[derive(Debug, Clone)]
pub struct Upstream {
    connection: Connection,
    origin: Uri,
}

impl Upstreams {
    /// Clients of the services at `urls`; they connect on first use.
    pub fn new(urls: &ServiceUrls) -> Result<Self, ServiceError> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(connector);
        let connection: Connection = tower::ServiceExt::map_err(client, classify);
        let mut upstreams = Self::default();
        for (service, url) in urls.all() {
            let origin =
                service_origin(url).map_err(|e| ServiceError::invalid_field(format!("services.{service}"), e))?;
            upstreams.upstreams.insert(service.to_owned(), Upstream { connection: connection.clone(), origin });
        }
        Ok(upstreams)
    }

    /// The client of `service`, or UNAVAILABLE when the gateway was given no address for it.
    pub fn get(&self, service: &str) -> Result<&Upstream, ServiceError> {
        self.upstreams.get(service).ok_or_else(|| {
            ServiceError::new(
                aimesh_kit::ErrorCode::Unavailable,
                "SERVICE_NOT_CONFIGURED",
                format!("the gateway has no address for the {service} service"),
            )
        })
    }

    /// Every configured service by short name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Upstream)> {
        self.upstreams.iter().map(|(name, upstream)| (name.as_str(), upstream))
    }
}

impl Upstream {
    /// A gRPC client of this service.
    pub fn grpc(&self) -> Grpc<Connection> {
        Grpc::with_origin(self.connection.clone(), self.origin.clone())
    }

    /// A grpc.health.v1 client of this service.
    pub fn health(&self) -> HealthClient<Connection> {
        HealthClient::with_origin(self.connection.clone(), self.origin.clone())
    }
}

/// A failure of the connection, not of the call: what tonic recognises in it (a reset stream, a
/// keep-alive timeout, a cancellation) keeps its code; the rest (no connection could be made, or
/// it was lost before the answer) is UNAVAILABLE, so callers retry, as Envoy answers 503 to an
/// upstream connect failure or reset.
fn classify(error: hyper_util::client::legacy::Error) -> tonic::Status {
    tonic::Status::try_from_error(Box::new(error)).unwrap_or_else(|error| {
        tonic::Status::unavailable(format!("the service cannot be reached or the connection to it was lost: {error}"))
    })
}

/// A tonic codec for messages known only by their descriptor.
#[derive(Debug, Clone)]
pub struct DynamicCodec {
    output: MessageDescriptor,
}

impl DynamicCodec {
    /// Decodes responses as `output`.
    pub fn new(output: MessageDescriptor) -> Self {
        Self { output }
    }
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder(self.output.clone())
    }
}

/// Encodes a dynamic request.
#[derive(Debug)]
pub struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst).map_err(|e| tonic::Status::internal(format!("encoding the request: {e}")))
    }
}

/// Decodes a dynamic response of one message type.
#[derive(Debug)]
pub struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding the response: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_url_is_an_http_origin_and_a_bad_one_names_its_setting() {
        let urls = ServiceUrls { chat: "http://aimesh-chat:7102".into(), ..ServiceUrls::default() };
        let upstreams = Upstreams::new(&urls).expect("origins");
        assert_eq!(upstreams.get("chat").expect("chat").origin, "http://aimesh-chat:7102");
        assert!(upstreams.get("search").is_err(), "a service without an address is not made up");
        for bad in ["aimesh-chat:7102", "https://aimesh-chat:7102", "http://aimesh-chat:7102/v1", "http://"] {
            let error = Upstreams::new(&ServiceUrls { chat: bad.into(), ..urls.clone() }).expect_err(bad);
            assert_eq!(error.field.as_deref(), Some("services.chat"), "{bad}");
        }
    }
}
