// Emulated threads as fibers, and the block scheduler: a block's threads run
// in thread order until each finishes or waits at a barrier; a barrier
// releases when every thread still running waits at it. Each OS thread that
// runs blocks has a scheduler of its own (tls_sched).

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#include "internal.h"

#if defined(__x86_64__) && !defined(TESSERA_EMU_UCONTEXT)
#define TESSERA_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace tessera_emu {

__thread const uint3* tls_thread_idx;
__thread uint3 tls_block_idx;
__thread dim3 tls_block_dim;
__thread dim3 tls_grid_dim;

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr uint32_t kMaxThreads = 1024;

#ifdef TESSERA_EMU_ASM_SWITCH
// glibc's swapcontext makes a system call (the signal mask) per switch; this
// saves only what the SysV ABI makes callee-saved, and the stack pointer.
struct Context {
    void* sp;
};
}  // namespace
}  // namespace tessera_emu

extern "C" void tessera_emu_switch(void** save_sp, void* sp);
extern "C" void tessera_emu_fiber_entry();

asm(R"(
    .pushsection .text
    .p2align 4
    .globl tessera_emu_switch
    .hidden tessera_emu_switch
    .type tessera_emu_switch, @function
tessera_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tessera_emu_switch, .-tessera_emu_switch

    .p2align 4
    .globl tessera_emu_fiber_entry
    .hidden tessera_emu_fiber_entry
    .type tessera_emu_fiber_entry, @function
tessera_emu_fiber_entry:
    .cfi_startproc
    .cfi_undefined rip
    callq *%r13
    ud2
    .cfi_endproc
    .size tessera_emu_fiber_entry, .-tessera_emu_fiber_entry
    .popsection
)");

