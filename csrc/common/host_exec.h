// Host execution of CUDA kernels: the CPU side of tfk_cuda.h (host mode).
//
// The same .cu source that nvcc compiles is compiled here as plain C++ and run
// on the CPU, for tests on machines without a GPU. Include tfk_cuda.h, never
// this file directly.
//
// Model
//   * Blocks of a grid run one after another on the calling OS thread (or
//     spread over a few worker threads, see set_workers(); each worker has its
//     own fibers and shared memory). Default: one thread, deterministic.
//   * The threads of a block are cooperative fibers, one stack each, resumed
//     round-robin in linear thread order (x fastest). A fiber runs until it
//     blocks: at __syncthreads(), in a warp collective whose other lanes have
//     not arrived yet, or at its end. Nothing preempts a fiber, so results are
//     deterministic and plain (non-atomic) read-modify-writes cannot tear.
//   * Warp collectives (shuffles, votes, __syncwarp, mma.sync, ldmatrix): each
//     lane deposits a pointer to its operands (on its own fiber stack) in a
//     per-warp exchange area and waits; the last lane named in the mask to
//     arrive computes every lane's result once, writes it through the
//     pointers, and releases the others. Collectives with different, disjoint
//     masks may be pending in one warp at the same time (divergent halves). A
//     shuffle from a lane outside the mask (undefined in PTX) yields all-ones
//     bits (NaN as a float).
//   * Refused with an error naming block, thread and operation, rather than
//     computed: a mask naming a lane that does not exist (partial last warp)
//     or has exited, lanes of one mask in different collectives, mma/ldmatrix
//     in a partial warp, __syncthreads after a thread of the block exited or
//     mixed with __syncthreads_count/and/or, and any deadlock (the scheduler
//     finds no runnable fiber; the message says who waits for whom).
//   * Shared memory: `__shared__` is `static thread_local` (one copy per OS
//     thread, reused by consecutive blocks: NOT reset between blocks). Dynamic
//     shared memory (tfk::dynamic_smem<T>(), the launch's smem bytes) is a
//     per-thread buffer poisoned with 0xFF bytes (NaN in fp32/fp16/bf16, -1 in
//     integers) before every block.
//   * cp.async is deferred, as on the GPU: a copy lands in shared memory only
//     when the issuing thread's cp_async_wait<N>() retires its group (or when
//     the thread ends), so a kernel that reads before waiting reads stale data.
//   * Race check (TFK_HOST_RACECHECK=1, compiled with -fsanitize=thread and
//     linked WITHOUT libtsan; add -fno-gnu-unique, see below): the compiler
//     instruments every load and store, and this file supplies the __tsan_*
//     entry points. Per shared-memory byte it records the last writer and
//     readers since the last barrier, and reports at the end of the launch
//     (as an exception): RAW (a read of a byte another thread wrote since the
//     last __syncthreads, without a __syncwarp between lanes of one warp), WAR,
//     WAW, UNINIT (a read of a byte not written in this block) and ASYNC (an
//     access to a byte a cp.async has not yet delivered). ldmatrix reads and
//     cp.async writes are recorded by the layer itself.
//     -fno-gnu-unique: a template kernel's `static thread_local` arrays are
//     STB_GNU_UNIQUE symbols, which the dynamic linker binds to the first
//     module that defines them; in a second module (a race-check library next
//     to tfk_host) they would live outside the module's TLS and go unchecked.
//     TFK_HOST_RACECHECK=warn in the environment prints the report instead.
//
// Stacks: TFK_HOST_STACK_KB (default 256) KiB per fiber, mmap'ed with
// MAP_NORESERVE (only touched pages cost memory) and a guard page below each,
// so an overflow faults instead of corrupting a neighbour (the test GEMM's
// fibers use about 4-5 KiB, at -O0 and in race-check builds too). Worker
// threads: TFK_HOST_THREADS (default 1) or tfk::host::set_workers().
// Fiber switch: a hand-written x86-64 context switch (callee-saved registers,
// MXCSR and x87 control word), about 40 ns per fiber resume including the
// scheduler; elsewhere, or with -DTFK_HOST_UCONTEXT=1, glibc's swapcontext
// (about 600 ns: it makes a sigprocmask system call per switch).
#pragma once

#if defined(__CUDACC__)
#error "common/host_exec.h is the host-mode half of common/tfk_cuda.h; nvcc builds use CUDA itself"
#endif

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(TFK_HOST_UCONTEXT)
#if defined(__x86_64__)
#define TFK_HOST_UCONTEXT 0
#else
#define TFK_HOST_UCONTEXT 1
#endif
#endif
#if TFK_HOST_UCONTEXT
#include <ucontext.h>
#endif

#if !defined(TFK_HOST_RACECHECK)
#if defined(__SANITIZE_THREAD__)
#error "tfk host mode under -fsanitize=thread: define TFK_HOST_RACECHECK=1 (tfk's own shared-memory race check; libtsan does not know fibers and must not be linked)"
#endif
#define TFK_HOST_RACECHECK 0
#endif
#if TFK_HOST_RACECHECK && !defined(__SANITIZE_THREAD__)
#error "TFK_HOST_RACECHECK=1 needs -fsanitize=thread at compile time (not at link time: tfk supplies the __tsan_* hooks)"
#endif

#if TFK_HOST_RACECHECK
#define TFK_HOST_NOSAN __attribute__((no_sanitize_thread))
#else
#define TFK_HOST_NOSAN
#endif
// Every function of the layer: inline (header-only), never instrumented.
#define TFK_HOST_FN inline TFK_HOST_NOSAN

// Everything below is private to the module (shared library) that includes it:
// two libraries in one process (tfk_host and a race-check build) must not
// bind to each other's runtime state.
#pragma GCC visibility push(hidden)

// ============================================================================
// CUDA built-in types and variables
// ============================================================================

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as in CUDA
};

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

// Per OS thread: the scheduler sets threadIdx before resuming each fiber.
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ============================================================================
// Half precision and bfloat16 (no implicit conversions and no arithmetic
// operators: the torch extension build compiles with __CUDA_NO_HALF_OPERATORS__,
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__, so kernels
// convert explicitly, and so must host-mode code).
// ============================================================================

struct __half_raw { unsigned short x; };
struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}  // NOLINT
  constexpr operator __half_raw() const { return __half_raw{__x}; }
};
struct alignas(4) __half2 { __half x, y; };
typedef __half half;
typedef __half2 half2;

struct __nv_bfloat16_raw { unsigned short x; };
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}  // NOLINT
  constexpr operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

namespace tfk {
namespace host {

TFK_HOST_FN uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
TFK_HOST_FN float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// float -> binary16, round to nearest even; NaN -> 0x7fff (CUDA's canonical NaN).
TFK_HOST_FN uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fff;                          // NaN
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (x < 0x38800000u) {  // below 2^-14: subnormal or zero, in units of 2^-24
    const float scaled = bits_f32(x) * 16777216.0f;             // exact
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)));
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // rebias exponent (127 -> 15) and round half to even
  return static_cast<uint16_t>(sign | (x >> 13));
}

TFK_HOST_FN float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> bfloat16, round to nearest even; NaN -> 0x7fff (as CUDA).
TFK_HOST_FN uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

TFK_HOST_FN float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace host
}  // namespace tfk

