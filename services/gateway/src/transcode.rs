//! JSON to protobuf and back, by the proto3 canonical JSON mapping (prost-reflect's
//! implementation of it, driven by the descriptors: no hand-written serde per message).
//!
//! A request message is assembled as one JSON object from the body, the query string and the
//! path variables (path wins, as in grpc-gateway), then decoded once, so every mistake is
//! reported the same way: 400 with the JSON path of the offending field.

use std::borrow::Cow;

use prost_reflect::{DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions};
use serde_json::{Map, Value as Json};

use aimesh_kit::ServiceError;

use crate::routes::{BodyRule, Route, resolve_field};

/// The request message for `route` from the bound path variables, the raw query string and the
/// body.
pub fn request_message(
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, ServiceError> {
    let input = route.method.input();
    let mut root = match &route.body {
        BodyRule::Whole => match parse_body(body)? {
            Some(Json::Object(object)) => object,
            Some(_) => return Err(ServiceError::invalid_field("body", "must be a JSON object")),
            None => Map::new(),
        },
        BodyRule::Field(field) => {
            let descriptor =
                input.get_field_by_name(field).ok_or_else(|| ServiceError::internal("body field vanished"))?;
            let mut root = Map::new();
            if let Some(value) = parse_body(body)? {
                infer_update_mask(&input, &descriptor, &value, &mut root);
                root.insert(descriptor.json_name().to_owned(), value);
            }
            root
        }
        BodyRule::None => match parse_body(body)? {
            None => Map::new(),
            Some(Json::Object(object)) if object.is_empty() => Map::new(),
            Some(_) => return Err(ServiceError::invalid_field("body", "this route takes no body")),
        },
    };
    let query = form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    place_parameters(&mut root, route, query, "query", "is not a query parameter of this route")?;
    place_bound(&mut root, route, bound)
}

/// The first message of a multipart upload: the path and query as for a raw-body upload, plus
/// the form's text parts, named as the query parameters are (`metadata.name`).
pub fn upload_message(
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
    query: Option<&str>,
    form: &[(String, String)],
) -> Result<DynamicMessage, ServiceError> {
    let mut root = Map::new();
    let query = form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    place_parameters(&mut root, route, query, "query", "is not a query parameter of this route")?;
    let form = form.iter().map(|(name, value)| (name.as_str().into(), value.as_str().into()));
    place_parameters(&mut root, route, form, "form", "is not a field of this upload form")?;
    place_bound(&mut root, route, bound)
}

/// Named scalar values (query parameters, form fields) into `root`; a name that is no field of
/// the input (or is the body's field) is refused with `unknown`.
fn place_parameters<'a>(
    root: &mut Map<String, Json>,
    route: &Route,
    parameters: impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
    source: &'static str,
    unknown: &str,
) -> Result<(), ServiceError> {
    let input = route.method.input();
    for (name, value) in parameters {
        if name.is_empty() {
            return Err(ServiceError::invalid_field(source, "has a parameter without a name"));
        }
        let path: Vec<String> = name.split('.').map(str::to_owned).collect();
        let field = resolve_json_field(&input, &path)
            .filter(|_| route.body != BodyRule::Whole)
            .filter(|_| !matches!(&route.body, BodyRule::Field(body) if path.first().is_some_and(|p| is_field(&input, p, body))))
            .ok_or_else(|| ServiceError::invalid_field(name.as_ref(), unknown))?;
        let converted =
            scalar_json(&field, &value).map_err(|message| ServiceError::invalid_field(name.as_ref(), message))?;
        place(root, &input, &path, converted, field.is_list());
    }
    Ok(())
}

/// The path variables into `root` (they win over the query and the body, as in grpc-gateway),
/// then the whole decoded as the route's input.
fn place_bound(
    root: &mut Map<String, Json>,
    route: &Route,
    bound: Vec<(Vec<String>, String)>,
) -> Result<DynamicMessage, ServiceError> {
    let input = route.method.input();
    for (path, value) in bound {
        let field = resolve_field(&input, &path).ok_or_else(|| ServiceError::internal("path variable vanished"))?;
        let converted =
            scalar_json(&field, &value).map_err(|message| ServiceError::invalid_field(path.join("."), message))?;
        place(root, &input, &path, converted, false);
    }
    decode(&input, Json::Object(std::mem::take(root)))
}

/// Decodes `json` into a message of type `descriptor`; a mistake names its JSON path.
pub fn decode(descriptor: &MessageDescriptor, json: Json) -> Result<DynamicMessage, ServiceError> {
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(&json, &mut track);
    DynamicMessage::deserialize_with_options(descriptor.clone(), deserializer, &DeserializeOptions::new()).map_err(
        |error| {
            let path = track.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            ServiceError::invalid_field(field, error.to_string())
        },
    )
}

