//! The gateway scenario: the same read through the REST gateway and over gRPC directly.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

use aimesh_proto::chat::v1 as chat_pb;
use aimesh_tests::{Mesh, authed};

use crate::report::{Figures, Load, measure_alternating};

/// The two are measured in alternating slices of the run, so that a shared machine's drift
/// during the run does not favour either.
const SLICES: u32 = 10;

/// GetSession of one session: through the gateway (REST/JSON, keep-alive HTTP/1.1 connections,
/// one per request in flight) and straight to chat over gRPC (one HTTP/2 channel).
pub async fn get_session(mesh: &Mesh, token: &str, project: &str, load: Load) -> anyhow::Result<(Figures, Figures)> {
    let request = chat_pb::CreateSessionRequest {
        project_id: project.to_owned(),
        model: "gpt-4o".into(),
        title: "bench".into(),
        ..Default::default()
    };
    let session = mesh.chat().create_session(authed(request, token)).await?.into_inner().id;

    let connections = Arc::new(Mutex::new(Vec::with_capacity(load.concurrency)));
    for _ in 0..load.concurrency {
        let stream = tokio::net::TcpStream::connect(mesh.gateway).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        connections.lock().await.push(sender);
    }
    let (path, authorization, host) =
        (format!("/v1/chat/sessions/{session}"), format!("Bearer {token}"), mesh.gateway.to_string());
    let rest = move |_| {
        let (connections, path, authorization, host) =
            (Arc::clone(&connections), path.clone(), authorization.clone(), host.clone());
        async move {
            let mut sender: SendRequest<Empty<Bytes>> = connections.lock().await.pop().ok_or("no idle connection")?;
            let request = http::Request::get(path)
                .header("host", host)
                .header("authorization", authorization)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            let outcome = async {
                let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                response.into_body().collect().await.map_err(|e| e.to_string())?;
                if status.is_success() { Ok(()) } else { Err(format!("status {status}")) }
            }
            .await;
            connections.lock().await.push(sender);
            outcome
        }
    };
    let (client, token) = (mesh.chat(), token.to_owned());
    let grpc = move |_| {
        let mut client = client.clone();
        let request = authed(chat_pb::GetSessionRequest { session_id: session.clone() }, &token);
        async move { client.get_session(request).await.map(drop).map_err(|s| s.to_string()) }
    };
    Ok(measure_alternating(load, SLICES, ("REST GET session", rest), ("gRPC GetSession", grpc)).await)
}
