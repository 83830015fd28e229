//! lineguard: real-time logical and structural anomaly detection for factory lines.
//!
//! The detector is EfficientAD-S (teacher / student / autoencoder) trained with the Distinctive Feature
//! Separation Constraint, which keeps the autoencoder from copying the teacher's novel features so that
//! logical anomalies (a missing part, a wrong pairing, a part in the wrong place) stay visible.
//!
//! Layout, in the order data flows:
//! - [`preprocess`]: bytes → decoded image → normalised input tensor (shared by training and serving);
//! - [`model`]: networks, losses, the training loop and the self-describing model file;
//! - [`dataset`]: MVTec LOCO AD folders; [`synth`]: a procedural dataset in that layout, the data of the
//!   embedded demo and of the fast tests;
//! - [`eval`]: image AUROC and pixel AU-sPRO, MVTec LOCO style; [`heatmap`]: pictures of anomaly maps;
//! - [`torch`]: libtorch start-up (CUDA loading) and device choice;
//! - [`error`]: the library's error types.

pub mod dataset;
pub mod error;
pub mod eval;
pub mod heatmap;
pub mod model;
pub mod preprocess;
pub mod synth;
pub mod torch;
