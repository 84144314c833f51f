//! Calling the services: one lazily connected HTTP/2 channel per service, and a codec that
//! sends and receives dynamic messages, so any RPC in the descriptor set can be called.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

use aimesh_kit::ServiceError;

/// The channel of each service the gateway fronts, by short name (`identity`, `chat`, ...).
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    channels: HashMap<String, Channel>,
    urls: HashMap<String, String>,
}

impl Upstreams {
    /// Channels to `urls` (short name to `http://host:port`); they connect on first use.
    pub fn new(urls: impl IntoIterator<Item = (String, String)>) -> Result<Self, ServiceError> {
        let mut upstreams = Self::default();
        for (service, url) in urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| ServiceError::invalid_field(format!("gateway.{service}_url"), e.to_string()))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30));
            upstreams.channels.insert(service.clone(), endpoint.connect_lazy());
            upstreams.urls.insert(service, url);
        }
        Ok(upstreams)
    }

    /// The channel of `service`, or UNAVAILABLE when the gateway was given none.
    pub fn channel(&self, service: &str) -> Result<Channel, ServiceError> {
        self.channels.get(service).cloned().ok_or_else(|| {
            ServiceError::new(
                aimesh_kit::ErrorCode::Unavailable,
                "SERVICE_NOT_CONFIGURED",
                format!("the gateway has no address for the {service} service"),
            )
        })
    }

    /// Every configured service and its URL.
    pub fn services(&self) -> impl Iterator<Item = (&str, &str)> {
        self.urls.iter().map(|(name, url)| (name.as_str(), url.as_str()))
    }
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
