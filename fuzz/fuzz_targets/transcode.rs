//! A REST request through the gateway's route table and JSON transcoding. The input is the
//! request line and the body: `METHOD /path?query\n<body>`.
//!
//! Properties: a message the gateway accepts encodes to JSON that decodes to the same message
//! (compared by its canonical JSON, which also holds for NaN floats); a refusal is
//! INVALID_ARGUMENT naming a field. Path templates parsed from the path never panic, and one
//! without variables matches its own text.
#![no_main]

use std::sync::OnceLock;

use aimesh_gateway::routes::{Lookup, PathTemplate, RouteTable, aimesh_pool};
use aimesh_gateway::transcode::{decode, encode, request_message};
use aimesh_kit::ErrorCode;
use libfuzzer_sys::fuzz_target;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let pool = aimesh_pool().expect("the descriptor set is built in");
        RouteTable::from_pool(&pool).expect("the built-in routes are valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(line) = std::str::from_utf8(line) else { return };
    let Some((method, target)) = line.split_once(' ') else { return };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));

    if let Ok(template) = PathTemplate::parse(path)
        && template.variables().next().is_none()
    {
        assert_eq!(template.matches(path), Some(Vec::new()), "{path:?} does not match itself");
    }

    let Lookup::Found(route, bound) = table().lookup(&method, path) else { return };
    match request_message(route, bound, query, body) {
        Ok(message) => {
            let json = encode(&message).expect("an accepted message encodes");
            let value: serde_json::Value = serde_json::from_slice(&json).expect("encode gives JSON");
            let decoded = decode(&route.method.input(), value).expect("the gateway's own JSON decodes");
            let again = encode(&decoded).expect("a decoded message encodes");
            assert_eq!(String::from_utf8_lossy(&json), String::from_utf8_lossy(&again), "round trip changed it");
        }
        Err(error) => {
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
            assert!(error.field.as_ref().is_some_and(|field| !field.is_empty()), "{error:?}");
        }
    }
});
