//! See `fuzz/harness.rs`: `models_topic`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| harness::models_topic(bytes));
