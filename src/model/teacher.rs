//! Teacher files: importing a published PDN-S teacher from a PyTorch checkpoint into our safetensors
//! layout (`conv1..conv4`), which [`super::EfficientAd`] loads through `recipe.teacher`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::pth::{PthError, StateDict};
use super::weights::TensorFile;
use crate::error::WeightsError;

/// Metadata key of teacher files, describing where the weights came from.
pub const TEACHER_METADATA: &str = "lineguard_teacher";

/// Weight shapes of a PDN: `[out, in, k, k]` of conv1..conv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdnShape {
    pub convs: [[i64; 4]; 4],
}

impl PdnShape {
    /// EfficientAD's PDN-S (teacher with `out_channels` outputs, 384 as published).
    pub fn small(out_channels: i64) -> PdnShape {
        PdnShape { convs: [[128, 3, 4, 4], [256, 128, 4, 4], [256, 256, 3, 3], [out_channels, 256, 4, 4]] }
    }
}

/// Key spellings of conv1..conv4 in published checkpoints: EfficientAD's `nn.Sequential` indices
/// (`teacher_small.pth`) and anomalib's named layers.
const KEY_STYLES: [[&str; 4]; 2] = [["0", "3", "6", "8"], ["conv1", "conv2", "conv3", "conv4"]];
/// Wrappers that training code puts in front of keys (`nn.DataParallel`, `torch.compile`).
const KEY_PREFIXES: [&str; 3] = ["", "module.", "_orig_mod."];

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Read(#[from] PthError),
    #[error(
        "{path}: not a PDN-S teacher: no weights for conv{layer} (looked for {looked_for}); the file holds: {holds}"
    )]
    MissingLayer { path: PathBuf, layer: usize, looked_for: String, holds: String },
    #[error("{path}: key {key} has shape {found:?}, lineguard's PDN-S expects {expected:?}")]
    Shape { path: PathBuf, key: String, found: Vec<i64>, expected: Vec<i64> },
    #[error("{path}: unexpected key {key}: a PDN-S teacher has only conv1..conv4 weights and biases")]
    Unexpected { path: PathBuf, key: String },
    #[error("{path}: key {key} holds non-finite values")]
    NotFinite { path: PathBuf, key: String },
    #[error(transparent)]
    Write(#[from] WeightsError),
}

/// Maps a published teacher's state dict onto our PDN layout, checking every shape. The tensors come back
/// as f32 (half-precision checkpoints are widened), keyed `conv1.weight` … `conv4.bias`.
pub fn map_pdn_teacher(
    state: &StateDict,
    shape: &PdnShape,
    path: &Path,
) -> Result<BTreeMap<String, Tensor>, ImportError> {
    let names: Vec<&str> = state.tensors.iter().map(|(k, _)| k.as_str()).collect();
    let (style, prefix) = KEY_STYLES
        .iter()
        .flat_map(|style| KEY_PREFIXES.iter().map(move |prefix| (style, *prefix)))
        .find(|(style, prefix)| names.contains(&format!("{prefix}{}.weight", style[0]).as_str()))
        .unwrap_or((&KEY_STYLES[0], ""));
    let mut mapped = BTreeMap::new();
    let mut used = Vec::new();
    for (layer, expected) in shape.convs.iter().enumerate() {
        for (part, expected_shape) in [("weight", expected.to_vec()), ("bias", vec![expected[0]])] {
            let key = format!("{prefix}{}.{part}", style[layer]);
            let tensor = state.get(&key).ok_or_else(|| ImportError::MissingLayer {
                path: path.to_path_buf(),
                layer: layer + 1,
                looked_for: KEY_STYLES
                    .iter()
                    .map(|s| format!("{prefix}{}.{part}", s[layer]))
                    .collect::<Vec<_>>()
                    .join(" or "),
                holds: summarise_keys(&names),
            })?;
            if tensor.size() != expected_shape {
                return Err(ImportError::Shape {
                    path: path.to_path_buf(),
                    key,
                    found: tensor.size(),
                    expected: expected_shape,
                });
            }
            let value = tensor.to_kind(Kind::Float);
            if !bool::try_from(value.isfinite().all()).unwrap_or(false) {
                return Err(ImportError::NotFinite { path: path.to_path_buf(), key });
            }
            mapped.insert(format!("conv{}.{part}", layer + 1), value);
            used.push(key);
        }
    }
    if let Some(extra) = names.iter().find(|name| !used.iter().any(|u| u == *name)) {
        return Err(ImportError::Unexpected { path: path.to_path_buf(), key: extra.to_string() });
    }
    Ok(mapped)
}

fn summarise_keys(names: &[&str]) -> String {
    const SHOWN: usize = 12;
    let mut text = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(", … ({} keys)", names.len()));
    }
    if names.is_empty() {
        text = "no tensors".into();
    }
    text
}

/// Writes a teacher file with provenance `source` (free text, stored as JSON metadata).
pub fn save_teacher(
    tensors: BTreeMap<String, Tensor>,
    source: serde_json::Value,
    out: &Path,
) -> Result<(), WeightsError> {
    let mut file = TensorFile { tensors, ..Default::default() };
    file.metadata.insert(TEACHER_METADATA.into(), source.to_string());
    file.save(out)
}
