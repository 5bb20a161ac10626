//! The CUDA C sources of the backend's kernels, embedded in the binary and
//! compiled with NVRTC for the device at start (the backend caches the
//! modules). The test below compiles every source for sm_80 (A100) and
//! sm_90 (H100/H200), so CI catches kernel source that does not compile
//! even though it has no GPU: it needs only libnvrtc, which `.ci/run` takes
//! from the `nvidia-cuda-nvrtc` 13.0 wheel.

use anyhow::{anyhow, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// (module name, CUDA C source) of every kernel file, one per op group as
/// in the CPU backend.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("kernels/elementwise.cu")),
    ("columns", include_str!("kernels/columns.cu")),
    ("activation", include_str!("kernels/activation.cu")),
    ("norm", include_str!("kernels/norm.cu")),
    ("attention", include_str!("kernels/attention.cu")),
    ("rope", include_str!("kernels/rope.cu")),
    ("embedding", include_str!("kernels/embedding.cu")),
    ("loss", include_str!("kernels/loss.cu")),
    ("image", include_str!("kernels/image.cu")),
    ("s2", include_str!("kernels/s2.cu")),
    ("optim", include_str!("kernels/optim.cu")),
];

/// The storage type of activations and weights' compute copies (the
/// `act_t` of kernels/storage.cuh). Every source compiles for both; the
/// backend loads the f32 build, and the bf16 build too with
/// `MathMode::Bf16` (buffer.rs says which buffers take which).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    F32,
    Bf16,
}

/// kernels/storage.cuh, prepended to every source.
const STORAGE_HEADER: &str = include_str!("kernels/storage.cuh");

/// The text NVRTC compiles: the storage type, then the source, whose line
/// numbers (in NVRTC's errors) stay those of its file.
fn full_source(name: &str, source: &str, storage: Storage) -> String {
    let define = if storage == Storage::Bf16 { "#define TESSERA_BF16\n" } else { "" };
    format!("{define}{STORAGE_HEADER}\n#line 1 \"{name}.cu\"\n{source}")
}

/// The `extern "C" __global__` kernels a source declares, by name.
pub fn entry_points(source: &'static str) -> Vec<&'static str> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .collect()
}

