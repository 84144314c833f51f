//! Serving gRPC: the server and its layers (observation, authentication, rate limits, write
//! positions for read-your-writes), the
//! background loops, and the runtime every service starts through.

pub mod authenticate;
pub mod gate;
pub mod periodic;
pub mod ratelimit;
pub mod read_your_writes;
pub mod runtime;
pub mod server;
