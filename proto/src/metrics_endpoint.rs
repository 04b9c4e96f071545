//! The `GET /metrics` endpoint both binaries serve (Prometheus' text
//! format): the controller and its storage role, and the node plugin. Each
//! brings its own registry; this is the HTTP around it, written once.
//!
//! Rendering runs on tokio's blocking pool: collectors read files (sysfs,
//! /proc, the store's images) that a wedged kernel or disk can make slow,
//! and a scrape must never hold a runtime worker that CSI calls need.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

/// The Prometheus text exposition format's content type.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape answers: the metrics now, in the text format.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Answers `GET /metrics` on `listener` with `render`'s text, until dropped;
/// any other path is 404, any other method 405.
pub async fn serve(listener: TcpListener, render: Render) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = Arc::clone(&render);
            async move {
                match tokio::task::spawn_blocking(move || render()).await {
                    Ok(text) => Ok(([(http::header::CONTENT_TYPE, TEXT_FORMAT)], text)),
                    Err(e) => {
                        tracing::error!(error = %e, "rendering the metrics failed");
                        Err(http::StatusCode::INTERNAL_SERVER_ERROR)
                    }
                }
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds the metrics listener and serves it in the background; returns
/// the address bound (a port 0 resolved).
pub async fn spawn(addr: SocketAddr, render: Render) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, render).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn http(addr: SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn scrapes_get_the_text_format_and_nothing_else_is_served() {
        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&scrapes);
        let render: Render = Arc::new(move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            format!("# TYPE scrapes counter\nscrapes_total {n}\n# EOF\n")
        });
        let addr = spawn("127.0.0.1:0".parse().unwrap(), render).await.unwrap();
        let close = "Connection: close\r\n\r\n";
        let reply = http(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains(&format!("content-type: {TEXT_FORMAT}")), "{reply}");
        assert!(reply.ends_with("\r\n\r\n# TYPE scrapes counter\nscrapes_total 1\n# EOF\n"), "{reply}");
        let again = http(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(again.contains("scrapes_total 2\n"), "rendered on each scrape: {again}");
        let other = http(addr, &format!("GET /other HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = http(addr, &format!("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}")).await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }
}
