// tessera_emu_launch: finds the kernel, checks the arguments and dimensions
// as the driver would (and more: the parameter types), runs the grid's
// blocks (one after another, or on TESSERA_EMU_THREADS OS threads), and turns
// faults next to an allocation, traps and misuse inside the kernel into an
// error naming it.

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "internal.h"

namespace tessera_emu {

const char* const build_names[3] = {"f32", "bf16", "test"};

__thread Runner* volatile tls_runner;

int describe_kernel(const Launch& L, char* out, size_t len) {
    return snprintf(out, len, "kernel %s (%s build)", L.entry->name, build_names[L.build]);
}

namespace {

const std::vector<const KernelEntry*>& kernels(int build) {
    static const std::vector<const KernelEntry*>* all = [] {
        auto* v = new std::vector<const KernelEntry*>[3];
        for (int b = 0; b < 3; ++b)
            for (const KernelEntry* const* t = build_tables[b]; *t; ++t)
                for (const KernelEntry* e = *t; e->name; ++e) v[b].push_back(e);
        return v;
    }();
    return all[build];
}

const char* kind_name(char k) {
    switch (k) {
        case 'p': return "a pointer";
        case 'U': return "an unsigned long long";
        case 'i': return "an int";
        case 'f': return "a float";
        case 'd': return "a double";
        default: return nullptr;
    }
}

// The signal handler: installed once, lazily; a fault that is not the
// launch's own goes back to the handler it replaced (Rust's stack-overflow
// handler, or the default), and the next launch installs this one again.
std::atomic<bool> handler_installed{false};
std::mutex handler_mu;
struct sigaction previous_segv, previous_bus;

void restore_previous() {
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
    handler_installed.store(false);
}

int access_kind(void* ucv) {
#if defined(__x86_64__) && defined(REG_ERR)
    // Bit 1 of the page-fault error code: the access was a write.
    const ucontext_t* uc = static_cast<const ucontext_t*>(ucv);
    return (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 2 : 1;
#else
    (void)ucv;
    return 0;
#endif
}

void on_fault(int sig, siginfo_t* info, void* ucv) {
    Runner* L = tls_runner;
    if (L && L->running) {
        Fault f{};
        const uintptr_t addr = (uintptr_t)info->si_addr;
        bool ours = find_guard(addr, &f);
        if (!ours && sched_stack_guard(addr)) {
            f.what = Fault::StackOverflow;
            ours = true;
        }
        if (ours) {
            f.addr = addr;
            f.access = sig == SIGSEGV ? access_kind(ucv) : 0;
            f.thread = sched_current_thread();
            L->fault = f;
            L->faulted = true;
            // The jump target saved no signal mask (a system call per launch
            // otherwise): unblock the signal this handler runs with.
            sigset_t set;
            sigemptyset(&set);
            sigaddset(&set, sig);
            pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
            siglongjmp(L->jmp, 2);
        }
    }
    restore_previous();  // returning re-raises the fault through it
}

void install_handler() {
    if (handler_installed.load()) return;
    std::lock_guard<std::mutex> g(handler_mu);
    if (handler_installed.load()) return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
    sigaction(SIGBUS, &sa, &previous_bus);
    handler_installed.store(true);
}

// A fault on a fiber's stack guard (stack overflow) leaves no stack to run
// the handler on: the launching thread needs an alternate signal stack.
// Rust's threads have one; for others this makes one, freed at thread exit.
struct AltStack {
    void* mem = nullptr;
    size_t len = 0;
    ~AltStack() {
        if (!mem) return;
        stack_t off;
        memset(&off, 0, sizeof off);
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
        munmap(mem, len);
    }
};

void ensure_altstack() {
    static thread_local bool checked = false;
    static thread_local AltStack own;
    if (checked) return;
    checked = true;
    stack_t cur;
    if (sigaltstack(nullptr, &cur) != 0 || !(cur.ss_flags & SS_DISABLE)) return;
    const size_t len = 64 * 1024;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = m;
    ss.ss_size = len;
    if (sigaltstack(&ss, nullptr) != 0) {
        munmap(m, len);
        return;
    }
    own.mem = m;
    own.len = len;
}

void format_fault(Runner& L) {
    const Fault& f = L.fault;
    int k = describe_kernel(*L.launch, L.msg, sizeof L.msg);
    if (k < 0 || (size_t)k >= sizeof L.msg) return;
    const uint3& b = tls_block_idx;
    // The thread's index from its linear one (the fibers' state is gone).
    const uint32_t bx = L.launch->block.x, by = L.launch->block.y;
    const uint32_t tx = f.thread % bx, ty = (f.thread / bx) % by, tz = f.thread / (bx * by);
    k += snprintf(L.msg + k, sizeof L.msg - k, ", block (%u,%u,%u) thread (%u,%u,%u): ", b.x, b.y, b.z, tx, ty, tz);
    if (k < 0 || (size_t)k >= sizeof L.msg) return;
    if (f.what == Fault::StackOverflow) {
        snprintf(L.msg + k, sizeof L.msg - k, "stack overflow (each emulated thread has a 64 KiB stack) at %p",
                 (void*)f.addr);
        return;
    }
    const char* access = f.access == 2 ? "write" : f.access == 1 ? "read" : "access";
    if (f.what == Fault::PastEnd)
        snprintf(L.msg + k, sizeof L.msg - k,
                 "invalid %s at %p, past the end of an allocation of %zu bytes (at byte offset %lld)", access,
                 (void*)f.addr, f.alloc_bytes, f.offset);
    else
        snprintf(L.msg + k, sizeof L.msg - k,
                 "invalid %s at %p, before the start of an allocation of %zu bytes (at byte offset %lld)", access,
                 (void*)f.addr, f.alloc_bytes, f.offset);
}

// A launch's blocks, handed out in order (x fastest) to the OS threads
// that run them. A thread that fails stops the others from taking later
// blocks; the error reported is the earliest block's, as when one thread
// runs them all.
struct Job {
    const Launch* launch;
    unsigned long long total;
    std::atomic<unsigned long long> next{0};
    std::atomic<unsigned long long> fail_at{~0ull};
};

void run_blocks(Job& job, Runner& r, Scheduler* sched) {
    const Launch& L = *job.launch;
    tls_block_dim = L.block;
    tls_grid_dim = {L.grid.x, L.grid.y, L.grid.z};
    sched_bind(sched, L);
    r.launch = &L;
    r.failed = ~0ull;
    r.faulted = false;
    r.msg[0] = 0;
    tls_runner = &r;
    // What lives across the jump is in r (memory), not in locals.
    if (sigsetjmp(r.jmp, 0) == 0) {
        r.running = 1;
        for (;;) {
            r.block = job.next.fetch_add(1);
            if (r.block >= job.total || r.block >= job.fail_at.load()) break;
            const unsigned long long b = r.block;
            tls_block_idx = {(unsigned)(b % L.grid.x), (unsigned)(b / L.grid.x % L.grid.y),
                             (unsigned)(b / ((unsigned long long)L.grid.x * L.grid.y))};
            if (!sched_run_block()) {
                r.failed = b;
                break;
            }
        }
        r.running = 0;
    } else {
        r.running = 0;
        r.failed = r.block;
        if (r.faulted) format_fault(r);
    }
    tls_runner = nullptr;
    sched_reset();
    if (r.failed != ~0ull) {
        unsigned long long cur = job.fail_at.load();
        while (r.failed < cur && !job.fail_at.compare_exchange_weak(cur, r.failed)) {
        }
    }
}

// TESSERA_EMU_THREADS (default 1): the OS threads that run a launch's
// blocks, the launching one included.
std::atomic<int> thread_count{0};

int threads_wanted() {
    int n = thread_count.load();
    if (n == 0) {
        const char* env = getenv("TESSERA_EMU_THREADS");
        n = env ? atoi(env) : 1;
        n = n < 1 ? 1 : n > 64 ? 64 : n;
        int unset = 0;
        thread_count.compare_exchange_strong(unset, n);
        n = thread_count.load();
    }
    return n;
}

// Helper threads, started when first wanted and kept; never destroyed (at
// exit they may still wait on the condition variable).
struct Helper {
    Runner runner;
    Scheduler* sched;
};

struct Pool {
    std::mutex mu;
    std::condition_variable go, done;
    unsigned long long generation = 0;
    int active = 0;   // helpers taking part in this launch
    int running = 0;  // of those, not done yet
    Job* job = nullptr;
    std::vector<Helper*> helpers;
};

Pool& pool() {
    static Pool* p = new Pool();
    return *p;
}

void helper_main(Pool* p, Helper* h, int index) {
    ensure_altstack();
    unsigned long long seen = 0;
    for (;;) {
        Job* job;
        {
            std::unique_lock<std::mutex> g(p->mu);
            p->go.wait(g, [&] { return p->generation != seen && index < p->active; });
            seen = p->generation;
            job = p->job;
        }
        run_blocks(*job, h->runner, h->sched);
        std::lock_guard<std::mutex> g(p->mu);
        if (--p->running == 0) p->done.notify_all();
    }
}

std::mutex launch_mu;
Launch the_launch;
Runner caller_runner;

}  // namespace
}  // namespace tessera_emu

using namespace tessera_emu;

// For tests: overrides TESSERA_EMU_THREADS for the launches that follow.
extern "C" void tessera_emu_set_threads(int n) { thread_count.store(n < 1 ? 1 : n > 64 ? 64 : n); }

extern "C" size_t tessera_emu_kernel_count(int storage) {
    return storage >= 0 && storage < 3 ? kernels(storage).size() : 0;
}

extern "C" const char* tessera_emu_kernel_name(int storage, size_t i) {
    if (storage < 0 || storage >= 3 || i >= kernels(storage).size()) return nullptr;
    return kernels(storage)[i]->name;
}

extern "C" int tessera_emu_launch(int storage, const char* kernel, const unsigned grid[3], const unsigned block[3],
                                  unsigned dynamic_shared_bytes, void** args, const char* kinds, size_t nargs,
                                  char* err, size_t err_len) {
    if (storage < 0 || storage >= 3)
        return say(err, err_len, "emulated launch of %s: no build %d (0 = f32, 1 = bf16, 2 = test)",
                      kernel ? kernel : "(null)", storage);
    const char* bn = build_names[storage];
    const KernelEntry* entry = nullptr;
    if (kernel)
        for (const KernelEntry* e : kernels(storage))
            if (!strcmp(e->name, kernel)) entry = e;
    if (!entry)
        return say(err, err_len, "emulated launch: no kernel named \"%s\" in the %s build (%zu kernels)",
                      kernel ? kernel : "(null)", bn, kernels(storage).size());
    const size_t arity = strlen(entry->kinds);
    if (nargs != arity)
        return say(err, err_len, "kernel %s (%s build) takes %zu parameters, the launch passed %zu", kernel, bn,
                      arity, nargs);
    if (nargs && (!args || !kinds))
        return say(err, err_len, "kernel %s (%s build): the launch passed no argument array", kernel, bn);
    for (size_t i = 0; i < nargs; ++i) {
        const char* passed = kind_name(kinds[i]);
        if (!passed)
            return say(err, err_len, "kernel %s (%s build): argument %zu has the unknown kind '%c'", kernel, bn,
                          i + 1, kinds[i]);
        if (kinds[i] != entry->kinds[i])
            return say(err, err_len, "parameter %zu of %s (%s build) is %s, the launch passed %s", i + 1, kernel,
                          bn, kind_name(entry->kinds[i]), passed);
        if (!args[i])
            return say(err, err_len, "kernel %s (%s build): argument %zu is a null pointer", kernel, bn, i + 1);
    }
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64)
        return say(err, err_len,
                      "kernel %s (%s build): a block of %ux%ux%u = %llu threads; CUDA allows 1 to 1024 (x, y up to "
                      "1024, z up to 64)",
                      kernel, bn, block[0], block[1], block[2], threads);
    if (grid[0] == 0 || grid[0] >= (1u << 31) || grid[1] == 0 || grid[1] > 65535 || grid[2] == 0 || grid[2] > 65535)
        return say(err, err_len,
                      "kernel %s (%s build): a grid of %ux%ux%u blocks; CUDA allows x from 1 to 2^31 - 1, y and z "
                      "from 1 to 65535",
                      kernel, bn, grid[0], grid[1], grid[2]);
    if (dynamic_shared_bytes)
        return say(err, err_len,
                      "kernel %s (%s build): %u bytes of dynamic shared memory; the emulated device has none (only "
                      "static __shared__ arrays)",
                      kernel, bn, dynamic_shared_bytes);

