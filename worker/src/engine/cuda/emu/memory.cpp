// The emulated device's memory: each allocation is its own mapping, a
// PROT_NONE guard page, the data pages, a PROT_NONE guard page. The buffer
// ends on the last byte before the upper guard, so any access past the end
// faults at once; the slack below the buffer's start holds a canary checked
// after every launch (writes there do not fault).

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <vector>

#include "internal.h"

namespace tessera_emu {
namespace {

struct Alloc {
    char* base;  // the mapping, lower guard page included
    size_t map_len;
    char* data;  // the buffer handed out
    size_t bytes;
};

struct Memory {
    std::mutex mu;
    std::map<uintptr_t, Alloc> allocs;  // by base
    unsigned long long in_use = 0, peak = 0;
    size_t page = 0;
    std::vector<unsigned char> canary;  // one page of the pattern
};

Memory& mem() {
    static Memory* m = [] {
        Memory* m = new Memory();  // never destroyed: threads may free at exit
        m->page = (size_t)sysconf(_SC_PAGESIZE);
        m->canary.resize(m->page);
        for (size_t i = 0; i < m->page; ++i) m->canary[i] = (unsigned char)(0xa5 ^ (i * 29));
        return m;
    }();
    return *m;
}

// The allocation whose mapping holds addr. Caller holds mu.
const Alloc* containing(Memory& m, uintptr_t addr) {
    auto it = m.allocs.upper_bound(addr);
    if (it == m.allocs.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    return addr < (uintptr_t)a.base + a.map_len ? &a : nullptr;
}

char* slack_start(const Alloc& a, size_t page) { return a.base + page; }

}  // namespace

int say(char* err, size_t len, const char* fmt, ...) {
    if (len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return 1;
}

bool find_guard(uintptr_t addr, Fault* out) {
    Memory& m = mem();
    std::lock_guard<std::mutex> g(m.mu);
    const Alloc* a = containing(m, addr);
    if (!a) return false;
    const uintptr_t base = (uintptr_t)a->base, end = base + a->map_len;
    if (addr >= base + m.page && addr < end - m.page) return false;  // data pages: not a guard fault
    out->what = addr < base + m.page ? Fault::BeforeStart : Fault::PastEnd;
    out->alloc_bytes = a->bytes;
    out->offset = (long long)(addr - (uintptr_t)a->data);
    return true;
}

bool check_canaries(const char* prefix, char* msg, size_t len) {
    Memory& m = mem();
    std::lock_guard<std::mutex> g(m.mu);
    size_t damaged = 0;
    for (auto& [base, a] : m.allocs) {
        (void)base;
        char* s = slack_start(a, m.page);
        const size_t slack = (size_t)(a.data - s);
        if (!slack || !memcmp(s, m.canary.data(), slack)) continue;
        size_t lo = 0, hi = slack;
        while (s[lo] == (char)m.canary[lo]) ++lo;
        while (s[hi - 1] == (char)m.canary[hi - 1]) --hi;
        if (!damaged++ && len)
            snprintf(msg, len, "%swrote before the start of an allocation of %zu bytes (byte offsets %lld to %lld)",
                     prefix, a.bytes, (long long)lo - (long long)slack, (long long)hi - 1 - (long long)slack);
        memcpy(s, m.canary.data(), slack);
    }
    if (damaged > 1 && len) {
        const size_t k = strlen(msg);
        if (k < len) snprintf(msg + k, len - k, ", and before %zu more", damaged - 1);
    }
    return damaged != 0;
}

}  // namespace tessera_emu

using namespace tessera_emu;

extern "C" void* tessera_emu_alloc(size_t bytes) {
    Memory& m = mem();
    const size_t page = m.page;
    if (bytes > ((size_t)1 << 46)) return nullptr;
    // At least one data page, so that even an empty buffer has a start.
    const size_t data_pages = bytes ? (bytes + page - 1) / page : 1;
    const size_t map_len = (data_pages + 2) * page;
    void* p = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    char* base = static_cast<char*>(p);
    if (mprotect(base + page, data_pages * page, PROT_READ | PROT_WRITE) != 0) {
        munmap(p, map_len);
        return nullptr;
    }
    Alloc a{base, map_len, base + page + data_pages * page - bytes, bytes};
    memcpy(slack_start(a, page), m.canary.data(), (size_t)(a.data - slack_start(a, page)));
    std::lock_guard<std::mutex> g(m.mu);
    m.allocs.emplace((uintptr_t)base, a);
    m.in_use += bytes;
    if (m.in_use > m.peak) m.peak = m.in_use;
    return a.data;
}

extern "C" void tessera_emu_free(void* p) {
    Memory& m = mem();
    Alloc a;
    {
        std::lock_guard<std::mutex> g(m.mu);
        const Alloc* found = containing(m, (uintptr_t)p);
        if (!found || found->data != p) {
            fprintf(stderr, "tessera emulated device: free of %p, which is not the start of a live allocation%s\n", p,
                    found ? " (it lies inside one)" : "");
            abort();
        }
        a = *found;
        m.in_use -= a.bytes;
        m.allocs.erase((uintptr_t)a.base);
    }
    munmap(a.base, a.map_len);
}

extern "C" int tessera_emu_check_range(const void* p, size_t bytes, char* err, size_t err_len) {
    Memory& m = mem();
    std::lock_guard<std::mutex> g(m.mu);
    const uintptr_t addr = (uintptr_t)p;
    const Alloc* a = containing(m, addr);
    if (!a)
        return say(err, err_len, "%zu bytes at %p: not in any live allocation of the emulated device", bytes, p);
    const uintptr_t start = (uintptr_t)a->data, end = start + a->bytes;
    if (addr < start)
        return say(err, err_len, "%zu bytes at %p: %zu bytes before the start of an allocation of %zu bytes", bytes, p,
                   (size_t)(start - addr), a->bytes);
    if (addr > end || bytes > end - addr)
        return say(err, err_len, "%zu bytes at byte offset %zu of an allocation of %zu bytes: %zu bytes past the end",
                   bytes, (size_t)(addr - start), a->bytes, (size_t)(addr - end + bytes));
    return 0;
}

extern "C" void tessera_emu_memory(unsigned long long* in_use, unsigned long long* peak) {
    Memory& m = mem();
    std::lock_guard<std::mutex> g(m.mu);
    if (in_use) *in_use = m.in_use;
    if (peak) *peak = m.peak;
}

extern "C" void tessera_emu_reset_peak(void) {
    Memory& m = mem();
    std::lock_guard<std::mutex> g(m.mu);
    m.peak = m.in_use;
}
