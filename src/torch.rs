//! libtorch start-up. rustc links with `--as-needed`, which drops `libtorch_cuda.so` because no symbol of
//! it is referenced directly; CUDA then looks absent even on a GPU host (tch-rs issue 980). Loading the
//! library by hand before any other tch call registers its CUDA hooks. A CUDA query made before that caches
//! the CPU-only answer for the life of the process, hence [`init`] first thing in `main`.

use std::sync::Once;

use tch::Device;

static INIT: Once = Once::new();

/// Loads `libtorch_cuda.so` when present (GPU installs); harmless on CPU-only installs.
pub fn init() {
    INIT.call_once(|| {
        for name in [c"libtorch_cuda.so", c"libtorch_hip.so"] {
            // SAFETY: dlopen with a valid NUL-terminated name; the handle is deliberately never closed so
            // the library's static initialisers stay registered.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                log::debug!("loaded {}", name.to_string_lossy());
            }
        }
    });
}

/// CUDA device 0 when available and not refused, else the CPU.
pub fn select_device(force_cpu: bool) -> Device {
    init();
    if !force_cpu && tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => format!("CPU ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("CUDA device {i}"),
        other => format!("{other:?}"),
    }
}

/// Gives the calling thread its own number of CPU threads for libtorch operations, so a background
/// trainer can be held to one core while inference keeps the others. libtorch's OpenMP thread count is
/// per calling thread, but its first parallel operation in a thread re-applies the last process-wide
/// value; running one such operation first makes this thread's setting stick.
pub fn use_threads(count: usize) {
    let _ = tch::get_num_threads();
    let _ = tch::Tensor::ones([1 << 16], (tch::Kind::Float, Device::Cpu)).sum(tch::Kind::Float);
    tch::set_num_threads(count.max(1) as i32);
}

/// Lowers the calling thread's CPU scheduling priority to the minimum (nice 19), so that on a busy
/// machine the kernel runs inference threads first. Linux threads carry their own nice value.
pub fn lower_thread_priority() {
    // SAFETY: gettid and setpriority have no memory-safety preconditions; failure is reported, not UB.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if result != 0 {
        log::warn!("cannot lower the trainer's priority: {}", std::io::Error::last_os_error());
    }
}
