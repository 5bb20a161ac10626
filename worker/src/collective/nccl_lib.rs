//! NCCL, opened at run time by this module rather than through cudarc:
//! pip's NVIDIA wheels (`nvidia-nccl-cu12`/`-cu13`, which PyTorch brings)
//! ship only `libnccl.so.2`, a name cudarc's loader never tries, and a
//! missing library must be an error that names the paths tried and the
//! fix, not a panic. Only jobs of more than one GPU open it.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `ncclResult_t` values the code tells apart.
pub const NCCL_SUCCESS: c_int = 0;
pub const NCCL_IN_PROGRESS: c_int = 7;

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

/// `ncclConfig_t` as NCCL 2.17 lays it out; NCCL reads as many fields as
/// `size` and `version` say, so a newer library accepts it.
#[repr(C)]
pub struct Config {
    size: usize,
    magic: u32,
    version: u32,
    pub blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default".
const UNDEF: c_int = c_int::MIN;

impl Config {
    /// `NCCL_CONFIG_INITIALIZER` of NCCL 2.17.1, with `blocking` set.
    pub fn new(blocking: bool) -> Config {
        Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: 2 * 10_000 + 17 * 100 + 1,
            blocking: c_int::from(blocking),
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
        }
    }
}

pub type Comm = *mut c_void;

/// `ncclDataType_t` and `ncclRedOp_t` values used here.
pub const NCCL_UINT64: c_int = 5;
pub const NCCL_FLOAT32: c_int = 7;
pub const NCCL_BFLOAT16: c_int = 9;
pub const NCCL_SUM: c_int = 0;

/// The NCCL entry points the collective calls.
pub struct Nccl {
    pub path: PathBuf,
    pub get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    pub comm_init_rank_config: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int, *mut Config) -> c_int,
    /// (sendbuff, recvbuff, count, datatype, op, comm, stream).
    pub all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int,
    /// (sendbuff, recvbuff, recvcount, datatype, op, comm, stream).
    pub reduce_scatter:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int,
    /// (sendbuff, recvbuff, sendcount, datatype, comm, stream): no reduction op.
    pub all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> c_int,
    pub comm_get_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    pub comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    pub(super) get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// The open library (None only for the tests' stand-in).
    pub(super) _lib: Option<libloading::Library>,
}

impl Nccl {
    /// NCCL's name for a result code.
    pub fn error(&self, r: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let s = unsafe { (self.get_error_string)(r) };
        if s.is_null() {
            return format!("NCCL error {r}");
        }
        // SAFETY: a NUL-terminated static string.
        format!("{} (NCCL error {r})", unsafe { CStr::from_ptr(s) }.to_string_lossy())
    }
}

/// The library names tried, most specific first.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Where NCCL may be besides the loader's own search (LD_LIBRARY_PATH,
/// the ld.so cache): `$NCCL_HOME/lib`, the active conda or virtual
/// environment's wheels, the user's and the system's Python wheels, and
/// the CUDA toolkit.
fn search_dirs(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = env("NCCL_HOME") {
        dirs.push(Path::new(&home).join("lib"));
    }
    let mut prefixes: Vec<PathBuf> =
        ["VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(|v| env(v)).map(PathBuf::from).collect();
    if let Some(home) = env("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    for prefix in prefixes {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else { continue };
            let mut pythons: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
                .collect();
            pythons.sort();
            for py in pythons {
                for site in ["site-packages", "dist-packages"] {
                    dirs.push(py.join(site).join("nvidia/nccl/lib"));
                }
            }
        }
    }
    dirs.extend(["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"].map(PathBuf::from));
    dirs
}

/// Opens NCCL once per process; every later call gets the same answer.
pub fn load() -> Result<&'static Nccl, String> {
    static LIB: OnceLock<Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(|| open(&|k| std::env::var(k).ok())).as_ref().map_err(Clone::clone)
}

