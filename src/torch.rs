//! libtorch start-up. rustc links with `--as-needed`, which drops `libtorch_cuda.so` because no symbol of
//! it is referenced directly; CUDA then looks absent even on a GPU host (tch-rs issue 980). Loading the
//! library by hand before any other tch call registers its CUDA hooks. A CUDA query made before that caches
//! the CPU-only answer for the life of the process, hence [`init`] first thing in `main`.

use std::sync::{Once, OnceLock};

use tch::{Device, Tensor};

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

/// The instruction-set extensions a `/proc/cpuinfo` text lists (`flags` on x86, `Features` on Arm): which
/// of libtorch's CPU kernels can run, e.g. whether bf16 is computed or emulated.
pub fn cpu_extensions(cpuinfo: &str) -> std::collections::BTreeSet<&str> {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags") || line.starts_with("Features"))
        .filter_map(|line| line.split_once(':'))
        .flat_map(|(_, flags)| flags.split_whitespace())
        .collect()
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

/// On a GPU, lets cuDNN time its convolution algorithms once per input shape and keep the fastest. It
/// pays where shapes repeat: a training loop has one, a serving line one per batch size. `cargo bench
/// --bench model -- --cuda` and `bench-serving` measure it against cuDNN's heuristics.
pub fn autotune_convolutions(device: Device) {
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
}

pub fn describe(device: Device) -> String {
    describe_threads(device, tch::get_num_threads().max(1) as usize)
}

/// [`describe`] for a thread that will run with `threads` libtorch CPU threads.
pub fn describe_threads(device: Device, threads: usize) -> String {
    match device {
        Device::Cpu => format!("CPU ({threads} threads)"),
        Device::Cuda(i) => format!("CUDA device {i}"),
        other => format!("{other:?}"),
    }
}

/// libtorch CPU threads for the threads that ask for them with [`use_threads`], once
/// [`make_parallelism_opt_in`] ran; `None` before.
static OPT_IN_THREADS: OnceLock<usize> = OnceLock::new();

/// Makes libtorch's CPU parallelism opt-in for this process: every thread that has not asked for threads
/// with [`use_threads`] runs libtorch work on one core. Returns the number of threads libtorch would have
/// used (the cores, or `OMP_NUM_THREADS`), which [`parallel_threads`] keeps for the threads that opt in.
/// Call it first thing, before any libtorch work, in processes where several threads use libtorch (the
/// service: inference, trainer, model loading).
///
/// Why: libgomp gives every thread that runs a parallel region its own team of worker threads, and keeps
/// the team after the region ends. Once the process's teams hold more threads than there are cores, libgomp
/// cuts the time idle workers spin between regions to almost nothing (its throttled spin count): they sleep
/// and must be woken for each of the model's hundreds of parallel regions. Measured on 2 cores (`cargo bench --bench threads`; 128 px, batch 1):
/// inference on a spawned thread took 78 ms in f32 and 31 ms in bf16 while the main thread held an idle
/// team, 71 and 21 ms without one.
pub fn make_parallelism_opt_in() -> usize {
    *OPT_IN_THREADS.get_or_init(|| {
        let count = tch::get_num_threads().max(1) as usize;
        tch::set_num_threads(1);
        count
    })
}

/// The libtorch CPU threads a thread doing the heavy work (inference) should use: what
/// [`make_parallelism_opt_in`] kept, else the calling thread's current count.
pub fn parallel_threads() -> usize {
    OPT_IN_THREADS.get().copied().unwrap_or_else(|| tch::get_num_threads().max(1) as usize)
}

/// Gives the calling thread its own number of CPU threads for libtorch operations, so a background
/// trainer can be held to one core while inference keeps the others. libtorch's OpenMP thread count is
/// per calling thread, but its first parallel operation in a thread applies the last process-wide value
/// (which every `set_num_threads` also sets); running one such operation first makes this thread's setting
/// stick. Where parallelism is opt-in, the process-wide value goes back to one afterwards, from a
/// short-lived thread, so threads that start libtorch work later stay on one core.
pub fn use_threads(count: usize) {
    let _ = tch::get_num_threads();
    let _ = tch::Tensor::ones([1 << 16], (tch::Kind::Float, Device::Cpu)).sum(tch::Kind::Float);
    tch::set_num_threads(count.max(1) as i32);
    if OPT_IN_THREADS.get().is_some() {
        // Joining cannot fail: the closure does not panic on a count of one.
        let _ = std::thread::spawn(|| tch::set_num_threads(1)).join();
    }
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

/// A uint8 tensor of `shape` on the host, filled in place by `fill`: one copy of the caller's bytes, where
/// gathering them into a `Vec` for `Tensor::from_slice` makes two. For a CUDA `device` it lives in
/// page-locked (pinned) memory, so the copy to the GPU is one DMA transfer that [`to_device_async`] need
/// not wait for; where pinning fails (no CUDA runtime) it stays pageable, said once in the log. `bench-serving`
/// measures pinned against pageable on a GPU.
pub fn host_bytes(shape: &[i64], device: Device, fill: impl FnOnce(&mut [u8])) -> Tensor {
    static PAGEABLE_FALLBACK: Once = Once::new();
    let pageable = Tensor::empty(shape, (tch::Kind::Uint8, Device::Cpu));
    let tensor = if device.is_cuda() {
        // Pinning copies the (uninitialised) contents once: about 1 ms for a batch of 64 frames at 256 px.
        pageable.f_pin_memory(device).unwrap_or_else(|err| {
            PAGEABLE_FALLBACK.call_once(|| {
                log::warn!("no pinned host memory ({err}); copies to the GPU go through pageable memory")
            });
            pageable
        })
    } else {
        pageable
    };
    let len = tensor.numel();
    if len > 0 {
        // SAFETY: `tensor` was created above as a contiguous uint8 host tensor of `len` elements (pinning
        // keeps both), nothing else refers to it yet, and the slice ends with this block.
        let bytes = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, len) };
        fill(bytes);
    }
    tensor
}

/// `host` on `device`. From pinned memory to a GPU the copy is queued on the current stream and the thread
/// goes on (the kernels that read it are queued behind it; libtorch keeps the pinned block until the copy
/// has run); from pageable memory, or to the CPU, it is the ordinary copy.
pub fn to_device_async(host: &Tensor, device: Device) -> Tensor {
    host.to_device_(device, host.kind(), device.is_cuda(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bytes_hold_what_was_written_pinned_or_not() {
        let written: Vec<u8> = (0..2 * 4 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        // Asking for a GPU's pinned memory on a host without CUDA falls back to pageable memory.
        for device in [Device::Cpu, Device::Cuda(0)] {
            let host = host_bytes(&[2, 4, 4, 3], device, |bytes| bytes.copy_from_slice(&written));
            assert_eq!(host.size(), [2, 4, 4, 3]);
            assert_eq!(host.device(), Device::Cpu);
            assert_eq!(Vec::<u8>::try_from(host.view([-1])).unwrap(), written, "{device:?}");
            let on_device = select_device(false);
            if device.is_cuda() && on_device.is_cuda() {
                assert!(host.is_pinned(on_device), "pinned where CUDA is present");
                let copied = to_device_async(&host, on_device).to_device(Device::Cpu);
                assert_eq!(Vec::<u8>::try_from(copied.view([-1])).unwrap(), written);
            }
        }
        let empty = host_bytes(&[0, 4, 4, 3], Device::Cpu, |_| panic!("nothing to fill"));
        assert_eq!(empty.numel(), 0);
    }
}
