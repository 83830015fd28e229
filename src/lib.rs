//! lineguard: real-time logical and structural anomaly detection for factory lines.
//!
//! The detector is EfficientAD-S (teacher / student / autoencoder) trained with the Distinctive Feature
//! Separation Constraint, which keeps the autoencoder from copying the teacher's novel features so that
//! logical anomalies (a missing part, a wrong pairing, a part in the wrong place) stay visible.
//!
//! The tree is the architecture:
//! - [`service`]: the streaming service. Its stages in the order a frame travels: `source` (Kafka
//!   consumer) → `preprocess` (CPU decoding pool) → `infer` (batched model, hot-swappable) → `sink`
//!   (results, maps, dead letters) → `ack` (offset commits); the background `retrain` stage beside them;
//!   `settings` and `metrics` as thin shared layers. [`service`]'s module docs draw the picture.
//! - [`model`]: networks, losses, the training loop, teachers and the self-describing model file;
//! - [`data`]: images into network inputs (shared by training and serving), MVTec LOCO AD folders, and
//!   the procedural synthetic line of the embedded demo and the fast tests;
//! - [`eval`]: scoring, image AUROC and pixel AU-sPRO, pictures of anomaly maps;
//! - [`torch`]: libtorch start-up (CUDA loading) and device choice; [`error`]: the library's error types.
//!
//! The `lineguard` binary (`main.rs`, `commands/`) is one file per subcommand over this library.

pub mod data;
pub mod error;
pub mod eval;
pub mod model;
pub mod service;
pub mod torch;
