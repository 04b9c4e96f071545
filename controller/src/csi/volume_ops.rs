//! CreateVolume, DeleteVolume, ValidateVolumeCapabilities, ListVolumes,
//! ControllerGetVolume, GetCapacity, ControllerExpandVolume: checked here,
//! then carried out by the in-process agent or, in cluster mode, through
//! the cluster's objects ([`crate::storage`]).

use std::collections::HashMap;

use agent::{Condition, ExportTls, NewVolume, Source, VolumeRecord, VolumeStatus};
use csi_proto::contract::{VolumeAccess, VolumeContext};
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use csi_proto::*;
use tracing::Span;

use super::{
    Caps, MIB, capacity, check_capabilities, check_parameters, export_tls, is_reader_only, page, require, selector,
};
use crate::driver::{Driver, LockKey};
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::storage::objects::{self, VolumeRequest};

/// What the node plugin learns from volume_context (never the token), and
/// the name the volume was created with, for operators.
fn volume_context(record: &VolumeRecord) -> HashMap<String, String> {
    let access =
        if record.block { VolumeAccess::Block } else { VolumeAccess::Mount { fs_type: record.fs_type.clone() } };
    VolumeContext { name: record.name.clone(), access }.to_map()
}

fn source_message(source: &Option<Source>) -> Option<VolumeContentSource> {
    let r#type = match source.as_ref()? {
        Source::Snapshot(id) => SourceType::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
        Source::Volume(id) => SourceType::Volume(VolumeSource { volume_id: id.clone() }),
    };
    Some(VolumeContentSource { r#type: Some(r#type) })
}

pub fn volume_message(record: &VolumeRecord) -> Volume {
    Volume {
        capacity_bytes: record.capacity_bytes as i64,
        volume_id: record.id.clone(),
        volume_context: volume_context(record),
        content_source: source_message(&record.source),
        accessible_topology: Vec::new(),
    }
}

fn condition(volume: &VolumeStatus) -> VolumeCondition {
    match &volume.condition {
        Condition::Broken(reason) => VolumeCondition { abnormal: true, message: reason.clone() },
        Condition::Serving => VolumeCondition { abnormal: false, message: "NBD server is serving".into() },
        Condition::Unpublished => VolumeCondition {
            abnormal: false,
            message: "published to no node: its NBD server starts at ControllerPublishVolume".into(),
        },
        Condition::NotServing => VolumeCondition { abnormal: true, message: "NBD server is not serving".into() },
    }
}

/// Same name asked again: the same volume if it satisfies the request
/// (with at least the TLS asked for: a clone's may be its source's, more).
fn compatible(
    record: &VolumeRecord,
    req: &CreateVolumeRequest,
    caps: &Caps,
    source: &Option<Source>,
    tls: ExportTls,
) -> bool {
    let (required, limit) = req.capacity_range.as_ref().map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    let size = record.capacity_bytes as i64;
    size >= required
        && (limit == 0 || size <= limit)
        && record.block == caps.block
        && caps.modes.iter().all(|m| record.access_modes.contains(m))
        && (caps.fs_type.is_empty() || caps.fs_type == record.fs_type)
        && &record.source == source
        && record.tls >= tls
}

/// Content that came from a block volume never becomes a filesystem volume:
/// its user could write any bytes, a crafted superblock included, and the
/// node would mount it in its kernel. The other way round is harmless: a
/// block volume's user gets the raw bytes of a filesystem, parsed by nobody
/// but that user.
pub fn check_source_access(what: &str, source_block: bool, block: bool) -> Result<()> {
    if source_block && !block {
        return Err(Error::invalid(format!(
            "{what} holds a block volume's content: it can only become a block volume, not a filesystem volume \
             (the node would mount a filesystem the block volume's user could craft)"
        )));
    }
    Ok(())
}

fn parse_source(source: &Option<VolumeContentSource>) -> Result<Option<Source>> {
    let Some(source) = source else { return Ok(None) };
    match &source.r#type {
        Some(SourceType::Snapshot(s)) => require(&s.snapshot_id, "content source snapshot_id")
            .map(|()| Some(Source::Snapshot(s.snapshot_id.clone()))),
        Some(SourceType::Volume(v)) => {
            require(&v.volume_id, "content source volume_id").map(|()| Some(Source::Volume(v.volume_id.clone())))
        }
        None => Err(Error::invalid("volume_content_source without a type")),
    }
}

/// Every expansion needs the node step, raw block volumes included: the
/// kernel's NBD device learns the new size only from NodeExpandVolume
/// (netlink RECONFIGURE), so without it `/dev/nbdX` keeps its old size in
/// the pod until the volume is staged again; for a filesystem the node
/// grows it too.
const NODE_EXPANSION_REQUIRED: bool = true;