namespace tessera_emu {
namespace {

// A new fiber's stack as tessera_emu_switch leaves a suspended one: six
// saved registers (r13 = the entry function), then the return address.
void context_init(Context* c, char* hi, void (*entry)()) {
    uint64_t* top = reinterpret_cast<uint64_t*>(hi);  // 16-byte aligned
    top[-1] = reinterpret_cast<uint64_t>(&tessera_emu_fiber_entry);
    top[-2] = 0;                                     // rbp: ends frame chains
    top[-3] = 0;                                     // rbx
    top[-4] = 0;                                     // r12
    top[-5] = reinterpret_cast<uint64_t>(entry);     // r13
    top[-6] = 0;                                     // r14
    top[-7] = 0;                                     // r15
    c->sp = top - 7;
}

inline void context_switch(Context* from, Context* to) { tessera_emu_switch(&from->sp, to->sp); }
#else
struct Context {
    ucontext_t uc;
};

void context_init(Context* c, char* hi, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = hi - kStackBytes;
    c->uc.uc_stack.ss_size = kStackBytes;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}

inline void context_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#endif

struct Fiber {
    Context ctx;
    char* guard;  // PROT_NONE page just below the stack
    char* hi;     // top of the stack
    uint32_t thread;
};

enum : uint8_t { kUnstarted, kReady, kRunning, kWaitBlock, kWaitWarp, kDone };

struct Thread {
    uint3 idx;
    uint8_t state;
    Fiber* fiber;
    uint32_t shfl_seq;  // shuffles done: the slot parity, and a tag partners check
    const char* file;   // where it waits
    int line;
};

struct Warp {
    uint32_t lanes, alive, waiting;
    uint32_t waiters[32];
    // Double-buffered by shuffle parity: a lane can only be one shuffle
    // ahead of its partners, so one warp barrier per shuffle suffices.
    unsigned long long slot[2][32];
    uint32_t tag[2][32];
};

}  // namespace

struct Scheduler {
    const Launch* launch;
    uint32_t n;
    Thread threads[kMaxThreads];
    Warp warps[kMaxThreads / 32];
    uint32_t next_unstarted, alive;
    uint32_t block_waiting;
    uint32_t block_waiters[kMaxThreads];
    const char* block_file;
    int block_line;
    uint32_t ready[kMaxThreads];  // ring
    uint32_t ready_head, ready_count;
    bool shuffled;  // the tags need a reset before the next block
    Fiber* current;
    Context main;
    std::vector<Fiber*> fibers, free_fibers;
};

__thread Scheduler* tls_sched;

namespace {

void fiber_main();

Fiber* take_fiber() {
    Scheduler& S = *tls_sched;
    if (!S.free_fibers.empty()) {
        Fiber* f = S.free_fibers.back();
        S.free_fibers.pop_back();
        return f;
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) fail("cannot map a %zu KiB fiber stack for the block's thread %u", kStackBytes / 1024,
                              S.next_unstarted);
    char* base = static_cast<char*>(m);
    if (mprotect(base, page, PROT_NONE) != 0) {
        munmap(m, kStackBytes + page);
        fail("cannot protect a fiber stack's guard page");
    }
    Fiber* f = new Fiber();
    f->guard = base;
    // Stack tops staggered by a few cache lines: tops at the same offset in
    // their pages would all compete for the same cache sets.
    f->hi = base + page + kStackBytes - (S.fibers.size() * 3 % 61) * 64;
    S.fibers.push_back(f);
    S.free_fibers.reserve(S.fibers.size());  // pushing back a finished fiber must not allocate
    return f;
}

void push_ready(uint32_t t) {
    Scheduler& S = *tls_sched;
    S.threads[t].state = kReady;
    S.ready[(S.ready_head + S.ready_count++) % kMaxThreads] = t;
}

void release_block() {
    Scheduler& S = *tls_sched;
    for (uint32_t i = 0; i < S.block_waiting; ++i) push_ready(S.block_waiters[i]);
    S.block_waiting = 0;
}

void release_warp(Warp& w) {
    for (uint32_t i = 0; i < w.waiting; ++i) push_ready(w.waiters[i]);
    w.waiting = 0;
}

// Switches from `from` to the next thread that can run: a released one, else
// a new fiber for the next thread not yet started, else back to the
// launcher. Returns when `from` is resumed.
void run_next(Context* from) {
    Scheduler& S = *tls_sched;
    if (S.ready_count) {
        const uint32_t t = S.ready[S.ready_head];
        S.ready_head = (S.ready_head + 1) % kMaxThreads;
        --S.ready_count;
        Thread& th = S.threads[t];
        th.state = kRunning;
        S.current = th.fiber;
        tls_thread_idx = &th.idx;
        context_switch(from, &th.fiber->ctx);
    } else if (S.next_unstarted < S.n) {
        Fiber* f = take_fiber();
        f->thread = S.next_unstarted++;
        context_init(&f->ctx, f->hi, fiber_main);
        S.current = f;
        context_switch(from, &f->ctx);
    } else {
        S.current = nullptr;
        context_switch(from, &S.main);
    }
}

void finish(uint32_t t) {
    Scheduler& S = *tls_sched;
    S.threads[t].state = kDone;
    --S.alive;
    Warp& w = S.warps[t >> 5];
    --w.alive;
    // Threads that have exited do not hold a barrier up.
    if (S.block_waiting && S.block_waiting == S.alive) release_block();
    if (w.waiting && w.waiting == w.alive) release_warp(w);
}

// Runs threads to completion one after another on this fiber's stack while
// unstarted ones remain (no switch at all for kernels without barriers).
void fiber_main() {
    Scheduler& S = *tls_sched;
    Fiber* f = S.current;
    for (;;) {
        Thread& th = S.threads[f->thread];
        th.state = kRunning;
        th.fiber = f;
        tls_thread_idx = &th.idx;
        S.launch->entry->invoke(S.launch->args);
        finish(f->thread);
        if (S.next_unstarted < S.n) {
            f->thread = S.next_unstarted++;
            continue;
        }
        // Free now: no thread is left to start, so run_next cannot hand this
        // (still running) stack to a new fiber; a later block reuses it.
        S.free_fibers.push_back(f);
        run_next(&f->ctx);
        __builtin_trap();  // a finished fiber is never resumed
    }
}

void format_thread(char* out, size_t len, uint32_t t) {
    Scheduler& S = *tls_sched;
    const uint3& i = S.threads[t].idx;
    snprintf(out, len, "(%u,%u,%u)", i.x, i.y, i.z);
}

bool same_site(const char* f1, int l1, const char* f2, int l2) { return l1 == l2 && (f1 == f2 || !strcmp(f1, f2)); }

[[noreturn]] void fail_sites(uint32_t t1, const char* f1, int l1, uint32_t t2, const char* f2, int l2) {
    char a[40], b[40];
    format_thread(a, sizeof a, t1);
    format_thread(b, sizeof b, t2);
    const uint3& bi = tls_block_idx;
    fail("threads of block (%u,%u,%u) wait at different barriers: thread %s at the __syncthreads at %s:%d, thread %s "
         "at the __syncthreads at %s:%d",
         bi.x, bi.y, bi.z, a, base_name(f1), l1, b, base_name(f2), l2);
}

// Parks thread `me` at a barrier (`state`, the call site), records it in
// the barrier's waiter slot and runs the next runnable thread.
void park(uint32_t me, uint8_t state, const char* file, int line, uint32_t& slot) {
    Thread& th = tls_sched->threads[me];
    th.state = state;
    th.file = file;
    th.line = line;
    slot = me;
    run_next(&th.fiber->ctx);
}

void warp_wait(uint32_t me, const char* file, int line) {
    Scheduler& S = *tls_sched;
    Warp& w = S.warps[me >> 5];
    if (w.waiting + 1 == w.alive) {
        release_warp(w);
        return;
    }
    park(me, kWaitWarp, file, line, w.waiters[w.waiting++]);
}

}  // namespace

const char* base_name(const char* path) {
    const char* slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

void fail(const char* fmt, ...) {
    Scheduler& S = *tls_sched;
    Runner& L = *tls_runner;
    int k = describe_kernel(*S.launch, L.msg, sizeof L.msg);
    if (S.current && k >= 0 && (size_t)k < sizeof L.msg) {
        char t[40];
        format_thread(t, sizeof t, S.current->thread);
        const uint3& b = tls_block_idx;
        k += snprintf(L.msg + k, sizeof L.msg - k, ", block (%u,%u,%u) thread %s", b.x, b.y, b.z, t);
    }
    if (k >= 0 && (size_t)k + 2 < sizeof L.msg) {
        k += snprintf(L.msg + k, sizeof L.msg - k, ": ");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(L.msg + k, sizeof L.msg - k, fmt, ap);
        va_end(ap);
    }
    siglongjmp(L.jmp, 1);
}

Scheduler* sched_create() { return new Scheduler(); }

void sched_bind(Scheduler* s, const Launch& L) {
    tls_sched = s;
    Scheduler& S = *s;
    S.launch = &L;
    S.n = L.threads;
    uint32_t t = 0;
    for (uint32_t z = 0; z < L.block.z; ++z)
        for (uint32_t y = 0; y < L.block.y; ++y)
            for (uint32_t x = 0; x < L.block.x; ++x) S.threads[t++].idx = {x, y, z};
    S.shuffled = true;
}

bool sched_run_block() {
    Scheduler& S = *tls_sched;
    for (uint32_t t = 0; t < S.n; ++t) {
        S.threads[t].state = kUnstarted;
        S.threads[t].shfl_seq = 0;
    }
    const uint32_t warps = (S.n + 31) / 32;
    for (uint32_t w = 0; w < warps; ++w) {
        Warp& wp = S.warps[w];
        wp.lanes = wp.alive = (w + 1) * 32 <= S.n ? 32 : S.n - w * 32;
        wp.waiting = 0;
        if (S.shuffled) memset(wp.tag, 0xff, sizeof wp.tag);
    }
    S.shuffled = false;
    S.next_unstarted = 0;
    S.alive = S.n;
    S.block_waiting = 0;
    S.ready_head = S.ready_count = 0;
    run_next(&S.main);
    if (S.alive == 0) return true;
    // Nothing can run, yet threads wait: at a __syncthreads some others
    // never reach, or at a warp barrier whose lanes wait elsewhere.
    uint32_t at_block = S.n, at_warp = S.n, n_block = 0, n_warp = 0;
    for (uint32_t t = 0; t < S.n; ++t) {
        if (S.threads[t].state == kWaitBlock) {
            if (!n_block++) at_block = t;
        } else if (S.threads[t].state == kWaitWarp) {
            if (!n_warp++) at_warp = t;
        }
    }
    Runner& L = *tls_runner;
    int k = describe_kernel(*S.launch, L.msg, sizeof L.msg);
    const uint3& b = tls_block_idx;
    if (k >= 0 && (size_t)k < sizeof L.msg)
        k += snprintf(L.msg + k, sizeof L.msg - k,
                      ": threads of block (%u,%u,%u) wait at different barriers, so none can go on (%u of %u threads "
                      "still running)",
                      b.x, b.y, b.z, S.alive, S.n);
    char t[40];
    if (n_block && k >= 0 && (size_t)k < sizeof L.msg) {
        format_thread(t, sizeof t, at_block);
        k += snprintf(L.msg + k, sizeof L.msg - k, ": %u at the __syncthreads at %s:%d (thread %s first)", n_block,
                      base_name(S.threads[at_block].file), S.threads[at_block].line, t);
    }
    if (n_warp && k >= 0 && (size_t)k < sizeof L.msg) {
        format_thread(t, sizeof t, at_warp);
        k += snprintf(L.msg + k, sizeof L.msg - k, "%s %u at a warp barrier (shuffle or __syncwarp) at %s:%d (thread %s first)",
                      n_block ? "," : ":", n_warp, base_name(S.threads[at_warp].file), S.threads[at_warp].line, t);
    }
    return false;
}

void sched_reset() {
    if (!tls_sched) return;
    Scheduler& S = *tls_sched;
    S.free_fibers.assign(S.fibers.begin(), S.fibers.end());
    S.current = nullptr;
    tls_thread_idx = nullptr;
}

uint32_t sched_current_thread() {
    const Scheduler* S = tls_sched;
    return S && S->current ? S->current->thread : 0;
}

bool sched_stack_guard(uintptr_t addr) {
    if (!tls_sched) return false;
    Scheduler& S = *tls_sched;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (const Fiber* f : S.fibers) {
        const uintptr_t g = reinterpret_cast<uintptr_t>(f->guard);
        if (addr >= g && addr < g + page) return true;
    }
    return false;
}

}  // namespace tessera_emu

using namespace tessera_emu;

extern "C" void tessera_emu_syncthreads(const char* file, int line) {
    Scheduler& S = *tls_sched;
    const uint32_t me = S.current->thread;
    if (S.block_waiting == 0) {
        S.block_file = file;
        S.block_line = line;
    } else if (!same_site(file, line, S.block_file, S.block_line)) {
        fail_sites(S.block_waiters[0], S.block_file, S.block_line, me, file, line);
    }
    if (S.block_waiting + 1 == S.alive) {
        release_block();
        return;
    }
    park(me, kWaitBlock, file, line, S.block_waiters[S.block_waiting++]);
}

extern "C" void tessera_emu_syncwarp(unsigned mask, const char* file, int line) {
    Scheduler& S = *tls_sched;
    if (mask != 0xffffffffu)
        fail("__syncwarp(0x%08x) at %s:%d: the emulator supports only the full mask 0xffffffff", mask,
             base_name(file), line);
    warp_wait(S.current->thread, file, line);
}

extern "C" unsigned long long tessera_emu_shuffle(unsigned mask, unsigned long long bits, int mode, int arg,
                                                  int width, const char* file, int line) {
    Scheduler& S = *tls_sched;
    static const char* const names[4] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
    const char* name = names[mode & 3];
    if (mask != 0xffffffffu)
        fail("%s(0x%08x, ...) at %s:%d: the emulator supports only the full mask 0xffffffff", name, mask,
             base_name(file), line);
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail("%s at %s:%d: width %d is not a power of two up to 32", name, base_name(file), line, width);
    const uint32_t me = S.current->thread, lane = me & 31, w = (uint32_t)width;
    Warp& wp = S.warps[me >> 5];
    Thread& th = S.threads[me];
    const uint32_t seq = th.shfl_seq++, parity = seq & 1;
    S.shuffled = true;
    wp.slot[parity][lane] = bits;
    wp.tag[parity][lane] = seq;
    // CUDA's source lane; out of the lane's segment of `width`, its own value.
    const uint32_t base = lane & ~(w - 1), pos = lane - base, a = (uint32_t)arg;
    uint32_t src = lane;
    switch (mode) {
        case 0: src = base + (a & (w - 1)); break;
        case 1: src = a <= pos ? lane - a : lane; break;
        case 2: src = (uint64_t)pos + a < w ? lane + a : lane; break;
        default: src = (lane ^ a) < base + w ? lane ^ a : lane; break;
    }
    if (src != lane && src >= wp.lanes)
        fail("%s at %s:%d reads lane %u, which does not exist: this warp has %u threads (blocks of %u)", name,
             base_name(file), line, src, wp.lanes, S.n);
    warp_wait(me, file, line);
    if (src != lane && wp.tag[parity][src] != seq) {
        char t[40];
        format_thread(t, sizeof t, (me & ~31u) + src);
        fail("%s at %s:%d reads lane %u (thread %s), which %s", name, base_name(file), line, src, t,
             S.threads[(me & ~31u) + src].state == kDone ? "has exited" : "is at a different shuffle");
    }
    return wp.slot[parity][src];
}

extern "C" void tessera_emu_trap(const char* file, int line) { fail("__trap() at %s:%d", base_name(file), line); }
