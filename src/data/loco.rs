//! Reading datasets in the MVTec LOCO AD layout: `train/good`, `validation/good`, `test/good`,
//! `test/logical_anomalies`, `test/structural_anomalies`, `ground_truth/<type>/<NNN>/*.png`,
//! `defects_config.json`. Only `train/good` and `validation/good` are required; a missing test split is
//! simply empty.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::data::preprocess;
use crate::error::{DatasetError, ImageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    TrainGood,
    ValidationGood,
    TestGood,
    TestLogical,
    TestStructural,
}

impl Split {
    pub fn folder(self) -> &'static str {
        match self {
            Split::TrainGood => "train/good",
            Split::ValidationGood => "validation/good",
            Split::TestGood => "test/good",
            Split::TestLogical => "test/logical_anomalies",
            Split::TestStructural => "test/structural_anomalies",
        }
    }

    /// The anomaly type's name under `ground_truth/`, for anomalous splits.
    pub fn anomaly_type(self) -> Option<&'static str> {
        match self {
            Split::TestLogical => Some("logical_anomalies"),
            Split::TestStructural => Some("structural_anomalies"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LocoDataset {
    pub root: PathBuf,
    pub train: Vec<PathBuf>,
    pub validation: Vec<PathBuf>,
    pub test_good: Vec<PathBuf>,
    pub test_logical: Vec<PathBuf>,
    pub test_structural: Vec<PathBuf>,
}

impl LocoDataset {
    /// Lists the images of a dataset, checking the folders that training needs.
    pub fn open(root: &Path) -> Result<LocoDataset, DatasetError> {
        let mut dataset = Self::open_test(root)?;
        dataset.train = required(root, Split::TrainGood)?;
        dataset.validation = required(root, Split::ValidationGood)?;
        Ok(dataset)
    }

    /// Only the test split (evaluation works on a test-only copy); train and validation stay empty.
    pub fn open_test(root: &Path) -> Result<LocoDataset, DatasetError> {
        if !root.is_dir() {
            return Err(DatasetError::MissingRoot { path: root.to_path_buf() });
        }
        Ok(LocoDataset {
            root: root.to_path_buf(),
            train: Vec::new(),
            validation: Vec::new(),
            test_good: optional(root, Split::TestGood)?,
            test_logical: optional(root, Split::TestLogical)?,
            test_structural: optional(root, Split::TestStructural)?,
        })
    }

    pub fn images(&self, split: Split) -> &[PathBuf] {
        match split {
            Split::TrainGood => &self.train,
            Split::ValidationGood => &self.validation,
            Split::TestGood => &self.test_good,
            Split::TestLogical => &self.test_logical,
            Split::TestStructural => &self.test_structural,
        }
    }

    /// `ground_truth/<type>/<image stem>/` for an anomalous test image.
    pub fn ground_truth_dir(&self, split: Split, image: &Path) -> Option<PathBuf> {
        let anomaly_type = split.anomaly_type()?;
        let stem = image.file_stem()?;
        Some(self.root.join("ground_truth").join(anomaly_type).join(stem))
    }

    pub fn defects_config(&self) -> PathBuf {
        self.root.join("defects_config.json")
    }

    /// What training reads of this dataset (train/good and validation/good, names and bytes), in one
    /// digest: a model file records it, so a stored model can be recognised as trained on these very
    /// images wherever the folder lies.
    pub fn training_fingerprint(&self) -> Result<TrainingImages, ImageError> {
        let mut digest = Sha256::new();
        for (folder, images) in [("train/good", &self.train), ("validation/good", &self.validation)] {
            for path in images {
                let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
                let bytes = std::fs::read(path).map_err(|source| ImageError::Read { path: path.clone(), source })?;
                // Lengths first, so that no two different sequences of names and contents hash alike.
                for part in [folder.as_bytes(), name.as_bytes(), &bytes] {
                    digest.update((part.len() as u64).to_le_bytes());
                    digest.update(part);
                }
            }
        }
        Ok(TrainingImages {
            train: self.train.len(),
            validation: self.validation.len(),
            sha256: format!("{:x}", digest.finalize()),
        })
    }
}

/// The images a model was trained on, as [`LocoDataset::training_fingerprint`] digests them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingImages {
    pub train: usize,
    pub validation: usize,
    pub sha256: String,
}

fn required(root: &Path, split: Split) -> Result<Vec<PathBuf>, DatasetError> {
    let folder = root.join(split.folder());
    if !folder.is_dir() {
        return Err(DatasetError::MissingFolder { root: root.to_path_buf(), folder: split.folder().into() });
    }
    let images = list_images(&folder)?;
    if images.is_empty() {
        return Err(DatasetError::EmptyFolder { root: root.to_path_buf(), folder: split.folder().into() });
    }
    Ok(images)
}

fn optional(root: &Path, split: Split) -> Result<Vec<PathBuf>, DatasetError> {
    let folder = root.join(split.folder());
    if folder.is_dir() {
        list_images(&folder)
    } else {
        Ok(Vec::new())
    }
}

/// Image files of a folder, sorted by name so every run sees them in the same order.
pub fn list_images(folder: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let list_error = |source| DatasetError::List { path: folder.to_path_buf(), source };
    let mut images = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(list_error)? {
        let path = entry.map_err(list_error)?.path();
        if is_image(&path) {
            images.push(path);
        }
    }
    images.sort();
    Ok(images)
}

pub fn is_image(path: &Path) -> bool {
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    path.is_file() && matches!(extension.as_deref(), Some("png" | "jpg" | "jpeg"))
}

/// Decodes and preprocesses images on all cores into one [N, 3, side, side] tensor. `on_image` is called
/// after each image (progress).
pub fn load_inputs(paths: &[PathBuf], side: u32, on_image: &(dyn Fn() + Sync)) -> Result<Tensor, ImageError> {
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(paths.len().max(1));
    let chunk = paths.len().div_ceil(workers).max(1);
    let decoded: Vec<Result<Vec<Vec<f32>>, ImageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|path| {
                            let planar = preprocess::to_planar(&preprocess::load_image(path)?, side);
                            on_image();
                            Ok(planar)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut flat = Vec::with_capacity(paths.len() * 3 * (side * side) as usize);
    for part in decoded {
        for image in part? {
            flat.extend(image);
        }
    }
    let s = side as i64;
    Ok(Tensor::from_slice(&flat).reshape([paths.len() as i64, 3, s, s]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_folders_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocoDataset::open(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = LocoDataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("train/good"), "{err}");
        std::fs::create_dir_all(dir.path().join("train/good")).unwrap();
        let err = LocoDataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("train/good") && err.contains("no images"), "{err}");
    }

    #[test]
    fn a_broken_image_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("000.png");
        std::fs::write(&bad, b"definitely not a png").unwrap();
        let err = load_inputs(&[bad], 128, &|| {}).unwrap_err().to_string();
        assert!(err.contains("000.png"), "{err}");
    }

    #[test]
    fn the_training_fingerprint_follows_training_images_not_their_folder_or_the_test_split() {
        let make = |root: &Path, train_byte: u8| {
            for (folder, byte) in [("train/good", train_byte), ("validation/good", 2), ("test/good", 3)] {
                std::fs::create_dir_all(root.join(folder)).unwrap();
                std::fs::write(root.join(folder).join("000.png"), [byte; 8]).unwrap();
            }
            LocoDataset::open(root).unwrap()
        };
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = make(one.path(), 1).training_fingerprint().unwrap();
        assert_eq!((first.train, first.validation, first.sha256.len()), (1, 1, 64));
        assert_eq!(make(two.path(), 1).training_fingerprint().unwrap(), first, "another folder, same images");
        std::fs::write(two.path().join("test/good/000.png"), [9u8; 8]).unwrap();
        assert_eq!(make(two.path(), 1).training_fingerprint().unwrap(), first, "the test split is not training's");
        assert_ne!(make(two.path(), 7).training_fingerprint().unwrap(), first, "one training image changed");
        std::fs::rename(two.path().join("train/good/000.png"), two.path().join("train/good/001.png")).unwrap();
        std::fs::write(two.path().join("train/good/001.png"), [1u8; 8]).unwrap();
        assert_ne!(LocoDataset::open(two.path()).unwrap().training_fingerprint().unwrap(), first, "renamed");
    }
}