impl Driver {
    #[tracing::instrument(err, skip_all, fields(volume.name = %req.name, volume.id = tracing::field::Empty))]
    pub async fn create_volume(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
        require(&req.name, "name")?;
        let caps = check_capabilities(&req.volume_capabilities)?;
        let checked = check_parameters(&req.parameters)?;
        if !req.mutable_parameters.is_empty() {
            return Err(Error::invalid("mutable_parameters are not supported (no MODIFY_VOLUME)"));
        }
        // The class's mode, else the controller's default; a clone or
        // restore gets its source's when that is more (below).
        let tls = export_tls(checked.tls.unwrap_or(self.config().default_tls));
        let parameters = checked.kept;
        let source = parse_source(&req.volume_content_source)?;
        let _name_guard = self.lock(LockKey::VolumeName(req.name.to_owned())).await;
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            Storage::Cluster(cluster) => {
                // The range is checked before anything is read.
                capacity(req.capacity_range.as_ref(), 0)?;
                let selector = selector(&parameters)?;
                Span::current().record("volume.id", objects::volume_id(&req.name).as_str());
                let (required, limit) =
                    req.capacity_range.as_ref().map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
                let request = VolumeRequest { name: req.name, required, limit, caps, source, parameters, tls };
                let volume = cluster.create_volume(&request, &selector).await?;
                return Ok(CreateVolumeResponse { volume: Some(volume) });
            }
        };
        let existing = agent.find_volume_by_name(&req.name);
        if let Some(record) = existing {
            Span::current().record("volume.id", record.id.as_str());
            if compatible(&record, &req, &caps, &source, tls) {
                return Ok(CreateVolumeResponse { volume: Some(volume_message(&record)) });
            }
            return Err(Error::exists(format!("volume {:?} exists as {} with other properties", req.name, record.id)));
        }
        // Hold the source still until the agent has copied it.
        let (_source_guard, source_size, source_tls) = match &source {
            None => (None, 0, ExportTls::Off),
            Some(Source::Snapshot(id)) => {
                let guard = self.lock(LockKey::SnapshotId(id.to_owned())).await;
                let snapshot = agent.snapshot(id).map(|s| (s.size_bytes, s.source_block, s.source_tls));
                let (size, source_block, source_tls) =
                    snapshot.ok_or_else(|| Error::not_found(format!("source snapshot {id} not found")))?;
                // Unknown (an old record whose source is gone): assume block.
                check_source_access(&format!("snapshot {id}"), source_block.unwrap_or(true), caps.block)?;
                (Some(guard), size, source_tls)
            }
            Some(Source::Volume(id)) => {
                let guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
                let (size, source_tls) = match agent.volume(id) {
                    None => return Err(Error::not_found(format!("source volume {id} not found"))),
                    Some(v) => {
                        v.check_usable()?;
                        check_source_access(&format!("volume {id}"), v.record.block, caps.block)?;
                        (v.record.capacity_bytes, v.record.tls)
                    }
                };
                (Some(guard), size, source_tls)
            }
        };
        let size = capacity(req.capacity_range.as_ref(), source_size)?;
        let new = NewVolume {
            id: None,
            name: req.name.clone(),
            capacity_bytes: size,
            block: caps.block,
            read_only: caps.modes.iter().all(|m| is_reader_only(*m)),
            access_modes: caps.modes,
            fs_type: caps.fs_type,
            parameters,
            source,
            export_name: None,
            tls: tls.max(source_tls),
        };
        let record = agent.create_volume(new).await?;
        Span::current().record("volume.id", record.id.as_str());
        Ok(CreateVolumeResponse { volume: Some(volume_message(&record)) })
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.volume_id))]
    pub async fn delete_volume(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let id = req.volume_id;
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            Storage::Cluster(cluster) => {
                let _guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
                cluster.delete_volume(&id).await?;
                return Ok(DeleteVolumeResponse {});
            }
        };
        let Some(name) = agent.volume(&id).map(|v| v.record.name) else {
            return Ok(DeleteVolumeResponse {});
        };
        let _name_guard = self.lock(LockKey::VolumeName(name.to_owned())).await;
        let _guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
        agent.delete_volume(&id).await?;
        Ok(DeleteVolumeResponse {})
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.volume_id))]
    pub async fn validate_capabilities(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse> {
        require(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::invalid("volume_capabilities are required"));
        }
        let block = match self.storage() {
            Storage::Embedded(agent) => match agent.volume(&req.volume_id) {
                Some(v) => v.record.block,
                None => return Err(Error::not_found(format!("volume {} not found", req.volume_id))),
            },
            Storage::Cluster(cluster) => {
                cluster.volume(&req.volume_id).await?.spec.access_type == agent::resources::AccessType::Block
            }
        };
        let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse { confirmed: None, message };
        let caps = match check_capabilities(&req.volume_capabilities) {
            Ok(caps) => caps,
            Err(e) => return Ok(unconfirmed(e.to_string())),
        };
        if caps.block != block {
            let kind = if block { "block" } else { "mount" };
            return Ok(unconfirmed(format!("volume was created for {kind} access")));
        }
        if let Err(e) = check_parameters(&req.parameters) {
            return Ok(unconfirmed(e.to_string()));
        }
        if !req.mutable_parameters.is_empty() {
            return Ok(unconfirmed("mutable_parameters are not supported".into()));
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = tracing::field::Empty))]
    pub async fn list_volumes(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            Storage::Cluster(cluster) => {
                let objects = cluster.list_volumes().await?;
                let ids: Vec<String> = objects.iter().map(kube::ResourceExt::name_any).collect();
                let (on_page, next_token) =
                    page(ids.iter(), &req.starting_token, req.max_entries, agent::is_volume_id)?;
                let entries = objects
                    .iter()
                    .zip(&ids)
                    // Both in id order: the page is one run of them.
                    .filter(|(_, id)| on_page.binary_search(id).is_ok())
                    .map(|(o, _)| list_volumes_response::Entry {
                        volume: Some(objects::volume_message(o)),
                        status: Some(list_volumes_response::VolumeStatus {
                            published_node_ids: objects::published_nodes(o),
                            volume_condition: Some(objects::volume_condition(o)),
                        }),
                    })
                    .collect();
                return Ok(ListVolumesResponse { entries, next_token });
            }
        };
        let all = agent.volume_ids();
        let (ids, next_token) = page(all.iter(), &req.starting_token, req.max_entries, agent::is_volume_id)?;
        let entries = ids
            .iter()
            .filter_map(|id| agent.volume(id))
            .map(|v| list_volumes_response::Entry {
                volume: Some(volume_message(&v.record)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: v.record.published.keys().cloned().collect(),
                    volume_condition: Some(condition(&v)),
                }),
            })
            .collect();
        Ok(ListVolumesResponse { entries, next_token })
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.volume_id))]
    pub async fn get_volume(&self, req: ControllerGetVolumeRequest) -> Result<ControllerGetVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            Storage::Cluster(cluster) => {
                let object = cluster.volume(&req.volume_id).await?;
                return Ok(ControllerGetVolumeResponse {
                    volume: Some(objects::volume_message(&object)),
                    status: Some(controller_get_volume_response::VolumeStatus {
                        published_node_ids: objects::published_nodes(&object),
                        volume_condition: Some(objects::volume_condition(&object)),
                    }),
                });
            }
        };
        let v = agent.volume(&req.volume_id).ok_or_else(|| Error::not_found("volume not found"))?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(volume_message(&v.record)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: v.record.published.keys().cloned().collect(),
                volume_condition: Some(condition(&v)),
            }),
        })
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = tracing::field::Empty))]
    pub async fn get_capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
        let checked = check_parameters(&req.parameters)?;
        if !req.volume_capabilities.is_empty() && check_capabilities(&req.volume_capabilities).is_err() {
            // No volume with these capabilities can be created at all.
            return Ok(GetCapacityResponse { available_capacity: 0, ..Default::default() });
        }
        // Only storage that can serve the class's TLS counts: CreateVolume
        // places a TLS volume nowhere else.
        let needs_tls = !export_tls(checked.tls.unwrap_or(self.config().default_tls)).is_off();
        let (available, largest) = match self.storage() {
            Storage::Embedded(agent) if needs_tls && !agent.can_serve_tls().await => (0, 0),
            Storage::Embedded(agent) => {
                let available = agent.space().await?.available;
                (available, available)
            }
            Storage::Cluster(cluster) => cluster.capacity(&selector(&checked.kept)?, needs_tls).await?,
        };
        // Whole MiB: what a volume's size can use.
        let mib = |bytes: u64| (bytes / MIB * MIB).min(i64::MAX as u64) as i64;
        Ok(GetCapacityResponse {
            available_capacity: mib(available),
            maximum_volume_size: Some(mib(largest)),
            minimum_volume_size: Some(MIB as i64),
        })
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.volume_id))]
    pub async fn expand_volume(&self, req: ControllerExpandVolumeRequest) -> Result<ControllerExpandVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let range = req.capacity_range.ok_or_else(|| Error::invalid("capacity_range is required"))?;
        if let Some(cap) = &req.volume_capability {
            super::check_capability(cap)?;
        }
        let id = req.volume_id;
        let _guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            Storage::Cluster(cluster) => {
                let size = cluster.expand_volume(&id, &range).await?;
                return Ok(ControllerExpandVolumeResponse {
                    capacity_bytes: size.min(i64::MAX as u64) as i64,
                    node_expansion_required: NODE_EXPANSION_REQUIRED,
                });
            }
        };
        let record = {
            let v = agent.volume(&id).ok_or_else(|| Error::not_found(format!("volume {id} not found")))?;
            v.check_usable()?;
            v.record
        };
        // Never shrinks: the new size is at least the current one.
        let size = capacity(Some(&range), record.capacity_bytes)?;
        let size = agent.expand_volume(&id, size).await?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: NODE_EXPANSION_REQUIRED,
        })
    }
}
