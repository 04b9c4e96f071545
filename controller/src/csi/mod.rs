//! The CSI gRPC services over the [`Driver`]: request validation shared by
//! the RPCs, and the wrapper that turns results into gRPC responses and
//! metrics.

mod controller;
mod identity;
mod publish;
mod snapshots;
mod volume_ops;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use agent::ExportTls;
use csi_proto::contract::{StorageClassParameters, VolumeTls, parameter_key};
use csi_proto::volume_capability::AccessType;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::{CapacityRange, VolumeCapability};
use tonic::{Response, Status};

use crate::driver::Driver;
use crate::error::{Error, Kind, Result};
use crate::storage::placement::Selector;

#[cfg(test)]
pub use controller::CAPABILITIES;
pub use controller::ControllerService;
pub use identity::IdentityService;
pub use volume_ops::check_source_access;

/// Volumes are sized in whole MiB: requests round up to the next MiB.
pub const MIB: u64 = 1 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// Names, ids and parameter strings longer than this are refused before use.
pub const MAX_STRING: usize = 1024;

/// Runs one RPC: records count and latency by method and gRPC code.
async fn call<T>(
    driver: &Arc<Driver>,
    method: &'static str,
    rpc: impl Future<Output = Result<T>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let result = rpc.await.map_err(Status::from);
    let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
    driver.metrics().observe(method, code, start.elapsed());
    result.map(Response::new)
}

pub fn require(value: &str, what: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(format!("{what} is required")));
    }
    if value.len() > MAX_STRING {
        return Err(Error::invalid(format!("{what} is longer than {MAX_STRING} bytes")));
    }
    Ok(())
}

pub fn is_single_node(mode: i32) -> bool {
    matches!(
        Mode::try_from(mode),
        Ok(Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter)
    )
}

pub fn is_reader_only(mode: i32) -> bool {
    matches!(Mode::try_from(mode), Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly))
}

/// One capability: `(block, mode)` when supported, INVALID_ARGUMENT otherwise.
pub fn check_capability(cap: &VolumeCapability) -> Result<(bool, i32)> {
    let block = match &cap.access_type {
        Some(AccessType::Block(_)) => true,
        Some(AccessType::Mount(_)) => false,
        None => return Err(Error::invalid("volume capability without access_type")),
    };
    let Some(mode) = cap.access_mode.as_ref().map(|m| m.mode) else {
        return Err(Error::invalid("volume capability without access_mode"));
    };
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::MultiNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => Ok((block, mode)),
        Ok(Mode::MultiNodeMultiWriter) if block => Ok((block, mode)),
        Ok(Mode::MultiNodeMultiWriter) => {
            Err(Error::invalid("MULTI_NODE_MULTI_WRITER is supported for block volumes only"))
        }
        Ok(other) => Err(Error::invalid(format!("access mode {} is not supported", other.as_str_name()))),
        Err(_) => Err(Error::invalid(format!("unknown access mode {mode}"))),
    }
}

/// What a set of capabilities asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    pub block: bool,
    pub modes: Vec<i32>,
    pub fs_type: String,
}

pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<Caps> {
    if caps.is_empty() {
        return Err(Error::invalid("volume_capabilities are required"));
    }
    let mut out = Caps { block: false, modes: Vec::new(), fs_type: String::new() };
    for (i, cap) in caps.iter().enumerate() {
        let (block, mode) = check_capability(cap)?;
        if i > 0 && block != out.block {
            return Err(Error::invalid("a volume is either block or mount, not both"));
        }
        out.block = block;
        if !out.modes.contains(&mode) {
            out.modes.push(mode);
        }
        if let Some(AccessType::Mount(mount)) = &cap.access_type
            && !mount.fs_type.is_empty()
        {
            require(&mount.fs_type, "fs_type")?;
            out.fs_type = mount.fs_type.clone();
        }
    }
    out.modes.sort_unstable();
    Ok(out)
}

