//! The OpenAPI 3 document, generated from the same route table and descriptors the gateway
//! serves, with the proto comments as descriptions: it cannot drift from the routes.

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value as Json, json};

use crate::routes::{BodyRule, Route, RouteTable, parameter_name, resolve_field};
use crate::transcode::string_shaped;

/// The document for every route of `table`.
pub fn document(table: &RouteTable) -> Json {
    let mut schemas = Schemas::default();
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    for route in table.routes() {
        let operation = operation(route, &mut schemas);
        paths.entry(route.template.openapi_path()).or_default().insert(route.verb.as_str().to_owned(), operation);
    }
    let mut components = schemas.done;
    components.insert("aimesh.Error".into(), error_schema());
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "aimesh REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "REST/JSON in front of the aimesh gRPC services. Bodies follow the proto3 canonical \
                JSON mapping: lowerCamelCase names, 64-bit integers as strings, enums by name, fields at their \
                zero value left out. Every failure has the aimesh.Error shape.",
        },
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "a session access token or an API key" }
            },
            "schemas": components,
        },
    })
}

fn operation(route: &Route, schemas: &mut Schemas) -> Json {
    let method = &route.method;
    let input = method.input();
    let service = method.parent_service();
    let method_comment = comment(service.parent_file_descriptor_proto(), method.path());
    let mut parameters = Vec::new();
    let bound: Vec<&[String]> = route.template.variables().collect();
    for variable in &bound {
        if let Some(field) = resolve_field(&input, variable) {
            parameters.push(json!({
                "name": parameter_name(variable),
                "in": "path",
                "required": true,
                "schema": parameter_schema(schemas, &field),
            }));
        }
    }
    let body_field = match &route.body {
        BodyRule::Field(name) => Some(name.as_str()),
        _ => None,
    };
    if route.body != BodyRule::Whole {
        for field in input.fields() {
            let is_bound = bound.iter().any(|v| v.len() == 1 && v[0] == field.name());
            if is_bound || Some(field.name()) == body_field || !fits_query(&field) {
                continue;
            }
            let mut parameter = json!({
                "name": field.json_name(),
                "in": "query",
                "required": false,
                "schema": parameter_schema(schemas, &field),
            });
            if let Some(text) = comment(input.parent_file_descriptor_proto(), field.path()) {
                parameter["description"] = Json::String(text);
            }
            if field.is_list() {
                parameter["style"] = json!("form");
                parameter["explode"] = json!(true);
            }
            parameters.push(parameter);
        }
    }
    let mut operation = json!({
        "operationId": format!("{}_{}", service.name(), method.name()),
        "tags": [service.name()],
        "parameters": parameters,
        "responses": responses(route, schemas),
    });
    if let Some(text) = method_comment {
        operation["summary"] = Json::String(text.lines().next().unwrap_or_default().to_owned());
        operation["description"] = Json::String(text);
    }
    if route.method.is_client_streaming() {
        operation["requestBody"] = upload_body(route, &bound, schemas);
        return operation;
    }
    let body_schema = match &route.body {
        BodyRule::Whole => Some(schemas.message(&input)),
        BodyRule::Field(name) => input.get_field_by_name(name).map(|f| schemas.field(&f)),
        BodyRule::None => None,
    };
    if let Some(schema) = body_schema {
        operation["requestBody"] =
            json!({ "required": false, "content": { "application/json": { "schema": schema } } });
    }
    operation
}

/// A client-streaming upload takes the content either as the raw body or as the `file` part of
/// a form whose text parts carry the fields the query can (see the gateway's `upload_form`).
fn upload_body(route: &Route, bound: &[&[String]], schemas: &mut Schemas) -> Json {
    let input = route.method.input();
    let body_field = match &route.body {
        BodyRule::Field(name) => Some(name.as_str()),
        _ => None,
    };
    let mut properties = serde_json::Map::new();
    properties.insert(
        "file".into(),
        json!({
            "type": "string",
            "format": "binary",
            "description": "The content; its file name and Content-Type stand in for the name and MIME type when no field gives them.",
        }),
    );
    for field in input.fields() {
        if Some(field.name()) == body_field || field.is_list() || field.is_map() {
            continue;
        }
        let children: Vec<FieldDescriptor> = match field.kind() {
            Kind::Message(message) if !string_shaped(message.full_name()) => message.fields().collect(),
            _ => {
                if !bound.iter().any(|v| v.len() == 1 && v[0] == field.name()) {
                    properties.insert(field.json_name().to_owned(), form_field_schema(schemas, &field));
                }
                continue;
            }
        };
        for child in children.iter().filter(|child| fits_query(child) && !child.is_list()) {
            let is_bound = bound.iter().any(|v| v.len() == 2 && v[0] == field.name() && v[1] == child.name());
            if !is_bound {
                let name = format!("{}.{}", field.json_name(), child.json_name());
                properties.insert(name, form_field_schema(schemas, child));
            }
        }
    }
    json!({
        "required": true,
        "content": {
            "application/octet-stream": { "schema": { "type": "string", "format": "binary" } },
            "multipart/form-data": {
                "schema": { "type": "object", "properties": properties, "required": ["file"] },
                "encoding": { "file": { "contentType": "*/*" } },
            },
        },
    })
}