/// The canonical JSON of `message`. As in protojson and grpc-gateway, fields at their zero value
/// are left out: emitting them would also print unset timestamps as 1970-01-01.
pub fn encode(message: &DynamicMessage) -> Result<Vec<u8>, ServiceError> {
    let mut out = Vec::with_capacity(256);
    let mut serializer = serde_json::Serializer::new(&mut out);
    message.serialize_with_options(&mut serializer, &SerializeOptions::new()).map_err(ServiceError::internal)?;
    Ok(out)
}

fn parse_body(body: &[u8]) -> Result<Option<Json>, ServiceError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|error| ServiceError::invalid_field("body", format!("is not valid JSON: {}", error.inner())))?;
    Ok(Some(value))
}

/// Whether `name` (JSON or proto spelling) is the field `proto_name` of `message`.
fn is_field(message: &MessageDescriptor, name: &str, proto_name: &str) -> bool {
    field_by_any_name(message, name).is_some_and(|f| f.name() == proto_name)
}

fn field_by_any_name(message: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    message.get_field_by_json_name(name).or_else(|| message.get_field_by_name(name))
}

/// Resolves a dotted query name written in JSON or proto spelling.
fn resolve_json_field(message: &MessageDescriptor, path: &[String]) -> Option<FieldDescriptor> {
    let (last, parents) = path.split_last()?;
    let mut current = message.clone();
    for parent in parents {
        let field = field_by_any_name(&current, parent)?;
        if field.is_list() || field.is_map() {
            return None;
        }
        current = field.kind().as_message()?.clone();
    }
    let field = field_by_any_name(&current, last)?;
    (!field.is_map()).then_some(field)
}

/// A query or path value as the JSON the field expects. Numbers stay strings (the JSON mapping
/// accepts quoted numbers for every integer and float type), booleans become booleans, and
/// messages are accepted only where their JSON form is a string (Timestamp, Duration, FieldMask,
/// wrappers).
fn scalar_json(field: &FieldDescriptor, value: &str) -> Result<Json, String> {
    match field.kind() {
        Kind::Bool => match value {
            "true" => Ok(Json::Bool(true)),
            "false" => Ok(Json::Bool(false)),
            _ => Err("must be true or false".into()),
        },
        Kind::Message(message) if !string_shaped(message.full_name()) => {
            Err("cannot be given in the URL; send it in the body".into())
        }
        _ => Ok(Json::String(value.to_owned())),
    }
}

/// Well-known types whose JSON form is a string (or a scalar that a string can carry).
pub fn string_shaped(full_name: &str) -> bool {
    matches!(
        full_name,
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
    )
}

/// Puts `value` at the dotted `path` of `root` under JSON names, appending for repeated fields.
fn place(root: &mut Map<String, Json>, message: &MessageDescriptor, path: &[String], value: Json, repeated: bool) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut current_message = message.clone();
    let mut object = root;
    for parent in parents {
        let Some(field) = field_by_any_name(&current_message, parent) else { return };
        let Some(child) = field.kind().as_message().cloned() else { return };
        let slot = object.entry(field.json_name().to_owned()).or_insert_with(|| Json::Object(Map::new()));
        if !slot.is_object() {
            *slot = Json::Object(Map::new());
        }
        let Json::Object(next) = slot else { return };
        object = next;
        current_message = child;
    }
    let Some(field) = field_by_any_name(&current_message, last) else { return };
    let key = field.json_name().to_owned();
    if repeated {
        match object.entry(key).or_insert_with(|| Json::Array(Vec::new())) {
            Json::Array(items) => items.push(value),
            other => *other = Json::Array(vec![value]),
        }
    } else {
        object.insert(key, value);
    }
}

