//! See `fuzz/harness.rs`: `model_file`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| harness::model_file(bytes));
