//! `ProjectService`: projects and who may act in them.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{Cursor, Page};
use aimesh_kit::wire::proto_json;
use aimesh_proto::identity::v1 as pb;

use super::{Identity, actor, client_address, respond};
use crate::domain::{
    requests_per_minute_to_proto, role_field, role_from_db, validate_email, validate_requests_per_minute,
};
use crate::error::{IdentityError, Result};
use crate::store::{Actor, MemberRow, ProjectPatch, ProjectRow};

const MAX_PROJECT_NAME: usize = 100;
const MAX_DESCRIPTION: usize = 1000;

pub(super) struct ProjectApi(pub(super) Arc<Identity>);

fn project_to_proto(row: &ProjectRow, caller_role: ProjectRole) -> pb::Project {
    pb::Project {
        id: row.id.to_string(),
        name: row.name.clone(),
        description: row.description.clone(),
        create_time: Some(proto_json::timestamp(row.created_at)),
        update_time: Some(proto_json::timestamp(row.updated_at)),
        caller_role: caller_role.to_proto().into(),
        requests_per_minute: requests_per_minute_to_proto(row.requests_per_minute),
    }
}

fn member_to_proto(row: MemberRow) -> Result<pb::Membership> {
    Ok(pb::Membership {
        project_id: row.project_id.to_string(),
        user_id: row.user_id.to_string(),
        email: row.email,
        username: row.username,
        role: role_from_db(&row.role)?.to_proto().into(),
        create_time: Some(proto_json::timestamp(row.created_at)),
    })
}

/// Only an owner may make someone an owner or change what an owner is.
fn owner_only(caller_role: ProjectRole, target_current: ProjectRole, target_new: Option<ProjectRole>) -> Result<()> {
    let touches_owner = target_current == ProjectRole::Owner || target_new == Some(ProjectRole::Owner);
    if touches_owner && caller_role != ProjectRole::Owner {
        return Err(IdentityError::forbidden("only an owner may grant, change or remove the owner role"));
    }
    Ok(())
}

impl Identity {
    async fn create_project(
        &self,
        caller: &Caller,
        request: pb::CreateProjectRequest,
        actor: Actor,
    ) -> Result<pb::Project> {
        let principal = &caller.principal;
        principal.require_session()?;
        let name = fields::text("name", &request.name, MAX_PROJECT_NAME, true)?;
        let description = fields::text("description", &request.description, MAX_DESCRIPTION, false)?;
        let row = self.store.create_project(principal.user_id, &name, &description, &actor).await?;
        // Nothing to invalidate: the id is a fresh UUIDv7 made by the store, so no cache entry
        // can exist for it, not even a negative one (the row is read only after `require_role`
        // passed, which it never does for an id no project has).
        Ok(project_to_proto(&row, ProjectRole::Owner))
    }