inline __half __float2half_rn(float f) { return __half_raw{tfk::host::f32_to_f16(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return tfk::host::f16_to_f32(h.__x); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float2half2_rn(float f) { return {__float2half_rn(f), __float2half_rn(f)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half2 __halves2half2(__half lo, __half hi) { return {lo, hi}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16_raw{tfk::host::f32_to_bf16(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return tfk::host::bf16_to_f32(b.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return {__float2bfloat16_rn(f), __float2bfloat16_rn(f)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return {lo, hi}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline float __low2float(__nv_bfloat162 b) { return __bfloat162float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return __bfloat162float(b.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }

// ============================================================================
// Scalar intrinsics with CUDA's names
// ============================================================================

using std::isfinite;  // CUDA has these unqualified in device code
using std::isinf;
using std::isnan;

inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { return tfk::host::f32_bits(f); }
inline float __uint_as_float(unsigned u) { return tfk::host::bits_f32(u); }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(std::max(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
// CUDA's min/max overloads: mixed arithmetic types meet in their common type.
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<T>::value) return std::fmin(T(a), T(b));
  else return T(a) < T(b) ? T(a) : T(b);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<T>::value) return std::fmax(T(a), T(b));
  else return T(a) < T(b) ? T(b) : T(a);
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ============================================================================
// The runtime
// ============================================================================

namespace tfk {
namespace host {

// Context switch. Defined once per shared object (a COMDAT group), hidden.
extern "C" void tfk_host_fiber_switch(void** save_sp, void* load_sp);
extern "C" void tfk_host_fiber_start();

enum : uint8_t { kReady = 0, kAtBarrier = 1, kInWarpOp = 2, kDone = 3 };

struct Exec;
struct Warp;

// A warp-collective operation: identity (by address), name for messages, and
// the function the last arriving lane runs for every lane in the mask.
struct Collective {
  const char* name;
  bool whole_warp;  // .sync.aligned instructions: every lane of a full warp
  void (*complete)(Exec&, Warp&, uint32_t mask);
};

struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  uint32_t size, src_bytes;
};

struct Fiber {
  void* sp = nullptr;
#if TFK_HOST_UCONTEXT
  ucontext_t uc;
#endif
  uint32_t tid = 0;  // linear thread index in the block
  uint3 idx{0, 0, 0};
  uint8_t state = kReady;
  const Collective* op = nullptr;  // while kInWarpOp
  uint32_t mask = 0;
  // cp.async: copies in issue order; group_end[g] = copies issued before commit g.
  std::vector<AsyncCopy> copies;
  size_t landed = 0;
  std::vector<size_t> group_end;
  size_t groups_done = 0;
};

struct WarpGroup {
  uint32_t mask, arrived;
  const Collective* op;
};

struct Warp {
  uint32_t base = 0;    // tid of lane 0
  uint32_t exist = 0;   // lanes that exist (a partial last warp has fewer)
  uint32_t exited = 0;  // lanes whose thread has returned
  uint32_t sync_gen = 0;
  int ngroups = 0;
  WarpGroup groups[32];
  void* slot[32];
};

struct Stats {
  uint64_t blocks = 0, resumes = 0, barriers = 0, collectives = 0;
};

#if TFK_HOST_RACECHECK
enum : uint8_t { kShMulti = 1, kShPending = 2, kShIgnore = 4 };
struct Shadow {
  uint32_t w_epoch, r_epoch, w_sync, r_sync;
  uint16_t writer, reader, reader_warp;
  uint8_t flags, pad;
};
enum RaceKind : int { kRaw = 0, kWar, kWaw, kUninit, kAsync };
struct RaceReport {
  int kind;
  uint32_t tid, other;
  uint3 block;
  bool dynamic;
  size_t offset;
  const void* pc;
};
struct RaceState {
  bool active = false;
  bool in_hook = false;
  uint32_t epoch = 1, block_start = 1;
  std::vector<Shadow> dyn, tls;
  std::vector<RaceReport> reports;
  uint64_t total = 0;
};
#endif

struct Exec {
  // the launch
  const void* kernel = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  dim3 grid, block;
  size_t smem = 0;
  uint32_t nthreads = 0;
  uint3 bidx{0, 0, 0};
  // fibers of the running block
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Fiber* cur = nullptr;  // the running fiber; null in the scheduler
  void* sched_sp = nullptr;
#if TFK_HOST_UCONTEXT
  ucontext_t sched_uc;
#endif
  unsigned char* stacks = nullptr;
  size_t stacks_len = 0, stack_stride = 0, stack_count = 0;
  uint32_t done = 0;
  // __syncthreads
  uint32_t bar_arrived = 0, bar_true = 0;
  int bar_kind = 0, bar_result = 0;
  // failure of the running block
  bool failed = false;
  std::string error;
  // shared memory
  unsigned char* dyn = nullptr;
  size_t dyn_len = 0;  // mapped bytes
  uintptr_t tls_lo = 0, tls_hi = 0;  // this module's TLS block (static __shared__)
  std::vector<std::pair<uintptr_t, uintptr_t>> other_tls;  // other modules' TLS blocks
  Stats stats;
#if TFK_HOST_RACECHECK
  RaceState race;
#endif
  Exec() = default;
  Exec(const Exec&) = delete;
  Exec& operator=(const Exec&) = delete;
  TFK_HOST_NOSAN ~Exec() {
    if (stacks) munmap(stacks, stacks_len);
    if (dyn) munmap(dyn, dyn_len);
  }
};

inline thread_local Exec* tls_exec = nullptr;
inline thread_local std::unique_ptr<Exec> tls_exec_owner;

TFK_HOST_FN Exec& exec_for_this_thread() {
  if (!tls_exec) {
    tls_exec_owner.reset(new Exec);
    tls_exec = tls_exec_owner.get();
  }
  return *tls_exec;
}

// ---------------------------------------------------------------- settings

inline std::atomic<int> g_workers{0};  // 0: not set, read TFK_HOST_THREADS

// Worker OS threads for the blocks of a grid (1: the calling thread only).
// Results stay deterministic when blocks do not interact (no floating-point
// atomics on shared outputs); the default is 1.
TFK_HOST_FN void set_workers(int n) { g_workers.store(n < 1 ? 1 : n); }
TFK_HOST_FN int workers() {
  int n = g_workers.load();
  if (n > 0) return n;
  const char* env = std::getenv("TFK_HOST_THREADS");
  n = env ? std::atoi(env) : 1;
  return n < 1 ? 1 : n;
}

TFK_HOST_FN size_t stack_bytes() {
  const char* env = std::getenv("TFK_HOST_STACK_KB");
  long kb = env ? std::atol(env) : 256;
  if (kb < 16) kb = 16;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t bytes = static_cast<size_t>(kb) * 1024;
  return (bytes + page - 1) / page * page;
}

// Counters of the last launch on this thread (for performance reports).
TFK_HOST_FN Stats last_stats() { return tls_exec ? tls_exec->stats : Stats{}; }

// ---------------------------------------------------------------- errors

[[noreturn]] TFK_HOST_FN void fail(const std::string& what) { throw std::runtime_error(what); }

TFK_HOST_FN std::string fmt_idx(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
TFK_HOST_FN std::string fmt_hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}
TFK_HOST_FN std::string fmt_lanes(uint32_t bits) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!(bits >> i & 1u)) { ++i; continue; }
    int j = i;
    while (j + 1 < 32 && (bits >> (j + 1) & 1u)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(i);
    if (j > i) s += "-" + std::to_string(j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}
TFK_HOST_FN std::string symbol_name(const void* p) {
  Dl_info info;
  if (p && dladdr(p, &info) && info.dli_sname && info.dli_saddr) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = d ? d : info.dli_sname;
    std::free(d);
    const uintptr_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(info.dli_saddr);
    if (off) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "+0x%zx", static_cast<size_t>(off));
      s += buf;
    }
    return s;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}
TFK_HOST_FN std::string kernel_name(const Exec& ex) {
  std::string s = symbol_name(ex.kernel);
  const size_t paren = s.find('(');
  return paren == std::string::npos ? s : s.substr(0, paren);
}

// Inside a kernel: the executor of this thread, with a running fiber.
TFK_HOST_FN Exec& in_kernel(const char* what) {
  Exec* ex = tls_exec;
  if (!ex || !ex->cur) {
    throw std::logic_error(std::string("tfk host: ") + what + " called outside a kernel launch");
  }
  return *ex;
}

TFK_HOST_FN uint3 thread_idx_of(const Exec& ex, uint32_t tid) {
  return uint3{tid % ex.block.x, (tid / ex.block.x) % ex.block.y, tid / (ex.block.x * ex.block.y)};
}

// ---------------------------------------------------------------- shared memory ranges

struct TlsQuery {
  uintptr_t fn, lo, hi;
  std::vector<std::pair<uintptr_t, uintptr_t>>* all;
};

TFK_HOST_FN int tls_phdr_cb(struct dl_phdr_info* info, size_t size, void* data) {
  auto* q = static_cast<TlsQuery*>(data);
  if (size < offsetof(struct dl_phdr_info, dlpi_tls_data) + sizeof(info->dlpi_tls_data)) return 0;
  bool mine = false;
  const ElfW(Phdr)* tls = nullptr;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && q->fn >= lo && q->fn < lo + ph.p_memsz) mine = true;
    if (ph.p_type == PT_TLS) tls = &ph;
  }
  if (tls && info->dlpi_tls_data) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
    if (mine) {
      q->lo = lo;
      q->hi = lo + tls->p_memsz;
    } else if (q->all) {
      q->all->emplace_back(lo, lo + tls->p_memsz);
    }
  }
  return 0;
}

// Where static __shared__ arrays live: this module's TLS block for this thread
// (and, because template statics are bound process-wide to the first module
// defining them, any other module's TLS block).
TFK_HOST_FN void refresh_tls_ranges(Exec& ex) {
  // Computing the address allocates this thread's TLS block of this module if
  // it does not exist yet; it must exist before dl_iterate_phdr looks.
  const uintptr_t probe = reinterpret_cast<uintptr_t>(&threadIdx);
  __asm__ volatile("" : : "r"(probe) : "memory");
  TlsQuery q{reinterpret_cast<uintptr_t>(&tls_phdr_cb), 0, 0, &ex.other_tls};
  ex.other_tls.clear();
  dl_iterate_phdr(&tls_phdr_cb, &q);
  if (q.lo <= probe && probe < q.hi) {
    ex.tls_lo = q.lo;
    ex.tls_hi = q.hi;
  } else {
    ex.tls_lo = ex.tls_hi = 0;
  }
}

// Is [p, p+n) in shared memory (dynamic buffer or a TLS block)?
TFK_HOST_FN bool in_smem(Exec& ex, const void* p, size_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (ex.smem && a >= reinterpret_cast<uintptr_t>(ex.dyn) && a + n <= reinterpret_cast<uintptr_t>(ex.dyn) + ex.smem)
    return true;
  if (a >= ex.tls_lo && a + n <= ex.tls_hi) return true;
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& r : ex.other_tls)
      if (a >= r.first && a + n <= r.second) return true;
    if (pass == 0) refresh_tls_ranges(ex);  // a module loaded since the last look
  }
  return ex.tls_lo == 0 && ex.tls_hi == 0;  // TLS not locatable here: do not refuse
}

// ---------------------------------------------------------------- race check

#if TFK_HOST_RACECHECK
TFK_HOST_FN const char* race_kind_name(int k) {
  switch (k) {
    case kRaw: return "RAW: read of a byte another thread wrote since the last barrier";
    case kWar: return "WAR: write of a byte another thread read since the last barrier";
    case kWaw: return "WAW: write of a byte another thread wrote since the last barrier";
    case kUninit: return "UNINIT: read of shared memory not written in this block";
    default: return "ASYNC: access to shared memory a cp.async has not delivered yet (no cp_async_wait)";
  }
}

TFK_HOST_FN void race_report(Exec& ex, int kind, uint32_t tid, uint32_t other, bool dynamic, size_t off,
                             const void* pc) {
  RaceState& rs = ex.race;
  ++rs.total;
  for (const RaceReport& r : rs.reports)
    if (r.kind == kind && r.pc == pc) return;  // one report per kind and instruction
  if (rs.reports.size() < 16) rs.reports.push_back({kind, tid, other, ex.bidx, dynamic, off, pc});
}

// Shadow of the byte at address a, or null when a is not tracked shared memory.
TFK_HOST_FN Shadow* race_shadow(Exec& ex, uintptr_t a, bool* dynamic, size_t* off) {
  const uintptr_t d = reinterpret_cast<uintptr_t>(ex.dyn);
  if (ex.smem && a >= d && a < d + ex.smem) {
    *dynamic = true;
    *off = a - d;
    return &ex.race.dyn[a - d];
  }
  if (a >= ex.tls_lo && a < ex.tls_hi) {
    *dynamic = false;
    *off = a - ex.tls_lo;
    return &ex.race.tls[a - ex.tls_lo];
  }
  return nullptr;
}

TFK_HOST_FN bool warp_ordered(Exec& ex, uint32_t a_tid, uint32_t b_warp, uint32_t recorded_sync) {
  // b's warp passed a __syncwarp since the access recorded by a (same warp only).
  return (a_tid >> 5) == b_warp && ex.warps[b_warp].sync_gen != recorded_sync;
}

// check false: only record the access (a cp.async landing, checked when issued).
TFK_HOST_FN void race_access(Exec& ex, uint32_t tid, const void* p, size_t n, bool write, const void* pc,
                             bool check = true) {
  RaceState& rs = ex.race;
  const uint32_t warp = tid >> 5;
  const uint32_t sync = ex.warps[warp].sync_gen;
  unsigned seen = 0;  // kinds already reported for this access (one report per access and kind)
  auto report = [&](int kind, uint32_t other, bool dyn, size_t off) TFK_HOST_NOSAN {
    if (!(seen >> kind & 1u)) race_report(ex, kind, tid, other, dyn, off, pc);
    seen |= 1u << kind;
  };
  for (size_t i = 0; i < n; ++i) {
    bool dyn;
    size_t off;
    Shadow* s = race_shadow(ex, reinterpret_cast<uintptr_t>(p) + i, &dyn, &off);
    if (!s || (s->flags & kShIgnore)) continue;
    const bool other_wrote =
        s->w_epoch == rs.epoch && s->writer != tid && !warp_ordered(ex, s->writer, warp, s->w_sync);
    if (!check) {
      // recorded below, not checked
    } else if (s->flags & kShPending) {
      report(kAsync, s->writer, dyn, off);
    } else if (!write && s->w_epoch < rs.block_start) {
      report(kUninit, tid, dyn, off);
    } else if (other_wrote) {
      report(write ? kWaw : kRaw, s->writer, dyn, off);
    } else if (write && s->r_epoch == rs.epoch && (s->reader != tid || (s->flags & kShMulti)) &&
               !(s->reader_warp == warp && ex.warps[warp].sync_gen != s->r_sync)) {
      report(kWar, s->reader, dyn, off);
    }
    if (write) {
      s->w_epoch = rs.epoch;
      s->writer = static_cast<uint16_t>(tid);
      s->w_sync = sync;
    } else if (s->r_epoch != rs.epoch) {
      s->r_epoch = rs.epoch;
      s->reader = static_cast<uint16_t>(tid);
      s->reader_warp = static_cast<uint16_t>(warp);
      s->r_sync = sync;
      s->flags = static_cast<uint8_t>(s->flags & ~kShMulti);
    } else if (s->reader != tid) {
      s->flags |= kShMulti;
      if (s->reader_warp != warp) s->reader_warp = 0xffff;
      s->r_sync = sync;
    } else {
      s->r_sync = sync;
    }
  }
}

TFK_HOST_FN void race_mark_pending(Exec& ex, uint32_t tid, const void* p, size_t n, bool pending) {
  for (size_t i = 0; i < n; ++i) {
    bool dyn;
    size_t off;
    Shadow* s = race_shadow(ex, reinterpret_cast<uintptr_t>(p) + i, &dyn, &off);
    if (!s) continue;
    if (pending) {
      s->flags |= kShPending;
      s->writer = static_cast<uint16_t>(tid);
    } else {
      s->flags = static_cast<uint8_t>(s->flags & ~kShPending);
    }
  }
}

TFK_HOST_FN void race_launch_start(Exec& ex) {
  RaceState& rs = ex.race;
  rs.reports.clear();
  rs.total = 0;
  rs.dyn.assign(ex.smem, Shadow{});
  rs.tls.assign(ex.tls_hi - ex.tls_lo, Shadow{});
  // The layer's own thread-locals are not shared memory.
  const std::pair<const void*, size_t> own[] = {
      {&threadIdx, sizeof threadIdx}, {&blockIdx, sizeof blockIdx}, {&blockDim, sizeof blockDim},
      {&gridDim, sizeof gridDim},     {&tls_exec, sizeof tls_exec}, {&tls_exec_owner, sizeof tls_exec_owner}};
  for (const auto& o : own) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(o.first);
    for (size_t i = 0; i < o.second; ++i)
      if (a + i >= ex.tls_lo && a + i < ex.tls_hi) rs.tls[a + i - ex.tls_lo].flags = kShIgnore;
  }
  rs.active = true;
}

TFK_HOST_FN std::string race_summary(Exec& ex) {
  RaceState& rs = ex.race;
  std::string s = "tfk host racecheck: " + std::to_string(rs.total) + " racy shared-memory access(es) in " +
                  kernel_name(ex) + " (the first of each kind and instruction):";
  for (const RaceReport& r : rs.reports) {
    char off[64];
    std::snprintf(off, sizeof off, "%s+%zu", r.dynamic ? "dynamic smem" : "static __shared__ (TLS)", r.offset);
    s += "\n  ";
    s += race_kind_name(r.kind);
    s += "; block " + fmt_idx(r.block) + " thread " + fmt_idx(thread_idx_of(ex, r.tid));
    if (r.other != r.tid) s += ", other thread " + fmt_idx(thread_idx_of(ex, r.other));
    s += std::string(", at ") + off + ", in " + symbol_name(r.pc);
  }
  return s;
}

// Called by the __tsan_* hooks for every instrumented load and store.
TFK_HOST_FN void race_hook(const void* p, size_t n, bool write, const void* pc) {
  Exec* ex = tls_exec;
  if (!ex || !ex->cur || !ex->race.active || ex->race.in_hook) return;
  ex->race.in_hook = true;
  race_access(*ex, ex->cur->tid, p, n, write, pc);
  ex->race.in_hook = false;
}
#endif  // TFK_HOST_RACECHECK

// ---------------------------------------------------------------- fibers

[[noreturn]] TFK_HOST_FN void fiber_main(void* arg);

#if !TFK_HOST_UCONTEXT
// Initial frame of a fiber, popped by tfk_host_fiber_switch: MXCSR + x87 control
// word, r15, r14, r13 = entry, r12 = argument, rbx, rbp, return address =
// tfk_host_fiber_start (which calls entry(argument) with an aligned stack).
TFK_HOST_FN void* fiber_init_stack(unsigned char* top, void* arg) {
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  sp[-1] = 0;
  sp[-2] = 0;
  sp[-3] = reinterpret_cast<uint64_t>(&tfk_host_fiber_start);
  sp[-4] = 0;                                      // rbp
  sp[-5] = 0;                                      // rbx
  sp[-6] = reinterpret_cast<uint64_t>(arg);        // r12
  sp[-7] = reinterpret_cast<uint64_t>(&fiber_main);  // r13
  sp[-8] = 0;                                      // r14
  sp[-9] = 0;                                      // r15
  uint32_t mxcsr;
  uint16_t fpcw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpcw));
  sp[-10] = 0;
  std::memcpy(reinterpret_cast<unsigned char*>(sp - 10), &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp - 10) + 4, &fpcw, 2);
  return sp - 10;
}
#else
TFK_HOST_FN void fiber_ucontext_entry() { fiber_main(tls_exec); }

// Not inlined: getcontext returns twice in principle (-Wclobbered in the caller).
__attribute__((noinline)) TFK_HOST_FN void init_ucontext(Fiber& f, unsigned char* stack, size_t size) {
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, &fiber_ucontext_entry, 0);
}
#endif

