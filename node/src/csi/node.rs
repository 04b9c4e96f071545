//! CSI Node: maps requests onto [`Volumes`].

use std::path::PathBuf;
use std::sync::Arc;

use csi_proto::contract::PublishContext;
use csi_proto::node_server::Node;
use csi_proto::node_service_capability::{Rpc, Type as CapType, rpc::Type as RpcType};
use csi_proto::volume_capability::AccessType;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_usage::Unit;
use csi_proto::*;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::{NodeInfo, status};
use crate::attach::KernelAttacher;
use crate::blocking::blocking;
use crate::error::{Error, ErrorKind};
use crate::fsutil;
use crate::state::Access;
use crate::volumes::Volumes;

#[derive(Debug, Clone)]
pub struct NodeService {
    pub volumes: Arc<Volumes<KernelAttacher>>,
    pub info: NodeInfo,
}

fn access(cap: Option<&VolumeCapability>) -> Result<Access, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() { "ext4".to_owned() } else { m.fs_type.clone() };
            if !["ext4", "ext3", "ext2", "xfs"].contains(&fs_type.as_str()) {
                return Err(Status::invalid_argument(format!("unsupported fsType {fs_type:?}")));
            }
            Ok(Access::Mount { fs_type, flags: m.mount_flags.clone() })
        }
        None => Err(Status::invalid_argument("volume_capability needs an access type")),
    }
}

