//! The data a model sees, from files or frames to tensors:
//! - [`preprocess`]: decoding and normalising images into network inputs. The training loop, evaluation and
//!   the service's preprocessing stage ([`crate::service::preprocess`]) all call it, so a frame is prepared identically everywhere;
//! - [`loco`]: datasets in the MVTec LOCO AD folder layout (splits, images, ground-truth masks);
//! - [`synth`]: a deterministic procedural dataset in that layout (trays on a conveyor belt, with logical
//!   and structural defects): the data of the embedded demo and of the fast tests.

pub mod loco;
pub mod preprocess;
pub mod synth;