TFK_HOST_FN unsigned char* stack_top(Exec& ex, uint32_t t) {
  return ex.stacks + (static_cast<size_t>(t) + 1) * ex.stack_stride;
}

TFK_HOST_FN void ensure_stacks(Exec& ex, uint32_t n) {
  if (ex.stack_count >= n) return;
  if (ex.stacks) munmap(ex.stacks, ex.stacks_len);
  ex.stacks = nullptr;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ex.stack_stride = stack_bytes() + page;  // guard page at the low end of each stack
  ex.stacks_len = ex.stack_stride * n;
  void* m = mmap(nullptr, ex.stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) fail("tfk host: cannot map " + std::to_string(ex.stacks_len >> 20) + " MiB of fiber stacks");
  ex.stacks = static_cast<unsigned char*>(m);
  ex.stack_count = n;
  for (uint32_t t = 0; t < n; ++t) mprotect(ex.stacks + t * ex.stack_stride, page, PROT_NONE);
}

TFK_HOST_FN void resume(Exec& ex, Fiber& f) {
  threadIdx = f.idx;
  ex.cur = &f;
  ++ex.stats.resumes;
#if TFK_HOST_UCONTEXT
  swapcontext(&ex.sched_uc, &f.uc);
#else
  tfk_host_fiber_switch(&ex.sched_sp, f.sp);
#endif
  ex.cur = nullptr;
}

