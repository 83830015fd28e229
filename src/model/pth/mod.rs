//! Reads PyTorch checkpoints (`torch.save(state_dict)`) without Python: the zip format written since
//! torch 1.6 and the legacy format before it (a run of pickles followed by raw storages). Only state dicts
//! of tensors are supported, which is what published weights are; a pickled `nn.Module` is refused with the
//! advice to save its `state_dict()`.

pub mod pickle;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use pickle::{StorageRef, StorageType, TensorRef, Value};

/// The largest record of a zip checkpoint we read (the pickle or one storage): published teachers and
/// backbones are tens of megabytes.
const MAX_RECORD_BYTES: usize = 1 << 30;
/// What the archive's declared size may make us reserve before reading.
const RESERVE_AT_MOST: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PthError {
    #[error("cannot read checkpoint {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("checkpoint {path}: {source}")]
    Pickle { path: PathBuf, source: pickle::PickleError },
    #[error("checkpoint {path}: tensor {name}: {reason}")]
    Tensor { path: PathBuf, name: String, reason: String },
}

/// The tensors of a state dict in file order, on the CPU, in their stored dtype.
#[derive(Debug)]
pub struct StateDict {
    pub tensors: Vec<(String, Tensor)>,
}

impl StateDict {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(k, _)| k == name).map(|(_, t)| t)
    }
}

/// `torch.save`'s magic number at the start of a legacy-format file.
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

pub fn read_state_dict(path: &Path) -> Result<StateDict, PthError> {
    let bytes = std::fs::read(path).map_err(|source| PthError::Read { path: path.to_path_buf(), source })?;
    parse_state_dict(&bytes, path)
}

/// [`read_state_dict`] on bytes in memory; `path` names them in errors.
pub fn parse_state_dict(bytes: &[u8], path: &Path) -> Result<StateDict, PthError> {
    let format = |reason: String| PthError::Format { path: path.to_path_buf(), reason };
    if bytes.starts_with(ZIP_MAGIC) {
        read_zip(path, bytes)
    } else if bytes.first() == Some(&0x80) {
        read_legacy(path, bytes)
    } else if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
        Err(format("tar-format checkpoints (torch < 0.4) are not supported; re-save with a newer torch".into()))
    } else {
        Err(format("not a PyTorch checkpoint (neither the zip nor the legacy pickle format)".into()))
    }
}

