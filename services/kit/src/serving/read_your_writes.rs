//! Records, after each RPC that may write, the primary's WAL position for its caller, so that
//! the caller's next reads never come from a replica that has not replayed it (see
//! [`crate::data::replicas`]). Only services with read replicas have this layer.

use std::task::{Context, Poll};

use futures::future::BoxFuture;

use crate::auth::Principal;
use crate::data::replicas::Database;

/// Methods that write nothing, by the naming rule every aimesh API follows: their handlers may
/// read from a replica, and they leave no position to wait for. `Authenticate` only verifies a
/// credential.
pub fn is_read_only(method: &str) -> bool {
    const READ_PREFIXES: [&str; 6] = ["Get", "List", "Search", "Export", "Watch", "Download"];
    method == "Authenticate" || READ_PREFIXES.iter().any(|prefix| method.starts_with(prefix))
}

/// Makes [`RecordWrites`].
#[derive(Clone, Debug)]
pub struct RecordWritesLayer {
    database: Database,
}

impl RecordWritesLayer {
    pub fn new(database: Database) -> Self {
        Self { database }
    }
}

impl<S> tower::Layer<S> for RecordWritesLayer {
    type Service = RecordWrites<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordWrites { inner, database: self.database.clone() }
    }
}

/// The service [`RecordWritesLayer`] makes.
#[derive(Clone, Debug)]
pub struct RecordWrites<S> {
    inner: S,
    database: Database,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RecordWrites<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let writer = request.extensions().get::<Principal>().map(|principal| principal.user_id);
        let writer = writer.filter(|_| !is_read_only(method));
        let future = self.inner.call(request);
        let Some(user) = writer else {
            return Box::pin(future);
        };
        let database = self.database.clone();
        Box::pin(async move {
            let response = future.await?;
            // A failed unary call answers trailers-only, its code in the headers: it committed
            // nothing. A success (code in the trailers) may have.
            let failed = response.headers().get("grpc-status").is_some_and(|code| code.as_bytes() != b"0");
            if !failed {
                database.wrote(user).await;
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::is_read_only;

    #[test]
    fn reads_are_told_from_writes_by_name() {
        for read in ["GetSession", "ListMessages", "SearchMessages", "ExportProject", "WatchSession", "Download"] {
            assert!(is_read_only(read), "{read}");
        }
        for write in ["AppendMessage", "Reserve", "RecordUsage", "CreateDownloadUrl", "Login", "SetRetention"] {
            assert!(!is_read_only(write), "{write}");
        }
    }
}