// From a fiber back to the scheduler; returns when the scheduler resumes it.
TFK_HOST_FN void yield(Exec& ex, Fiber& f) {
#if TFK_HOST_UCONTEXT
  swapcontext(&f.uc, &ex.sched_uc);
#else
  tfk_host_fiber_switch(&f.sp, ex.sched_sp);
#endif
}

TFK_HOST_FN void fail_block(Exec& ex, Fiber& f, const std::string& what) {
  if (ex.failed) return;
  ex.failed = true;
  ex.error = "tfk host: " + kernel_name(ex) + ": block " + fmt_idx(ex.bidx) + " thread " + fmt_idx(f.idx) +
             ": " + what;
}

// ---------------------------------------------------------------- cp.async

TFK_HOST_FN void land(Exec& ex, Fiber& f, size_t upto) {
  for (; f.landed < upto; ++f.landed) {
    const AsyncCopy& c = f.copies[f.landed];
    if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
    if (c.src_bytes < c.size) std::memset(c.dst + c.src_bytes, 0, c.size - c.src_bytes);
#if TFK_HOST_RACECHECK
    race_mark_pending(ex, f.tid, c.dst, c.size, false);
    race_access(ex, f.tid, c.dst, c.size, true, nullptr, false);
#else
    (void)ex;
#endif
  }
  if (f.landed == f.copies.size() && f.groups_done == f.group_end.size()) {
    f.copies.clear();
    f.group_end.clear();
    f.landed = f.groups_done = 0;
  }
}

TFK_HOST_FN void cp_async(void* dst, const void* src, uint32_t size, uint32_t src_bytes) {
  Exec& ex = in_kernel("cp.async");
  Fiber& f = *ex.cur;
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (src_bytes > size)
    fail("cp.async of " + std::to_string(size) + " bytes with src-size " + std::to_string(src_bytes));
  if (d % size || (src_bytes && s % size))
    fail("cp.async of " + std::to_string(size) + " bytes needs " + std::to_string(size) +
         "-byte aligned addresses");
  if (!in_smem(ex, dst, size)) fail("cp.async destination is not shared memory");
#if TFK_HOST_RACECHECK
  race_access(ex, f.tid, dst, size, true, __builtin_return_address(0));
  race_mark_pending(ex, f.tid, dst, size, true);
#endif
  f.copies.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), size, src_bytes});
}

TFK_HOST_FN void cp_async_commit() {
  Exec& ex = in_kernel("cp.async.commit_group");
  ex.cur->group_end.push_back(ex.cur->copies.size());
}

// Retire the oldest committed groups until at most n are pending.
TFK_HOST_FN void cp_async_wait(int n) {
  Exec& ex = in_kernel("cp.async.wait_group");
  Fiber& f = *ex.cur;
  while (f.group_end.size() - f.groups_done > static_cast<size_t>(n)) {
    const size_t upto = f.group_end[f.groups_done++];
    land(ex, f, upto);
  }
}

// ---------------------------------------------------------------- __syncthreads

TFK_HOST_FN const char* barrier_name(int kind) {
  static const char* const names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                      "__syncthreads_or"};
  return names[kind];
}

