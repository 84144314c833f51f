//! Live delivery of new messages across replicas: every stored message is published on the
//! session's Redis channel after its commit, and each process holds one subscriber connection
//! that fans messages out to the watchers of each session.
//!
//! Redis pub/sub is at most once (a reconnect or a slow listener loses messages), so it only
//! says "something new, probably this": a [`Watch`] delivers by sequence number and fills any
//! gap from PostgreSQL, the truth. It also looks at PostgreSQL when the subscriber reconnected,
//! when its queue overflowed, and after `poll_interval` without news, so a lost publication
//! delays a message by at most that long and never loses it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use aimesh_kit::data::redis::{Redis, RedisError, timed};

use crate::error::Result;
use crate::store::{MessageRow, Store};

/// Live messages queued per session for slow watchers before they fall back to PostgreSQL.
const FAN_OUT_CAPACITY: usize = 256;
/// Messages read from PostgreSQL at a time while catching up.
const CATCH_UP_PAGE: i64 = 200;

/// What a watcher hears from the hub.
#[derive(Debug, Clone)]
enum Live {
    Message(Arc<MessageRow>),
    /// Publications may have been lost: look at PostgreSQL.
    Resync,
}

/// The channel of a session: seed 003's `channel:chat:{session_id}` in chat's namespace.
pub fn channel(redis: &Redis, session_id: Uuid) -> String {
    redis.key("chat", &format!("channel:{{{session_id}}}"))
}

type Routes = Mutex<HashMap<String, broadcast::Sender<Live>>>;

struct HubInner {
    redis: Redis,
    subscriber: SubscriberClient,
    /// Channel -> its watchers; read by the listener for every message.
    routes: Arc<Routes>,
    /// Serialises SUBSCRIBE and UNSUBSCRIBE, so a watcher arriving while the last one leaves
    /// never ends up unsubscribed.
    changes: tokio::sync::Mutex<()>,
    _listener: DropGuard,
}

/// The process's one subscription point for live messages. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// Opens the subscriber connection and starts routing what it receives.
    pub async fn start(redis: &Redis) -> Result<Self, RedisError> {
        let subscriber = redis.subscriber().await?;
        let routes: Arc<Routes> = Arc::default();
        let stop = CancellationToken::new();
        let mut messages = subscriber.message_rx();
        let mut reconnects = subscriber.reconnect_rx();
        let listener_routes = Arc::clone(&routes);
        let listener_stop = stop.clone();
        let listener_client = subscriber.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = listener_stop.cancelled() => break,
                    message = messages.recv() => match message {
                        Ok(message) => route(&listener_routes, &message.channel, message.value.as_bytes()),
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "live message listener lagged, watchers resync from postgres");
                            resync(&listener_routes);
                        }
                        Err(RecvError::Closed) => break,
                    },
                    reconnected = reconnects.recv() => match reconnected {
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            tracing::info!("live message subscriber reconnected, watchers resync from postgres");
                            resync(&listener_routes);
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
            let _ = listener_client.quit().await;
        });
        Ok(Self {
            inner: Arc::new(HubInner {
                redis: redis.clone(),
                subscriber,
                routes,
                changes: tokio::sync::Mutex::new(()),
                _listener: stop.drop_guard(),
            }),
        })
    }

    /// Publishes a stored message to its session's watchers on every replica. Call after the
    /// commit; a failure only delays delivery (watchers poll PostgreSQL), so it is logged.
    pub async fn publish(&self, message: &MessageRow) {
        let channel = channel(&self.inner.redis, message.session_id);
        let published = match serde_json::to_vec(message) {
            Ok(bytes) => {
                timed("chat_publish", self.inner.redis.pool().next_connected().publish::<i64, _, _>(channel, bytes))
                    .await
            }
            Err(error) => Err(RedisError::new(fred::error::ErrorKind::Parse, error.to_string())),
        };
        if let Err(error) = published {
            tracing::warn!(%error, session_id = %message.session_id, "cannot publish a live message; watchers will poll");
        }
    }

    /// Joins the session's channel, returning once the subscription is in place: everything
    /// published from then on reaches the returned subscription.
    async fn join(&self, session_id: Uuid) -> Result<Subscription, RedisError> {
        let channel = channel(&self.inner.redis, session_id);
        let _serial = self.inner.changes.lock().await;
        let (receiver, new) = {
            let mut routes = self.inner.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match routes.get(&channel) {
                Some(sender) => (sender.subscribe(), false),
                None => {
                    let (sender, receiver) = broadcast::channel(FAN_OUT_CAPACITY);
                    routes.insert(channel.clone(), sender);
                    (receiver, true)
                }
            }
        };
        if new && let Err(error) = self.inner.subscriber.subscribe(channel.as_str()).await {
            self.inner.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&channel);
            return Err(error);
        }
        Ok(Subscription { receiver, channel, hub: Arc::downgrade(&self.inner) })
    }
}