/// Tries the loader's search, then each directory of [`search_dirs`]; the
/// error lists every attempt and how to install NCCL.
fn open(env: &dyn Fn(&str) -> Option<String>) -> Result<Nccl, String> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = NAMES.iter().map(PathBuf::from).collect();
    for dir in search_dirs(env) {
        for name in NAMES {
            let p = dir.join(name);
            if p.exists() {
                candidates.push(p);
            }
        }
    }
    for c in candidates {
        // SAFETY: loading NCCL runs its initializers, which have no
        // preconditions; its symbols are checked below.
        match unsafe { libloading::Library::new(&c) } {
            Ok(lib) => match symbols(lib, &c) {
                Ok(n) => return Ok(n),
                Err(e) => tried.push(format!("{}: {e}", c.display())),
            },
            Err(e) => tried.push(format!("{}: {e}", c.display())),
        }
    }
    Err(format!(
        "NCCL (libnccl.so.2), which a job of more than one GPU needs for its all-reduce, cannot be loaded. Tried:\n  {}\n\
         Install it with `pip install nvidia-nccl-cu12` (CUDA 12) or `nvidia-nccl-cu13` (CUDA 13) and put its \
         site-packages/nvidia/nccl/lib on LD_LIBRARY_PATH, or set NCCL_HOME to an NCCL install (its lib/ is searched)",
        tried.join("\n  ")
    ))
}

fn symbols(lib: libloading::Library, path: &Path) -> Result<Nccl, String> {
    // SAFETY: each symbol is looked up with the C signature NCCL's nccl.h
    // declares for it (2.17 and later).
    unsafe {
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes())
                    .map_err(|e| format!("no symbol {} ({e}): an NCCL older than 2.17?", $name))?
            };
        }
        Ok(Nccl {
            path: path.to_path_buf(),
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank_config: sym!("ncclCommInitRankConfig"),
            all_reduce: sym!("ncclAllReduce"),
            reduce_scatter: sym!("ncclReduceScatter"),
            all_gather: sym!("ncclAllGather"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            comm_abort: sym!("ncclCommAbort"),
            get_error_string: sym!("ncclGetErrorString"),
            _lib: Some(lib),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wheel directories of an active virtual environment are searched,
    /// and NCCL_HOME comes first.
    #[test]
    fn searches_the_wheels_of_the_active_environment() {
        let venv = tempfile::tempdir().unwrap();
        let wheel = venv.path().join("lib/python3.11/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&wheel).unwrap();
        let env = |k: &str| match k {
            "VIRTUAL_ENV" => Some(venv.path().display().to_string()),
            "NCCL_HOME" => Some("/opt/nccl".to_string()),
            _ => None,
        };
        let dirs = search_dirs(&env);
        assert_eq!(dirs[0], Path::new("/opt/nccl/lib"));
        assert!(dirs.contains(&wheel), "{dirs:?}");
    }

    /// A file named libnccl.so.2 that is not NCCL is reported with its path
    /// and why it failed, beside the names tried and the fix; nothing
    /// panics. (Where a real NCCL is installed it would load instead.)
    #[test]
    fn a_missing_or_broken_nccl_is_named_with_the_paths_tried_and_the_fix() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("lib")).unwrap();
        let fake = home.path().join("lib/libnccl.so.2");
        std::fs::write(&fake, b"not a shared object").unwrap();
        let env = |k: &str| (k == "NCCL_HOME").then(|| home.path().display().to_string());
        match open(&env) {
            Ok(n) => assert_ne!(n.path, fake, "the fake library cannot load"),
            Err(e) => {
                assert!(e.contains(&fake.display().to_string()), "{e}");
                assert!(e.contains("libnccl.so.2:") && e.contains("pip install nvidia-nccl-cu12"), "{e}");
            }
        }
    }

    /// The layout NCCL 2.17's ncclConfig_t has on 64-bit Linux.
    #[test]
    fn config_has_nccl_2_17_layout() {
        let c = Config::new(false);
        assert_eq!(std::mem::size_of::<Config>(), 48);
        assert_eq!((c.size, c.magic, c.version, c.blocking), (48, 0xcafe_beef, 21701, 0));
    }
}