// kind: 0 plain, 1 count, 2 and, 3 or.
TFK_HOST_FN int barrier(int kind, int pred) {
  Exec& ex = in_kernel(barrier_name(kind));
  Fiber& f = *ex.cur;
  if (ex.done) {
    fail(std::string(barrier_name(kind)) + " reached after " + std::to_string(ex.done) +
         " thread(s) of the block returned: a barrier needs every thread of the block");
  }
  if (ex.bar_arrived == 0) {
    ex.bar_kind = kind;
    ex.bar_true = 0;
  } else if (ex.bar_kind != kind) {
    fail(std::string(barrier_name(kind)) + " meets " + barrier_name(ex.bar_kind) +
         " of other threads at the same barrier");
  }
  ex.bar_true += pred != 0;
  if (++ex.bar_arrived == ex.nthreads) {  // the last to arrive releases the others
    const uint32_t n = ex.nthreads, t = ex.bar_true;
    ex.bar_result = kind == 1 ? static_cast<int>(t) : kind == 2 ? (t == n) : kind == 3 ? (t > 0) : 0;
    ex.bar_arrived = 0;
    ++ex.stats.barriers;
#if TFK_HOST_RACECHECK
    ++ex.race.epoch;
#endif
    for (uint32_t t = 0; t < n; ++t)
      if (ex.fibers[t].state == kAtBarrier) ex.fibers[t].state = kReady;
    return ex.bar_result;
  }
  f.state = kAtBarrier;
  yield(ex, f);
  return ex.bar_result;
}

// ---------------------------------------------------------------- warp collectives

TFK_HOST_FN void warp_arrive(const Collective& op, uint32_t mask, void* slot) {
  Exec& ex = in_kernel(op.name);
  Fiber& f = *ex.cur;
  const uint32_t lane = f.tid & 31u, bit = 1u << lane;
  Warp& w = ex.warps[f.tid >> 5];
  if (op.whole_warp) {
    if (w.exist != 0xffffffffu)
      fail(std::string(op.name) + " needs a full warp of 32 threads; warp " + std::to_string(f.tid >> 5) +
           " of this block has " + std::to_string(__builtin_popcount(w.exist)) + " (block size " +
           std::to_string(ex.nthreads) + ")");
    mask = 0xffffffffu;
  }
  if (!(mask & bit))
    fail(std::string(op.name) + ": mask " + fmt_hex(mask) + " does not name the calling lane " + std::to_string(lane));
  if (mask & ~w.exist)
    fail(std::string(op.name) + ": mask " + fmt_hex(mask) + " names lanes " + fmt_lanes(mask & ~w.exist) +
         " that do not exist (warp " + std::to_string(f.tid >> 5) + " of a " + std::to_string(ex.nthreads) +
         "-thread block has lanes " + fmt_lanes(w.exist) + ")");
  if (mask & w.exited)
    fail(std::string(op.name) + ": mask " + fmt_hex(mask) + " names lanes " + fmt_lanes(mask & w.exited) +
         " whose threads have returned");
  WarpGroup* g = nullptr;
  for (int i = 0; i < w.ngroups; ++i)
    if (w.groups[i].mask == mask) g = &w.groups[i];
  if (!g) {
    g = &w.groups[w.ngroups++];  // at most 32: each pending group holds a distinct waiting lane
    *g = WarpGroup{mask, 0, &op};
  } else if (g->op != &op) {
    fail(std::string(op.name) + " with mask " + fmt_hex(mask) + " while lanes " + fmt_lanes(g->arrived) +
         " of that mask wait in " + g->op->name + ": all lanes of a mask must execute the same collective");
  }
  w.slot[lane] = slot;
  g->arrived |= bit;
  if (g->arrived != mask) {
    f.state = kInWarpOp;
    f.op = &op;
    f.mask = mask;
    yield(ex, f);
    return;
  }
  *g = w.groups[--w.ngroups];  // complete: remove the group, then compute
  ++ex.stats.collectives;
  op.complete(ex, w, mask);
  for (uint32_t m = mask & ~bit; m; m &= m - 1) {
    Fiber& o = ex.fibers[w.base + static_cast<uint32_t>(__builtin_ctz(m))];
    o.state = kReady;
    o.op = nullptr;
  }
}

// -- shuffles

struct ShflSlot {
  uint64_t in, out;
  int64_t arg;
  int width;
};

enum ShflKind { kIdx, kUp, kDown, kXor };

// Source lane per the PTX shfl.sync definition (CUDA's c = ((32 - width) << 8) | clamp).
// A source lane outside the mask yields all-ones bits (NaN as a float), the
// value being undefined in PTX.
template <int Kind>
TFK_HOST_NOSAN void shfl_complete(Exec&, Warp& w, uint32_t mask) {
  static const char* const names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  int width = -1;
  for (uint32_t m = mask; m; m &= m - 1) {
    const auto* s = static_cast<const ShflSlot*>(w.slot[__builtin_ctz(m)]);
    if (width < 0) width = s->width;
    if (s->width != width) fail(std::string(names[Kind]) + ": lanes pass different widths");
  }
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(std::string(names[Kind]) + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  for (uint32_t m = mask; m; m &= m - 1) {
    const int64_t lane = __builtin_ctz(m);
    auto* s = static_cast<ShflSlot*>(w.slot[lane]);
    const int64_t seg = lane & ~static_cast<int64_t>(width - 1), last = seg + width - 1;
    int64_t j = lane;
    bool ok = true;
    const uint32_t b = static_cast<uint32_t>(s->arg);
    switch (Kind) {
      case kIdx: j = seg | (b & static_cast<uint32_t>(width - 1)); break;
      case kUp: j = lane - static_cast<int64_t>(b); ok = j >= seg; break;
      case kDown: j = lane + static_cast<int64_t>(b); ok = j <= last; break;
      default: j = lane ^ static_cast<int64_t>(b); ok = j <= last; break;
    }
    if (!ok) j = lane;
    // A source lane outside the mask gives an undefined value (PTX): poison.
    s->out = (mask >> j & 1u) ? static_cast<const ShflSlot*>(w.slot[j])->in : ~uint64_t{0};
  }
}

inline constexpr Collective kShflIdx{"__shfl_sync", false, &shfl_complete<kIdx>};
inline constexpr Collective kShflUp{"__shfl_up_sync", false, &shfl_complete<kUp>};
inline constexpr Collective kShflDown{"__shfl_down_sync", false, &shfl_complete<kDown>};
inline constexpr Collective kShflXor{"__shfl_xor_sync", false, &shfl_complete<kXor>};

template <typename T>
TFK_HOST_NOSAN inline T shfl(const Collective& op, uint32_t mask, T var, int64_t arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  ShflSlot s{0, 0, arg, width};
  std::memcpy(&s.in, &var, sizeof(T));
  warp_arrive(op, mask, &s);
  T r;
  std::memcpy(&r, &s.out, sizeof(T));
  return r;
}

// -- votes and __syncwarp

struct VoteSlot {
  int pred;
  uint32_t out;
};

enum VoteKind { kBallot, kAny, kAll };

template <int Kind>
TFK_HOST_NOSAN void vote_complete(Exec&, Warp& w, uint32_t mask) {
  uint32_t ballot = 0;
  for (uint32_t m = mask; m; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    if (static_cast<const VoteSlot*>(w.slot[lane])->pred) ballot |= 1u << lane;
  }
  const uint32_t r = Kind == kBallot ? ballot : Kind == kAny ? (ballot != 0) : (ballot == mask);
  for (uint32_t m = mask; m; m &= m - 1) static_cast<VoteSlot*>(w.slot[__builtin_ctz(m)])->out = r;
}

inline constexpr Collective kBallotOp{"__ballot_sync", false, &vote_complete<kBallot>};
inline constexpr Collective kAnyOp{"__any_sync", false, &vote_complete<kAny>};
inline constexpr Collective kAllOp{"__all_sync", false, &vote_complete<kAll>};

TFK_HOST_FN uint32_t vote(const Collective& op, uint32_t mask, int pred) {
  VoteSlot s{pred, 0};
  warp_arrive(op, mask, &s);
  return s.out;
}

TFK_HOST_NOSAN inline void syncwarp_complete(Exec&, Warp& w, uint32_t) { ++w.sync_gen; }
inline constexpr Collective kSyncwarpOp{"__syncwarp", false, &syncwarp_complete};

// -- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"), g = laneid >> 2, t = laneid % 4, low 16 bits = lower column/row:
//   A (16x16, row): a[r] holds A[g + 8*(r&1)][2t + 8*(r>>1) + {0,1}]
//   B (16x8, col):  b[r] holds B[2t + 8r + {0,1}][g]
//   C, D (16x8):    c[i] is   C[g + 8*(i>>1)][2t + (i&1)]
// Products are exact in double; the 16 of a dot product and C are summed in
// double and rounded once to float (the tensor core's own summation order and
// truncation are not modelled: results agree with it to fp32 accumulation
// tolerance, not bit for bit).

struct MmaSlot {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
  float* d;
};

template <bool BF16>
TFK_HOST_NOSAN void mma_complete(Exec&, Warp& w, uint32_t) {
  float (*const cvt)(uint16_t) = BF16 ? &bf16_to_f32 : &f16_to_f32;
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* s = static_cast<const MmaSlot*>(w.slot[lane]);
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
      A[row][col] = cvt(static_cast<uint16_t>(s->a[r]));
      A[row][col + 1] = cvt(static_cast<uint16_t>(s->a[r] >> 16));
    }
    for (int r = 0; r < 2; ++r) {
      const int k = 2 * t + 8 * r;
      B[k][g] = cvt(static_cast<uint16_t>(s->b[r]));
      B[k + 1][g] = cvt(static_cast<uint16_t>(s->b[r] >> 16));
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = s->c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {  // C is read in full above: d may alias c
    auto* s = static_cast<MmaSlot*>(w.slot[lane]);
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double acc = 0.0;
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[m][k]) * static_cast<double>(B[k][n]);
      s->d[i] = static_cast<float>(acc + static_cast<double>(C[m][n]));
    }
  }
}

