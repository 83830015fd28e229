//! The streaming service (`lineguard run`). Per product line, a frame travels:
//!
//! ```text
//! Kafka ─► source ─(crossbeam, max_in_flight)─► preprocess ─(crossbeam, 2·max_batch)─► infer
//!            ▲                                       │ rejected                          │ scored
//!            │ offsets                               ▼                                   ▼
//!            └──── ack ◄──── sink ◄──(tokio mpsc, max_in_flight)─────────────────────────┘ ─► Kafka
//! ```
//!
//! - [`source`]: Kafka consumer group → [`frame::RawFrame`], in-flight limit, offset commits;
//! - [`preprocess`]: the CPU pool that checks the message contract, decodes and resizes (with
//!   [`crate::data::preprocess`], the code that prepares training images);
//! - [`infer`]: dynamic batching and the model on CUDA or CPU, hot-swappable;
//! - [`sink`]: results, anomaly maps and dead letters to Kafka (through a producer that is replaced by a
//!   fresh client when it stalls or fails fatally), then the frame's [`ack`], which moves the committable
//!   offset only past frames whose outputs were delivered.
//!
//! A line with `[lines.<name>.retrain]` also publishes confidently normal frames to its accepted topic,
//! follows its models topic (a thread that hot-swaps every newly promoted model into `infer`), and, in
//! the `all` and `trainer` roles, runs the background [`retrain`] stage: replay buffer, trainer, gate,
//! version store.
//!
//! [`pipeline`] wires the stages and owns shutdown. Thin shared layers: [`settings`] (the pipeline config,
//! validated whole), [`frame`] (the typed messages between stages), [`metrics`] (Prometheus events, the
//! health and metrics endpoint), [`kafka`] (client plumbing) and [`broker`] (the local nisshi broker of
//! the demo and the tests).

// Shared layers: the config, the typed messages between stages, metrics and Kafka plumbing.
pub mod broker;
pub mod frame;
pub mod kafka;
pub mod metrics;
pub mod settings;

// The stages, in the order a frame travels (each group of one keeps rustfmt from sorting them).
pub mod source;

pub mod preprocess;

pub mod infer;

pub mod sink;

pub mod ack;

// Wiring and shutdown; the background stage.
pub mod pipeline;
pub mod retrain;

/// Called with a stage thread's result when it ends, so that the pipeline reacts to a failure when it
/// happens rather than when the thread is joined at shutdown.
pub type OnExit = Box<dyn FnOnce(&Result<(), String>) + Send>;

/// The message of a caught panic (stages catch their own so the line can say which one failed).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
