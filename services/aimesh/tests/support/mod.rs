//! What the tests of the `aimesh` binary share: free addresses, waiting for a child process to
//! serve, and stopping it with SIGTERM.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A loopback address nobody listens on right now, for the child to listen on (see
/// [`aimesh_kit::testing::free_ports`]).
pub fn free_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], aimesh_kit::testing::free_ports(1)[0]))
}

/// Waits until grpc.health.v1 at `address` says SERVING.
pub async fn wait_serving(address: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(child.try_wait().expect("child status").is_none(), "aimesh exited before serving");
        if let Ok(channel) =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).expect("url").connect().await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            if let Ok(answer) = health.check(request).await
                && answer.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "aimesh did not serve at {address} within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends SIGTERM and returns whether the process exited successfully within `within`. Async,
/// so clients of this test's runtime can still answer the server's graceful HTTP/2 goodbye.
pub async fn terminate(child: &mut Child, within: Duration) -> bool {
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(sent.success(), "kill -TERM {pid} failed");
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("child status") {
            return status.success();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    false
}
