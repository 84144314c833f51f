//! A small HTTP/1.1 client of the gateway for the end-to-end tests: one connection per request,
//! the raw status, headers and body, and bodies read as they stream (Server-Sent Events).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// The gateway at an address.
#[derive(Debug, Clone)]
pub struct Rest {
    address: SocketAddr,
}

/// A finished response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Panics unless the status is `status`, showing the body.
    #[track_caller]
    pub fn expect(self, status: StatusCode) -> Self {
        assert_eq!(self.status, status, "body: {}", String::from_utf8_lossy(&self.body));
        self
    }
}

/// A request being built.
#[derive(Debug)]
pub struct Call {
    address: SocketAddr,
    request: http::request::Builder,
    body: Bytes,
}

impl Rest {
    pub fn new(address: SocketAddr) -> Self {
        Self { address }
    }

    /// A request of `method` to `path_and_query`.
    pub fn call(&self, method: Method, path_and_query: &str) -> Call {
        let request = Request::builder().method(method).uri(path_and_query).header("host", self.address.to_string());
        Call { address: self.address, request, body: Bytes::new() }
    }

    pub fn get(&self, path: &str) -> Call {
        self.call(Method::GET, path)
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> Call {
        self.call(Method::POST, path).json(body)
    }

    pub fn patch(&self, path: &str, body: serde_json::Value) -> Call {
        self.call(Method::PATCH, path).json(body)
    }

    pub fn delete(&self, path: &str) -> Call {
        self.call(Method::DELETE, path)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_until_ready(&self) {
        self.wait_for_ok("/readyz", "ready").await;
    }

    /// Waits until the gateway answers `/healthz`, whatever its services' state.
    pub async fn wait_until_live(&self) {
        self.wait_for_ok("/healthz", "live").await;
    }

    async fn wait_for_ok(&self, path: &str, state: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(reply) = self.get(path).try_send().await
                && reply.status == StatusCode::OK
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the gateway did not become {state} within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Call {
    /// Sets a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.request = self.request.header(name, value);
        self
    }

    /// `authorization: Bearer <credential>`.
    pub fn bearer(self, credential: &str) -> Self {
        self.header("authorization", &format!("Bearer {credential}"))
    }

    /// A JSON body.
    pub fn json(self, body: serde_json::Value) -> Self {
        self.raw("application/json", Bytes::from(body.to_string()))
    }

    /// A body as given.
    pub fn raw(mut self, content_type: &str, body: impl Into<Bytes>) -> Self {
        self.request = self.request.header("content-type", content_type);
        self.body = body.into();
        self
    }

    /// Sends and reads the whole response.
    pub async fn send(self) -> Reply {
        self.try_send().await.expect("the gateway answers")
    }

    async fn try_send(self) -> anyhow::Result<Reply> {
        let response = self.open().await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// Sends and returns the response with its body still streaming.
    pub async fn open(self) -> anyhow::Result<http::Response<Incoming>> {
        let stream = tokio::net::TcpStream::connect(self.address).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = self.request.body(Full::new(self.body))?;
        Ok(sender.send_request(request).await?)
    }
}

impl Call {
    /// A `multipart/form-data` body.
    pub fn form(self, form: Form) -> Self {
        let content_type = format!("multipart/form-data; boundary={}", Form::BOUNDARY);
        let mut body = form.body;
        body.extend_from_slice(format!("--{}--\r\n", Form::BOUNDARY).as_bytes());
        self.raw(&content_type, body)
    }

    /// Declares the whole body but sends only its first `kept` bytes, waits for `before_cut`,
    /// then drops the connection: a client gone in the middle of an upload.
    pub async fn send_cut_off(self, kept: usize, before_cut: impl Future<Output = ()> + Send + 'static) {
        let length = self.body.len();
        let kept = self.body.slice(..kept.min(length.saturating_sub(1)));
        let sent = futures::stream::once(futures::future::ready(Ok(Frame::data(kept))));
        let cut = futures::stream::once(async move {
            before_cut.await;
            Err(std::io::Error::other("the client went away"))
        });
        let body = StreamBody::new(futures::StreamExt::chain(sent, cut));
        let request = self.request.header("content-length", length).body(body).expect("a request");
        let stream = tokio::net::TcpStream::connect(self.address).await.expect("connect to the gateway");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("an HTTP/1.1 connection");
        let connection = tokio::spawn(connection);
        let answer = sender.send_request(request).await;
        assert!(answer.is_err(), "a request cut off mid-body got an answer: {answer:?}");
        connection.abort();
    }
}

/// A `multipart/form-data` body being built.
#[derive(Debug, Default)]
pub struct Form {
    body: Vec<u8>,
}

impl Form {
    const BOUNDARY: &'static str = "aimesh-test-boundary-7d1c";

    pub fn new() -> Self {
        Self::default()
    }

    /// A text part.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.head(&format!("Content-Disposition: form-data; name=\"{name}\"\r\n"));
        self.body.extend_from_slice(value.as_bytes());
        self.body.extend_from_slice(b"\r\n");
        self
    }

    /// A file part.
    pub fn file(mut self, name: &str, file_name: &str, content_type: &str, content: &[u8]) -> Self {
        self.head(&format!(
            "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\nContent-Type: {content_type}\r\n"
        ));
        self.body.extend_from_slice(content);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    fn head(&mut self, headers: &str) {
        self.body.extend_from_slice(format!("--{}\r\n{headers}\r\n", Self::BOUNDARY).as_bytes());
    }
}

/// Reads Server-Sent Events from a streaming body.
#[derive(Debug)]
pub struct Events {
    body: Incoming,
    buffer: String,
}

/// One event: its `event:` name, `id:` and `data:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub id: Option<String>,
    pub data: String,
}

impl Events {
    pub fn new(body: Incoming) -> Self {
        Self { body, buffer: String::new() }
    }

    /// The next event (comments skipped), `None` at the end of the stream; panics after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Event> {
        tokio::time::timeout(wait, self.read()).await.expect("an event within the wait")
    }

    async fn read(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event { name: "message".into(), id: None, data: String::new() };
                let mut comment_only = true;
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event.name = name.to_owned();
                        comment_only = false;
                    } else if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.to_owned());
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        event.data.push_str(data);
                        comment_only = false;
                    }
                }
                if comment_only {
                    continue;
                }
                return Some(event);
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
}
