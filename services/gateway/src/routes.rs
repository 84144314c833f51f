//! The route table: every RPC that carries a `google.api.http` option becomes a REST route. The
//! mapping is declared once, in the protos; nothing here names a service or a method.

use std::collections::HashMap;

use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

/// The HTTP methods a rule can bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Put,
    Post,
    Delete,
    Patch,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Put => "put",
            Self::Post => "post",
            Self::Delete => "delete",
            Self::Patch => "patch",
        }
    }

    fn from_http(method: &http::Method) -> Option<Self> {
        Some(match *method {
            http::Method::GET => Self::Get,
            http::Method::PUT => Self::Put,
            http::Method::POST => Self::Post,
            http::Method::DELETE => Self::Delete,
            http::Method::PATCH => Self::Patch,
            _ => return None,
        })
    }
}

/// Where the request message comes from besides the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRule {
    /// No body: the fields the path does not bind come from the query string.
    None,
    /// The body is the whole request message (`body: "*"`).
    Whole,
    /// The body is one field of the request (`body: "session"`); the rest from the query string.
    Field(String),
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{field}` or `{message.field}`: one path segment bound to a (possibly nested) field.
    Variable(Vec<String>),
}

/// A path template such as `/v1/chat/sessions/{session_id}:restore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    pub segments: Vec<Segment>,
    /// The custom verb after the last segment (`restore` above).
    pub verb: Option<String>,
}

impl PathTemplate {
    /// Parses the subset of the google.api.http template syntax aimesh uses: literal segments,
    /// `{field.path}` variables of one segment each, and a trailing `:verb`.
    pub fn parse(template: &str) -> Result<Self, String> {
        let rest = template.strip_prefix('/').ok_or_else(|| format!("{template}: must start with /"))?;
        let (path, verb) = match rest.rfind(':') {
            Some(at) if !rest[at..].contains('}') => (&rest[..at], Some(rest[at + 1..].to_owned())),
            _ => (rest, None),
        };
        let segments = path
            .split('/')
            .map(|segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(variable) if !variable.is_empty() && !variable.contains('=') => {
                    Ok(Segment::Variable(variable.split('.').map(str::to_owned).collect()))
                }
                Some(_) => Err(format!("{template}: unsupported variable {segment}")),
                None if segment.is_empty() || segment.contains(['{', '}']) => {
                    Err(format!("{template}: bad segment {segment:?}"))
                }
                None => Ok(Segment::Literal(segment.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { segments, verb })
    }

    /// The variables bound by `path` (already split from its query), or `None` if it does not
    /// match. Values are percent-decoded.
    pub fn matches(&self, path: &str) -> Option<Vec<(Vec<String>, String)>> {
        let mut rest = path.strip_prefix('/')?;
        if let Some(verb) = &self.verb {
            rest = rest.strip_suffix(verb.as_str())?.strip_suffix(':')?;
        }
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut bound = Vec::new();
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(literal) if literal == part => {}
                Segment::Literal(_) => return None,
                Segment::Variable(field) => {
                    let value = percent_decode(part)?;
                    // Without a custom verb in the template, a value may not smuggle one in.
                    if value.is_empty() || (self.verb.is_none() && value.contains(':')) {
                        return None;
                    }
                    bound.push((field.clone(), value));
                }
            }
        }
        Some(bound)
    }

    /// The template as written in OpenAPI: `{project_id}`; a nested field `{setting.key}` is
    /// named `{setting_key}`, since OpenAPI tools take path parameter names for identifiers.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            out.push('/');
            match segment {
                Segment::Literal(literal) => out.push_str(literal),
                Segment::Variable(field) => {
                    out.push('{');
                    out.push_str(&parameter_name(field));
                    out.push('}');
                }
            }
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// The variables, in order.
    pub fn variables(&self) -> impl Iterator<Item = &[String]> {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Variable(field) => Some(field.as_slice()),
            Segment::Literal(_) => None,
        })
    }

    /// More literal segments first, so `/v1/users/me` would win over `/v1/users/{user_id}`.
    fn specificity(&self) -> (bool, usize) {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        (self.verb.is_some(), literals)
    }
}

