//! Error types of the library. Each names what the user can act on: the file, the key, the reason.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: config::ConfigError },
    #[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid { problems: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset folder {path} does not exist")]
    MissingRoot { path: PathBuf },
    #[error("dataset {root}: missing folder {folder} (expected MVTec LOCO layout: train/good, validation/good, test/good, test/logical_anomalies, ...)")]
    MissingFolder { root: PathBuf, folder: String },
    #[error("dataset {root}: folder {folder} holds no images (.png, .jpg, .jpeg)")]
    EmptyFolder { root: PathBuf, folder: String },
    #[error("cannot list {path}")]
    List { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Image(#[from] ImageError),
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot decode image {origin}: {source}")]
    Decode { origin: String, source: image::ImageError },
    #[error("image {origin} is empty (0 bytes)")]
    Empty { origin: String },
    #[error("image {origin} is a truncated JPEG (no end-of-image marker): cut short by the camera or the network")]
    Truncated { origin: String },
    #[error("image {origin} is {width}x{height}: too small (at least {min}x{min} pixels)")]
    TooSmall { origin: String, width: u32, height: u32, min: u32 },
    #[error("image {origin} declares {width}x{height} pixels: too large ({limit}); not decoded")]
    TooLarge { origin: String, width: u32, height: u32, limit: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read model file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write model file {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("model file {path} is not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("model file {path}: {reason}")]
    Content { path: PathBuf, reason: String },
    #[error("model file {path}: tensor {name}: {reason}")]
    Tensor { path: PathBuf, name: String, reason: String },
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}
