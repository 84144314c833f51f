//! The direct gRPC scenario: one representative cheap read of each service, called straight over
//! gRPC (authentication, project access check, rate limit, the read), each beside the bare
//! tonic echo measured right after it.

use aimesh_proto::analytics::v1 as analytics_pb;
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as identity_pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{Mesh, authed};

use crate::echo::{ECHO_IS, measure_once};
use crate::report::{Load, Pair, measure};

/// What each read is made of: the ids it reads and the token it reads them with.
pub struct Subjects<'a> {
    pub mesh: &'a Mesh,
    pub token: &'a str,
    pub project: &'a str,
    pub model: &'a str,
}

/// Calls `client.$method` with `$request` under `$load`, then the echo under the same load right
/// after it, so the machine's drift over the run touches both alike.
macro_rules! read_beside_echo {
    ($name:expr, $load:expr, $client:expr, $token:expr, $request:expr, $method:ident) => {{
        let (client, token) = ($client, $token.to_owned());
        let request = $request;
        let read = measure($name, $load, move |_| {
            let mut client = client.clone();
            let request = authed(request.clone(), &token);
            async move { client.$method(request).await.map(drop).map_err(|s| s.to_string()) }
        })
        .await;
        Pair::new(read, measure_once($load).await?, ECHO_IS)
    }};
}

/// GetProject (identity), GetSession (chat), GetModel (usage), GetFile (files) and GetRetention
/// (analytics), each beside the echo.
pub async fn reads(subjects: &Subjects<'_>, load: Load) -> anyhow::Result<Vec<Pair>> {
    let Subjects { mesh, token, project, model } = *subjects;
    let session = crate::chat::sessions(mesh, token, project, 1).await?.pop();
    let session = session.ok_or_else(|| anyhow::anyhow!("no session was created"))?;
    let file = crate::files::upload(mesh.files(), token, project, 0, 1).await?.id;

    let mut pairs = Vec::with_capacity(5);
    pairs.push(read_beside_echo!(
        "identity.GetProject",
        load,
        mesh.projects(),
        token,
        identity_pb::GetProjectRequest { project_id: project.to_owned() },
        get_project
    ));
    pairs.push(read_beside_echo!(
        "chat.GetSession",
        load,
        mesh.chat(),
        token,
        chat_pb::GetSessionRequest { session_id: session },
        get_session
    ));
    pairs.push(read_beside_echo!(
        "usage.GetModel",
        load,
        mesh.models(),
        token,
        usage_pb::GetModelRequest { model_id: model.to_owned() },
        get_model
    ));
    pairs.push(read_beside_echo!(
        "files.GetFile",
        load,
        mesh.files(),
        token,
        files_pb::GetFileRequest { file_id: file },
        get_file
    ));
    pairs.push(read_beside_echo!(
        "analytics.GetRetention",
        load,
        mesh.analytics(),
        token,
        analytics_pb::GetRetentionRequest { project_id: project.to_owned() },
        get_retention
    ));
    Ok(pairs)
}
