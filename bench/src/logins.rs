//! Logins under a password-guessing flood: legitimate users log in through the REST gateway,
//! each from a loopback address of its own, while a flood of wrong-password logins for other
//! accounts comes from many other addresses; against the same logins with no flood. What it
//! shows: the share of legitimate logins that still succeed and their p99 (the throttles and the
//! bound on password hashing must keep both), and the peak memory (the hashing bound must keep
//! a flood from growing it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use aimesh_tests::{Account, Mesh, test_config};

use crate::report::{Load, Pair, measure};

/// Legitimate users, each logging in from `127.0.1.<n>`.
const USERS: usize = 16;
/// Accounts the flood guesses at (not the legitimate users').
const TARGETS: usize = 16;
/// Guesses in flight at once, spread over `FLOOD_ADDRESSES` addresses `127.0.2.<n>`.
const FLOOD_IN_FLIGHT: usize = 32;
const FLOOD_ADDRESSES: u8 = 200;
/// Legitimate logins in flight: logins are expensive by design (argon2id).
const MOST_IN_FLIGHT: usize = 8;

/// The scenario: legitimate logins during the flood, against the same logins without it.
pub async fn under_flood(load: Load) -> anyhow::Result<Pair> {
    let (mut config, databases) = test_config();
    config.common.log.filter = "warn".into();
    let mesh = Mesh::start_with(config, databases).await;
    let mut users = Vec::with_capacity(USERS);
    for n in 0..USERS {
        users.push(mesh.signup(&format!("user{n}")).await);
    }
    let mut targets = Vec::with_capacity(TARGETS);
    for n in 0..TARGETS {
        targets.push(mesh.signup(&format!("target{n}")).await.email);
    }
    let load = load.at_most_in_flight(MOST_IN_FLIGHT);
    let users = Arc::new(users);
    let gateway = mesh.gateway;

    let baseline = measure("legitimate logins, no flood", load, legitimate(gateway, Arc::clone(&users))).await;
    let memory_before = crate::files::peak_memory_mib();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(FloodTally::default());
    let flood: Vec<_> = (0..FLOOD_IN_FLIGHT)
        .map(|worker| tokio::spawn(guess(gateway, targets.clone(), worker, Arc::clone(&stop), Arc::clone(&tally))))
        .collect();
    let scenario = measure("legitimate logins during the flood", load, legitimate(gateway, users)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in flood {
        worker.await?;
    }
    let memory_after = crate::files::peak_memory_mib();
    mesh.stop().await?;

    let success = |figures: &crate::report::Figures| {
        100.0 * (figures.requests - figures.errors) as f64 / figures.requests.max(1) as f64
    };
    let note = format!(
        "legitimate logins succeeded {:.1}% during the flood (p99 {:.0} ms) and {:.1}% without it (p99 {:.0} ms); \
         the flood sent {} guesses from {FLOOD_ADDRESSES} addresses: {} refused as wrong (401), {} throttled (429), {} other; \
         peak RSS (VmHWM) of the bench process, whole mesh included: {memory_before:.0} MiB before the flood, {memory_after:.0} MiB after",
        success(&scenario),
        scenario.p99_ms,
        success(&baseline),
        baseline.p99_ms,
        tally.sent.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        tally.throttled.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    Ok(Pair::new(scenario, baseline, "the same logins with no flood running").with_note(note))
}

/// A login of user `n % USERS` from its own address, with the right password.
fn legitimate(
    gateway: SocketAddr,
    users: Arc<Vec<Account>>,
) -> impl Fn(u64) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
    move |n| {
        let user = &users[n as usize % users.len()];
        let from = Ipv4Addr::new(127, 0, 1, (n as usize % users.len()) as u8 + 1);
        let body = serde_json::json!({ "login": user.email, "password": user.password });
        Box::pin(async move {
            let status = login(gateway, from, &body).await?;
            if status == 200 { Ok(()) } else { Err(format!("status {status}")) }
        })
    }
}

#[derive(Default)]
struct FloodTally {
    sent: AtomicU64,
    wrong: AtomicU64,
    throttled: AtomicU64,
    other: AtomicU64,
}

/// One flood worker: wrong passwords for the target accounts in turn, each from the next
/// address, until stopped.
async fn guess(
    gateway: SocketAddr,
    targets: Vec<String>,
    worker: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<FloodTally>,
) {
    let mut n = worker;
    while !stop.load(Ordering::Relaxed) {
        let from = Ipv4Addr::new(127, 0, 2, (n % usize::from(FLOOD_ADDRESSES)) as u8 + 1);
        let body = serde_json::json!({ "login": targets[n % targets.len()], "password": format!("guess-{n}") });
        let counter = match login(gateway, from, &body).await {
            Ok(401) => &tally.wrong,
            Ok(429) => &tally.throttled,
            _ => &tally.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tally.sent.fetch_add(1, Ordering::Relaxed);
        n += FLOOD_IN_FLIGHT;
    }
}

/// `POST /v1/auth/login` from the local address `from`, on a connection of its own; the status.
async fn login(gateway: SocketAddr, from: Ipv4Addr, body: &serde_json::Value) -> Result<u16, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).map_err(|e| format!("bind {from}: {e}"))?;
    let stream = socket.connect(gateway).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::post("/v1/auth/login")
        .header("host", gateway.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    response.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}
