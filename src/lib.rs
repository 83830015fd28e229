//! lineguard: real-time logical and structural anomaly detection for factory lines.
//!
//! The detector is EfficientAD-S (teacher / student / autoencoder) trained with the Distinctive Feature
//! Separation Constraint, which keeps the autoencoder from copying the teacher's novel features so that
//! logical anomalies (a missing part, a wrong pairing, a part in the wrong place) stay visible.
//!
//! The streaming service, in the order a frame travels (see [`pipeline`] for the picture):
//! - [`source`]: Kafka consumer group → [`frame::RawFrame`], in-flight limit, offset commits;
//! - [`preprocess`]: the CPU pool ([`preprocess::pool`]) that checks the message contract, decodes and
//!   normalises (the same code prepares training images);
//! - [`infer`]: dynamic batching and the model on CUDA or CPU, hot-swappable;
//! - [`sink`]: results, anomaly maps and dead letters to Kafka, then the frame's [`ack`];
//! - shared thin layers: [`settings`] (pipeline config), [`metrics`] (Prometheus events and endpoint),
//!   [`kafka`] (client plumbing), [`frame`] (the typed messages between stages).
//!
//! The model and offline tools:
//! - [`model`]: networks, losses, the training loop and the self-describing model file;
//! - [`dataset`]: MVTec LOCO AD folders; [`synth`]: a procedural dataset in that layout, the data of the
//!   embedded demo and of the fast tests;
//! - [`eval`]: image AUROC and pixel AU-sPRO, MVTec LOCO style; [`heatmap`]: pictures of anomaly maps;
//! - [`broker`]: a local in-memory Kafka-compatible broker for the demo and the tests;
//! - [`torch`]: libtorch start-up (CUDA loading) and device choice;
//! - [`error`]: the library's error types.

pub mod ack;
pub mod broker;
pub mod dataset;
pub mod error;
pub mod eval;
pub mod frame;
pub mod heatmap;
pub mod infer;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod retrain;
pub mod settings;
pub mod sink;
pub mod source;
pub mod synth;
pub mod torch;