/// A form field's schema, with the field's proto comment as its description.
fn form_field_schema(schemas: &mut Schemas, field: &FieldDescriptor) -> Json {
    let schema = parameter_schema(schemas, field);
    match comment(field.parent_message().parent_file_descriptor_proto(), field.path()) {
        Some(text) => with_description(schema, text),
        None => schema,
    }
}

fn responses(route: &Route, schemas: &mut Schemas) -> Json {
    let output = route.method.output();
    let success = if !route.method.is_server_streaming() {
        json!({ "description": "OK", "content": { "application/json": { "schema": schemas.message(&output) } } })
    } else if output.get_field_by_name("data").is_some_and(|f| f.kind() == Kind::Bytes) {
        json!({
            "description": "The file, streamed; its media type is the one the service names.",
            "content": { "*/*": { "schema": { "type": "string", "format": "binary" } } },
        })
    } else {
        let event = schemas.message(&output);
        json!({
            "description": format!(
                "Server-Sent Events: `event: message` with `data:` a {} as JSON per message; on failure one \
                 `event: error` with `data:` an aimesh.Error, then the stream closes.",
                output.full_name()
            ),
            "content": { "text/event-stream": { "schema": { "type": "string" }, "x-event-schema": event } },
        })
    };
    let error = json!({
        "description": "The failure, with the HTTP status of the standard gRPC mapping.",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/aimesh.Error" } } },
    });
    json!({ "200": success, "default": error })
}

/// A parameter's schema; ids of resources (`project_id`, `session_id`, ...) are UUIDs, which
/// tells generated clients and test tools what a valid one looks like.
fn parameter_schema(schemas: &mut Schemas, field: &FieldDescriptor) -> Json {
    let mut schema = schemas.field(field);
    let is_resource_id = field.name() == "id" || field.name().ends_with("_id");
    if is_resource_id && field.kind() == Kind::String && !field.is_list() {
        schema["format"] = json!("uuid");
    }
    schema
}

/// Scalars, enums, repeated scalars and string-shaped well-known types can travel in a query.
fn fits_query(field: &FieldDescriptor) -> bool {
    if field.is_map() {
        return false;
    }
    match field.kind() {
        Kind::Message(message) => !field.is_list() && string_shaped(message.full_name()),
        _ => true,
    }
}

fn error_schema() -> Json {
    json!({
        "type": "object",
        "description": "Every failure: the gRPC code name, a stable machine-readable reason, a message for people.",
        "required": ["code", "reason", "message"],
        "properties": {
            "code": { "type": "string", "description": "google.rpc.Code name, such as INVALID_ARGUMENT" },
            "reason": { "type": "string", "description": "stable reason, such as SESSION_NOT_FOUND" },
            "message": { "type": "string" },
            "details": {
                "type": "object",
                "properties": {
                    "field": { "type": "string", "description": "the request field at fault" },
                    "retryAfterSeconds": { "type": "integer" },
                    "requestId": { "type": "string" },
                },
            },
        },
    })
}

/// The message schemas referenced so far.
#[derive(Default)]
struct Schemas {
    done: Map<String, Json>,
}