fn read_zip(path: &Path, bytes: &[u8]) -> Result<StateDict, PthError> {
    let format = |reason: String| PthError::Format { path: path.to_path_buf(), reason };
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format(format!("broken zip archive: {e}")))?;
    let pickle_name = archive
        .file_names()
        .find(|name| *name == "data.pkl" || name.ends_with("/data.pkl"))
        .map(str::to_string)
        .ok_or_else(|| format("zip archive without data.pkl: not a torch.save file".into()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut read_record = |name: &str| -> Result<Option<Vec<u8>>, PthError> {
        let mut file = match archive.by_name(name) {
            Ok(file) => file,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(format(format!("record {name}: {e}"))),
        };
        // The declared size is the archive's word, not a fact: reserve little and read at most the cap (a
        // small deflated record can expand to gigabytes).
        let mut out = Vec::with_capacity((file.size() as usize).min(RESERVE_AT_MOST));
        (&mut file)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format(format!("record {name}: {e}")))?;
        if out.len() > MAX_RECORD_BYTES {
            return Err(format(format!(
                "record {name} expands past {MAX_RECORD_BYTES} bytes; not a checkpoint we read"
            )));
        }
        Ok(Some(out))
    };
    if let Some(order) = read_record(&format!("{prefix}byteorder"))? {
        if order != b"little" {
            return Err(format(format!("byte order {:?} is not supported", String::from_utf8_lossy(&order))));
        }
    }
    let pickled = read_record(&pickle_name)?.unwrap_or_default();
    let (root, _) = pickle::load(&pickled).map_err(|source| PthError::Pickle { path: path.to_path_buf(), source })?;
    let entries = state_dict_entries(path, root)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, tensor) in entries {
        let key = &tensor.storage.key;
        if !storages.contains_key(key) {
            let data = read_record(&format!("{prefix}data/{key}"))?
                .ok_or_else(|| format(format!("storage {key} of tensor {name} is missing from the archive")))?;
            storages.insert(key.clone(), data);
        }
        let built = build_tensor(path, &name, &tensor, &storages[key])?;
        tensors.push((name, built));
    }
    Ok(StateDict { tensors })
}

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<StateDict, PthError> {
    let format = |reason: String| PthError::Format { path: path.to_path_buf(), reason };
    let mut pos = 0;
    let mut next_pickle = |what: &str| -> Result<Value, PthError> {
        let (value, used) = pickle::load(&bytes[pos..]).map_err(|source| PthError::Pickle {
            path: path.to_path_buf(),
            source: match source {
                pickle::PickleError::Truncated(_) => pickle::PickleError::Truncated(bytes.len()),
                other => other,
            },
        })?;
        log::debug!("{}: {what} pickle at byte {pos}", path.display());
        pos += used;
        Ok(value)
    };
    let magic = next_pickle("magic number")?;
    let magic_ok = match &magic {
        Value::BigInt(digits) => {
            let mut buf = [0u8; 16];
            digits.len() <= 16 && {
                buf[..digits.len()].copy_from_slice(digits);
                u128::from_le_bytes(buf) == LEGACY_MAGIC
            }
        }
        _ => false,
    };
    if !magic_ok {
        return Err(format("a pickle, but not torch.save's legacy format (wrong magic number)".into()));
    }
    let _protocol = next_pickle("protocol version")?;
    if let Value::Dict(info) = next_pickle("system info")? {
        let little = info.iter().find(|(k, _)| *k == Value::Str("little_endian".into())).map(|(_, v)| v);
        if little == Some(&Value::Bool(false)) {
            return Err(format("big-endian checkpoints are not supported".into()));
        }
    }
    let root = next_pickle("state dict")?;
    let Value::List(keys) = next_pickle("storage keys")? else {
        return Err(format("the storage key list after the state dict is missing".into()));
    };
    let mut dtypes: HashMap<String, StorageType> = HashMap::new();
    collect_storages(&root, &mut |storage| {
        let root_key = storage.view_of.as_ref().map_or(&storage.key, |(root, _, _)| root);
        dtypes.insert(root_key.clone(), storage.dtype);
    });
    // Storages follow back to back: an i64 element count, then the raw elements.
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(format("a storage key is not a string".into()));
        };
        let dtype = *dtypes.get(&key).ok_or_else(|| format(format!("storage {key} is listed but never used")))?;
        let count = bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .ok_or_else(|| format(format!("file ends before storage {key} (truncated download?)")))?;
        let start = pos + 8;
        let end = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(dtype.element_size()))
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| format(format!("file ends inside storage {key} (truncated download?)")))?;
        storages.insert(key, &bytes[start..end]);
        pos = end;
    }
    let entries = state_dict_entries(path, root)?;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, mut tensor) in entries {
        let mut data: &[u8] = match &tensor.storage.view_of {
            Some((root, _, _)) => storages.get(root).copied(),
            None => storages.get(&tensor.storage.key).copied(),
        }
        .ok_or_else(|| format(format!("storage of tensor {name} is not in the file")))?;
        if let Some((_, offset, size)) = tensor.storage.view_of.take() {
            let element = tensor.storage.dtype.element_size() as u64;
            let bytes_at = |n: u64| n.checked_mul(element).and_then(|b| usize::try_from(b).ok());
            let range = bytes_at(offset).zip(offset.checked_add(size).and_then(bytes_at));
            data = range
                .and_then(|(start, end)| data.get(start..end))
                .ok_or_else(|| format(format!("storage view of tensor {name} is out of range")))?;
        }
        let built = build_tensor(path, &name, &tensor, data)?;
        tensors.push((name, built));
    }
    Ok(StateDict { tensors })
}

fn collect_storages(value: &Value, found: &mut impl FnMut(&StorageRef)) {
    match value {
        Value::Storage(storage) => found(storage),
        Value::Tensor(tensor) => found(&tensor.storage),
        Value::Tuple(items) | Value::List(items) => items.iter().for_each(|v| collect_storages(v, found)),
        Value::Dict(pairs) => pairs.iter().for_each(|(k, v)| {
            collect_storages(k, found);
            collect_storages(v, found);
        }),
        Value::Object { callable, args } => {
            collect_storages(callable, found);
            collect_storages(args, found);
        }
        _ => {}
    }
}

