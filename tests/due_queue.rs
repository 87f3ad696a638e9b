//! The shared due queue against a real Redis: claims are exclusive while a lease runs, an
//! expired lease comes back, and a holder that lost its lease cannot remove the member from
//! the new holder (nor a newer schedule).

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use inkwire_shared::due_queue::DueQueue;
use inkwire_shared::redis_store;
use inkwire_tests::TestEnv;
use redis::aio::ConnectionManager;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn connection(env: &TestEnv) -> ConnectionManager {
    redis_store::connect(&env.redis_url).await.expect("redis")
}

#[tokio::test]
async fn only_due_members_are_claimed_once_per_lease() {
    let env = TestEnv::start().await;
    let mut r = connection(&env).await;
    let q = DueQueue::new("test:due:basic");
    let now = now_ms();
    q.schedule(&mut r, "a", now - 10).await.unwrap();
    q.schedule(&mut r, "b", now).await.unwrap();
    q.schedule(&mut r, "later", now + 60_000).await.unwrap();

    let got = q.claim(&mut r, now, 10, 30_000).await.unwrap();
    let members: Vec<&str> = got.iter().map(|l| l.member.as_str()).collect();
    assert_eq!(members, vec!["a", "b"]);
    assert!(got.iter().all(|l| l.until_ms == now + 30_000));
    assert_eq!(q.score(&mut r, "a").await.unwrap(), Some(now + 30_000));
    // Within the lease nobody gets them again; the future one is not due.
    assert!(
        q.claim(&mut r, now + 29_999, 10, 30_000)
            .await
            .unwrap()
            .is_empty()
    );
    // `limit` is respected.
    q.schedule(&mut r, "c", now).await.unwrap();
    q.schedule(&mut r, "d", now).await.unwrap();
    assert_eq!(q.claim(&mut r, now, 1, 30_000).await.unwrap().len(), 1);

    // done within the lease removes the member, once.
    assert!(q.done(&mut r, &got[0]).await.unwrap());
    assert!(!q.done(&mut r, &got[0]).await.unwrap());
    assert_eq!(q.score(&mut r, "a").await.unwrap(), None);
    let lease_key: Option<String> = redis::cmd("GET")
        .arg(q.lease_key("a"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(lease_key, None, "the lease key goes with the member");
    env.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_claimers_never_share_a_member() {
    let env = TestEnv::start().await;
    let q = DueQueue::new("test:due:race");
    let mut r = connection(&env).await;
    let now = now_ms();
    const N: usize = 3000;
    let mut pipe = redis::pipe();
    for i in 0..N {
        pipe.zadd(q.key(), format!("m-{i}"), now - (i as u64 % 97))
            .ignore();
    }
    pipe.query_async::<()>(&mut r).await.unwrap();

    let mut tasks = Vec::new();
    for _ in 0..2 {
        let q = q.clone();
        let mut r = connection(&env).await;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = q.claim(&mut r, now, 37, 60_000).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|l| l.member));
                tokio::task::yield_now().await;
            }
        }));
    }
    let a = tasks.remove(0).await.unwrap();
    let b = tasks.remove(0).await.unwrap();
    let (sa, sb): (HashSet<_>, HashSet<_>) = (a.iter().collect(), b.iter().collect());
    assert_eq!(sa.len(), a.len(), "a claimer got a member twice");
    assert_eq!(sb.len(), b.len(), "a claimer got a member twice");
    assert!(sa.is_disjoint(&sb), "a member was claimed by both");
    assert_eq!(a.len() + b.len(), N, "every member claimed");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both claimers took part ({} / {})",
        a.len(),
        b.len()
    );
    env.shutdown.trigger();
}

#[tokio::test]
async fn an_expired_lease_comes_back_and_the_old_holder_cannot_remove_it() {
    let env = TestEnv::start().await;
    let q = DueQueue::new("test:due:expiry");
    let mut holder_a = connection(&env).await;
    let mut holder_b = connection(&env).await;
    q.schedule(&mut holder_a, "job", now_ms()).await.unwrap();

    // A claims with a short lease and stalls past it (or crashed).
    let a = q.claim(&mut holder_a, now_ms(), 10, 200).await.unwrap();
    assert_eq!(a.len(), 1);
    assert!(
        q.claim(&mut holder_b, now_ms(), 10, 200)
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;

    // The member is due again: B takes it over with its own lease.
    let b = q.claim(&mut holder_b, now_ms(), 10, 30_000).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].member, "job");
    assert_ne!(b[0].token, a[0].token);

    // A finishes late: its done is a no-op, B's claim stands.
    assert!(!q.done(&mut holder_a, &a[0]).await.unwrap());
    assert_eq!(
        q.score(&mut holder_a, "job").await.unwrap(),
        Some(b[0].until_ms)
    );
    assert!(
        q.claim(&mut holder_a, now_ms(), 10, 200)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(q.done(&mut holder_b, &b[0]).await.unwrap());
    assert_eq!(q.score(&mut holder_b, "job").await.unwrap(), None);
    env.shutdown.trigger();
}

#[tokio::test]
async fn done_after_the_lease_ended_leaves_the_member_to_be_claimed_again() {
    let env = TestEnv::start().await;
    let q = DueQueue::new("test:due:late");
    let mut r = connection(&env).await;
    q.schedule(&mut r, "job", now_ms()).await.unwrap();
    let a = q.claim(&mut r, now_ms(), 10, 150).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Nobody re-claimed yet, but the lease is over: at least once, not at most once.
    assert!(!q.done(&mut r, &a[0]).await.unwrap());
    let again = q.claim(&mut r, now_ms(), 10, 30_000).await.unwrap();
    assert_eq!(again.len(), 1);
    env.shutdown.trigger();
}

#[tokio::test]
async fn rescheduling_or_cancelling_ends_a_lease() {
    let env = TestEnv::start().await;
    let q = DueQueue::new("test:due:resched");
    let mut r = connection(&env).await;
    let now = now_ms();
    q.schedule(&mut r, "s", now).await.unwrap();
    let lease = q.claim(&mut r, now, 10, 30_000).await.unwrap().remove(0);
    // Rescheduled while claimed (e.g. a session saved with a new due time): the newer
    // schedule stands, the holder cannot remove it.
    q.schedule(&mut r, "s", now + 5_000).await.unwrap();
    assert!(!q.done(&mut r, &lease).await.unwrap());
    assert_eq!(q.score(&mut r, "s").await.unwrap(), Some(now + 5_000));

    let lease = q
        .claim(&mut r, now + 5_000, 10, 30_000)
        .await
        .unwrap()
        .remove(0);
    assert!(q.cancel(&mut r, "s").await.unwrap());
    assert!(!q.done(&mut r, &lease).await.unwrap());
    assert!(!q.cancel(&mut r, "s").await.unwrap());
    assert!(
        q.claim(&mut r, now + 100_000, 10, 30_000)
            .await
            .unwrap()
            .is_empty()
    );

    // schedule_if_absent adds once, and not over a claim.
    assert!(q.schedule_if_absent(&mut r, "d", now).await.unwrap());
    assert!(!q.schedule_if_absent(&mut r, "d", now + 1).await.unwrap());
    assert_eq!(q.score(&mut r, "d").await.unwrap(), Some(now));
    let lease = q.claim(&mut r, now, 10, 30_000).await.unwrap().remove(0);
    assert!(!q.schedule_if_absent(&mut r, "d", now).await.unwrap());
    assert!(q.done(&mut r, &lease).await.unwrap());
    assert!(q.schedule_if_absent(&mut r, "d", now).await.unwrap());
    env.shutdown.trigger();
}
