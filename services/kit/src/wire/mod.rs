//! What crosses the wire: the one error type and its gRPC and HTTP mappings, field checks,
//! protobuf/JSON conversions, enums spelled the same in protobuf and the database, pagination.

pub mod error;
pub mod fields;
pub mod pagination;
pub mod proto_json;
pub mod spelled;