/// Compiles one source to PTX for a virtual architecture such as
/// `compute_90`, with `storage` as its act_t; the error carries NVRTC's log.
pub fn compile(name: &str, source: &str, arch: &'static str, storage: Storage) -> Result<Ptx> {
    let opts = CompileOptions { arch: Some(arch), name: Some(format!("{name}.cu")), ..Default::default() };
    compile_ptx_with_opts(full_source(name, source, storage), opts)
        .map_err(|e| anyhow!("kernel source {name}.cu ({storage:?} storage) does not compile for {arch}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel source compiles for both architectures the clusters
    /// have and both storage types, and each `extern "C" __global__`
    /// function is in the PTX. Needs libnvrtc (CI: the nvidia-cuda-nvrtc
    /// wheel on LD_LIBRARY_PATH).
    #[test]
    fn every_kernel_compiles_to_ptx_for_sm80_and_sm90() {
        // SAFETY: only tries to dlopen the library.
        assert!(
            unsafe { cudarc::nvrtc::sys::is_culib_present() },
            "libnvrtc not found: `pip install nvidia-cuda-nvrtc==13.0.*` and put its nvidia/cu13/lib on LD_LIBRARY_PATH (see .ci/run)"
        );
        for (name, src) in SOURCES {
            let kernels = entry_points(src);
            assert!(!kernels.is_empty(), "{name}.cu declares no kernel");
            for (arch, storage) in [
                ("compute_80", Storage::F32),
                ("compute_90", Storage::F32),
                ("compute_80", Storage::Bf16),
                ("compute_90", Storage::Bf16),
            ] {
                let ptx = compile(name, src, arch, storage).unwrap_or_else(|e| panic!("{e:#}"));
                let text = ptx.to_src();
                for k in &kernels {
                    assert!(text.contains(&format!(".entry {k}(")), "{name}.cu for {arch}: no entry {k} in the PTX");
                }
                // bf16 storage means 16-bit loads or stores (every source
                // but AdamW's, whose buffers are all f32 state).
                let halves = text.contains(".u16") || text.contains(".b16");
                if *name != "optim" {
                    assert_eq!(halves, storage == Storage::Bf16, "{name}.cu, {storage:?} storage: 16-bit accesses?");
                }
            }
        }
    }

    /// The host modules that launch the kernels.
    const LAUNCHERS: &[(&str, &str)] = &[
        ("activation.rs", include_str!("activation.rs")),
        ("attention.rs", include_str!("attention.rs")),
        ("columns.rs", include_str!("columns.rs")),
        ("elementwise.rs", include_str!("elementwise.rs")),
        ("embedding.rs", include_str!("embedding.rs")),
        ("image.rs", include_str!("image.rs")),
        ("loss.rs", include_str!("loss.rs")),
        ("norm.rs", include_str!("norm.rs")),
        ("optim.rs", include_str!("optim.rs")),
        ("rope.rs", include_str!("rope.rs")),
        ("s2.rs", include_str!("s2.rs")),
    ];

    /// Splits `text` (which starts just after an opening parenthesis) at
    /// its top-level commas up to the matching closing parenthesis.
    fn top_level_args(text: &str) -> Vec<String> {
        let (mut depth, mut args, mut cur, mut in_str) = (0usize, Vec::new(), String::new(), false);
        for ch in text.chars() {
            match ch {
                '"' => in_str = !in_str,
                '(' | '[' | '{' | '<' if !in_str => depth += 1,
                ')' if !in_str && depth == 0 => break,
                ')' | ']' | '}' | '>' if !in_str => depth = depth.saturating_sub(1),
                ',' if !in_str && depth == 0 => {
                    args.push(std::mem::take(&mut cur).trim().to_string());
                    continue;
                }
                _ => {}
            }
            cur.push(ch);
        }
        if !cur.trim().is_empty() {
            args.push(cur.trim().to_string());
        }
        args
    }

    /// A kernel launched with the wrong number of arguments reads garbage
    /// or fails only on a GPU: every `launch!` here passes exactly as many
    /// arguments as its kernel declares parameters, and names a kernel that
    /// exists. (The `->` of closures and generics' `<>` do not occur inside
    /// launch arguments; the parser counts `<`/`>` as brackets.)
    #[test]
    fn every_launch_passes_as_many_arguments_as_its_kernel_takes() {
        let mut params = std::collections::HashMap::new();
        for (_, src) in SOURCES {
            for rest in src.split("extern \"C\" __global__ void ").skip(1) {
                let (name, after) = rest.split_once('(').expect("a kernel's parameter list");
                params.insert(name.trim().to_string(), top_level_args(after).len());
            }
        }
        let mut launches = 0;
        for (file, src) in LAUNCHERS {
            for call in src.split("launch!(").skip(1) {
                let mut args = top_level_args(call);
                if args.get(1).is_some_and(|a| a.starts_with("storage =")) {
                    args.remove(1); // `storage = S` picks the build, not an argument
                }
                let name = args.get(1).map(|n| n.trim_matches('"').to_string()).unwrap_or_default();
                let Some(&want) = params.get(&name) else {
                    panic!("{file}: launch of {name:?}, which no .cu declares")
                };
                assert_eq!(
                    args.len() - 3,
                    want,
                    "{file}: {name} takes {want} parameters, launched with {:?}",
                    &args[3..]
                );
                launches += 1;
            }
        }
        assert!(launches >= params.len(), "{launches} launches for {} kernels", params.len());
    }

    /// A broken source is refused with NVRTC's message, not a panic.
    #[test]
    fn a_broken_kernel_is_an_error_naming_the_file() {
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return; // the test above fails with the reason
        }
        let err =
            compile("broken", "extern \"C\" __global__ void f(float* x) { x[0] = y; }", "compute_80", Storage::F32)
                .unwrap_err()
                .to_string();
        assert!(err.contains("broken.cu") && err.contains("compute_80"), "{err}");
    }
}