/// The name → tensor entries of the state dict in `root`, also when it is wrapped in a training
/// checkpoint (`{"state_dict": …}` or `{"model": …}`). Non-tensor entries are skipped.
fn state_dict_entries(path: &Path, root: Value) -> Result<Vec<(String, TensorRef)>, PthError> {
    let format = |reason: String| PthError::Format { path: path.to_path_buf(), reason };
    let Value::Dict(pairs) = root else {
        let what = match &root {
            Value::Object { callable, .. } => match callable.as_ref() {
                Value::Global { module, name } => format!("a pickled {module}.{name}"),
                _ => "a pickled object".to_string(),
            },
            _ => "not a dict".to_string(),
        };
        return Err(format(format!("{what}, not a state dict; save it with torch.save(model.state_dict(), path)")));
    };
    let has_tensors = pairs.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    if !has_tensors {
        for wrapper in ["state_dict", "model", "model_state_dict"] {
            if let Some((_, inner @ Value::Dict(_))) = pairs.iter().find(|(k, _)| *k == Value::Str(wrapper.into())) {
                return state_dict_entries(path, inner.clone());
            }
        }
        return Err(format("holds no tensors".into()));
    }
    Ok(pairs
        .into_iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(name), Value::Tensor(tensor)) => Some((name, tensor)),
            _ => None,
        })
        .collect())
}

fn build_tensor(path: &Path, name: &str, tensor: &TensorRef, data: &[u8]) -> Result<Tensor, PthError> {
    let bad = |reason: String| PthError::Tensor { path: path.to_path_buf(), name: name.to_string(), reason };
    let element = tensor.storage.dtype.element_size();
    let numel = (data.len() / element) as i64;
    if tensor.size.len() != tensor.stride.len() || tensor.size.iter().chain(&tensor.stride).any(|&d| d < 0) {
        return Err(bad(format!("bad shape {:?} / stride {:?}", tensor.size, tensor.stride)));
    }
    let empty = tensor.size.contains(&0);
    // Zero strides let a few stored elements declare a tensor of any size, which `contiguous` would then
    // allocate: a saved weight never holds more elements than its storage.
    let elements = tensor.size.iter().try_fold(1i64, |acc, &n| acc.checked_mul(n));
    if elements.is_none_or(|elements| elements > numel.max(1)) {
        return Err(bad(format!(
            "shape {:?} declares more elements than its storage holds ({numel}); zero strides?",
            tensor.size
        )));
    }
    // Saturating: a hostile file must not overflow its way past the bounds check.
    let last_index =
        tensor.size.iter().zip(&tensor.stride).fold(tensor.offset.min(i64::MAX as u64) as i64, |acc, (n, s)| {
            acc.saturating_add((n - 1).saturating_mul(*s))
        });
    if !empty && last_index >= numel {
        return Err(bad(format!(
            "shape {:?} at offset {} needs {} elements, the storage holds {numel}",
            tensor.size,
            tensor.offset,
            last_index.saturating_add(1)
        )));
    }
    let kind = match tensor.storage.dtype {
        StorageType::F32 => Kind::Float,
        StorageType::F16 => Kind::Half,
        StorageType::BF16 => Kind::BFloat16,
        StorageType::F64 => Kind::Double,
        StorageType::I64 => Kind::Int64,
        StorageType::I32 => Kind::Int,
        StorageType::I16 => Kind::Int16,
        StorageType::I8 => Kind::Int8,
        StorageType::U8 => Kind::Uint8,
        StorageType::Bool => Kind::Bool,
    };
    let storage =
        Tensor::f_from_data_size(&data[..numel as usize * element], &[numel], kind).map_err(|e| bad(e.to_string()))?;
    storage
        .f_as_strided(tensor.size.as_slice(), tensor.stride.as_slice(), Some(tensor.offset as i64))
        .and_then(|t| t.f_contiguous())
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before: the bounds check passed (every index is 0) and `contiguous` asked for 2^40 floats.
    #[test]
    fn zero_strides_cannot_declare_more_elements_than_the_storage_holds() {
        let storage = StorageRef { dtype: StorageType::F32, key: "0".into(), numel: 1, view_of: None };
        let tensor = |size: Vec<i64>, stride: Vec<i64>| TensorRef { storage: storage.clone(), offset: 0, size, stride };
        let data = 1.5f32.to_le_bytes();
        let err = build_tensor(Path::new("bomb.pth"), "w", &tensor(vec![1 << 20, 1 << 20], vec![0, 0]), &data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more elements than its storage holds"), "{err}");
        let overflow = tensor(vec![i64::MAX, 4], vec![0, 0]);
        assert!(build_tensor(Path::new("bomb.pth"), "w", &overflow, &data).is_err());
        let fine = build_tensor(Path::new("ok.pth"), "w", &tensor(vec![1, 1], vec![0, 0]), &data).unwrap();
        assert_eq!(fine.size(), vec![1, 1]);
    }
}