    install_handler();
    ensure_altstack();
    std::lock_guard<std::mutex> g(launch_mu);
    Launch& L = the_launch;
    L.entry = entry;
    L.build = storage;
    L.args = args;
    L.grid = {grid[0], grid[1], grid[2]};
    L.block = {block[0], block[1], block[2]};
    L.threads = (uint32_t)threads;
    Job job;
    job.launch = &L;
    job.total = (unsigned long long)grid[0] * grid[1] * grid[2];
    // Helpers only where there is enough work to pay for waking them.
    unsigned long long helpers = (unsigned long long)threads_wanted() - 1;
    if (job.total * threads < 4096) helpers = 0;
    if (helpers > job.total - 1) helpers = job.total - 1;
    Pool& p = pool();
    if (helpers > 0) {
        std::lock_guard<std::mutex> pg(p.mu);
        while (p.helpers.size() < helpers) {
            Helper* h = new Helper();
            h->sched = sched_create();
            p.helpers.push_back(h);
            std::thread(helper_main, &p, h, (int)p.helpers.size() - 1).detach();
        }
        p.job = &job;
        p.active = p.running = (int)helpers;
        ++p.generation;
        p.go.notify_all();
    }
    static Scheduler* const caller_sched = sched_create();
    run_blocks(job, caller_runner, caller_sched);
    if (helpers > 0) {
        std::unique_lock<std::mutex> pg(p.mu);
        p.done.wait(pg, [&] { return p.running == 0; });
        p.active = 0;
    }
    const Runner* failed = caller_runner.failed != ~0ull ? &caller_runner : nullptr;
    for (unsigned long long i = 0; i < helpers; ++i) {
        const Runner& r = p.helpers[i]->runner;
        if (r.failed != ~0ull && (!failed || r.failed < failed->failed)) failed = &r;
    }
    bool ok = !failed;
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", failed ? failed->msg : "");
    // Writes below a buffer's start land in its first page's slack, which
    // does not fault: the canaries catch them.
    char prefix[256];
    describe_kernel(L, prefix, sizeof prefix);
    strncat(prefix, " ", sizeof prefix - strlen(prefix) - 1);
    char damage[512];
    if (check_canaries(prefix, damage, sizeof damage)) {
        if (ok) snprintf(msg, sizeof msg, "%s", damage);
        ok = false;
    }
    if (ok) return 0;
    if (err_len) snprintf(err, err_len, "%s", msg);
    return 1;
}