fn route(routes: &Routes, channel: &str, payload: Option<&[u8]>) {
    let Some(sender) = routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(channel).cloned() else {
        return;
    };
    match payload.map(serde_json::from_slice::<MessageRow>) {
        Some(Ok(message)) => {
            let _ = sender.send(Live::Message(Arc::new(message)));
        }
        _ => {
            tracing::warn!(channel, "undecodable live message, watchers resync from postgres");
            let _ = sender.send(Live::Resync);
        }
    }
}

fn resync(routes: &Routes) {
    for sender in routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values() {
        let _ = sender.send(Live::Resync);
    }
}

/// One watcher's place on a channel; leaving the last one unsubscribes.
struct Subscription {
    receiver: broadcast::Receiver<Live>,
    channel: String,
    hub: std::sync::Weak<HubInner>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let (Some(hub), Ok(runtime)) = (self.hub.upgrade(), tokio::runtime::Handle::try_current()) else { return };
        let channel = std::mem::take(&mut self.channel);
        // Our receiver must be gone before the count below is read.
        let (_, placeholder) = broadcast::channel(1);
        drop(std::mem::replace(&mut self.receiver, placeholder));
        runtime.spawn(async move {
            let _serial = hub.changes.lock().await;
            let unused = {
                let mut routes = hub.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                // This watcher's receiver is gone by now; others may have joined meanwhile.
                let unused = routes.get(&channel).is_some_and(|sender| sender.receiver_count() == 0);
                if unused {
                    routes.remove(&channel);
                }
                unused
            };
            if unused && let Err(error) = hub.subscriber.unsubscribe(channel.as_str()).await {
                tracing::warn!(%error, channel, "cannot unsubscribe from a live channel");
            }
        });
    }
}

/// The messages of one session from a sequence number on, stored ones first, then live ones,
/// each exactly once and in order (see the module docs).
pub struct Watch {
    store: Store,
    session_id: Uuid,
    subscription: Subscription,
    /// The last sequence delivered.
    last: i64,
    pending: VecDeque<MessageRow>,
    /// PostgreSQL may hold messages after `last` not yet in `pending`.
    catching_up: bool,
    poll_interval: Duration,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("session_id", &self.session_id).field("last", &self.last).finish_non_exhaustive()
    }
}

impl Watch {
    /// Subscribes first, then reads PostgreSQL: a message committed meanwhile is either read or
    /// heard (or both, and delivered once).
    pub async fn start(hub: &Hub, store: Store, session_id: Uuid, after: i64, poll_interval: Duration) -> Result<Self> {
        let subscription = hub.join(session_id).await?;
        Ok(Self {
            store,
            session_id,
            subscription,
            last: after.max(0),
            pending: VecDeque::new(),
            catching_up: true,
            poll_interval,
        })
    }

    /// The next message; waits for one as long as it takes. Cancel-safe: dropping the future
    /// loses nothing the next call would deliver.
    pub async fn next(&mut self) -> Result<MessageRow> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                if message.sequence <= self.last {
                    continue;
                }
                self.last = message.sequence;
                return Ok(message);
            }
            if self.catching_up {
                let page = self.store.messages_after(self.session_id, self.last, None, CATCH_UP_PAGE).await?;
                self.catching_up = page.len() as i64 == CATCH_UP_PAGE;
                self.pending.extend(page);
                continue;
            }
            match tokio::time::timeout(self.poll_interval, self.subscription.receiver.recv()).await {
                Ok(Ok(Live::Message(message))) if message.sequence <= self.last => {}
                Ok(Ok(Live::Message(message))) if message.sequence == self.last + 1 => {
                    self.last = message.sequence;
                    return Ok(Arc::unwrap_or_clone(message));
                }
                // A gap (a publication lost or still on its way), news lost, or a quiet while
                // worth a look: PostgreSQL has everything committed.
                Ok(Ok(Live::Message(_) | Live::Resync)) | Ok(Err(RecvError::Lagged(_))) | Err(_) => {
                    self.catching_up = true;
                }
                Ok(Err(RecvError::Closed)) => {
                    // The hub is gone (shutting down); keep serving from PostgreSQL.
                    tokio::time::sleep(self.poll_interval).await;
                    self.catching_up = true;
                }
            }
        }
    }

    /// The last sequence delivered (or the starting point).
    pub fn last_sequence(&self) -> i64 {
        self.last
    }
}
