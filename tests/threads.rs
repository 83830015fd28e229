//! libtorch CPU parallelism made opt-in per thread (`torch::make_parallelism_opt_in`), as `lineguard run`
//! and `bench-serving` start. Its own test binary: the setting is process-wide.

use tch::{Device, Kind, Tensor};

/// The thread's libtorch CPU threads after its first parallel operation (which is when libtorch applies
/// the process-wide value to a thread).
fn threads_after_work() -> i32 {
    let _ = Tensor::ones([1 << 20], (Kind::Float, Device::Cpu)).sum(Kind::Float);
    tch::get_num_threads()
}

#[test]
fn only_threads_that_ask_for_libtorch_threads_get_them() {
    let default = tch::get_num_threads() as usize;
    assert_eq!(lineguard::torch::make_parallelism_opt_in(), default);
    assert_eq!(lineguard::torch::parallel_threads(), default, "kept for the threads that opt in");
    assert_eq!(threads_after_work(), 1, "the main thread");
    let fresh = || std::thread::spawn(threads_after_work).join().expect("a fresh thread");
    assert_eq!(fresh(), 1, "a thread that did not ask");
    let asked = std::thread::spawn(|| {
        lineguard::torch::use_threads(3);
        threads_after_work()
    });
    assert_eq!(asked.join().expect("the asking thread"), 3);
    // `set_num_threads` also sets the process-wide value; `use_threads` puts it back.
    assert_eq!(fresh(), 1, "a thread started after another asked");
    assert_eq!(threads_after_work(), 1, "the main thread, afterwards");
}
