//! Promoted versions on the trainer's disk: `versions/v000007.safetensors` with `v000007.json` (why it
//! was promoted), and `current.json` naming the version every replica should serve. Each file is written
//! atomically (temp file + rename) and `current.json` only after the model file is complete, so a crash
//! at any point leaves the previous current model loadable. The last `keep` versions stay for
//! `lineguard model rollback`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

use super::gate::GateReport;
use super::RetrainError;
use crate::model::weights::{remove_interrupted_writes, write_atomically};
use crate::model::EfficientAd;

/// Why a version exists, stored beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u64,
    pub recorded_unix: u64,
    /// `initial`, `promoted` or `rollback`.
    pub origin: String,
    pub trained_steps: u64,
    /// The version it was retrained from.
    pub parent: Option<u64>,
    pub gate: Option<GateReport>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Current {
    version: u64,
}

pub struct VersionStore {
    root: PathBuf,
    keep: usize,
}

impl VersionStore {
    pub fn open(root: &Path, keep: usize) -> Result<VersionStore, RetrainError> {
        let versions = root.join("versions");
        std::fs::create_dir_all(&versions).map_err(|source| RetrainError::Io { path: versions.clone(), source })?;
        remove_interrupted_writes(&versions);
        remove_interrupted_writes(root);
        Ok(VersionStore { root: root.to_path_buf(), keep: keep.max(1) })
    }

    pub fn model_path(&self, version: u64) -> PathBuf {
        self.root.join("versions").join(format!("v{version:06}.safetensors"))
    }

    fn record_path(&self, version: u64) -> PathBuf {
        self.root.join("versions").join(format!("v{version:06}.json"))
    }

    /// The version replicas should serve, if one was ever recorded.
    pub fn current(&self) -> Result<Option<u64>, RetrainError> {
        let path = self.root.join("current.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<Current>(&text)
                .map(|c| Some(c.version))
                .map_err(|e| RetrainError::Data(format!("{}: {e}", path.display()))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RetrainError::Io { path, source }),
        }
    }

    pub fn set_current(&self, version: u64) -> Result<(), RetrainError> {
        if !self.model_path(version).is_file() {
            return Err(RetrainError::Data(format!("version {version} is not kept in {}", self.root.display())));
        }
        let path = self.root.join("current.json");
        let text = serde_json::to_vec(&Current { version }).unwrap_or_default();
        write_atomically(&path, &text).map_err(|e| RetrainError::Data(e.to_string()))
    }

    /// Kept versions with their records, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionRecord>, RetrainError> {
        let folder = self.root.join("versions");
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&folder).map_err(|source| RetrainError::Io { path: folder.clone(), source })? {
            let path = entry.map_err(|source| RetrainError::Io { path: folder.clone(), source })?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text =
                    std::fs::read_to_string(&path).map_err(|source| RetrainError::Io { path: path.clone(), source })?;
                match serde_json::from_str::<VersionRecord>(&text) {
                    Ok(record) if self.model_path(record.version).is_file() => records.push(record),
                    Ok(_) => {}
                    Err(err) => log::warn!("ignoring {}: {err}", path.display()),
                }
            }
        }
        records.sort_by_key(|r| r.version);
        Ok(records)
    }

    pub fn highest_version(&self) -> Result<u64, RetrainError> {
        Ok(self.versions()?.last().map_or(0, |r| r.version))
    }

    pub fn load(&self, version: u64, device: Device) -> Result<EfficientAd, RetrainError> {
        EfficientAd::load(&self.model_path(version), device).map_err(RetrainError::Weights)
    }

    /// Writes the model, then its record, then makes it current, then prunes old versions.
    pub fn record(&self, model: &EfficientAd, record: &VersionRecord) -> Result<(), RetrainError> {
        model.save(&self.model_path(record.version))?;
        let text = serde_json::to_vec_pretty(record).unwrap_or_default();
        write_atomically(&self.record_path(record.version), &text)?;
        self.set_current(record.version)?;
        self.prune()
    }

    fn prune(&self) -> Result<(), RetrainError> {
        let current = self.current()?;
        let versions = self.versions()?;
        let excess = versions.len().saturating_sub(self.keep);
        for old in versions.iter().take(excess).filter(|r| Some(r.version) != current) {
            let _ = std::fs::remove_file(self.model_path(old.version));
            let _ = std::fs::remove_file(self.record_path(old.version));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Preset, Recipe};

    fn model(version: u64) -> EfficientAd {
        let recipe = Recipe { image_size: 128, channels: 8, ..Recipe::preset(Preset::Dfsc) };
        let mut model = EfficientAd::new(recipe, Device::Cpu).unwrap();
        model.info.model_version = version;
        model
    }

    fn record(version: u64) -> VersionRecord {
        VersionRecord {
            version,
            recorded_unix: 0,
            origin: "promoted".into(),
            trained_steps: 0,
            parent: version.checked_sub(1),
            gate: None,
        }
    }

    #[test]
    fn keeps_the_last_versions_and_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = VersionStore::open(dir.path(), 2).unwrap();
        assert_eq!(store.current().unwrap(), None);
        for v in 1..=3 {
            store.record(&model(v), &record(v)).unwrap();
        }
        let kept: Vec<u64> = store.versions().unwrap().iter().map(|r| r.version).collect();
        assert_eq!(kept, vec![2, 3]);
        assert_eq!(store.current().unwrap(), Some(3));
        store.set_current(2).unwrap();
        assert!(store.set_current(1).is_err(), "pruned versions cannot become current");
        assert_eq!(store.load(2, Device::Cpu).unwrap().info.model_version, 2);
        assert_eq!(store.highest_version().unwrap(), 3);
    }
}