inline constexpr Collective kMmaF16{"mma.sync.m16n8k16.f32.f16", true, &mma_complete<false>};
inline constexpr Collective kMmaBF16{"mma.sync.m16n8k16.f32.bf16", true, &mma_complete<true>};

TFK_HOST_FN void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16) {
  MmaSlot s{a, b, c, d};
  warp_arrive(bf16 ? kMmaBF16 : kMmaF16, 0xffffffffu, &s);
}

// -- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16
//
// Lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 bytes each,
// 16-byte aligned, in shared memory); lanes beyond 8*num are ignored. Lane l
// receives in register i, for r = l/4 and c = 2*(l%4):
//   without .trans: M_i[r][c], M_i[r][c+1]   (low, high 16 bits)
//   with .trans:    M_i[c][r], M_i[c+1][r]

struct LdmSlot {
  const unsigned char* addr;
  uint32_t* out;
  const void* pc;  // caller, for race reports
};

TFK_HOST_FN uint32_t ld16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

template <int Num, bool Trans>
TFK_HOST_NOSAN void ldmatrix_complete(Exec& ex, Warp& w, uint32_t) {
  const unsigned char* rows[32];
  for (int i = 0; i < 8 * Num; ++i) {
    const unsigned char* p = static_cast<const LdmSlot*>(w.slot[i])->addr;
    if (reinterpret_cast<uintptr_t>(p) % 16 || !in_smem(ex, p, 16)) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%p", static_cast<const void*>(p));
      fail(std::string("ldmatrix: lane ") + std::to_string(i) + "'s row address " + buf +
           (reinterpret_cast<uintptr_t>(p) % 16 ? " is not 16-byte aligned" : " is not in shared memory"));
    }
#if TFK_HOST_RACECHECK
    race_access(ex, w.base + static_cast<uint32_t>(i), p, 16, false, static_cast<const LdmSlot*>(w.slot[i])->pc);
#endif
    rows[i] = p;
  }
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* out = static_cast<LdmSlot*>(w.slot[lane])->out;
    const int r = lane >> 2, c = 2 * (lane & 3);
    for (int m = 0; m < Num; ++m) {
      uint32_t lo, hi;
      if (!Trans) {
        lo = ld16(rows[8 * m + r] + 2 * c);
        hi = ld16(rows[8 * m + r] + 2 * c + 2);
      } else {
        lo = ld16(rows[8 * m + c] + 2 * r);
        hi = ld16(rows[8 * m + c + 1] + 2 * r);
      }
      out[m] = lo | (hi << 16);
    }
  }
}

inline constexpr Collective kLdm1{"ldmatrix.x1", true, &ldmatrix_complete<1, false>};
inline constexpr Collective kLdm2{"ldmatrix.x2", true, &ldmatrix_complete<2, false>};
inline constexpr Collective kLdm4{"ldmatrix.x4", true, &ldmatrix_complete<4, false>};
inline constexpr Collective kLdm1T{"ldmatrix.x1.trans", true, &ldmatrix_complete<1, true>};
inline constexpr Collective kLdm2T{"ldmatrix.x2.trans", true, &ldmatrix_complete<2, true>};
inline constexpr Collective kLdm4T{"ldmatrix.x4.trans", true, &ldmatrix_complete<4, true>};

template <int Num, bool Trans>
TFK_HOST_NOSAN inline void ldmatrix(uint32_t* out, const void* row) {
  static_assert(Num == 1 || Num == 2 || Num == 4, "ldmatrix loads 1, 2 or 4 matrices");
  LdmSlot s{static_cast<const unsigned char*>(row), out, __builtin_return_address(0)};
  const Collective& op = Num == 1 ? (Trans ? kLdm1T : kLdm1) : Num == 2 ? (Trans ? kLdm2T : kLdm2)
                                                                          : (Trans ? kLdm4T : kLdm4);
  warp_arrive(op, 0xffffffffu, &s);
}

TFK_HOST_FN unsigned lane_id() { return in_kernel("lane_id").cur->tid & 31u; }

// ---------------------------------------------------------------- scheduler

TFK_HOST_FN void thread_exit(Exec& ex, Fiber& f) {
  land(ex, f, f.copies.size());  // copies still in flight land
  f.state = kDone;
  ++ex.done;
  Warp& w = ex.warps[f.tid >> 5];
  const uint32_t bit = 1u << (f.tid & 31u);
  w.exited |= bit;
  for (int i = 0; i < w.ngroups; ++i)
    if (w.groups[i].mask & bit)
      fail_block(ex, f, std::string("returned while lanes ") + fmt_lanes(w.groups[i].arrived) + " wait for it in " +
                            w.groups[i].op->name + " (mask " + fmt_hex(w.groups[i].mask) + ")");
  if (ex.bar_arrived)
    fail_block(ex, f, "returned while " + std::to_string(ex.bar_arrived) + " thread(s) wait at " +
                          barrier_name(ex.bar_kind) + ": a barrier needs every thread of the block");
}

[[noreturn]] TFK_HOST_FN void fiber_main(void* arg) {
  Exec& ex = *static_cast<Exec*>(arg);
  Fiber& f = *ex.cur;
  try {
    ex.body(ex.body_arg);
  } catch (const std::exception& e) {
    fail_block(ex, f, e.what());
  } catch (...) {
    fail_block(ex, f, "unknown exception");
  }
  try {
    thread_exit(ex, f);
  } catch (const std::exception& e) {
    fail_block(ex, f, e.what());
  }
  yield(ex, f);  // never resumed
  std::abort();
}

[[noreturn]] TFK_HOST_FN void deadlock(Exec& ex) {
  std::string s = "tfk host: " + kernel_name(ex) + ": deadlock in block " + fmt_idx(ex.bidx) + ": ";
  uint32_t at_bar = 0;
  for (uint32_t t = 0; t < ex.nthreads; ++t) at_bar += ex.fibers[t].state == kAtBarrier;
  if (at_bar) s += std::to_string(at_bar) + " thread(s) wait at " + barrier_name(ex.bar_kind) + "; ";
  for (size_t wi = 0; wi < ex.warps.size(); ++wi) {
    const Warp& w = ex.warps[wi];
    for (int i = 0; i < w.ngroups; ++i) {
      const WarpGroup& g = w.groups[i];
      const uint32_t missing = g.mask & ~g.arrived;
      s += "warp " + std::to_string(wi) + ": lanes " + fmt_lanes(g.arrived) + " wait in " + g.op->name + " (mask " +
           fmt_hex(g.mask) + ") for lanes " + fmt_lanes(missing);
      s += ", which are ";
      std::string where;
      for (uint32_t m = missing; m; m &= m - 1) {
        const Fiber& o = ex.fibers[w.base + static_cast<uint32_t>(__builtin_ctz(m))];
        const std::string st = o.state == kAtBarrier ? "at __syncthreads"
                               : o.state == kDone    ? "returned"
                               : o.op                ? std::string("in ") + o.op->name + " (mask " + fmt_hex(o.mask) + ")"
                                                     : "elsewhere";
        if (where.find(st) == std::string::npos) where += (where.empty() ? "" : " / ") + st;
      }
      s += where + "; ";
    }
  }
  s += std::to_string(ex.done) + " of " + std::to_string(ex.nthreads) + " thread(s) returned";
  fail(s);
}