/// Runs a volume operation to its end in a task of its own. When the caller
/// goes away (kubelet's deadline, a restart), tonic drops the handler, but a
/// kernel request already on the blocking pool goes on: the operation goes
/// on with it, holding the node's volume lock, so that kubelet's retry finds
/// it done rather than half done (a device attached, its state "attaching").
async fn to_the_end<T: Send + 'static>(
    op: impl Future<Output = crate::error::Result<T>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(op.in_current_span())
        .await
        .map_err(|e| Status::internal(format!("volume operation failed: {e}")))?
        .map_err(status)
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(err, skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() || r.staging_target_path.is_empty() {
            return Err(Status::invalid_argument("volume_id and staging_target_path are required"));
        }
        let access = access(r.volume_capability.as_ref())?;
        let context =
            PublishContext::try_from(&r.publish_context).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let volumes = Arc::clone(&self.volumes);
        let (volume_id, staging) = (r.volume_id.clone(), PathBuf::from(&r.staging_target_path));
        let index = to_the_end(async move { volumes.stage(&volume_id, &context, &staging, &access).await }).await?;
        tracing::info!(volume = %r.volume_id, index, "staged");
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let volumes = Arc::clone(&self.volumes);
        let (volume_id, staging) = (r.volume_id.clone(), PathBuf::from(&r.staging_target_path));
        to_the_end(async move { volumes.unstage(&volume_id, &staging).await }).await?;
        tracing::info!(volume = %r.volume_id, "unstaged");
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let access = access(r.volume_capability.as_ref())?;
        if r.staging_target_path.is_empty() {
            return Err(Status::failed_precondition("staging_target_path is required (STAGE_UNSTAGE_VOLUME)"));
        }
        let (staging, target) = (PathBuf::from(&r.staging_target_path), PathBuf::from(&r.target_path));
        let block = access == Access::Block;
        let single_writer = r
            .volume_capability
            .as_ref()
            .and_then(|c| c.access_mode.as_ref())
            .is_some_and(|m| m.mode == Mode::SingleNodeSingleWriter as i32);
        let (volumes, volume_id, ro) = (Arc::clone(&self.volumes), r.volume_id, r.readonly);
        to_the_end(async move { volumes.publish(&volume_id, &staging, &target, block, ro, single_writer).await })
            .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let (volumes, target) = (Arc::clone(&self.volumes), PathBuf::from(&r.target_path));
        to_the_end(async move { volumes.unpublish(&r.volume_id, &target).await }).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() || r.volume_path.is_empty() {
            return Err(Status::invalid_argument("volume_id and volume_path are required"));
        }
        let path = PathBuf::from(&r.volume_path);
        // stat and statvfs of a filesystem on a device whose server is gone
        // may wait: on the blocking pool.
        let (is_dir, usage) = blocking(move || {
            let meta = std::fs::metadata(&path)
                .map_err(|_| Error::new(ErrorKind::NotFound, format!("{} does not exist", path.display())))?;
            Ok((meta.is_dir(), if meta.is_dir() { Some(fsutil::usage(&path)?) } else { None }))
        })
        .await
        .map_err(status)?;
        let (device, (abnormal, message)) = self.volumes.condition(&r.volume_id).await.map_err(status)?;
        let condition = VolumeCondition { abnormal, message };
        let usage = if let (true, Some((b, i))) = (is_dir, usage) {
            let u = |v: [u64; 3], unit: Unit| VolumeUsage {
                total: v[0] as i64,
                available: v[1] as i64,
                used: v[2] as i64,
                unit: unit as i32,
            };
            vec![u(b, Unit::Bytes), u(i, Unit::Inodes)]
        } else {
            let size = device.and_then(|i| self.volumes.attacher().sysfs().size_bytes(i)).unwrap_or(0);
            vec![VolumeUsage { total: size as i64, available: 0, used: 0, unit: Unit::Bytes as i32 }]
        };
        Ok(Response::new(NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) }))
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() || r.volume_path.is_empty() {
            return Err(Status::invalid_argument("volume_id and volume_path are required"));
        }
        let path = if r.staging_target_path.is_empty() { &r.volume_path } else { &r.staging_target_path };
        let (volumes, path) = (Arc::clone(&self.volumes), PathBuf::from(path));
        let size = to_the_end(async move { volumes.expand(&r.volume_id, &path).await }).await?;
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes: size as i64 }))
    }

    #[tracing::instrument(err, skip_all)]
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: RpcType| NodeServiceCapability { r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })) };
        let capabilities = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::ExpandVolume,
            RpcType::VolumeCondition,
            RpcType::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(rpc)
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    #[tracing::instrument(err, skip_all)]
    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.info.node_id.clone(),
            max_volumes_per_node: self.info.max_volumes,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;
    use std::time::Duration;

    use csi_proto::contract::publish_key::{NBD_URI, READ_ONLY};
    use csi_proto::volume_capability::{AccessMode, BlockVolume};
    use tonic::Code;

    use super::*;
    use crate::state::StateDir;
    use crate::volumes::Settings;

    fn service(dir: &Path) -> NodeService {
        let settings = Settings {
            node_id: "node-a".into(),
            connections: 1,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
        };
        let attacher = Arc::new(KernelAttacher::open(true).unwrap());
        let volumes = Volumes::new(attacher, StateDir::open(dir.join("state")).unwrap(), settings);
        let info = NodeInfo { driver_name: "nbd.csi.dev".into(), node_id: "worker-1".into(), max_volumes: 1 };
        NodeService { volumes: Arc::new(volumes), info }
    }

    fn stage_request(dir: &Path, context: &[(&str, &str)]) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: "vol-1".into(),
            staging_target_path: dir.join("staging").to_string_lossy().into_owned(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Block(BlockVolume {})),
                access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            }),
            publish_context: context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
            ..Default::default()
        }
    }

    /// A node at its volume limit refuses another volume with
    /// RESOURCE_EXHAUSTED and the reason, before saving or attaching anything
    /// (port 1 on loopback refuses connections: an attach would fail
    /// UNAVAILABLE).
    #[tokio::test]
    async fn stage_beyond_the_volume_limit_is_resource_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        let node = service(dir.path());
        let node = NodeService {
            volumes: Arc::new(
                Volumes::new(
                    Arc::new(KernelAttacher::open(true).unwrap()),
                    StateDir::open(dir.path().join("state")).unwrap(),
                    Settings {
                        node_id: "node-a".into(),
                        connections: 1,
                        timeout: Duration::from_secs(30),
                        dead_conn_timeout: Duration::from_secs(120),
                    },
                )
                .with_max_volumes(1),
            ),
            ..node
        };
        let staged = crate::state::VolumeState {
            volume_id: "vol-0".into(),
            phase: crate::state::Phase::Staged,
            uri: "nbd://127.0.0.1:1/vol".into(),
            connections: 1,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            staging_path: dir.path().join("staging-0"),
            access: Access::Block,
            read_only: false,
            index: Some(0),
            backend_id: None,
        };
        StateDir::open(dir.path().join("state")).unwrap().save(&staged).unwrap();
        let request = stage_request(dir.path(), &[(NBD_URI, "nbd://127.0.0.1:1/vol")]);
        let err = node.node_stage_volume(Request::new(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("maximum of 1 volumes"), "{}", err.message());
        let saved = std::fs::read_dir(dir.path().join("state")).unwrap().count();
        assert_eq!(saved, 1, "nothing saved for the refused volume");
    }

    /// A publish_context the controller never writes is refused with the
    /// key it is about, before anything is saved or attached (port 1 on
    /// loopback refuses connections: an attach would fail UNAVAILABLE).
    #[tokio::test]
    async fn stage_refuses_a_bad_publish_context_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let node = service(dir.path());
        let cases: [(&[(&str, &str)], &str); 4] = [
            (&[(READ_ONLY, "false")], NBD_URI),
            (&[(NBD_URI, "nbd://127.0.0.1:0/vol")], NBD_URI),
            (&[(NBD_URI, "127.0.0.1:1/vol")], NBD_URI),
            (&[(NBD_URI, "nbd://127.0.0.1:1/vol"), (READ_ONLY, "yes")], READ_ONLY),
        ];
        for (context, key) in cases {
            let err = node.node_stage_volume(Request::new(stage_request(dir.path(), context))).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{context:?}: {err:?}");
            assert!(err.message().contains(key), "{context:?}: {}", err.message());
            let saved = std::fs::read_dir(dir.path().join("state")).unwrap().count();
            assert_eq!(saved, 0, "{context:?}: nothing saved");
        }
    }

    /// An nbds:// volume on a plugin started without --tls-dir: the node
    /// lacks what the volume needs, FAILED_PRECONDITION naming the flag,
    /// before any connection (port 1 on loopback refuses connections: an
    /// attempt would fail UNAVAILABLE) and never a plaintext attach.
    #[tokio::test]
    async fn stage_of_an_nbds_volume_without_certificates_is_a_failed_precondition() {
        let dir = tempfile::tempdir().unwrap();
        let node = service(dir.path());
        let request = stage_request(dir.path(), &[(NBD_URI, "nbds://127.0.0.1:1/vol")]);
        let err = node.node_stage_volume(Request::new(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("--tls-dir"), "{}", err.message());
    }
}
