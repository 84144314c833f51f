//! The chat scenarios.

use std::sync::Arc;

use aimesh_proto::chat::v1 as chat_pb;
use aimesh_tests::{Mesh, authed};

use crate::report::{Figures, Load, measure};

/// Messages per session in the list scenario: one page as a client reads it.
const MESSAGES_PER_SESSION: usize = 50;

/// Creates `count` sessions of `project`; returns their ids.
pub async fn sessions(mesh: &Mesh, token: &str, project: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let request = chat_pb::CreateSessionRequest {
            project_id: project.to_owned(),
            model: "gpt-4o".into(),
            title: format!("bench {n}"),
            ..Default::default()
        };
        ids.push(mesh.chat().create_session(authed(request, token)).await?.into_inner().id);
    }
    Ok(ids)
}

/// The text of the `n`th message the bench writes.
pub fn message_text(n: u64) -> String {
    format!("message {n}: the quick brown fox jumps over the lazy dog, twice over.")
}

pub fn message(session_id: &str, n: u64) -> chat_pb::AppendMessageRequest {
    chat_pb::AppendMessageRequest {
        session_id: session_id.to_owned(),
        role: if n.is_multiple_of(2) { chat_pb::MessageRole::User } else { chat_pb::MessageRole::Assistant }.into(),
        content: message_text(n),
        tokens: 16,
        ..Default::default()
    }
}

/// Appends from `load.concurrency` writers to `ids` (as many sessions as writers, see
/// [`sessions`]), request `n` to session `n mod` their number.
pub async fn append(mesh: &Mesh, token: &str, ids: Vec<String>, load: Load) -> anyhow::Result<Figures> {
    let ids = Arc::new(ids);
    let (client, token) = (mesh.chat(), token.to_owned());
    Ok(measure("chat.AppendMessage", load, move |n| {
        let mut client = client.clone();
        let session = &ids[usize::try_from(n).unwrap_or(0) % ids.len()];
        let request = authed(message(session, n), &token);
        async move { client.append_message(request).await.map(drop).map_err(|s| s.to_string()) }
    })
    .await)
}

/// ListMessages of 50 messages: first over sessions nobody read yet, then the same again.
pub async fn list(mesh: &Mesh, token: &str, project: &str, load: Load) -> anyhow::Result<(Figures, Figures)> {
    let count = 400;
    let ids = sessions(mesh, token, project, count).await?;
    let mut client = mesh.chat();
    for id in &ids {
        for n in 0..MESSAGES_PER_SESSION {
            client.append_message(authed(message(id, n as u64), token)).await?;
        }
    }
    let ids = Arc::new(ids);
    // Each pass reads every session once: the first finds nothing cached, the second everything.
    let pass = Load { max_requests: Some(count as u64), ..load };
    let read = |name: &'static str, ids: Arc<Vec<String>>| {
        let (client, token) = (mesh.chat(), token.to_owned());
        measure(name, pass, move |n| {
            let mut client = client.clone();
            let session = ids[usize::try_from(n).unwrap_or(0) % ids.len()].clone();
            let request = chat_pb::ListMessagesRequest { session_id: session, page_size: 50, ..Default::default() };
            let request = authed(request, &token);
            async move {
                let page = client.list_messages(request).await.map_err(|s| s.to_string())?.into_inner();
                if page.messages.len() == MESSAGES_PER_SESSION {
                    Ok(())
                } else {
                    Err(format!("{} messages", page.messages.len()))
                }
            }
        })
    };
    let cold = read("chat.ListMessages cold", Arc::clone(&ids)).await;
    let warm = read("chat.ListMessages warm", ids).await;
    Ok((cold, warm))
}
