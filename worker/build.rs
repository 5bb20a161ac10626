//! With the `cuda-emu` feature: the emulated CUDA device. Every kernel source
//! (src/engine/cuda/kernels/*.cu) is compiled as C++ for both storage builds
//! (f32, and bf16 with TESSERA_BF16), plus the test-only kernels, against
//! emu/cuda_host.h, and linked with the emulator's runtime into one static
//! library. Without the feature this does nothing, so the default build
//! needs no C++ compiler.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The cfg keeps `cc` (an optional build-dependency) out of default
    // builds; the variable is how cargo tells a build script its features.
    #[cfg(feature = "cuda-emu")]
    if std::env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        emu::build();
    }
}

#[cfg(feature = "cuda-emu")]
mod emu {
    use std::fmt::Write as _;
    use std::fs;
    use std::path::{Path, PathBuf};

    /// The runtime's sources, compiled with warnings as errors.
    const RUNTIME: &[&str] = &["fibers.cpp", "memory.cpp", "launch.cpp"];

    /// A kernel source and the build it is compiled for.
    struct Unit {
        module: String,
        build: &'static str,
        source: PathBuf,
    }

    pub fn build() {
        let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let cuda = manifest.join("src/engine/cuda");
        let kernels = cuda.join("kernels");
        let emu = cuda.join("emu");
        println!("cargo:rerun-if-changed={}", kernels.display());
        println!("cargo:rerun-if-changed={}", emu.display());

        let mut sources: Vec<PathBuf> = fs::read_dir(&kernels)
            .unwrap_or_else(|e| panic!("{}: {e}", kernels.display()))
            .map(|e| e.expect("kernels directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        sources.sort();
        let mut units = Vec::new();
        for build in ["f32", "bf16"] {
            for source in &sources {
                units.push(Unit { module: stem(source), build, source: source.clone() });
            }
        }
        let control = emu.join("negative_control.cu");
        units.push(Unit { module: stem(&control), build: "test", source: control });

        let storage = kernels.join("storage.cuh");
        let storage_text = read(&storage);
        let mut generated: Vec<PathBuf> = units.iter().map(|u| generate(u, &storage, &storage_text, &out)).collect();
        generated.push(registry(&units, &out));

        let base = {
            let mut b = cc::Build::new();
            b.cpp(true)
                .std("c++17")
                .opt_level(2)
                .include(&emu)
                // Kernels' float math stays unfused, as their _rn intrinsics
                // ask; the bf16 storage type reads bits through casts.
                .flag("-ffp-contract=off")
                .flag("-fno-strict-aliasing")
                // A trap or fault longjmps from a fiber's stack to the
                // launcher's, which fortified longjmp would refuse.
                .flag("-U_FORTIFY_SOURCE");
            b
        };
        let mut objects =
            base.clone().warnings_into_errors(true).files(RUNTIME.iter().map(|f| emu.join(f))).compile_intermediates();
        objects.extend(compile_parallel(&base, &generated));
        let mut lib = base;
        lib.objects(objects).compile("tessera_emu");
    }

    fn stem(path: &Path) -> String {
        path.file_stem().and_then(|s| s.to_str()).expect("kernel file name").to_string()
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn ident(s: &str) -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
    }

    fn c_string(path: &Path) -> String {
        path.display().to_string().replace('\\', "\\\\").replace('"', "\\\"")
    }

    /// The `extern "C" __global__` kernels of a source, by name (as
    /// kernels::entry_points finds them for NVRTC).
    fn entry_points(source: &str) -> Vec<String> {
        source
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .filter_map(|rest| rest.split('(').next())
            .map(|name| name.trim().to_string())
            .collect()
    }

    fn table_name(u: &Unit) -> String {
        format!("table_{}_{}", ident(&u.module), u.build)
    }

    /// One translation unit: the kernel source inside a namespace of its own
    /// (the two builds' kernels share names), C++ linkage, and its table.
    fn generate(u: &Unit, storage: &Path, storage_text: &str, out: &Path) -> PathBuf {
        let text = read(&u.source);
        let ns = format!("tessera_emu_{}_{}", ident(&u.module), u.build);
        let path = out.join(format!("emu_{}_{}.cpp", ident(&u.module), u.build));
        let mut s = String::new();
        writeln!(s, "// Generated by worker/build.rs from {} ({} build).", u.source.display(), u.build).unwrap();
        if u.build == "bf16" {
            s.push_str("#define TESSERA_BF16\n");
        }
        s.push_str("#include \"cuda_host.h\"\n#include \"registry.h\"\n");
        writeln!(s, "namespace {ns} {{").unwrap();
        writeln!(s, "#line 1 \"{}\"", c_string(storage)).unwrap();
        s.push_str(storage_text);
        writeln!(s, "\n#line 1 \"{}\"", c_string(&u.source)).unwrap();
        s.push_str(&text.replace("extern \"C\" __global__", "__global__"));
        s.push_str("\n}\n");
        let line = s.lines().count() + 2;
        writeln!(s, "#line {line} \"{}\"", c_string(&path)).unwrap();
        let table = table_name(u);
        writeln!(s, "namespace tessera_emu {{").unwrap();
        writeln!(s, "extern const KernelEntry {table}[];").unwrap();
        writeln!(s, "const KernelEntry {table}[] = {{").unwrap();
        for k in entry_points(&text) {
            writeln!(s, "    {{\"{k}\", &invoke<&::{ns}::{k}>, Signature<decltype(&::{ns}::{k})>::kinds}},").unwrap();
        }
        s.push_str("    {nullptr, nullptr, nullptr},\n};\n}\n");
        write_if_changed(&path, &s);
        path
    }

    /// The tables of each build, which the runtime looks kernels up in.
    fn registry(units: &[Unit], out: &Path) -> PathBuf {
        let mut s =
            String::from("// Generated by worker/build.rs.\n#include \"registry.h\"\nnamespace tessera_emu {\n");
        for u in units {
            writeln!(s, "extern const KernelEntry {}[];", table_name(u)).unwrap();
        }
        s.push_str("namespace {\n");
        for build in ["f32", "bf16", "test"] {
            write!(s, "const KernelEntry* const {build}_tables[] = {{").unwrap();
            for u in units.iter().filter(|u| u.build == build) {
                write!(s, "{}, ", table_name(u)).unwrap();
            }
            s.push_str("nullptr};\n");
        }
        s.push_str("}  // namespace\nconst KernelEntry* const* const build_tables[3] = {f32_tables, bf16_tables, test_tables};\n}\n");
        let path = out.join("emu_registry.cpp");
        write_if_changed(&path, &s);
        path
    }

    fn write_if_changed(path: &Path, text: &str) {
        if fs::read_to_string(path).ok().as_deref() != Some(text) {
            fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    /// Compiles the generated units on cargo's job count of threads (cc's own
    /// parallelism needs its jobserver feature).
    fn compile_parallel(base: &cc::Build, files: &[PathBuf]) -> Vec<PathBuf> {
        let jobs = std::env::var("NUM_JOBS").ok().and_then(|j| j.parse::<usize>().ok()).unwrap_or(1).max(1);
        let chunks: Vec<Vec<PathBuf>> = (0..jobs)
            .map(|j| files.iter().skip(j).step_by(jobs).cloned().collect())
            .filter(|c: &Vec<_>| !c.is_empty())
            .collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let mut b = base.clone();
                    scope.spawn(move || b.files(chunk).compile_intermediates())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("compiling the emulated kernels")).collect()
        })
    }
}