/// The OpenAPI name of a path variable bound to the (possibly nested) field `path`.
pub fn parameter_name(path: &[String]) -> String {
    path.join("_")
}

fn percent_decode(part: &str) -> Option<String> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = part.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One REST route: an HTTP method and path template bound to an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    pub verb: Verb,
    pub template: PathTemplate,
    pub body: BodyRule,
    pub method: MethodDescriptor,
    /// The aimesh service that serves it (`identity` for `aimesh.identity.v1`).
    pub service: String,
    /// Made once here, not per request.
    grpc_path: http::uri::PathAndQuery,
    label: String,
}

impl Route {
    /// The gRPC path, `/aimesh.chat.v1.ChatService/GetSession`.
    pub fn grpc_path(&self) -> &http::uri::PathAndQuery {
        &self.grpc_path
    }

    /// A stable label for metrics and logs: the template, not the concrete path.
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// What a request matched.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found(&'a Route, Vec<(Vec<String>, String)>),
    /// The path exists, but not with this HTTP method.
    WrongMethod,
    NotFound,
}

/// Every route of every service in the descriptor set.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Reads the `google.api.http` option of every method in `pool`.
    pub fn from_pool(pool: &DescriptorPool) -> Result<Self, String> {
        let extension = pool
            .get_extension_by_name("google.api.http")
            .ok_or("the descriptor set lacks google/api/annotations.proto")?;
        let mut routes = Vec::new();
        for service in pool.services() {
            let Some(short) = service.package_name().strip_prefix("aimesh.").and_then(|p| p.split('.').next()) else {
                continue;
            };
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&extension) {
                    continue; // internal: no REST route
                }
                let Value::Message(rule) = options.get_extension(&extension).into_owned() else {
                    return Err(format!("{}: google.api.http is not a message", method.full_name()));
                };
                let mut rules = vec![rule.clone()];
                if let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").map(|v| v.into_owned()) {
                    rules.extend(more.into_iter().filter_map(|v| v.as_message().cloned()));
                }
                for rule in rules {
                    routes.push(route_of(&rule, &method, short).map_err(|e| format!("{}: {e}", method.full_name()))?);
                }
            }
        }
        routes.sort_by_key(|route| std::cmp::Reverse(route.template.specificity()));
        let mut seen = HashMap::new();
        for route in &routes {
            if let Some(other) =
                seen.insert((route.verb, route.label().to_owned()), route.method.full_name().to_owned())
            {
                return Err(format!(
                    "{} and {other} both bind {} {}",
                    route.method.full_name(),
                    route.verb.as_str(),
                    route.label()
                ));
            }
        }
        Ok(Self { routes })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `method` and `path`.
    pub fn lookup(&self, method: &http::Method, path: &str) -> Lookup<'_> {
        let verb = Verb::from_http(method);
        let mut path_exists = false;
        for route in &self.routes {
            if let Some(bound) = route.template.matches(path) {
                if Some(route.verb) == verb {
                    return Lookup::Found(route, bound);
                }
                path_exists = true;
            }
        }
        if path_exists { Lookup::WrongMethod } else { Lookup::NotFound }
    }
}

fn route_of(rule: &DynamicMessage, method: &MethodDescriptor, service: &str) -> Result<Route, String> {
    let text =
        |name: &str| rule.get_field_by_name(name).and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let (verb, template) = [
        (Verb::Get, "get"),
        (Verb::Put, "put"),
        (Verb::Post, "post"),
        (Verb::Delete, "delete"),
        (Verb::Patch, "patch"),
    ]
    .into_iter()
    .find_map(|(verb, name)| rule.has_field_by_name(name).then(|| (verb, text(name))))
    .ok_or("only get, put, post, delete and patch rules are supported")?;
    let template = PathTemplate::parse(&template)?;
    let input = method.input();
    for variable in template.variables() {
        resolve_field(&input, variable)
            .ok_or_else(|| format!("path variable {} is not a field", variable.join(".")))?;
    }
    let body = match text("body").as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::Whole,
        field => {
            input.get_field_by_name(field).ok_or_else(|| format!("body {field} is not a field"))?;
            BodyRule::Field(field.to_owned())
        }
    };
    if method.is_client_streaming() && raw_body_field(method, &body).is_none() {
        return Err("a client-streaming RPC needs `body` naming a bytes field (the raw upload)".into());
    }
    let grpc_path = format!("/{}/{}", method.parent_service().full_name(), method.name())
        .parse()
        .map_err(|e| format!("bad gRPC path: {e}"))?;
    let label = template.openapi_path();
    Ok(Route { verb, template, body, method: method.clone(), service: service.to_owned(), grpc_path, label })
}

