// The emulated device's kernel tables: build.rs generates one table per
// kernel source and build, whose entries call the kernel's C++ function with
// cuLaunchKernel-style arguments (args[i] points to the i-th value).
#pragma once

#include <stddef.h>
#include <string.h>

#include <type_traits>
#include <utility>

namespace tessera_emu {

using Invoker = void (*)(void* const* args);

struct KernelEntry {
    const char* name;  // nullptr ends a table
    Invoker invoke;
    const char* kinds;  // one char per parameter, as tessera_emu_launch's kinds
};

// One table per kernel source, nullptr-terminated, per build (f32, bf16, test).
extern const KernelEntry* const* const build_tables[3];

template <typename T>
struct dependent_false : std::false_type {};

// The launch ABI's kind of a parameter type: any pointer is an address.
template <typename T>
constexpr char kind_of() {
    if constexpr (std::is_pointer<T>::value) return 'p';
    else if constexpr (std::is_same<T, unsigned long long>::value) return 'U';
    else if constexpr (std::is_same<T, int>::value) return 'i';
    else if constexpr (std::is_same<T, float>::value) return 'f';
    else if constexpr (std::is_same<T, double>::value) return 'd';
    else static_assert(dependent_false<T>::value, "a kernel parameter type the launch ABI cannot pass");
}

template <typename T>
inline T load_arg(const void* p) {
    T v;
    memcpy(&v, p, sizeof v);
    return v;
}

template <typename F>
struct Signature;

template <typename... P>
struct Signature<void (*)(P...)> {
    static constexpr char kinds[] = {kind_of<std::remove_cv_t<P>>()..., '\0'};

    template <void (*F)(P...), size_t... I>
    static void call(void* const* args, std::index_sequence<I...>) {
        (void)args;
        F(load_arg<std::remove_cv_t<P>>(args[I])...);
    }
};

template <auto F>
void invoke(void* const* args) {
    using S = Signature<decltype(F)>;
    S::template call<F>(args, std::make_index_sequence<sizeof(S::kinds) - 1>{});
}

}  // namespace tessera_emu
