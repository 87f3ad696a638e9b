//! The projects and documents API end to end: the read routes (`GET /api/projects`, a
//! project's summary, its documents and their titles), removing a document (announced to the
//! relays), and the rule that a project never exists without an owner.

use std::time::Duration;

use futures::StreamExt;
use inkwire_shared::access_changes::{ACCESS_CHANGED_SUBJECT, AccessChange};
use inkwire_shared::membership;
use inkwire_tests::{TestEnv, json};
use redis::AsyncCommands;
use reqwest::StatusCode;

/// alice owns p-1 (bob reads it) and p-2; d-1 has a title, d-2 none.
async fn two_projects(env: &TestEnv) {
    let svc = env.service_token();
    let alice = env.token("alice");
    for project in ["p-1", "p-2"] {
        let (status, body) = env
            .put(
                &format!("/api/projects/{project}/members/alice"),
                &svc,
                &json!({"role": "owner"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = env
        .put(
            "/api/projects/p-1/members/bob",
            &alice,
            &json!({"role": "reader"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = env
        .put(
            "/api/projects/p-1/documents/d-1",
            &alice,
            &json!({"title": "Chapter 1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"projectId": "p-1", "documentId": "d-1", "title": "Chapter 1"})
    );
    let (status, body) = env
        .put("/api/projects/p-1/documents/d-2", &alice, &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["title"], json!(null));
}

#[tokio::test]
async fn callers_list_their_projects_with_their_role() {
    let env = TestEnv::start().await;
    two_projects(&env).await;

    let (status, body) = env.get("/api/projects", &env.token("alice")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"userId": "alice", "projects": [
            {"projectId": "p-1", "role": "owner"},
            {"projectId": "p-2", "role": "owner"}
        ]})
    );
    let (_, body) = env.get("/api/projects", &env.token("bob")).await;
    assert_eq!(
        body["projects"],
        json!([{"projectId": "p-1", "role": "reader"}])
    );
    let (status, body) = env.get("/api/projects", &env.token("mallory")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["projects"], json!([]));

    // A removed member no longer sees the project.
    let (status, _) = env
        .delete("/api/projects/p-1/members/bob", &env.token("alice"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, body) = env.get("/api/projects", &env.token("bob")).await;
    assert_eq!(body["projects"], json!([]));

    let (status, _) = env.get("/api/projects", "not-a-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_project_summary_is_for_members_service_and_admin() {
    let env = TestEnv::start().await;
    two_projects(&env).await;

    let (status, body) = env.get("/api/projects/p-1", &env.token("bob")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"projectId": "p-1", "role": "reader", "owners": ["alice"],
               "memberCount": 2, "documentCount": 2})
    );
    let (status, body) = env.get("/api/projects/p-1", &env.service_token()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["role"], json!(null), "the service is not a member");
    let (status, _) = env.get("/api/projects/p-2", &env.admin_token()).await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = env.get("/api/projects/p-1", &env.token("mallory")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Outsiders cannot tell a missing project from a foreign one.
    let (status, _) = env.get("/api/projects/nope", &env.token("mallory")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = env.get("/api/projects/nope", &env.service_token()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "project_not_found");
    let (status, body) = env.get("/api/projects/p.1", &env.service_token()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_id");
}

#[tokio::test]
async fn documents_are_listed_read_back_and_removed() {
    let env = TestEnv::start().await;
    two_projects(&env).await;
    let alice = env.token("alice");
    let bob = env.token("bob");

    let (status, body) = env.get("/api/projects/p-1/documents", &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"projectId": "p-1", "documents": [
            {"documentId": "d-1", "title": "Chapter 1"},
            {"documentId": "d-2", "title": null}
        ]})
    );
    let (status, _) = env
        .get("/api/projects/p-1/documents", &env.token("mallory"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, body) = env.get("/api/projects/p-2/documents", &alice).await;
    assert_eq!(body["documents"], json!([]));

    // The title is read back; registering again without one keeps it, with one changes it.
    let (status, body) = env.get("/api/projects/p-1/documents/d-1", &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"projectId": "p-1", "documentId": "d-1", "title": "Chapter 1"})
    );
    let (_, body) = env
        .put("/api/projects/p-1/documents/d-1", &alice, &json!({}))
        .await;
    assert_eq!(body["title"], "Chapter 1");
    let (_, body) = env
        .put(
            "/api/projects/p-1/documents/d-1",
            &alice,
            &json!({"title": "Chapter One"}),
        )
        .await;
    assert_eq!(body["title"], "Chapter One");
    let (_, body) = env.get("/api/projects/p-1/documents/d-1", &bob).await;
    assert_eq!(body["title"], "Chapter One");

    // A document is found only in its own project.
    let (status, body) = env.get("/api/projects/p-2/documents/d-1", &alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "document_not_found");
    let (status, _) = env.get("/api/projects/p-1/documents/d-9", &bob).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env
        .get("/api/projects/p-1/documents/d-1", &env.token("mallory"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = env.get("/api/projects/p-1/documents/d*1", &bob).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_id");

    // Removing: owners, service and admin only.
    let (status, _) = env.delete("/api/projects/p-1/documents/d-1", &bob).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = env.delete("/api/projects/p-2/documents/d-1", &alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not registered in p-2");
    let (status, body) = env.delete("/api/projects/p-1/documents/d-1", &alice).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = env.delete("/api/projects/p-1/documents/d-1", &alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "document_not_found");
    let (status, _) = env.get("/api/projects/p-1/documents/d-1", &bob).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, body) = env.get("/api/projects/p-1/documents", &bob).await;
    assert_eq!(
        body["documents"],
        json!([{"documentId": "d-2", "title": null}])
    );
    let (_, body) = env.get("/api/projects/p-1", &bob).await;
    assert_eq!(body["documentCount"], 1);

    // Gone from its project, it no longer authorizes anything there and may be registered
    // elsewhere, without its old title.
    let mut redis = env.state.redis.clone();
    assert_eq!(
        membership::project_of_document(&mut redis, "d-1")
            .await
            .unwrap(),
        None
    );
    let (status, body) = env
        .put("/api/projects/p-2/documents/d-1", &alice, &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["title"], json!(null));
    let (status, _) = env
        .delete("/api/projects/p-2/documents/d-1", &env.service_token())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn removing_a_document_is_announced_to_the_relays() {
    let env = TestEnv::start().await;
    two_projects(&env).await;
    let mut changes = env
        .state
        .nats
        .subscribe(ACCESS_CHANGED_SUBJECT)
        .await
        .unwrap();
    env.state.nats.flush().await.unwrap();

    let (status, _) = env
        .delete("/api/projects/p-1/documents/d-2", &env.token("alice"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let msg = tokio::time::timeout(Duration::from_secs(2), changes.next())
        .await
        .expect("an announcement within 2 s")
        .unwrap();
    let change: AccessChange = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(
        change,
        AccessChange::Document {
            project_id: "p-1".into(),
            document_id: "d-2".into()
        }
    );
}

#[tokio::test]
async fn a_project_is_created_by_its_first_owner_only() {
    let env = TestEnv::start().await;
    let svc = env.service_token();

    // The first member must be an owner: anything else would create an ownerless project.
    for role in ["editor", "reviewer", "reader"] {
        let (status, body) = env
            .put(
                "/api/projects/p-new/members/bob",
                &svc,
                &json!({"role": role}),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{role}: {body}");
        assert_eq!(body["code"], "project_needs_owner");
    }
    let (status, body) = env.get("/api/projects/p-new", &svc).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was created: {body}");
    let (_, body) = env.get("/api/projects", &env.token("bob")).await;
    assert_eq!(body["projects"], json!([]));

    // A document cannot be registered in a project that does not exist.
    let (status, body) = env
        .put("/api/projects/p-new/documents/d-1", &svc, &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "project_not_found");
    let mut redis = env.state.redis.clone();
    assert_eq!(
        membership::project_of_document(&mut redis, "d-1")
            .await
            .unwrap(),
        None
    );

    // With an owner, both work.
    let (status, _) = env
        .put(
            "/api/projects/p-new/members/alice",
            &svc,
            &json!({"role": "owner"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .put(
            "/api/projects/p-new/members/bob",
            &svc,
            &json!({"role": "editor"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .put("/api/projects/p-new/documents/d-1", &svc, &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // And the owner can still not be removed while they are the last one.
    let (status, body) = env.delete("/api/projects/p-new/members/alice", &svc).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "last_owner");
}

#[tokio::test]
async fn ownerless_data_stays_ownerless_until_an_owner_is_added() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    // A project stored before owners were enforced: one reader, no owner.
    let mut redis = env.state.redis.clone();
    let _: () = redis
        .hset("inkwire:project:legacy:members", "bob", "reader")
        .await
        .unwrap();

    let (status, body) = env
        .put(
            "/api/projects/legacy/members/carol",
            &svc,
            &json!({"role": "editor"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "project_needs_owner");
    let (status, body) = env
        .put("/api/projects/legacy/documents/d-1", &svc, &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "project_needs_owner");

    // Giving it an owner repairs it.
    let (status, _) = env
        .put(
            "/api/projects/legacy/members/bob",
            &svc,
            &json!({"role": "owner"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .put("/api/projects/legacy/documents/d-1", &svc, &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
}