impl Schemas {
    /// A reference to the schema of `message`, generating it (and what it refers to) once.
    fn message(&mut self, message: &MessageDescriptor) -> Json {
        if let Some(schema) = well_known(message.full_name()) {
            return schema;
        }
        let name = message.full_name().to_owned();
        if !self.done.contains_key(&name) {
            self.done.insert(name.clone(), Json::Null); // reserves the name: recursion ends here
            let mut properties = Map::new();
            for field in message.fields() {
                let mut schema = self.field(&field);
                if let Some(text) = comment(message.parent_file_descriptor_proto(), field.path()) {
                    schema = with_description(schema, text);
                }
                properties.insert(field.json_name().to_owned(), schema);
            }
            let mut schema = json!({ "type": "object", "properties": properties, "additionalProperties": false });
            if let Some(text) = comment(message.parent_file_descriptor_proto(), message.path()) {
                schema["description"] = Json::String(text);
            }
            self.done.insert(name.clone(), schema);
        }
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }

    fn field(&mut self, field: &FieldDescriptor) -> Json {
        if field.is_map() {
            let entry = field.kind();
            let value = entry.as_message().map(MessageDescriptor::map_entry_value_field);
            let values = value.map_or(json!({}), |v| self.kind(&v.kind()));
            return json!({ "type": "object", "additionalProperties": values });
        }
        let single = self.kind(&field.kind());
        if field.is_list() { json!({ "type": "array", "items": single }) } else { single }
    }

    fn kind(&mut self, kind: &Kind) -> Json {
        match kind {
            Kind::Double | Kind::Float => json!({ "type": "number" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({ "type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX })
            }
            Kind::Uint32 | Kind::Fixed32 => json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX }),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({ "type": "string", "format": "int64", "pattern": "^-?[0-9]{1,18}$" })
            }
            Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]{1,19}$" }),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "format": "byte" }),
            Kind::Enum(e) => {
                json!({ "type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>() })
            }
            Kind::Message(message) => self.message(message),
        }
    }
}

/// The JSON forms the mapping gives well-known types.
fn well_known(full_name: &str) -> Option<Json> {
    Some(match full_name {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$" }),
        "google.protobuf.FieldMask" => {
            json!({ "type": "string", "description": "comma-separated lowerCamelCase field paths" })
        }
        "google.protobuf.Struct" => json!({ "type": "object", "additionalProperties": true }),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({ "type": "array", "items": {} }),
        "google.protobuf.Empty" => json!({ "type": "object", "additionalProperties": false }),
        "google.protobuf.StringValue" | "google.protobuf.BytesValue" => json!({ "type": "string", "nullable": true }),
        "google.protobuf.BoolValue" => json!({ "type": "boolean", "nullable": true }),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => json!({ "type": "integer", "nullable": true }),
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => json!({ "type": "string", "nullable": true }),
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({ "type": "number", "nullable": true }),
        _ => return None,
    })
}

fn with_description(schema: Json, text: String) -> Json {
    // A $ref cannot carry siblings in OpenAPI 3.0: wrap it.
    if schema.get("$ref").is_some() {
        json!({ "allOf": [schema], "description": text })
    } else {
        let mut schema = schema;
        schema["description"] = Json::String(text);
        schema
    }
}

/// The leading comment of the element at `path` of `file`, as the proto author wrote it.
fn comment(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let location = info.location.iter().find(|location| location.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let text = text.lines().map(str::trim).collect::<Vec<_>>().join("\n");
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::aimesh_pool;

    #[test]
    fn the_document_covers_every_route() {
        let pool = aimesh_pool().expect("descriptor set");
        let table = RouteTable::from_pool(&pool).expect("routes");
        let doc = document(&table);
        let paths = doc["paths"].as_object().expect("paths");
        let operations: usize = paths.values().map(|p| p.as_object().map_or(0, Map::len)).sum();
        assert_eq!(operations, table.routes().len());
        let append = &doc["paths"]["/v1/chat/sessions/{session_id}/messages"]["post"];
        assert_eq!(append["operationId"], "ChatService_AppendMessage");
        assert_eq!(append["parameters"][0]["in"], "path");
        let session = &doc["components"]["schemas"]["aimesh.chat.v1.Session"];
        assert_eq!(session["properties"]["messageCount"]["type"], "string", "int64 is a string in JSON");
        assert_eq!(session["properties"]["createTime"]["format"], "date-time");
        let list = &doc["paths"]["/v1/chat/sessions"]["get"]["parameters"];
        assert!(list.as_array().is_some_and(|p| p.iter().any(|p| p["name"] == "pageSize")));
        assert!(doc["components"]["schemas"].as_object().is_some_and(|s| s.values().all(|v| !v.is_null())));
    }
}
