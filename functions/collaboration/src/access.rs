//! Losing a right takes effect at once on co-editing connections too: the listener follows
//! the same announcements as the relay (`inkwire.access.changed`, see
//! `shared::access_changes`) and asks the loaded documents concerned to re-check their
//! connections' roles in Redis. A connection whose user is no longer a member (or whose
//! document left the project) is closed with code `4403` (y-websocket 3.1 does not reconnect
//! on 44xx); one demoted to reviewer or reader stays, read-only from its next update. Each
//! document also re-checks every `INKWIRE_COEDIT_RECHECK_INTERVAL`, for announcements missed
//! while NATS was unreachable. A check that fails keeps the connections until the next one.

use futures::StreamExt;
use inkwire_shared::access_changes::{ACCESS_CHANGED_SUBJECT, AccessChange};
use inkwire_shared::membership::is_valid_id;

use crate::Coedit;
use crate::document::Command;

/// Listens to access-change announcements (core NATS) for this instance's documents.
pub async fn spawn_listener(coedit: Coedit) -> anyhow::Result<()> {
    let mut sub = coedit.app.nats.subscribe(ACCESS_CHANGED_SUBJECT).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Ok(change) = serde_json::from_slice::<AccessChange>(&msg.payload) else {
                continue;
            };
            match change {
                AccessChange::Member {
                    project_id,
                    user_id,
                } if is_valid_id(&project_id) && is_valid_id(&user_id) => {
                    for h in coedit.handles() {
                        if *h.project == *project_id {
                            h.send(Command::Recheck {
                                user: Some(user_id.clone()),
                            })
                            .await;
                        }
                    }
                }
                AccessChange::Document { document_id, .. } if is_valid_id(&document_id) => {
                    if let Some(h) = coedit.handle_of(&document_id) {
                        h.send(Command::Recheck { user: None }).await;
                    }
                }
                _ => {}
            }
        }
    });
    Ok(())
}
