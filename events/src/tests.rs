use http::{Method, StatusCode};
use serde_json::json;

use super::*;
use crate::mock_api::{self, ApiHandle, json_body as body, reply};

fn recorder() -> (Recorder, ApiHandle) {
    let (client, handle) = mock_api::client();
    (Recorder::new(client, "nbd.csi.dev/node".into(), &"i".repeat(300)), handle)
}

fn node(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

fn warning(regarding: &str, note: &str) -> WarningEvent {
    WarningEvent {
        namespace: "default".into(),
        regarding: node(regarding),
        related: None,
        reason: "ConnectionLost",
        action: "Reconnect",
        note: note.into(),
    }
}

#[tokio::test]
async fn repeats_count_in_the_series_and_expired_events_are_created_again() {
    let (recorder, mut handle) = recorder();
    let server = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("event create");
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/default/events");
        let mut created = body(request).await;
        let name = created["metadata"]["name"].as_str().unwrap();
        let suffix = name.strip_prefix("worker-1.").expect("named after the object");
        assert!(!suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
        assert!(created.get("series").is_none());
        assert_eq!(created["type"], "Warning");
        assert_eq!(created["reportingController"], "nbd.csi.dev/node");
        assert_eq!(created["reportingInstance"].as_str().unwrap().len(), 128);
        assert!(created["eventTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{created}");
        created["metadata"]["name"] = json!("worker-1.17f3a");
        reply(send, StatusCode::CREATED, &created);

        let (request, send) = handle.next_request().await.expect("event patch");
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/default/events/worker-1.17f3a");
        assert_eq!(request.headers()["content-type"], "application/merge-patch+json");
        let patch = body(request).await;
        assert_eq!(patch["series"]["count"], 2);
        assert!(patch["series"]["lastObservedTime"].as_str().is_some(), "{patch}");
        reply(send, StatusCode::OK, &created);

        let (request, send) = handle.next_request().await.expect("event patch");
        assert_eq!(request.method(), Method::PATCH);
        reply(send, StatusCode::NOT_FOUND, &mock_api::status(404, "NotFound", "events not found"));
        let (request, send) = handle.next_request().await.expect("event create again");
        assert_eq!(request.method(), Method::POST);
        let event = body(request).await;
        assert!(event.get("series").is_none());
        reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "worker-1.2", "namespace": "default"}}));

        // The same note about another object is another Event.
        let (request, send) = handle.next_request().await.expect("event create for worker-2");
        assert_eq!(request.method(), Method::POST);
        assert_eq!(body(request).await["regarding"]["name"], "worker-2");
        reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "worker-2.1", "namespace": "default"}}));
    });
    let lost = || warning("worker-1", "volume vol-1 lost its NBD connection");
    assert_eq!(recorder.record(lost()).await.unwrap(), "worker-1.17f3a");
    assert_eq!(recorder.record(lost()).await.unwrap(), "worker-1.17f3a");
    assert_eq!(recorder.record(lost()).await.unwrap(), "worker-1.2");
    let other = warning("worker-2", "volume vol-1 lost its NBD connection");
    assert_eq!(recorder.record(other).await.unwrap(), "worker-2.1");
    server.await.unwrap();
}

#[tokio::test]
async fn notes_are_cut_to_the_api_limit() {
    let (recorder, mut handle) = recorder();
    let server = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("event create");
        let event = body(request).await;
        assert_eq!(event["note"].as_str().unwrap().len(), MAX_NOTE);
        reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "n.1", "namespace": "default"}}));
    });
    recorder.record(warning("n", &"x".repeat(5000))).await.unwrap();
    server.await.unwrap();
}

#[test]
fn truncation_stops_at_a_char_boundary() {
    let cut = truncate("é".repeat(600), MAX_NOTE);
    assert_eq!(cut.len(), MAX_NOTE);
    assert!(cut.chars().all(|c| c == 'é'));
    assert_eq!(truncate("short".into(), 10), "short");
    assert_eq!(truncate("é".into(), 1), "");
}
