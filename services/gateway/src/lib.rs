//! The REST gateway: JSON over HTTP in front of every public RPC of the mesh. Routes come from
//! the `google.api.http` options in the protos, bodies follow the proto3 JSON mapping, errors
//! have one shape, server-streaming RPCs become Server-Sent Events (or a plain download when
//! they stream a file), and `/openapi.json` describes it all from the same source.

pub mod client;
pub mod config;
pub mod openapi;
pub mod reply;
pub mod routes;
pub mod transcode;
pub mod upstream;

mod dispatch;
mod downloads;
mod server;
mod streams;
mod uploads;

pub use config::GatewayConfig;
pub use server::run;