TFK_HOST_FN void run_block(Exec& ex) {
  blockIdx = ex.bidx;
  const uint32_t n = ex.nthreads;
  if (ex.smem) std::memset(ex.dyn, 0xff, ex.smem);  // poison: NaN as fp32/fp16/bf16
#if TFK_HOST_RACECHECK
  ex.race.block_start = ++ex.race.epoch;
#endif
  for (uint32_t t = 0; t < n; ++t) {
    Fiber& f = ex.fibers[t];
    f.tid = t;
    f.idx = thread_idx_of(ex, t);
    f.state = kReady;
    f.op = nullptr;
    f.copies.clear();
    f.group_end.clear();
    f.landed = f.groups_done = 0;
#if TFK_HOST_UCONTEXT
    init_ucontext(f, stack_top(ex, t) - stack_bytes(), stack_bytes());
#else
    f.sp = fiber_init_stack(stack_top(ex, t), &ex);
#endif
  }
  for (size_t wi = 0; wi < ex.warps.size(); ++wi) {
    Warp& w = ex.warps[wi];
    w.base = static_cast<uint32_t>(wi * 32);
    const uint32_t lanes = std::min<uint32_t>(32u, n - w.base);
    w.exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    w.exited = 0;
    w.ngroups = 0;
  }
  ex.done = 0;
  ex.bar_arrived = 0;
  ex.failed = false;
  ++ex.stats.blocks;
  while (ex.done < n) {
    bool ran = false;
    for (uint32_t t = 0; t < n; ++t) {
      if (ex.fibers[t].state != kReady) continue;
      ran = true;
      resume(ex, ex.fibers[t]);
      if (ex.failed) fail(ex.error);
    }
    if (!ran) deadlock(ex);
  }
}

// Runs blocks first, first + stride, ... of the grid on this OS thread.
TFK_HOST_FN void run_blocks(const void* kernel, void (*body)(void*), void* arg, dim3 grid, dim3 block, size_t smem,
                            uint64_t first, uint64_t stride) {
  Exec& ex = exec_for_this_thread();
  if (ex.cur || ex.body) throw std::logic_error("tfk host: a kernel launch inside a kernel");
  struct Reset {
    Exec& ex;
    TFK_HOST_NOSAN ~Reset() {
      ex.body = nullptr;
      ex.cur = nullptr;
#if TFK_HOST_RACECHECK
      ex.race.active = false;
#endif
    }
  } reset{ex};
  ex.kernel = kernel;
  ex.body = body;
  ex.body_arg = arg;
  ex.grid = grid;
  ex.block = block;
  ex.smem = smem;
  ex.nthreads = block.x * block.y * block.z;
  ex.stats = Stats{};
  gridDim = grid;
  blockDim = block;
  ensure_stacks(ex, ex.nthreads);
  if (ex.fibers.size() < ex.nthreads) ex.fibers.resize(ex.nthreads);
  ex.warps.resize((ex.nthreads + 31) / 32);
  for (Warp& w : ex.warps) w.sync_gen = 0;
  if (smem > ex.dyn_len) {
    if (ex.dyn) munmap(ex.dyn, ex.dyn_len);
    ex.dyn = nullptr;
    const size_t len = (smem + 65535) & ~size_t{65535};
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("tfk host: cannot map dynamic shared memory");
    ex.dyn = static_cast<unsigned char*>(m);
    ex.dyn_len = len;
  }
  refresh_tls_ranges(ex);
#if TFK_HOST_RACECHECK
  race_launch_start(ex);
#endif
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t b = first; b < nblocks; b += stride) {
    ex.bidx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    run_block(ex);
  }
#if TFK_HOST_RACECHECK
  if (ex.race.total) {
    const std::string s = race_summary(ex);
    const char* mode = std::getenv("TFK_HOST_RACECHECK");
    if (mode && std::strcmp(mode, "warn") == 0) {
      std::fprintf(stderr, "%s\n", s.c_str());
    } else {
      fail(s);
    }
  }
#endif
}

// The grid: validation, then blocks on this thread or on worker threads.
TFK_HOST_FN void run_grid(const void* kernel, void (*body)(void*), void* arg, dim3 grid, dim3 block, size_t smem) {
  if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z)
    throw std::invalid_argument("tfk host mode: empty grid or block");
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw std::invalid_argument("tfk host mode: block " + fmt_idx(uint3{block.x, block.y, block.z}) +
                                " exceeds CUDA's limits (1024 threads; z <= 64)");
  if (grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    throw std::invalid_argument("tfk host mode: grid " + fmt_idx(uint3{grid.x, grid.y, grid.z}) +
                                " exceeds CUDA's limits");
  if (smem > 227 * 1024)
    throw std::invalid_argument("tfk host mode: " + std::to_string(smem) +
                                " bytes of dynamic shared memory exceed the 227 KiB of sm_90");
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const uint64_t nw = std::min<uint64_t>(static_cast<uint64_t>(workers()), nblocks);
  if (nw <= 1) {
    run_blocks(kernel, body, arg, grid, block, smem, 0, 1);
    return;
  }
  // Each worker takes every nw-th block in order and stops at its first error;
  // the error of the lowest failing block is reported, as a serial run would.
  std::vector<std::string> errors(nw);
  std::vector<uint64_t> failed_at(nw, ~uint64_t{0});
  std::vector<std::thread> threads;
  for (uint64_t w = 0; w < nw; ++w) {
    threads.emplace_back([&, w]() {
      try {
        run_blocks(kernel, body, arg, grid, block, smem, w, nw);
      } catch (const std::exception& e) {
        errors[w] = e.what();
        const std::string& s = errors[w];
        const size_t at = s.find(": block (");
        failed_at[w] = w;
        if (at != std::string::npos) {
          unsigned bx = 0, by = 0, bz = 0;
          if (std::sscanf(s.c_str() + at, ": block (%u,%u,%u)", &bx, &by, &bz) == 3)
            failed_at[w] = bx + static_cast<uint64_t>(grid.x) * (by + static_cast<uint64_t>(grid.y) * bz);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  uint64_t best = ~uint64_t{0};
  int who = -1;
  for (uint64_t w = 0; w < nw; ++w)
    if (!errors[w].empty() && failed_at[w] < best) best = failed_at[w], who = static_cast<int>(w);
  if (who >= 0) fail(errors[who]);
}

// Type-erased kernel invocation: every thread calls kernel(args...).
template <typename Body>
TFK_HOST_NOSAN void invoke(void* p) {
  (*static_cast<Body*>(p))();
}

TFK_HOST_FN void* dynamic_smem_base() {
  Exec& ex = in_kernel("tfk::dynamic_smem");
  return ex.dyn;
}
TFK_HOST_FN size_t dynamic_smem_size() { return in_kernel("tfk::dynamic_smem_size").smem; }

}  // namespace host
}  // namespace tfk

// ============================================================================
// CUDA's device functions, on the host
// ============================================================================

TFK_HOST_NOSAN inline void __syncthreads() { tfk::host::barrier(0, 0); }
TFK_HOST_NOSAN inline int __syncthreads_count(int pred) { return tfk::host::barrier(1, pred); }
TFK_HOST_NOSAN inline int __syncthreads_and(int pred) { return tfk::host::barrier(2, pred); }
TFK_HOST_NOSAN inline int __syncthreads_or(int pred) { return tfk::host::barrier(3, pred); }

TFK_HOST_NOSAN inline void __syncwarp(unsigned mask = 0xffffffffu) {
  tfk::host::warp_arrive(tfk::host::kSyncwarpOp, mask, nullptr);
}

template <typename T>
TFK_HOST_NOSAN inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
  return tfk::host::shfl(tfk::host::kShflIdx, mask, var, srcLane, width);
}
template <typename T>
TFK_HOST_NOSAN inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return tfk::host::shfl(tfk::host::kShflUp, mask, var, delta, width);
}
template <typename T>
TFK_HOST_NOSAN inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return tfk::host::shfl(tfk::host::kShflDown, mask, var, delta, width);
}
template <typename T>
TFK_HOST_NOSAN inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  return tfk::host::shfl(tfk::host::kShflXor, mask, var, laneMask, width);
}

