//! The emulated CUDA device (feature `cuda-emu`): the kernels of
//! kernels/*.cu compiled as C++ by build.rs and run on the CPU, one fiber per
//! CUDA thread (emu/*.cpp). This is its safe interface: guarded device
//! memory (an access past a buffer's end faults at once, a write before its
//! start is caught after the launch) and launches whose errors name the
//! kernel, the block and the thread. Launches are synchronous and, from any
//! number of threads, serialized (one device, one stream); a launch's blocks
//! run on the calling thread, or on TESSERA_EMU_THREADS OS threads.

use super::driver::Arg;
use super::kernels::Storage;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

extern "C" {
    fn tessera_emu_launch(
        storage: c_int,
        kernel: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_shared_bytes: u32,
        args: *mut *mut c_void,
        kinds: *const c_char,
        nargs: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_emu_alloc(bytes: usize) -> *mut c_void;
    fn tessera_emu_free(p: *mut c_void);
    fn tessera_emu_check_range(p: *const c_void, bytes: usize, err: *mut c_char, err_len: usize) -> c_int;
    #[cfg(test)]
    fn tessera_emu_memory(in_use: *mut u64, peak: *mut u64);
    #[cfg(test)]
    fn tessera_emu_reset_peak();
    fn tessera_emu_set_threads(n: c_int);
    fn tessera_emu_kernel_count(storage: c_int) -> usize;
    fn tessera_emu_kernel_name(storage: c_int, i: usize) -> *const c_char;
}

/// Which compilation of the kernels: the two storage builds of
/// kernels/storage.cuh, or the test-only kernels of emu/negative_control.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EmuBuild {
    F32,
    Bf16,
    /// emu/negative_control.cu, for the emulator's own tests.
    #[cfg_attr(not(test), allow(dead_code))]
    Test,
}

impl EmuBuild {
    fn code(self) -> c_int {
        match self {
            EmuBuild::F32 => 0,
            EmuBuild::Bf16 => 1,
            EmuBuild::Test => 2,
        }
    }
}

impl From<Storage> for EmuBuild {
    fn from(s: Storage) -> Self {
        match s {
            Storage::F32 => EmuBuild::F32,
            Storage::Bf16 => EmuBuild::Bf16,
        }
    }
}

const ERR_LEN: usize = 1024;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `bytes` of zeroed device memory, or None when it cannot be mapped. Its
/// last byte is the last before a guard page.
pub(crate) fn alloc(bytes: usize) -> Option<u64> {
    // SAFETY: no preconditions; a null return is handled.
    let p = unsafe { tessera_emu_alloc(bytes) };
    (!p.is_null()).then_some(p as u64)
}

/// Frees an allocation; the process aborts if `addr` is not the start of a
/// live one.
///
/// # Safety
/// No launch may use the memory afterwards, and no host reference into it
/// may outlive the call.
pub(crate) unsafe fn free(addr: u64) {
    tessera_emu_free(addr as *mut c_void)
}

/// Ok when `[addr, addr + bytes)` lies inside one live allocation: the check
/// before a host copy touches device memory.
pub(crate) fn check_range(addr: u64, bytes: usize) -> Result<(), String> {
    let mut err = [0u8; ERR_LEN];
    // SAFETY: the runtime only compares the address with its table.
    let rc = unsafe { tessera_emu_check_range(addr as *const c_void, bytes, err.as_mut_ptr().cast(), ERR_LEN) };
    if rc == 0 {
        Ok(())
    } else {
        Err(message(&err))
    }
}

/// (bytes allocated now, the most allocated at once since the last
/// `reset_peak`), in bytes requested: the whole process's (each emulated
/// device keeps its own count too, driver/emu.rs).
#[cfg(test)]
pub(crate) fn memory() -> (u64, u64) {
    let (mut in_use, mut peak) = (0u64, 0u64);
    // SAFETY: two valid out-pointers.
    unsafe { tessera_emu_memory(&mut in_use, &mut peak) };
    (in_use, peak)
}

#[cfg(test)]
pub(crate) fn reset_peak() {
    // SAFETY: no preconditions.
    unsafe { tessera_emu_reset_peak() }
}

/// How many OS threads run a launch's blocks (the launching one included),
/// for the launches that follow; TESSERA_EMU_THREADS sets it at start
/// (default 1). Results are the same for any count.
pub(crate) fn set_threads(n: usize) {
    // SAFETY: no preconditions; the runtime clamps n to 1..=64.
    unsafe { tessera_emu_set_threads(n.min(64) as c_int) }
}

