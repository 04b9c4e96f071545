//! CSI access modes by name, as objects spell them; the agent's records
//! keep the CSI enum values.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A CSI `VolumeCapability.AccessMode.Mode`, named as in the CSI spec
/// (camel-cased): an object says `SingleNodeWriter`, not `1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    const ALL: [Self; 7] = [
        Self::SingleNodeWriter,
        Self::SingleNodeReaderOnly,
        Self::MultiNodeReaderOnly,
        Self::MultiNodeSingleWriter,
        Self::MultiNodeMultiWriter,
        Self::SingleNodeSingleWriter,
        Self::SingleNodeMultiWriter,
    ];

    /// The CSI enum value (the spec's numbering: 1 to 7; 0 is UNKNOWN).
    pub fn csi_value(self) -> i32 {
        match self {
            Self::SingleNodeWriter => 1,
            Self::SingleNodeReaderOnly => 2,
            Self::MultiNodeReaderOnly => 3,
            Self::MultiNodeSingleWriter => 4,
            Self::MultiNodeMultiWriter => 5,
            Self::SingleNodeSingleWriter => 6,
            Self::SingleNodeMultiWriter => 7,
        }
    }

    /// The mode of a CSI enum value; `None` for UNKNOWN or a value this
    /// version does not know.
    pub fn from_csi(value: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.csi_value() == value)
    }
}