/// The bytes field a route's body names, if any: such a route takes the raw request body (any
/// content type), streamed as successive messages when the RPC is client-streaming.
pub fn raw_body_field(method: &MethodDescriptor, body: &BodyRule) -> Option<prost_reflect::FieldDescriptor> {
    let BodyRule::Field(name) = body else { return None };
    method.input().get_field_by_name(name).filter(|f| f.kind() == prost_reflect::Kind::Bytes && !f.is_list())
}

/// The field a dotted path names, through nested messages.
pub fn resolve_field(
    message: &prost_reflect::MessageDescriptor,
    path: &[String],
) -> Option<prost_reflect::FieldDescriptor> {
    let (last, parents) = path.split_last()?;
    let mut current = message.clone();
    for parent in parents {
        current = current.get_field_by_name(parent)?.kind().as_message()?.clone();
    }
    current.get_field_by_name(last)
}

/// The pool of every aimesh service's descriptors.
pub fn aimesh_pool() -> Result<DescriptorPool, prost_reflect::DescriptorError> {
    DescriptorPool::decode(aimesh_proto::FILE_DESCRIPTOR_SET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let pool = aimesh_pool().expect("descriptor set");
        RouteTable::from_pool(&pool).expect("route table")
    }

    #[test]
    fn templates() {
        let t = PathTemplate::parse("/v1/chat/sessions/{session_id}:restore").expect("parses");
        assert_eq!(t.verb.as_deref(), Some("restore"));
        assert_eq!(t.matches("/v1/chat/sessions/abc:restore"), Some(vec![(vec!["session_id".into()], "abc".into())]));
        assert_eq!(t.matches("/v1/chat/sessions/abc"), None);
        let plain = PathTemplate::parse("/v1/chat/sessions/{session_id}").expect("parses");
        assert_eq!(plain.matches("/v1/chat/sessions/abc:restore"), None);
        assert_eq!(plain.matches("/v1/chat/sessions/a%20b"), Some(vec![(vec!["session_id".into()], "a b".into())]));
        assert_eq!(plain.matches("/v1/chat/sessions/"), None);
        let nested = PathTemplate::parse("/v1/settings/{setting.key}").expect("parses");
        assert_eq!(nested.openapi_path(), "/v1/settings/{setting_key}");
        assert!(PathTemplate::parse("v1/x").is_err());
        assert!(PathTemplate::parse("/v1/{name=projects/*}").is_err());
    }

    #[test]
    fn every_public_rpc_has_a_route_and_internal_ones_none() {
        let table = table();
        let bound: Vec<String> = table.routes().iter().map(|route| route.grpc_path().to_string()).collect();
        for internal in [
            "/aimesh.identity.v1.AuthService/Authenticate",
            "/aimesh.identity.v1.AuthService/GetProjectRole",
            "/aimesh.usage.v1.UsageService/RecordUsage",
            "/aimesh.usage.v1.QuotaService/Reserve",
        ] {
            assert!(!bound.iter().any(|b| b == internal), "{internal} must stay internal");
        }
        for public in ["/aimesh.chat.v1.ChatService/WatchSession", "/aimesh.usage.v1.ModelService/ListModels"] {
            assert!(bound.iter().any(|b| b == public), "{public} needs a route");
        }
    }

    #[test]
    fn lookup_prefers_the_custom_verb_and_reports_wrong_methods() {
        let table = table();
        match table.lookup(&http::Method::POST, "/v1/chat/sessions/x:restore") {
            Lookup::Found(route, bound) => {
                assert_eq!(route.method.name(), "RestoreSession");
                assert_eq!(bound[0].1, "x");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(table.lookup(&http::Method::PUT, "/v1/chat/sessions/x"), Lookup::WrongMethod));
        assert!(matches!(table.lookup(&http::Method::GET, "/v2/nothing"), Lookup::NotFound));
    }
}