/// PATCH without an `update_mask`: the fields present in the body are the ones to change, as
/// grpc-gateway infers it, so REST clients can send just what they change.
fn infer_update_mask(
    input: &MessageDescriptor,
    body_field: &FieldDescriptor,
    body: &Json,
    root: &mut Map<String, Json>,
) {
    let Some(mask) = input.get_field_by_name("update_mask") else { return };
    if mask.kind().as_message().map(MessageDescriptor::full_name) != Some("google.protobuf.FieldMask") {
        return;
    }
    let (Json::Object(fields), Some(message)) = (body, body_field.kind().as_message().cloned()) else { return };
    let paths: Vec<String> = fields
        .keys()
        .map(|key| field_by_any_name(&message, key).map_or_else(|| key.clone(), |f| f.json_name().to_owned()))
        .collect();
    root.insert(mask.json_name().to_owned(), Json::String(paths.join(",")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{Lookup, RouteTable, aimesh_pool};

    fn transcode(method: http::Method, uri: &str, body: &str) -> Result<DynamicMessage, ServiceError> {
        let pool = aimesh_pool().expect("descriptor set");
        let table = RouteTable::from_pool(&pool).expect("routes");
        let (path, query) = uri.split_once('?').map_or((uri, None), |(p, q)| (p, Some(q)));
        let Lookup::Found(route, bound) = table.lookup(&method, path) else { panic!("no route for {uri}") };
        request_message(route, bound, query, body.as_bytes())
    }

    fn json_of(message: &DynamicMessage) -> Json {
        serde_json::from_slice(&encode(message).expect("encodes")).expect("json")
    }

    #[test]
    fn path_query_and_body_make_one_message() {
        let message = transcode(
            http::Method::GET,
            "/v1/chat/sessions?projectId=p1&status=SESSION_STATUS_ACTIVE&page_size=5&all_users=true",
            "",
        )
        .expect("valid");
        let json = json_of(&message);
        assert_eq!(json["projectId"], "p1");
        assert_eq!(json["status"], "SESSION_STATUS_ACTIVE");
        assert_eq!(json["pageSize"], 5);
        assert_eq!(json["allUsers"], true);

        let message = transcode(
            http::Method::POST,
            "/v1/chat/sessions/s1/messages",
            r#"{"sessionId":"other","content":"hi","role":"MESSAGE_ROLE_USER","attachmentIds":["a"]}"#,
        )
        .expect("valid");
        let json = json_of(&message);
        assert_eq!(json["sessionId"], "s1", "the path wins over the body");
        assert_eq!(json["attachmentIds"], serde_json::json!(["a"]));
    }

    #[test]
    fn patch_infers_the_update_mask_from_the_body() {
        let message = transcode(http::Method::PATCH, "/v1/chat/sessions/s1", r#"{"title":"t","system_prompt":"p"}"#)
            .expect("valid");
        assert_eq!(json_of(&message)["updateMask"], "systemPrompt,title");
        let explicit = transcode(
            http::Method::PATCH,
            "/v1/chat/sessions/s1?updateMask=title",
            r#"{"title":"t","systemPrompt":"p"}"#,
        )
        .expect("valid");
        assert_eq!(json_of(&explicit)["updateMask"], "title");
    }

    #[test]
    fn nested_path_variables() {
        let message = transcode(http::Method::PUT, "/v1/settings/site.name", r#"{"value":"x"}"#).expect("valid");
        assert_eq!(json_of(&message)["setting"]["key"], "site.name");
    }

    #[test]
    fn mistakes_name_the_field() {
        let field = |result: Result<DynamicMessage, ServiceError>| result.err().and_then(|e| e.field);
        assert_eq!(field(transcode(http::Method::POST, "/v1/chat/sessions", r#"{"bogus":1}"#)), Some("body".into()));
        let error = transcode(http::Method::POST, "/v1/chat/sessions", r#"{"bogus":1}"#).err().map(|e| e.message);
        assert!(error.is_some_and(|m| m.contains("bogus")));
        assert_eq!(field(transcode(http::Method::POST, "/v1/chat/sessions", r#"{"title":5}"#)), Some("title".into()));
        assert_eq!(
            field(transcode(http::Method::POST, "/v1/chat/sessions/s/messages", r#"{"tokens":"many"}"#)),
            Some("tokens".into())
        );
        assert_eq!(field(transcode(http::Method::GET, "/v1/chat/sessions?nope=1", "")), Some("nope".into()));
        // Found by the transcode fuzz target: the error named the empty string.
        assert_eq!(field(transcode(http::Method::GET, "/v1/chat/sessions?pageSize=5&=true", "")), Some("query".into()));
        assert_eq!(field(transcode(http::Method::GET, "/v1/chat/sessions?allUsers=yes", "")), Some("allUsers".into()));
        assert_eq!(field(transcode(http::Method::POST, "/v1/chat/sessions?title=x", "{}")), Some("title".into()));
        assert_eq!(field(transcode(http::Method::POST, "/v1/chat/sessions", "[1]")), Some("body".into()));
        assert_eq!(field(transcode(http::Method::POST, "/v1/chat/sessions", "{")), Some("body".into()));
        assert_eq!(field(transcode(http::Method::GET, "/v1/chat/sessions", r#"{"a":1}"#)), Some("body".into()));
    }
}