/// The kernels a build holds, by name.
pub(crate) fn kernel_names(build: EmuBuild) -> Vec<String> {
    // SAFETY: indices below the count give static NUL-terminated names.
    unsafe {
        (0..tessera_emu_kernel_count(build.code()))
            .map(|i| CStr::from_ptr(tessera_emu_kernel_name(build.code(), i)).to_string_lossy().into_owned())
            .collect()
    }
}

/// Runs `kernel` of `build` over the grid and waits for it. Errors name the
/// kernel: an unknown name, arguments that do not match its parameters,
/// dimensions CUDA refuses, dynamic shared memory (not emulated), `__trap()`,
/// an access past a buffer's end or before its start, threads waiting at
/// different barriers. The device stays usable after any of them.
pub(crate) fn launch(
    build: EmuBuild,
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared: u32,
    args: &[Arg],
) -> Result<(), String> {
    let name = CString::new(kernel).map_err(|_| format!("kernel name {kernel:?} holds a NUL byte"))?;
    let mut kinds = Vec::with_capacity(args.len());
    let mut ptrs: Vec<*mut c_void> = Vec::with_capacity(args.len());
    for a in args {
        let (kind, p): (u8, *const c_void) = match a {
            Arg::Ptr(v) => (b'p', (v as *const u64).cast()),
            Arg::U64(v) => (b'U', (v as *const u64).cast()),
            Arg::I32(v) => (b'i', (v as *const i32).cast()),
            Arg::F32(v) => (b'f', (v as *const f32).cast()),
            Arg::F64(v) => (b'd', (v as *const f64).cast()),
        };
        kinds.push(kind);
        ptrs.push(p.cast_mut());
    }
    let mut err = [0u8; ERR_LEN];
    // SAFETY: every pointer in `ptrs` points into `args`, which outlives the
    // call, at a value of the kind `kinds` names; the runtime reads them only.
    let rc = unsafe {
        tessera_emu_launch(
            build.code(),
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dynamic_shared,
            ptrs.as_mut_ptr(),
            kinds.as_ptr().cast(),
            args.len(),
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(message(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::Arg::{Ptr, F32, F64, I32, U64};
    use super::*;
    use half::bf16;
    use std::collections::BTreeSet;
    use std::sync::{Mutex, MutexGuard};

    /// The memory counters are process-wide: the tests that allocate run one
    /// at a time.
    fn serial() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device buffer freed on drop.
    struct Dev {
        addr: u64,
        bytes: usize,
    }

    impl Dev {
        fn zeroed(bytes: usize) -> Dev {
            Dev { addr: alloc(bytes).expect("device memory"), bytes }
        }

        fn from<T: Copy>(values: &[T]) -> Dev {
            let d = Dev::zeroed(std::mem::size_of_val(values));
            check_range(d.addr, d.bytes).unwrap();
            // SAFETY: the range was just checked to lie in the allocation.
            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), d.addr as *mut u8, d.bytes) };
            d
        }

        fn read<T: Copy + Default>(&self) -> Vec<T> {
            let mut out = vec![T::default(); self.bytes / std::mem::size_of::<T>()];
            check_range(self.addr, std::mem::size_of_val(out.as_slice())).unwrap();
            // SAFETY: as above; T is a plain number type.
            unsafe { std::ptr::copy_nonoverlapping(self.addr as *const u8, out.as_mut_ptr().cast::<u8>(), self.bytes) };
            out
        }

        fn ptr(&self) -> Arg {
            Ptr(self.addr)
        }
    }

    impl Drop for Dev {
        fn drop(&mut self) {
            // SAFETY: launches are synchronous; none uses it any more.
            unsafe { free(self.addr) }
        }
    }

    /// Activation buffers of a storage build: f32 as is, bf16 rounded.
    fn act(build: EmuBuild, values: &[f32]) -> Dev {
        match build {
            EmuBuild::Bf16 => Dev::from(&values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect::<Vec<u16>>()),
            _ => Dev::from(values),
        }
    }

    fn read_act(build: EmuBuild, d: &Dev) -> Vec<f32> {
        match build {
            EmuBuild::Bf16 => d.read::<u16>().into_iter().map(|b| bf16::from_bits(b).to_f32()).collect(),
            _ => d.read::<f32>(),
        }
    }

    /// A value as the build stores it.
    fn stored(build: EmuBuild, v: f32) -> f32 {
        if build == EmuBuild::Bf16 {
            bf16::from_f32(v).to_f32()
        } else {
            v
        }
    }

    /// A launch that must work: the device is usable.
    fn good_launch() {
        let x = Dev::zeroed(1000 * 4);
        launch(EmuBuild::F32, "fill_f32", [2, 1, 1], [256, 1, 1], 0, &[x.ptr(), F32(2.5), U64(1000)]).unwrap();
        assert!(x.read::<f32>().iter().all(|&v| v == 2.5));
    }

    fn expect_err(r: Result<(), String>, parts: &[&str]) -> String {
        let e = r.expect_err("the launch should fail");
        for p in parts {
            assert!(e.contains(p), "{e:?} should mention {p:?}");
        }
        e
    }

    #[test]
    fn a_write_past_the_end_names_the_kernel_and_the_allocation() {
        let _s = serial();
        let x = Dev::zeroed(100 * 4);
        let e = launch(EmuBuild::Test, "oob_index_f32", [1, 1, 1], [128, 1, 1], 0, &[x.ptr(), U64(100)]);
        let e = expect_err(
            e,
            &["oob_index_f32", "test build", "past the end", "allocation of 400 bytes", "write", "thread (100,0,0)"],
        );
        assert!(e.contains("byte offset 400"), "{e}");
        // Every thread before it wrote its value.
        assert!(x.read::<f32>().iter().all(|&v| v == 1.0));
        good_launch();
        // A production kernel reading past the end: n one too large.
        let (a, b) = (Dev::zeroed(100 * 4), Dev::zeroed(100 * 4));
        let e = launch(EmuBuild::F32, "axpy_f32", [1, 1, 1], [128, 1, 1], 0, &[F32(1.0), a.ptr(), b.ptr(), U64(101)]);
        expect_err(e, &["axpy_f32", "f32 build", "invalid read", "past the end", "allocation of 400 bytes"]);
        good_launch();
        // In bounds, the same kernel is fine.
        let y = Dev::zeroed(101 * 4);
        launch(EmuBuild::Test, "oob_index_f32", [1, 1, 1], [128, 1, 1], 0, &[y.ptr(), U64(100)]).unwrap();
    }

    #[test]
    fn a_write_before_the_start_is_caught_in_the_slack_and_in_the_guard_page() {
        let _s = serial();
        // 400 bytes: x[-1] lands in the first page's slack (the canary).
        let x = Dev::zeroed(400);
        let e = launch(EmuBuild::Test, "underflow_write_f32", [1, 1, 1], [32, 1, 1], 0, &[x.ptr()]);
        expect_err(e, &["underflow_write_f32", "before the start", "allocation of 400 bytes", "offsets -4 to -1"]);
        good_launch();
        // The canary is restored: the next launch does not report it again.
        launch(EmuBuild::Test, "oob_index_f32", [1, 1, 1], [32, 1, 1], 0, &[x.ptr(), U64(0)]).unwrap();
        // A whole page: x[-1] is in the guard page, which faults at once.
        let y = Dev::zeroed(4096);
        let e = launch(EmuBuild::Test, "underflow_write_f32", [1, 1, 1], [32, 1, 1], 0, &[y.ptr()]);
        expect_err(e, &["underflow_write_f32", "before the start", "allocation of 4096 bytes", "byte offset -4"]);
        good_launch();
    }

    #[test]
    fn a_trap_names_the_kernel_and_the_thread() {
        let _s = serial();
        let flag = Dev::from(&[1i32]);
        let e = launch(EmuBuild::Test, "trap_f32", [2, 1, 1], [64, 1, 1], 0, &[flag.ptr()]);
        expect_err(e, &["trap_f32", "__trap()", "block (0,0,0) thread (3,0,0)", "negative_control.cu:"]);
        good_launch();
        let off = Dev::from(&[0i32]);
        launch(EmuBuild::Test, "trap_f32", [2, 1, 1], [64, 1, 1], 0, &[off.ptr()]).unwrap();
        // A production kernel's trap: gather_rows_f32 with an id past the table.
        let table = Dev::zeroed(4 * 8 * 4);
        let ids = Dev::from(&[1i32, 7]);
        let out = Dev::zeroed(2 * 8 * 4);
        let e = launch(
            EmuBuild::F32,
            "gather_rows_f32",
            [2, 1, 1],
            [32, 1, 1],
            0,
            &[table.ptr(), ids.ptr(), out.ptr(), U64(8), U64(4), I32(0)],
        );
        expect_err(e, &["gather_rows_f32", "f32 build", "block (1,0,0)", "__trap()", "embedding.cu:"]);
        good_launch();
    }

    #[test]
    fn threads_at_different_barriers_are_an_error() {
        let _s = serial();
        let x = Dev::zeroed(64 * 4);
        let e = launch(EmuBuild::Test, "divergent_barrier_f32", [1, 1, 1], [64, 1, 1], 0, &[x.ptr()]);
        expect_err(e, &["divergent_barrier_f32", "threads of block (0,0,0) wait at different barriers"]);
        good_launch();
        // A shuffle reading a lane the last, partial warp lacks.
        let y = Dev::zeroed(48 * 4);
        let e = launch(EmuBuild::Test, "partial_warp_shuffle_f32", [1, 1, 1], [48, 1, 1], 0, &[y.ptr()]);
        expect_err(e, &["partial_warp_shuffle_f32", "__shfl_xor_sync", "does not exist", "16 threads"]);
        good_launch();
        // Half of each warp at a shuffle, half at __syncthreads: a deadlock.
        let e = launch(EmuBuild::Test, "split_warp_f32", [1, 1, 1], [64, 1, 1], 0, &[x.ptr()]);
        expect_err(
            e,
            &["split_warp_f32", "wait at different barriers", "32 at the __syncthreads", "32 at a warp barrier"],
        );
        good_launch();
        let e = launch(EmuBuild::Test, "half_mask_shuffle_f32", [1, 1, 1], [64, 1, 1], 0, &[x.ptr()]);
        expect_err(e, &["half_mask_shuffle_f32", "0x0000ffff", "only the full mask"]);
        good_launch();
        // With whole warps the same kernel is fine: lanes swap halves.
        let v: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let z = Dev::from(&v);
        launch(EmuBuild::Test, "partial_warp_shuffle_f32", [1, 1, 1], [64, 1, 1], 0, &[z.ptr()]).unwrap();
        let want: Vec<f32> = (0..64).map(|i| (i ^ 16) as f32).collect();
        assert_eq!(z.read::<f32>(), want);
    }

    #[test]
    fn a_fiber_stack_overflow_is_an_error() {
        let _s = serial();
        let x = Dev::zeroed(4);
        let e = launch(EmuBuild::Test, "stack_overflow_f32", [1, 1, 1], [32, 1, 1], 0, &[x.ptr()]);
        expect_err(e, &["stack_overflow_f32", "stack overflow", "thread (0,0,0)"]);
        good_launch();
    }

    #[test]
    fn barriers_and_shuffles_give_the_exact_block_sum() {
        let _s = serial();
        for threads in [32u32, 96, 256, 1024] {
            let blocks = 3u32;
            let n = (threads * blocks) as usize;
            let v: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 - 300.0).collect();
            let x = Dev::from(&v);
            let out = Dev::zeroed(blocks as usize * 8);
            launch(EmuBuild::Test, "block_sum_f32", [blocks, 1, 1], [threads, 1, 1], 0, &[x.ptr(), out.ptr()]).unwrap();
            let want: Vec<f64> = v.chunks(threads as usize).map(|c| c.iter().map(|&a| a as f64).sum::<f64>()).collect();
            assert_eq!(out.read::<f64>(), want, "{threads} threads per block");
        }
        let mx = Dev::from(&[0u64]);
        let count = Dev::from(&[0i32]);
        launch(EmuBuild::Test, "atomics_f32", [5, 1, 1], [200, 1, 1], 0, &[mx.ptr(), count.ptr()]).unwrap();
        assert_eq!(mx.read::<u64>(), [999]);
        assert_eq!(count.read::<i32>(), [1000]);
    }

    #[test]
    fn arguments_and_dimensions_are_checked_against_the_kernel() {
        let _s = serial();
        let x = Dev::zeroed(16);
        let f = |args: &[Arg]| launch(EmuBuild::F32, "fill_f32", [1, 1, 1], [4, 1, 1], 0, args);
        expect_err(
            f(&[x.ptr(), U64(1), U64(4)]),
            &["parameter 2 of fill_f32 (f32 build) is a float, the launch passed an unsigned long long"],
        );
        expect_err(f(&[x.ptr(), F32(1.0)]), &["fill_f32", "takes 3 parameters, the launch passed 2"]);
        expect_err(f(&[F64(1.0), F32(1.0), U64(4)]), &["parameter 1 of fill_f32", "is a pointer", "a double"]);
        expect_err(
            launch(EmuBuild::Bf16, "no_such_kernel", [1, 1, 1], [1, 1, 1], 0, &[]),
            &["no_such_kernel", "bf16 build"],
        );
        let args = [x.ptr(), F32(1.0), U64(4)];
        let dims = |grid: [u32; 3], block: [u32; 3], shared: u32| {
            launch(EmuBuild::F32, "fill_f32", grid, block, shared, &args)
        };
        expect_err(dims([1, 1, 1], [2048, 1, 1], 0), &["fill_f32", "2048 threads"]);
        expect_err(dims([1, 1, 1], [0, 1, 1], 0), &["fill_f32", "0 threads"]);
        expect_err(dims([1, 1, 1], [32, 32, 2], 0), &["fill_f32", "2048 threads"]);
        expect_err(dims([0, 1, 1], [4, 1, 1], 0), &["fill_f32", "grid of 0x1x1"]);
        expect_err(dims([1 << 31, 1, 1], [4, 1, 1], 0), &["fill_f32", "grid of 2147483648x1x1"]);
        expect_err(dims([1, 65536, 1], [4, 1, 1], 0), &["fill_f32", "65536"]);
        expect_err(dims([1, 1, 0], [4, 1, 1], 0), &["fill_f32", "grid of 1x1x0"]);
        expect_err(dims([1, 1, 1], [4, 1, 1], 16), &["fill_f32", "16 bytes of dynamic shared memory"]);
        dims([1, 2, 3], [2, 2, 1], 0).unwrap();
        assert_eq!(x.read::<f32>(), [1.0; 4]);
    }

    /// The kernels each source declares, as kernels.rs finds them for NVRTC.
    fn declared(sources: &[&'static str]) -> BTreeSet<String> {
        sources.iter().flat_map(|s| super::super::kernels::entry_points(s)).map(str::to_string).collect()
    }

    #[test]
    fn every_kernel_of_every_source_is_registered_in_both_builds() {
        let all: Vec<&str> = super::super::kernels::SOURCES.iter().map(|s| s.1).collect();
        let want = declared(&all);
        assert!(want.len() > 40, "{want:?}");
        for build in [EmuBuild::F32, EmuBuild::Bf16] {
            let names = kernel_names(build);
            let got: BTreeSet<String> = names.iter().cloned().collect();
            assert_eq!(got.len(), names.len(), "{build:?}: a kernel registered twice");
            assert_eq!(got, want, "{build:?}");
        }
        let got: BTreeSet<String> = kernel_names(EmuBuild::Test).into_iter().collect();
        assert_eq!(got, declared(&[include_str!("emu/negative_control.cu")]));
        // The registry comes from the kernels directory, SOURCES from a list
        // in kernels.rs: a file in one and not the other shows up above.
    }

    #[test]
    fn memory_counts_allocations_and_the_peak() {
        let _s = serial();
        reset_peak();
        let (u0, p0) = memory();
        assert_eq!(p0, u0);
        let a = Dev::zeroed(3 << 20);
        let b = Dev::zeroed(5 << 20);
        assert_eq!(memory(), (u0 + (8 << 20), u0 + (8 << 20)));
        drop(a);
        assert_eq!(memory(), (u0 + (5 << 20), u0 + (8 << 20)));
        reset_peak();
        assert_eq!(memory(), (u0 + (5 << 20), u0 + (5 << 20)));
        drop(b);
        assert_eq!(memory().0, u0);
        // Zeroed, and the last byte is the last before the guard page.
        let c = Dev::zeroed(10_000);
        assert!(c.read::<u8>().iter().all(|&v| v == 0));
        assert_eq!((c.addr + c.bytes as u64) % 4096, 0);
        let empty = Dev::zeroed(0);
        check_range(empty.addr, 0).unwrap();
    }

    #[test]
    fn check_range_accepts_inside_and_refuses_outside() {
        let _s = serial();
        let x = Dev::zeroed(1000);
        check_range(x.addr, 1000).unwrap();
        check_range(x.addr + 10, 990).unwrap();
        check_range(x.addr + 1000, 0).unwrap();
        let e = check_range(x.addr + 10, 991).unwrap_err();
        assert!(e.contains("past the end") && e.contains("allocation of 1000 bytes"), "{e}");
        let e = check_range(x.addr - 4, 8).unwrap_err();
        assert!(e.contains("before the start") && e.contains("allocation of 1000 bytes"), "{e}");
        let e = check_range(8, 8).unwrap_err();
        assert!(e.contains("not in any live allocation"), "{e}");
    }

    const BUILDS: [EmuBuild; 2] = [EmuBuild::F32, EmuBuild::Bf16];

    #[test]
    fn fill_and_axpy_in_both_builds() {
        let _s = serial();
        for build in BUILDS {
            let n = 1000usize;
            let x = act(build, &vec![0.0; n]);
            // 2 blocks of 256: the grid-stride loop covers the rest.
            launch(build, "fill_f32", [2, 1, 1], [256, 1, 1], 0, &[x.ptr(), F32(1.5), U64(n as u64)]).unwrap();
            assert!(read_act(build, &x).iter().all(|&v| v == 1.5), "{build:?}");
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let ys: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
            let (x, y) = (act(build, &xs), act(build, &ys));
            let alpha = -0.75f32;
            launch(build, "axpy_f32", [3, 1, 1], [128, 1, 1], 0, &[F32(alpha), x.ptr(), y.ptr(), U64(n as u64)])
                .unwrap();
            let want: Vec<f32> =
                (0..n).map(|i| stored(build, stored(build, ys[i]) + alpha * stored(build, xs[i]))).collect();
            assert_eq!(read_act(build, &y), want, "{build:?}");
        }
    }

    /// Fused attention's online-softmax row kernel over two key blocks of
    /// one sequence (the second partial), causal or not: m + ln(l) is the
    /// log-sum-exp of each row's visible scores, the last block's P is
    /// exp(S - m) in the build's storage (0 where masked), and the output
    /// accumulator's rows are rescaled by exp(m_old - m) (the first block
    /// leaves them unread).
    #[test]
    fn online_softmax_rows_in_both_builds() {
        let _s = serial();
        let (heads, seq, kb0) = (2usize, 37usize, 20usize);
        // Every score, [heads, queries, keys].
        let all: Vec<f32> = (0..heads * seq * seq).map(|i| ((i * 7919) % 101) as f32 / 17.0 - 3.0).collect();
        let score = |h: usize, i: usize, j: usize| all[(h * seq + i) * seq + j];
        for build in BUILDS {
            let tol = if build == EmuBuild::Bf16 { 1e-2 } else { 1e-6 };
            for causal in [0, 1] {
                let (m, l) = (Dev::zeroed(heads * seq * 4), Dev::zeroed(heads * seq * 4));
                let o = Dev::from(&vec![1.0f32; seq * heads]); // head_dim 1
                let (mut p, mut i0) = (Vec::new(), 0);
                for (j0, kb) in [(0, kb0), (kb0, seq - kb0)] {
                    i0 = if causal == 1 { j0 } else { 0 };
                    let mut s = Vec::new();
                    for h in 0..heads {
                        for i in i0..seq {
                            s.extend((j0..j0 + kb).map(|j| score(h, i, j)));
                        }
                    }
                    let (s, pd) = (Dev::from(&s), act(build, &vec![0.0; s.len()]));
                    let (n, first) = (heads * (seq - i0), i32::from(j0 == 0));
                    let dims = [U64(seq as u64), U64(heads as u64), U64(1), U64(j0 as u64), U64(kb as u64)];
                    let mut args = vec![s.ptr(), pd.ptr(), m.ptr(), l.ptr(), o.ptr()];
                    args.extend(dims.into_iter().chain([I32(causal), I32(first)]));
                    launch(build, "attn_fwd_block_rows", [n as u32, 1, 1], [32, 1, 1], 0, &args).unwrap();
                    p = read_act(build, &pd);
                }
                let (m, l, o) = (m.read::<f32>(), l.read::<f32>(), o.read::<f32>());
                let kb = seq - kb0;
                for h in 0..heads {
                    for i in 0..seq {
                        let visible = if causal == 1 { i + 1 } else { seq };
                        let max = |n: usize| (0..n).map(|j| score(h, i, j)).fold(f32::NEG_INFINITY, f32::max);
                        let mx = max(visible);
                        let z: f64 = (0..visible).map(|j| ((score(h, i, j) - mx) as f64).exp()).sum();
                        let at = h * seq + i;
                        let what = format!("{build:?} causal {causal} head {h} row {i}");
                        assert_eq!(m[at], mx, "{what}: max");
                        let lse = m[at] as f64 + (l[at] as f64).ln();
                        assert!((lse - (mx as f64 + z.ln())).abs() <= 1e-6 * lse.abs().max(1.0), "{what}: lse {lse}");
                        let want_o = if i >= i0 { (max(visible.min(kb0)) - mx).exp() } else { 1.0 };
                        assert!(
                            (o[i * heads + h] - want_o).abs() <= 1e-6,
                            "{what}: o {} vs {want_o}",
                            o[i * heads + h]
                        );
                        for j in (i >= i0).then_some(0..kb).into_iter().flatten() {
                            let w = if kb0 + j < visible { (score(h, i, kb0 + j) - mx).exp() } else { 0.0 };
                            let g = p[(h * (seq - i0) + i - i0) * kb + j];
                            assert!((g - w).abs() <= tol * w.max(1e-3), "{what} key {}: P {g} vs {w}", kb0 + j);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sum_rows_f64_is_exact_in_both_builds() {
        let _s = serial();
        let n = 1000usize;
        let v: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 100.0).collect();
        for build in BUILDS {
            let x = Dev::from(&v);
            let out = Dev::zeroed(8);
            launch(build, "sum_rows_f64", [1, 1, 1], [256, 1, 1], 0, &[x.ptr(), out.ptr(), U64(n as u64)]).unwrap();
            assert_eq!(out.read::<f64>(), [v.iter().sum::<f64>()], "{build:?}");
        }
    }

    #[test]
    fn layernorm_forward_in_both_builds() {
        let _s = serial();
        let (rows, cols) = (3usize, 300usize);
        let eps = 1e-5f32;
        let xs: Vec<f32> = (0..rows * cols).map(|i| ((i * 31) % 97) as f32 / 13.0 - 2.0 + (i / cols) as f32).collect();
        let ws: Vec<f32> = (0..cols).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
        let bs: Vec<f32> = (0..cols).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
        for build in BUILDS {
            let (x, w, b, y) = (act(build, &xs), act(build, &ws), act(build, &bs), act(build, &vec![0.0; rows * cols]));
            let (mean, rstd) = (Dev::zeroed(rows * 4), Dev::zeroed(rows * 4));
            launch(
                build,
                "layernorm_fwd_f32",
                [rows as u32, 1, 1],
                [256, 1, 1],
                0,
                &[x.ptr(), w.ptr(), b.ptr(), y.ptr(), mean.ptr(), rstd.ptr(), U64(cols as u64), F32(eps)],
            )
            .unwrap();
            let (got, gm, gr) = (read_act(build, &y), mean.read::<f32>(), rstd.read::<f32>());
            let tol = if build == EmuBuild::Bf16 { 2e-2 } else { 1e-5 };
            for r in 0..rows {
                let row: Vec<f64> = xs[r * cols..(r + 1) * cols].iter().map(|&a| stored(build, a) as f64).collect();
                let mu = row.iter().sum::<f64>() / cols as f64;
                let var = row.iter().map(|a| (a - mu) * (a - mu)).sum::<f64>() / cols as f64;
                let rs = 1.0 / (var + eps as f64).sqrt();
                assert!((gm[r] as f64 - mu).abs() <= 1e-6 * mu.abs().max(1.0), "{build:?} mean {r}");
                assert!((gr[r] as f64 - rs).abs() <= 1e-6 * rs, "{build:?} rstd {r}");
                for c in 0..cols {
                    let want = (row[c] - mu) * rs * stored(build, ws[c]) as f64 + stored(build, bs[c]) as f64;
                    let g = got[r * cols + c] as f64;
                    assert!((g - want).abs() <= tol * want.abs().max(1.0), "{build:?} [{r},{c}]: {g} vs {want}");
                }
            }
        }
    }

    /// Blocks spread over several OS threads: bit-identical results, and
    /// the same error (the earliest failing block's) as with one thread.
    #[test]
    fn blocks_on_several_os_threads_give_the_same_results_and_errors() {
        let _s = serial();
        let run = |threads: usize| {
            set_threads(threads);
            let mut out: Vec<Vec<u8>> = Vec::new();
            let (rows, cols) = (64usize, 200usize);
            let xs: Vec<f32> = (0..rows * cols).map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0).collect();
            for build in BUILDS {
                // One causal key block of `cols` keys for `rows` queries.
                let (s, p, m, l, o) =
                    (Dev::from(&xs), act(build, &xs), Dev::zeroed(rows * 4), Dev::zeroed(rows * 4), Dev::zeroed(4));
                let launched = [rows as u32, 1, 1];
                let dims = [U64(rows as u64), U64(1), U64(0), U64(0), U64(cols as u64), I32(1), I32(1)];
                let args: Vec<Arg> = [s.ptr(), p.ptr(), m.ptr(), l.ptr(), o.ptr()].into_iter().chain(dims).collect();
                launch(build, "attn_fwd_block_rows", launched, [64, 1, 1], 0, &args).unwrap();
                out.extend([p.read::<u8>(), m.read::<u8>(), l.read::<u8>()]);
                let w = act(build, &vec![1.25; cols]);
                let b = act(build, &vec![-0.5; cols]);
                let (x, y) = (act(build, &xs), act(build, &vec![0.0; rows * cols]));
                let (mean, rstd) = (Dev::zeroed(rows * 4), Dev::zeroed(rows * 4));
                let args = [x.ptr(), w.ptr(), b.ptr(), y.ptr(), mean.ptr(), rstd.ptr(), U64(cols as u64), F32(1e-5)];
                launch(build, "layernorm_fwd_f32", launched, [256, 1, 1], 0, &args).unwrap();
                out.extend([y.read::<u8>(), mean.read::<u8>(), rstd.read::<u8>()]);
            }
            let v: Vec<f32> = (0..256 * 40).map(|i| (i % 77) as f32).collect();
            let (x, sums) = (Dev::from(&v), Dev::zeroed(40 * 8));
            launch(EmuBuild::Test, "block_sum_f32", [40, 1, 1], [256, 1, 1], 0, &[x.ptr(), sums.ptr()]).unwrap();
            out.push(sums.read::<u8>());
            let n = 100_000u64;
            let y = Dev::zeroed(n as usize * 4);
            let e = launch(EmuBuild::Test, "oob_index_f32", [400, 1, 1], [256, 1, 1], 0, &[y.ptr(), U64(n)]);
            let oob = e.unwrap_err().replace(&format!("{:#x}", y.addr + n * 4), "ADDR");
            let ids: Vec<i32> = (0..400).map(|i| if i == 50 || i == 300 { 9 } else { i % 8 }).collect();
            let (table, ids, rows_out) = (Dev::zeroed(8 * 64 * 4), Dev::from(&ids), Dev::zeroed(400 * 64 * 4));
            let args = [table.ptr(), ids.ptr(), rows_out.ptr(), U64(64), U64(8), I32(0)];
            let trap = launch(EmuBuild::F32, "gather_rows_f32", [400, 1, 1], [64, 1, 1], 0, &args).unwrap_err();
            (out, oob, trap)
        };
        let one = run(1);
        let three = run(3);
        set_threads(1);
        assert!(one.1.contains("block (390,0,0) thread (160,0,0)"), "{}", one.1);
        assert!(one.2.contains("block (50,0,0)"), "{}", one.2);
        assert_eq!(one.1, three.1);
        assert_eq!(one.2, three.2);
        assert!(one.0 == three.0, "results differ with 3 OS threads");
    }

    /// The emulator's speed, printed (`--nocapture`): a fiber switch (a
    /// barrier wait is one) and a 100k-thread elementwise launch. The bounds
    /// are loose, against pathological slowness only.
    #[test]
    fn speed_of_fiber_switches_and_launches() {
        let _s = serial();
        let (threads, iters) = (1024u32, 200u64);
        let mut per_switch = f64::MAX;
        // The first run maps the fiber stacks.
        for _ in 0..4 {
            let t = std::time::Instant::now();
            launch(EmuBuild::Test, "barrier_loop_f32", [1, 1, 1], [threads, 1, 1], 0, &[U64(iters)]).unwrap();
            per_switch = per_switch.min(t.elapsed().as_secs_f64() / (threads as f64 * iters as f64));
        }
        let n = 100_000u64;
        let x = Dev::zeroed(n as usize * 4);
        let y = Dev::zeroed(n as usize * 4);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            launch(
                EmuBuild::F32,
                "axpy_f32",
                [(n / 256) as u32 + 1, 1, 1],
                [256, 1, 1],
                0,
                &[F32(0.5), x.ptr(), y.ptr(), U64(n)],
            )
            .unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!(
            "emulated device: {:.1} ns per fiber switch (barrier wait), {:.2} ms per 100k-thread axpy launch",
            per_switch * 1e9,
            best * 1e3
        );
        assert!(per_switch < 2e-6 && best < 0.5, "{per_switch} s per switch, {best} s per launch");
    }
}
