//! One self-describing model file: safetensors holding the tensors, with the recipe, normalisation
//! statistics' provenance, map quantiles and versions as metadata. Writes are atomic (temp file + rename)
//! so a crash mid-write leaves the previous file loadable.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::error::WeightsError;

/// A named set of tensors plus string metadata, as stored in one file.
#[derive(Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// A tensor's bytes as stored: f16 and bf16 tensors as they are (half-size files), everything else as f32.
struct StoredView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &StoredView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn to_view(tensor: &Tensor) -> StoredView {
    let (dtype, kind, width) = match tensor.kind() {
        Kind::Half => (Dtype::F16, Kind::Half, 2),
        Kind::BFloat16 => (Dtype::BF16, Kind::BFloat16, 2),
        _ => (Dtype::F32, Kind::Float, 4),
    };
    let cpu = tensor.detach().to_device(Device::Cpu).to_kind(kind).contiguous();
    let numel = cpu.numel();
    let mut bytes = vec![0u8; numel * width];
    cpu.copy_data_u8(&mut bytes, numel);
    StoredView { dtype, shape: cpu.size().iter().map(|&d| d as usize).collect(), bytes }
}

impl TensorFile {
    /// Writes to `path` through a temporary file in the same folder and a rename.
    pub fn save(&self, path: &Path) -> Result<(), WeightsError> {
        write_atomically(path, &self.to_bytes(path)?)
    }

    /// The safetensors bytes of the file; `origin` names it in errors.
    pub fn to_bytes(&self, origin: &Path) -> Result<Vec<u8>, WeightsError> {
        let views: Vec<(String, StoredView)> = self.tensors.iter().map(|(k, v)| (k.clone(), to_view(v))).collect();
        let metadata = Some(self.metadata.clone());
        safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), &metadata)
            .map_err(|e| WeightsError::Format { path: origin.to_path_buf(), reason: e.to_string() })
    }

    pub fn load(path: &Path, device: Device) -> Result<TensorFile, WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Read { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Parses safetensors bytes (from a file or a Kafka record); `path` names their origin in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: Device) -> Result<TensorFile, WeightsError> {
        let format_error =
            |e: safetensors::SafeTensorError| WeightsError::Format { path: path.to_path_buf(), reason: e.to_string() };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(format_error)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let file = SafeTensors::deserialize(bytes).map_err(format_error)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::F16 => Kind::Half,
                Dtype::BF16 => Kind::BFloat16,
                Dtype::I64 => Kind::Int64,
                other => {
                    return Err(WeightsError::Tensor {
                        path: path.to_path_buf(),
                        name,
                        reason: format!("unsupported dtype {other:?}"),
                    })
                }
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)?.to_kind(Kind::Float).to_device(device);
            tensors.insert(name, tensor);
        }
        Ok(TensorFile { tensors, metadata })
    }

    /// Removes and returns a tensor, checking its shape.
    pub fn take(&mut self, path: &Path, name: &str, shape: &[i64]) -> Result<Tensor, WeightsError> {
        let tensor = self.tensors.remove(name).ok_or_else(|| WeightsError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            reason: "missing".into(),
        })?;
        if tensor.size() != shape {
            return Err(WeightsError::Tensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                reason: format!("shape {:?}, expected {:?}", tensor.size(), shape),
            });
        }
        Ok(tensor)
    }

    pub fn metadata_json<T: serde::de::DeserializeOwned>(&self, path: &Path, key: &str) -> Result<T, WeightsError> {
        let raw = self.metadata.get(key).ok_or_else(|| WeightsError::Content {
            path: path.to_path_buf(),
            reason: format!("metadata key '{key}' is missing"),
        })?;
        serde_json::from_str(raw).map_err(|e| WeightsError::Content {
            path: path.to_path_buf(),
            reason: format!("metadata key '{key}': {e}"),
        })
    }
}

/// Temp file in the destination folder (same filesystem, so the rename is atomic), fsync, rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    use std::io::Write;
    let write_error = |source| WeightsError::Write { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    let temp = temp_path(path);
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        crash_hook_for_tests(path, &mut file, bytes);
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(write_error)
}

/// Crash tests: when `LINEGUARD_CRASH_WRITING` names this file, write half of it to the temporary file
/// and abort the process, as a power cut or an OOM kill mid-write would.
fn crash_hook_for_tests(path: &Path, file: &mut std::fs::File, bytes: &[u8]) {
    use std::io::Write;
    let Some(target) = std::env::var_os("LINEGUARD_CRASH_WRITING") else { return };
    if path.file_name() == Some(target.as_os_str()) {
        log::error!("LINEGUARD_CRASH_WRITING: aborting halfway through writing {}", path.display());
        let _ = file.write_all(&bytes[..bytes.len() / 2]);
        let _ = file.sync_all();
        std::process::abort();
    }
}

/// Leftover temporary files of interrupted writes in `folder` (any process id).
pub fn remove_interrupted_writes(folder: &Path) {
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.rsplit_once(".tmp").is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())) {
            log::warn!("removing {} left by an interrupted write", entry.path().display());
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Copies named variables of a store into `tensors` under `prefix.`.
pub fn export_store(vs: &tch::nn::VarStore, prefix: &str, tensors: &mut BTreeMap<String, Tensor>) {
    for (name, tensor) in vs.variables() {
        tensors.insert(format!("{prefix}.{name}"), tensor.detach().to_device(Device::Cpu));
    }
}

/// Fills every variable of `vs` from `file` (`prefix.name`), checking presence and shapes.
pub fn import_store(
    vs: &mut tch::nn::VarStore,
    prefix: &str,
    file: &mut TensorFile,
    path: &Path,
) -> Result<(), WeightsError> {
    for (name, mut variable) in vs.variables() {
        let source = file.take(path, &format!("{prefix}.{name}"), &variable.size())?;
        tch::no_grad(|| variable.copy_(&source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_shapes_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut file = TensorFile::default();
        let a = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        file.tensors.insert("a".into(), a.shallow_clone());
        file.metadata.insert("recipe".into(), "{\"x\":1}".into());
        file.save(&path).unwrap();
        let mut loaded = TensorFile::load(&path, Device::Cpu).unwrap();
        assert_eq!(loaded.metadata["recipe"], "{\"x\":1}");
        let b = loaded.take(&path, "a", &[2, 3, 4]).unwrap();
        assert!(a.equal(&b));
        assert!(loaded.take(&path, "a", &[2, 3, 4]).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn wrong_shape_and_garbage_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut file = TensorFile::default();
        file.tensors.insert("w".into(), Tensor::zeros([3], (Kind::Float, Device::Cpu)));
        file.save(&path).unwrap();
        let mut loaded = TensorFile::load(&path, Device::Cpu).unwrap();
        let err = loaded.take(&path, "w", &[4]).unwrap_err().to_string();
        assert!(err.contains("tensor w") && err.contains("[3]"), "{err}");

        std::fs::write(&path, b"not a model").unwrap();
        let err = TensorFile::load(&path, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors"), "{err}");
    }

    #[test]
    fn atomic_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
