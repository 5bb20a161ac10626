// What the emulator's runtime files share (fibers.cpp, memory.cpp,
// launch.cpp); the kernels see only cuda_host.h.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_host.h"
#include "registry.h"

namespace tessera_emu {

extern const char* const build_names[3];

// A fault the signal handler recognised, recorded raw (no formatting in the
// handler: it runs on a small alternate stack) for the launcher to report.
struct Fault {
    enum What { PastEnd, BeforeStart, StackOverflow } what;
    uintptr_t addr;
    int access;  // 0 unknown, 1 read, 2 write
    size_t alloc_bytes;
    long long offset;  // addr minus the allocation's start
    uint32_t thread;   // linear index in the block
};

// The launch in progress. Launches are serialized (one device, one
// stream); its blocks may run on several OS threads (TESSERA_EMU_THREADS).
struct Launch {
    const KernelEntry* entry;
    int build;
    void* const* args;
    uint3 grid;
    dim3 block;
    uint32_t threads;  // per block
};

// One OS thread's share of a launch, and how it failed.
struct Runner {
    const Launch* launch;
    sigjmp_buf jmp;  // errors inside the kernel (trap, faults, misuse) jump here
    volatile sig_atomic_t running;
    unsigned long long block;   // the block being run (linear, x fastest)
    unsigned long long failed;  // the block that failed, or ~0
    bool faulted;
    Fault fault;
    char msg[1024];
};

// Set while this OS thread runs a launch's blocks: the fault handler's test.
extern __thread Runner* volatile tls_runner;

// "kernel K (B build)".
int describe_kernel(const Launch& L, char* out, size_t len);

// Writes a message into an FFI error buffer of `len` bytes; returns 1, the
// C API's error status.
__attribute__((format(printf, 3, 4))) int say(char* err, size_t len, const char* fmt, ...);

// Fibers and the block scheduler (fibers.cpp), one per OS thread that runs
// blocks; sched_bind makes it this thread's for the launch.
struct Scheduler;
Scheduler* sched_create();
void sched_bind(Scheduler* s, const Launch& L);
// Runs this thread's current block (tls_block_idx). Returns false with the
// runner's msg set when threads wait at different barriers; other errors
// siglongjmp to the runner's jmp.
bool sched_run_block();
// After a launch, normal or not: every fiber is free again.
void sched_reset();
uint32_t sched_current_thread();
bool sched_stack_guard(uintptr_t addr);
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
const char* base_name(const char* path);

// Guarded memory (memory.cpp).
bool find_guard(uintptr_t addr, Fault* out);
// Checks every live allocation's canary; on damage writes a message
// (after `prefix`) and restores the canary. Returns whether any was damaged.
bool check_canaries(const char* prefix, char* msg, size_t len);

}  // namespace tessera_emu
