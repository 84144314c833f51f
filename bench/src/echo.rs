//! The bare tonic baseline: an in-process tonic server with nothing but tonic-health, no layers
//! (no authentication, rate limit, metrics or storage), answering grpc.health.v1 Check. What a
//! service's cheap read costs beyond it is the mesh's own overhead.

use std::net::SocketAddr;

use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::report::{Figures, Load, measure};

/// What the echo baseline is, in words.
pub const ECHO_IS: &str = "bare tonic server in this process, grpc.health.v1 Check, no layers";

/// The echo server, running until stopped.
pub struct Echo {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Echo {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        // The reporter marks the server as a whole ("") SERVING.
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = oneshot::channel::<()>();
        let server =
            tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming_shutdown(
                aimesh_kit::serving::server::nodelay_incoming(listener),
                async {
                    let _ = stopped.await;
                },
            ));
        Ok(Echo { address, stop, server })
    }

    /// Check calls under `load`, over one HTTP/2 channel as the mesh's clients use.
    pub async fn measure(&self, load: Load) -> anyhow::Result<Figures> {
        let channel = Channel::from_shared(format!("http://{}", self.address))?.connect().await?;
        let client = HealthClient::new(channel);
        Ok(measure("bare tonic echo", load, move |_| {
            let mut client = client.clone();
            async move {
                let answer = client
                    .check(HealthCheckRequest { service: String::new() })
                    .await
                    .map_err(|status| status.to_string())?
                    .into_inner();
                if answer.status == ServingStatus::Serving as i32 {
                    Ok(())
                } else {
                    Err(format!("status {}", answer.status))
                }
            }
        })
        .await)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        Ok(())
    }
}

/// Starts an echo server, measures it under `load` and stops it.
pub async fn measure_once(load: Load) -> anyhow::Result<Figures> {
    let echo = Echo::start().await?;
    let figures = echo.measure(load).await?;
    echo.stop().await?;
    Ok(figures)
}
