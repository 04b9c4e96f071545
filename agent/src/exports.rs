//! The exports being served, by volume id: what a metrics collector reads
//! (each export's counters) without reaching into the agent's state. The
//! agent keeps it in step with the volumes' servers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use nbd::server::Export;

/// Cheap to clone: every clone is the same table.
#[derive(Debug, Default, Clone)]
pub struct ExportTable(Arc<Mutex<BTreeMap<String, Arc<Export>>>>);

impl ExportTable {
    pub(crate) fn insert(&self, id: &str, export: Arc<Export>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), export);
    }

    pub(crate) fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// The exports now, by volume id, in id order.
    pub fn snapshot(&self) -> Vec<(String, Arc<Export>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }
}