TFK_HOST_NOSAN inline unsigned __ballot_sync(unsigned mask, int pred) {
  return tfk::host::vote(tfk::host::kBallotOp, mask, pred);
}
TFK_HOST_NOSAN inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(tfk::host::vote(tfk::host::kAnyOp, mask, pred));
}
TFK_HOST_NOSAN inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(tfk::host::vote(tfk::host::kAllOp, mask, pred));
}

// Atomics: fibers of one OS thread never preempt each other, but blocks may run
// on several worker threads, so these are real (relaxed) atomic operations.
#define TFK_HOST_ATOMIC_INT(T)                                                                               \
  TFK_HOST_NOSAN inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }       \
  TFK_HOST_NOSAN inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }       \
  TFK_HOST_NOSAN inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }       \
  TFK_HOST_NOSAN inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }         \
  TFK_HOST_NOSAN inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }       \
  TFK_HOST_NOSAN inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }     \
  TFK_HOST_NOSAN inline T atomicCAS(T* a, T cmp, T v) {                                                    \
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);                     \
    return cmp;                                                                                              \
  }                                                                                                          \
  TFK_HOST_NOSAN inline T atomicMax(T* a, T v) {                                                            \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                            \
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                        \
    return old;                                                                                              \
  }                                                                                                          \
  TFK_HOST_NOSAN inline T atomicMin(T* a, T v) {                                                            \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                            \
    while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                        \
    return old;                                                                                              \
  }
TFK_HOST_ATOMIC_INT(int)
TFK_HOST_ATOMIC_INT(unsigned int)
TFK_HOST_ATOMIC_INT(long long)
TFK_HOST_ATOMIC_INT(unsigned long long)
#undef TFK_HOST_ATOMIC_INT

TFK_HOST_NOSAN inline unsigned short atomicCAS(unsigned short* a, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}

#define TFK_HOST_ATOMIC_FLOAT(T)                                                                               \
  TFK_HOST_NOSAN inline T atomicAdd(T* a, T v) {                                                              \
    T old, upd;                                                                                                \
    __atomic_load(a, &old, __ATOMIC_RELAXED);                                                                  \
    do {                                                                                                       \
      upd = old + v;                                                                                           \
    } while (!__atomic_compare_exchange(a, &old, &upd, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));            \
    return old;                                                                                                \
  }                                                                                                            \
  TFK_HOST_NOSAN inline T atomicExch(T* a, T v) {                                                             \
    T old;                                                                                                     \
    __atomic_exchange(a, &v, &old, __ATOMIC_RELAXED);                                                          \
    return old;                                                                                                \
  }
TFK_HOST_ATOMIC_FLOAT(float)
TFK_HOST_ATOMIC_FLOAT(double)
#undef TFK_HOST_ATOMIC_FLOAT

[[noreturn]] inline void __trap() { throw std::runtime_error("__trap() called"); }

// ============================================================================
// The x86-64 context switch (System V ABI): saves callee-saved registers,
// MXCSR and the x87 control word on the old stack, switches stacks, restores.
// A COMDAT group, so every translation unit may carry it and the linker keeps one.
// ============================================================================
#if !TFK_HOST_UCONTEXT
__asm__(
    ".pushsection .text.tfk_host_fiber_switch,\"axG\",@progbits,tfk_host_fiber_switch,comdat\n"
    ".weak tfk_host_fiber_switch\n"
    ".hidden tfk_host_fiber_switch\n"
    ".type tfk_host_fiber_switch,@function\n"
    ".p2align 4\n"
    "tfk_host_fiber_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size tfk_host_fiber_switch,.-tfk_host_fiber_switch\n"
    ".weak tfk_host_fiber_start\n"
    ".hidden tfk_host_fiber_start\n"
    ".type tfk_host_fiber_start,@function\n"
    "tfk_host_fiber_start:\n"
    "  movq %r12, %rdi\n"
    "  callq *%r13\n"
    "  ud2\n"
    ".size tfk_host_fiber_start,.-tfk_host_fiber_start\n"
    ".popsection\n");
#endif

// ============================================================================
// Race check: the entry points -fsanitize=thread instrumentation calls.
// Hidden and weak: one copy per shared object, bound to that object's runtime.
// ============================================================================
#if TFK_HOST_RACECHECK
#define TFK_TSAN_HOOK extern "C" __attribute__((weak, noinline, no_sanitize_thread))
TFK_TSAN_HOOK void __tsan_init() {}
TFK_TSAN_HOOK void __tsan_func_entry(void*) {}
TFK_TSAN_HOOK void __tsan_func_exit() {}
TFK_TSAN_HOOK void __tsan_vptr_update(void**, void*) {}
TFK_TSAN_HOOK void __tsan_vptr_read(void**) {}
#define TFK_TSAN_RW(N)                                                                                  \
  TFK_TSAN_HOOK void __tsan_read##N(void* p) { tfk::host::race_hook(p, N, false, __builtin_return_address(0)); }  \
  TFK_TSAN_HOOK void __tsan_write##N(void* p) { tfk::host::race_hook(p, N, true, __builtin_return_address(0)); }  \
  TFK_TSAN_HOOK void __tsan_unaligned_read##N(void* p) {                                                \
    tfk::host::race_hook(p, N, false, __builtin_return_address(0));                                     \
  }                                                                                                     \
  TFK_TSAN_HOOK void __tsan_unaligned_write##N(void* p) {                                               \
    tfk::host::race_hook(p, N, true, __builtin_return_address(0));                                      \
  }                                                                                                     \
  TFK_TSAN_HOOK void __tsan_volatile_read##N(void* p) {                                                 \
    tfk::host::race_hook(p, N, false, __builtin_return_address(0));                                     \
  }                                                                                                     \
  TFK_TSAN_HOOK void __tsan_volatile_write##N(void* p) {                                                \
    tfk::host::race_hook(p, N, true, __builtin_return_address(0));                                      \
  }
TFK_TSAN_RW(1)
TFK_TSAN_RW(2)
TFK_TSAN_RW(4)
TFK_TSAN_RW(8)
TFK_TSAN_RW(16)
#undef TFK_TSAN_RW
TFK_TSAN_HOOK void __tsan_read_range(void* p, unsigned long n) {
  tfk::host::race_hook(p, n, false, __builtin_return_address(0));
}
TFK_TSAN_HOOK void __tsan_write_range(void* p, unsigned long n) {
  tfk::host::race_hook(p, n, true, __builtin_return_address(0));
}
// Atomics are performed, not checked (atomics are not races).
#define TFK_TSAN_ATOMIC(N, T)                                                                                 \
  TFK_TSAN_HOOK T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  TFK_TSAN_HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  TFK_TSAN_HOOK T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                     \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  TFK_TSAN_HOOK T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  TFK_TSAN_HOOK T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  TFK_TSAN_HOOK T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  TFK_TSAN_HOOK T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                                     \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                           \
  TFK_TSAN_HOOK T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                           \
  TFK_TSAN_HOOK T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                                   \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  TFK_TSAN_HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {         \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                           \
  TFK_TSAN_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {           \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
  }                                                                                                           \
  TFK_TSAN_HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {               \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                         \
    return c;                                                                                                 \
  }
TFK_TSAN_ATOMIC(8, unsigned char)
TFK_TSAN_ATOMIC(16, unsigned short)
TFK_TSAN_ATOMIC(32, unsigned int)
TFK_TSAN_ATOMIC(64, unsigned long long)
#undef TFK_TSAN_ATOMIC
TFK_TSAN_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
TFK_TSAN_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#undef TFK_TSAN_HOOK
#endif  // TFK_HOST_RACECHECK

#pragma GCC visibility pop