/// Checked plugin parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parameters {
    /// What the record or object keeps: the driver's own keys but `tls`,
    /// which is kept as a field of its own.
    pub kept: BTreeMap<String, String>,
    /// The class's `tls`; `None` when it says nothing.
    pub tls: Option<VolumeTls>,
}

/// Plugin parameters ([`StorageClassParameters`]): this driver defines
/// `storageNodeSelector` (checked here, used for placement in cluster
/// mode; with one embedded agent there is nothing to choose from) and
/// `tls` (off, allowed or required), so any other key outside the
/// sidecars' reserved prefix, or another `tls` value, is INVALID_ARGUMENT.
pub fn check_parameters(parameters: &HashMap<String, String>) -> Result<Parameters> {
    let StorageClassParameters { storage_node_selector, tls } =
        StorageClassParameters::try_from(parameters).map_err(|e| Error::invalid(e.to_string()))?;
    let mut kept = BTreeMap::new();
    if let Some(text) = storage_node_selector.filter(|s| !s.trim().is_empty()) {
        require(&text, parameter_key::STORAGE_NODE_SELECTOR)?;
        Selector::parse(&text)?;
        kept.insert(parameter_key::STORAGE_NODE_SELECTOR.to_owned(), text);
    }
    Ok(Parameters { kept, tls })
}

/// The storage role's spelling of a TLS mode.
pub fn export_tls(tls: VolumeTls) -> ExportTls {
    match tls {
        VolumeTls::Off => ExportTls::Off,
        VolumeTls::Allowed => ExportTls::Allowed,
        VolumeTls::Required => ExportTls::Required,
    }
}

/// The storage-node selector in checked parameters; empty without one.
pub fn selector(parameters: &BTreeMap<String, String>) -> Result<Selector> {
    Selector::parse(parameters.get(parameter_key::STORAGE_NODE_SELECTOR).map_or("", String::as_str))
}

/// The size a volume gets: `required_bytes`; when not given, the source's
/// size for clones and restores, else 1 GiB (or the limit if smaller); at
/// least `minimum` (the source's size); rounded up to a whole MiB.
/// OUT_OF_RANGE when that exceeds `limit_bytes`.
pub fn capacity(range: Option<&CapacityRange>, minimum: u64) -> Result<u64> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Error::invalid("capacity_range values must not be negative"));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Error::out_of_range(format!("required_bytes {required} is above limit_bytes {limit}")));
    }
    let base = match (required, limit) {
        (0, 0) if minimum > 0 => minimum,
        (0, 0) => DEFAULT_CAPACITY,
        (0, limit) => DEFAULT_CAPACITY.min(limit),
        (required, _) => required,
    };
    let size = base
        .max(minimum)
        .checked_next_multiple_of(MIB)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| Error::out_of_range("capacity too large"))?;
    if limit > 0 && size > limit {
        return Err(Error::out_of_range(format!(
            "limit_bytes {limit} is below {size}, the smallest size allowed (whole MiB, at least the source's size)"
        )));
    }
    Ok(size)
}

/// One page of `ids` (sorted) from `token` on. Tokens are the id to start
/// at, so a page still works after the entry it points to is deleted;
/// anything that is not an id of this kind is ABORTED.
pub fn page<'a>(
    ids: impl Iterator<Item = &'a String>,
    token: &str,
    max_entries: i32,
    valid_id: fn(&str) -> bool,
) -> Result<(Vec<String>, String)> {
    if max_entries < 0 {
        return Err(Error::invalid("max_entries must not be negative"));
    }
    if !token.is_empty() && !valid_id(token) {
        return Err(Error::new(Kind::Aborted, format!("starting_token {token:?} is not valid")));
    }
    let mut rest = ids.filter(|id| id.as_str() >= token);
    let max = if max_entries == 0 { usize::MAX } else { max_entries as usize };
    let page: Vec<String> = rest.by_ref().take(max).cloned().collect();
    let next = rest.next().cloned().unwrap_or_default();
    Ok((page, next))
}

#[cfg(test)]
mod tests;
