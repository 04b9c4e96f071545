//! Where a binary's Kubernetes access comes from, decided once for both.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// A client from `kubeconfig`; else, inside a pod, from the in-cluster
/// config; else `None`: the binary runs without Kubernetes. An error names
/// what could not be loaded.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Option<kube::Client>, String> {
    let config = if let Some(path) = kubeconfig {
        let kc = Kubeconfig::read_from(path).map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster().map_err(|e| format!("in-cluster config: {e}"))?
    } else {
        return Ok(None);
    };
    kube::Client::try_from(config).map(Some).map_err(|e| format!("kubernetes client: {e}"))
}

/// Runs one Event recording in the background: a caller on an RPC path
/// never waits for the API server, and a failure is only logged.
/// `recording` yields the Event's name, or `None` when there was nothing
/// to record it on.
pub fn in_background<F>(reason: &'static str, recording: F)
where
    F: Future<Output = Result<Option<String>, kube::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        match recording.await {
            Ok(Some(name)) => tracing::debug!(event = %name, reason, "event recorded"),
            Ok(None) => tracing::debug!(reason, "nothing to record the event on"),
            Err(e) => tracing::warn!(reason, error = %e, "recording an event failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kubeconfig_that_cannot_be_read_is_an_error_naming_it() {
        let Err(err) = client(Some(Path::new("/nonexistent/kubeconfig"))).await else {
            panic!("a client from nothing")
        };
        assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
    }

    #[tokio::test]
    async fn a_kubeconfig_names_the_api_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:6443'}\n\
             users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
             current-context: x\n",
        )
        .unwrap();
        let client = client(Some(&path)).await.unwrap().expect("a client from the kubeconfig");
        assert_eq!(client.default_namespace(), "default");
    }
}