    async fn get_project(&self, caller: &Caller, request: pb::GetProjectRequest) -> Result<pb::Project> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let role = self.require_role(caller, project_id, ProjectRole::Viewer).await?;
        let row = self.project_row(project_id).await?;
        Ok(project_to_proto(&row, role))
    }

    async fn list_projects(
        &self,
        caller: &Caller,
        request: pb::ListProjectsRequest,
    ) -> Result<pb::ListProjectsResponse> {
        let principal = &caller.principal;
        principal.require_session()?;
        let page = Page::new(&request.page_token, request.page_size)?;
        let rows = self.reader(principal.user_id).await.list_projects(principal.user_id, &page).await?;
        let (rows, next_page_token) = page.finish(rows, |(p, _)| Cursor { time: p.created_at, id: p.id });
        let projects = rows
            .into_iter()
            .map(|(row, role)| Ok(project_to_proto(&row, role_from_db(&role)?)))
            .collect::<Result<_>>()?;
        Ok(pb::ListProjectsResponse { projects, next_page_token })
    }

    async fn update_project(
        &self,
        caller: &Caller,
        request: pb::UpdateProjectRequest,
        actor: Actor,
    ) -> Result<pb::Project> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let paths = fields::mask_paths(request.update_mask.as_ref(), &["name", "description", "requests_per_minute"])?;
        let project = request.project.unwrap_or_default();
        let (mut name, mut description) = (None, None);
        let mut patch = ProjectPatch::default();
        for path in &paths {
            match path.as_str() {
                "name" => name = Some(fields::text("project.name", &project.name, MAX_PROJECT_NAME, true)?),
                "description" => {
                    description =
                        Some(fields::text("project.description", &project.description, MAX_DESCRIPTION, false)?);
                }
                "requests_per_minute" => {
                    patch.requests_per_minute =
                        Some(validate_requests_per_minute("project.requests_per_minute", project.requests_per_minute)?);
                }
                _ => {}
            }
        }
        if let Some(limit) = patch.requests_per_minute {
            caller.principal.require_session()?;
            Self::check_limit_maximum(
                &caller.principal,
                "project.requests_per_minute",
                limit,
                self.limit_maxima.project,
                "rate_limit.max_project_requests_per_minute",
            )?;
        }
        let role = self.require_role(caller, project_id, ProjectRole::Admin).await?;
        (patch.name, patch.description) = (name.as_deref(), description.as_deref());
        let (row, live_keys) = self.store.update_project(project_id, &patch, &actor).await?;
        self.forget_project(project_id).await;
        // The project's keys' cached verifications carry its limit: the new one must replace it
        // within the revocation bound, like a revocation.
        self.forget_credentials(&live_keys).await;
        Ok(project_to_proto(&row, role))
    }

    async fn delete_project(&self, caller: &Caller, request: pb::DeleteProjectRequest, actor: Actor) -> Result<()> {
        let principal = &caller.principal;
        let project_id = fields::id("project_id", &request.project_id)?;
        principal.require_session()?;
        self.require_role(caller, project_id, ProjectRole::Owner).await?;
        let (revoked_keys, members) = self.store.delete_project(project_id, &actor).await?;
        self.forget_project(project_id).await;
        self.forget_credentials(&revoked_keys).await;
        self.forget_roles(project_id, &members).await;
        Ok(())
    }

    async fn add_member(&self, caller: &Caller, request: pb::AddMemberRequest, actor: Actor) -> Result<pb::Membership> {
        let principal = &caller.principal;
        let project_id = fields::id("project_id", &request.project_id)?;
        let email = validate_email(&request.email)?;
        let role = role_field(request.role, "role")?;
        principal.require_session()?;
        let caller_role = self.require_role(caller, project_id, ProjectRole::Admin).await?;
        owner_only(caller_role, ProjectRole::Viewer, Some(role))?;
        // Anyone may make a project and so ask this for any email: an address that keeps
        // finding unknown emails is probing who has an account, and is locked like a guesser.
        let address = client_address(&actor);
        self.throttle.check_address(address).await?;
        let added = match self.store.add_member(project_id, &email, role, &actor).await {
            Err(IdentityError::NotFound("user")) => {
                self.throttle.address_failed(address).await?;
                return Err(IdentityError::NotFound("user"));
            }
            added => added?,
        };
        self.forget_roles(project_id, &[added.user_id]).await;
        // A returning admin's keys work again: drop any cached refusal.
        self.forget_creator_keys(added.user_id, Some(project_id)).await;
        member_to_proto(added)
    }

    async fn list_members(&self, caller: &Caller, request: pb::ListMembersRequest) -> Result<pb::ListMembersResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let page = Page::new(&request.page_token, request.page_size)?;
        self.require_role(caller, project_id, ProjectRole::Viewer).await?;
        let rows = self.reader(caller.principal.user_id).await.list_members(project_id, &page).await?;
        let (rows, next_page_token) = page.finish(rows, |m| Cursor { time: m.created_at, id: m.user_id });
        let members = rows.into_iter().map(member_to_proto).collect::<Result<_>>()?;
        Ok(pb::ListMembersResponse { members, next_page_token })
    }

    async fn update_member_role(
        &self,
        caller: &Caller,
        request: pb::UpdateMemberRoleRequest,
        actor: Actor,
    ) -> Result<pb::Membership> {
        let principal = &caller.principal;
        let project_id = fields::id("project_id", &request.project_id)?;
        let user_id = fields::id("user_id", &request.user_id)?;
        let role = role_field(request.role, "role")?;
        principal.require_session()?;
        let caller_role = self.require_role(caller, project_id, ProjectRole::Admin).await?;
        let row = self
            .store
            .update_member_role(project_id, user_id, role, &actor, |current| {
                owner_only(caller_role, current, Some(role))
            })
            .await?;
        self.forget_roles(project_id, &[user_id]).await;
        // The member's keys act only while the member is an admin: a demotion ends them.
        self.forget_creator_keys(user_id, Some(project_id)).await;
        member_to_proto(row)
    }

    async fn remove_member(&self, caller: &Caller, request: pb::RemoveMemberRequest, actor: Actor) -> Result<()> {
        let principal = &caller.principal;
        let project_id = fields::id("project_id", &request.project_id)?;
        let user_id = fields::id("user_id", &request.user_id)?;
        principal.require_session()?;
        let leaving = user_id == principal.user_id;
        let needed = if leaving { ProjectRole::Viewer } else { ProjectRole::Admin };
        let caller_role = self.require_role(caller, project_id, needed).await?;
        self.store
            .remove_member(project_id, user_id, &actor, |current| {
                if leaving { Ok(()) } else { owner_only(caller_role, current, None) }
            })
            .await?;
        self.forget_roles(project_id, &[user_id]).await;
        // The member's own keys die with the membership; project-owned ones stay.
        self.forget_creator_keys(user_id, Some(project_id)).await;
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::project_service_server::ProjectService for ProjectApi {
    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.create_project(&caller, request.into_inner(), actor).await)
    }

    async fn get_project(&self, request: Request<pb::GetProjectRequest>) -> Result<Response<pb::Project>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.get_project(&caller, request.into_inner()).await)
    }

    async fn list_projects(
        &self,
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_projects(&caller, request.into_inner()).await)
    }

    async fn update_project(
        &self,
        request: Request<pb::UpdateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.update_project(&caller, request.into_inner(), actor).await)
    }

    async fn delete_project(
        &self,
        request: Request<pb::DeleteProjectRequest>,
    ) -> Result<Response<pb::DeleteProjectResponse>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(
            self.0.delete_project(&caller, request.into_inner(), actor).await.map(|()| pb::DeleteProjectResponse {}),
        )
    }

    async fn add_member(&self, request: Request<pb::AddMemberRequest>) -> Result<Response<pb::Membership>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.add_member(&caller, request.into_inner(), actor).await)
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_members(&caller, request.into_inner()).await)
    }

    async fn update_member_role(
        &self,
        request: Request<pb::UpdateMemberRoleRequest>,
    ) -> Result<Response<pb::Membership>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.update_member_role(&caller, request.into_inner(), actor).await)
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.remove_member(&caller, request.into_inner(), actor).await.map(|()| pb::RemoveMemberResponse {}))
    }
}
