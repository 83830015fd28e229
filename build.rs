//! Bakes the libtorch library folder into the binaries' rpath, so `lineguard` and the test binaries run
//! without LD_LIBRARY_PATH (tch sets no rpath of its own).

fn main() {
    // torch-sys exports the folder it linked against as DEP_TCH_LIBTORCH_LIB (links = "tch").
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        // The CUDA runtime wheels that libtorch_cpu.so needs live beside torch in site-packages layout.
        let site = std::path::Path::new(&lib_dir).join("../..");
        for sub in ["nvidia/cu13/lib", "nvidia/cuda_runtime/lib", "nvidia/cuda_cupti/lib"] {
            let dir = site.join(sub);
            if dir.is_dir() {
                if let Ok(dir) = dir.canonicalize() {
                    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
                }
            }
        }
    }
    if std::env::var_os("CARGO_FEATURE_CUDA_LINK").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
