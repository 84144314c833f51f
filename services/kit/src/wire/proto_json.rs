//! Conversions between protobuf well-known types and their domain counterparts
//! (`Struct`/`Value` and JSON, `Timestamp` and `DateTime<Utc>`).

use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};

/// A JSON value as a protobuf `Value`.
pub fn json_to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => {
            Kind::ListValue(ListValue { values: items.iter().map(json_to_value).collect() })
        }
        serde_json::Value::Object(map) => Kind::StructValue(json_object_to_struct(map)),
    };
    Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct`.
pub fn json_object_to_struct(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct { fields: map.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect() }
}

/// A JSON object as a protobuf `Struct`; anything else (null included) as none.
pub fn json_to_struct(json: &serde_json::Value) -> Option<Struct> {
    match json {
        serde_json::Value::Object(map) => Some(json_object_to_struct(map)),
        _ => None,
    }
}

/// A protobuf `Value` as JSON. Non-finite numbers, which JSON cannot hold, become null.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => serde_json::Value::Array(list.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// A protobuf `Struct` as a JSON object.
pub fn struct_to_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect())
}

/// A time as a protobuf `Timestamp`.
pub fn timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: time.timestamp(), nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0) }
}

/// An optional time as an optional `Timestamp`.
pub fn opt_timestamp(time: Option<DateTime<Utc>>) -> Option<Timestamp> {
    time.map(timestamp)
}

/// A `Timestamp` as a time; `None` when it is out of range.
pub fn from_timestamp(ts: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let json = serde_json::json!({"a": [1.5, true, null, "x"], "b": {"c": 2.0}});
        let serde_json::Value::Object(map) = &json else { panic!("object") };
        assert_eq!(struct_to_json(&json_object_to_struct(map)), json);
    }

    #[test]
    fn timestamp_round_trip() {
        let now = Utc::now();
        assert_eq!(from_timestamp(&timestamp(now)), Some(now));
        assert_eq!(from_timestamp(&Timestamp { seconds: 0, nanos: -1 }), None);
    }
}
