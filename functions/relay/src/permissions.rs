//! Who may subscribe to which channel, and which channel kinds each WebSocket path serves.
//!
//! - `user:{id}`: only that user;
//! - `project:{id}`: members of the project (any role);
//! - `document:{id}`: members of the project the document is registered in;
//! - `category:{name}`: the `admin` and `service` roles (whole-category firehoses);
//! - `room:{id}`: participants of the room (the Redis set `inkwire:room:{id}:participants`,
//!   filled by the chat function).
//!
//! `admin` and `service` callers may subscribe to project, document and room channels too
//! (operators and back ends see everything); `user:` channels stay private to their user.

use inkwire_shared::auth::Caller;
use inkwire_shared::channels::{Channel, ChannelKind};
use inkwire_shared::membership;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

/// The WebSocket paths and the channel kinds that make sense on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WsPath {
    Collaboration,
    Analytics,
    Notifications,
    Presence,
}

impl WsPath {
    pub const ALL: [WsPath; 4] = [
        WsPath::Collaboration,
        WsPath::Analytics,
        WsPath::Notifications,
        WsPath::Presence,
    ];

    pub fn route(self) -> &'static str {
        match self {
            WsPath::Collaboration => "/ws/collaboration",
            WsPath::Analytics => "/ws/analytics",
            WsPath::Notifications => "/ws/notifications",
            WsPath::Presence => "/ws/presence",
        }
    }

    pub fn name(self) -> &'static str {
        &self.route()[4..]
    }

    pub fn allows(self, kind: ChannelKind) -> bool {
        use ChannelKind::*;
        match self {
            WsPath::Collaboration => matches!(kind, Document | Project | Room | User),
            WsPath::Analytics => matches!(kind, Category | Project | Document | User),
            WsPath::Notifications => matches!(kind, User | Project),
            WsPath::Presence => matches!(kind, Project | Document | Room | User),
        }
    }

    /// Channels subscribed automatically on connect: `/ws/notifications` delivers the
    /// caller's own `user:` channel without asking.
    pub fn default_channels(self, caller: &Caller) -> Vec<Channel> {
        match self {
            WsPath::Notifications => vec![Channel::new(ChannelKind::User, caller.user_id.clone())],
            _ => Vec::new(),
        }
    }
}

/// The outcome of a permission check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Granted,
    Denied(String),
}

/// The Redis set of a room's participants.
pub fn room_participants_key(room: &str) -> String {
    format!("inkwire:room:{room}:participants")
}

/// Decides whether `caller` may read `channel`.
pub async fn check(
    caller: &Caller,
    channel: &Channel,
    redis: &mut ConnectionManager,
) -> redis::RedisResult<Access> {
    let privileged = caller.is_privileged();
    let denied = |why: String| Ok(Access::Denied(why));
    match channel.kind {
        ChannelKind::User => {
            if channel.id == caller.user_id {
                Ok(Access::Granted)
            } else {
                denied(format!("{channel} is private to its user"))
            }
        }
        ChannelKind::Category => {
            if privileged {
                Ok(Access::Granted)
            } else {
                denied(format!("{channel} needs the admin or service role"))
            }
        }
        _ if privileged => Ok(Access::Granted),
        ChannelKind::Project => {
            if membership::role_of(redis, &channel.id, &caller.user_id)
                .await?
                .is_some()
            {
                Ok(Access::Granted)
            } else {
                denied(format!("you are not a member of project {:?}", channel.id))
            }
        }
        ChannelKind::Document => match membership::project_of_document(redis, &channel.id).await? {
            Some(project)
                if membership::role_of(redis, &project, &caller.user_id)
                    .await?
                    .is_some() =>
            {
                Ok(Access::Granted)
            }
            _ => denied(format!(
                "you are not a member of the project of document {:?}",
                channel.id
            )),
        },
        ChannelKind::Room => {
            let member: bool = redis
                .sismember(room_participants_key(&channel.id), &caller.user_id)
                .await?;
            if member {
                Ok(Access::Granted)
            } else {
                denied(format!(
                    "you are not a participant of room {:?}",
                    channel.id
                ))
            }
        }
    }
}
