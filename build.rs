//! Bakes the libtorch library folder into the binaries' rpath, so `lineguard` and the test binaries run
//! without LD_LIBRARY_PATH (tch sets no rpath of its own), and compiles the small C++ shim that reaches the
//! ATen kernels tch's bindings leave out (`src/model/csrc/fused.cpp`).

fn main() {
    // torch-sys exports the folder it linked against as DEP_TCH_LIBTORCH_LIB (links = "tch").
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        compile_shim(std::path::Path::new(&lib_dir));
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

/// Same headers and C++ ABI as torch-sys's own wrapper, so the shim links against the same libtorch.
fn compile_shim(lib_dir: &std::path::Path) {
    const SHIM: &str = "src/model/csrc/fused.cpp";
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .file(SHIM)
        .include(lib_dir.join("../include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("lineguard_fused");
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
}
