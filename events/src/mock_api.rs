//! A `kube::Client` whose requests a test answers itself (tower-test), for
//! unit tests of code that talks to the API server.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::Value;
use tower_test::mock::{Handle, SendResponse};

/// The test's end: each `next_request()` is one API call.
pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

pub fn client() -> (kube::Client, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// Answers one request with `body` as JSON.
pub fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let mut response = Response::new(Body::from(serde_json::to_vec(body).expect("JSON")));
    *response.status_mut() = status;
    send.send_response(response);
}

/// The JSON body of a request.
pub async fn json_body(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.expect("request body");
    serde_json::from_slice(&bytes).expect("JSON request body")
}

/// A Kubernetes Status of `code` (404 NotFound, say).
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "reason": reason, "code": code
    })
}
