//! How the client subcommands print: text for people (sizes in binary
//! units, UTC timestamps, aligned tables) or JSON for scripts.

use std::fmt::Write as _;

use csi_proto::contract::{VolumeAccess, VolumeContext};
use csi_proto::volume_content_source::Type as SourceType;
use csi_proto::{Snapshot, Volume, VolumeCondition};
use serde_json::{Value, json};

use super::args::Output;

pub(super) fn print(output: Output, text: String, json: Value) {
    match output {
        Output::Text => print!("{text}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default()),
    }
}

/// 1073741824 → "1 GiB"; sizes that are no whole unit stay in bytes.
pub(super) fn human_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// UTC time of a protobuf timestamp as RFC 3339 (prost's own formatting).
pub(super) fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".into(), ToString::to_string)
}

fn source_of(v: &Volume) -> (String, Value) {
    match v.content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
        Some(SourceType::Snapshot(s)) => (format!("snapshot {}", s.snapshot_id), json!({"snapshot": s.snapshot_id})),
        Some(SourceType::Volume(s)) => (format!("volume {}", s.volume_id), json!({"volume": s.volume_id})),
        None => ("-".into(), Value::Null),
    }
}

/// A volume and, when known, where it is published and its condition.
pub(super) struct VolumeView<'a> {
    pub(super) volume: &'a Volume,
    pub(super) published: Option<&'a [String]>,
    pub(super) condition: Option<&'a VolumeCondition>,
}

impl VolumeView<'_> {
    /// The volume_context, when it is what the controller writes.
    fn context(&self) -> Option<VolumeContext> {
        VolumeContext::try_from(&self.volume.volume_context).ok()
    }

    pub(super) fn name(&self) -> String {
        self.context().map(|c| c.name).unwrap_or_default()
    }

    pub(super) fn access(&self) -> &'static str {
        self.context().map_or("", |c| c.access.as_str())
    }

    fn fs_type(&self) -> String {
        match self.context().map(|c| c.access) {
            Some(VolumeAccess::Mount { fs_type }) => fs_type,
            _ => String::new(),
        }
    }

    fn condition_text(&self) -> String {
        match self.condition {
            None => "-".into(),
            Some(c) if c.abnormal => format!("abnormal: {}", c.message),
            Some(c) => format!("ok: {}", c.message),
        }
    }

    pub(super) fn text(&self) -> String {
        let v = self.volume;
        let mut out = String::new();
        let _ = writeln!(out, "volume:     {}", v.volume_id);
        let _ = writeln!(out, "name:       {}", or_dash(&self.name()));
        let _ = writeln!(out, "size:       {} ({} bytes)", human_size(v.capacity_bytes as u64), v.capacity_bytes);
        let _ = writeln!(out, "access:     {}", or_dash(self.access()));
        let fs_type = self.fs_type();
        if !fs_type.is_empty() {
            let _ = writeln!(out, "fs type:    {fs_type}");
        }
        let _ = writeln!(out, "source:     {}", source_of(v).0);
        if let Some(nodes) = self.published {
            let _ = writeln!(out, "published:  {}", if nodes.is_empty() { "-".into() } else { nodes.join(", ") });
        }
        if self.condition.is_some() {
            let _ = writeln!(out, "condition:  {}", self.condition_text());
        }
        out
    }

    pub(super) fn json(&self) -> Value {
        let v = self.volume;
        let mut doc = json!({
            "id": v.volume_id,
            "name": self.name(),
            "capacity_bytes": v.capacity_bytes,
            "volume_context": v.volume_context,
            "source": source_of(v).1,
        });
        if let Some(nodes) = self.published {
            doc["published_node_ids"] = json!(nodes);
        }
        if let Some(c) = self.condition {
            doc["condition"] = json!({"abnormal": c.abnormal, "message": c.message});
        }
        doc
    }
}

pub(super) fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub(super) fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": rfc3339(s.creation_time.as_ref()),
        "ready_to_use": s.ready_to_use,
    })
}

pub(super) fn snapshot_text(s: &Snapshot) -> String {
    format!(
        "snapshot:   {}\nvolume:     {}\nsize:       {} ({} bytes)\ncreated:    {}\nready:      {}\n",
        s.snapshot_id,
        s.source_volume_id,
        human_size(s.size_bytes as u64),
        s.size_bytes,
        rfc3339(s.creation_time.as_ref()),
        s.ready_to_use
    )
}

/// Left-aligned columns.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<w$}  ");
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, &mut header.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_the_largest_whole_unit() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1536 << 20), "1536 MiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(1000), "1000 B");
        assert_eq!(human_size(0), "0 B");
    }

    #[test]
    fn timestamps_print_as_utc_rfc3339() {
        let ts = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(rfc3339(Some(&ts(0))), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(Some(&ts(951_782_400))), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(Some(&ts(1_700_000_000))), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(None), "-");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["ID", "N"], &[vec!["long-id".into(), "x".into()], vec!["a".into(), "yy".into()]]);
        assert_eq!(t, "ID       N\nlong-id  x\na        yy\n");
    }
}
