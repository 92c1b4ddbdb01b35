// A small CPU emulator of the CUDA features that rows.cu and sample.cu use, so that their kernels
// (the very same source, compiled by g++ -x c++ -DVF_EMULATE) run on a machine without a GPU.
// Test-only: never part of the extension.
//
// Each CUDA thread of a block is a fiber (ucontext); blocks run one after another. The emulator
// is strict where the hardware is forgiving, to catch bugs that would be silent on a GPU:
//  * __syncthreads: every thread of the block must arrive (an exited thread is an error);
//  * __shfl_xor_sync(mask, ...): every lane named in mask must arrive at a shuffle with the same
//    mask, the calling lane must be in mask, and the partner lane too;
//  * "device" memory comes from emu::Malloc, filled with 0xff bytes (NaN for every float type);
//    every kernel load and store is bounds-checked against the live allocations, and an access of
//    2..16 bytes must be aligned to its size, as on the hardware;
//  * no two threads may write the same 2-byte granule in one launch (the kernels' determinism
//    rests on every output and partial-sum slot having one owner thread);
//  * a deadlock (no runnable fiber, no barrier that can open) is an error;
//  * shared memory (VF_SHARED_ARRAY) is poisoned at the start of every block, and every access is
//    checked against the accesses of the other threads since the last barrier: a read of a slot
//    that no thread has written in this block, a read of a slot another thread wrote since the
//    last barrier (read-after-write), and a write to a slot another thread read or wrote since
//    the last barrier (write-after-read/write) are errors, whichever order the threads ran in;
//  * the threads of a block are scheduled in one of several orders (ascending, descending, a
//    seeded shuffle), changing from block to block, so order-dependent results show up as
//    mismatches between blocks and runs.
// Errors print a line and abort().
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <map>
#include <random>
#include <unordered_map>
#include <vector>

#include <cuda_runtime.h>

namespace emu {

enum FiberState { kRun = 0, kBar = 1, kShfl = 2, kDone = 3 };

struct Fiber {
  ucontext_t ctx;
  int state = kRun;
  unsigned shfl_mask = 0;
  int shfl_off = 0;
  unsigned char in[8] = {}, out[8] = {};
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  ucontext_t main_ctx;
  int cur = -1;
  unsigned bx = 0, gx = 0, bdx = 0;
  const std::function<void()>* body = nullptr;
  std::map<uintptr_t, size_t> allocs;                  // base -> bytes
  std::unordered_map<uintptr_t, int64_t> writers;      // granule -> writer id (this launch)
  int64_t launches = 0;
  uint64_t epoch = 0;                // barrier intervals: a new one at every block start and barrier
  std::vector<struct SharedBase*> shared;  // every VF_SHARED_ARRAY, poisoned at each block start
  std::vector<int> order;            // the order in which the block's threads are run
  int64_t blocks_run = 0;
};

// SM counts of the emulated devices: device 0 (the current one) has 2, device 1 has 8 (a mixed
// machine, so that a host computation on the wrong device shows).
constexpr int kDevices = 2;
constexpr int kSms[kDevices] = {2, 8};

inline State& S() {
  static State s;
  return s;
}

[[noreturn]] inline void die(const char* what) {
  State& s = S();
  std::fprintf(stderr, "emu: %s (block %u, thread %d)\n", what, s.bx, s.cur);
  std::abort();
}

inline int tid() { return S().cur; }
inline unsigned bid() { return S().bx; }
inline unsigned bdim() { return S().bdx; }
inline unsigned gdim() { return S().gx; }
// Test hook: when positive, the SM count of every emulated device (the self-test varies the grid
// sizes the launchers pick with it).
inline int& sms_override() {
  static int n = 0;
  return n;
}
inline int sms(int device) {
  if (sms_override() > 0) return sms_override();
  return kSms[device >= 0 && device < kDevices ? device : 0];
}

inline void yield_to_scheduler() {
  State& s = S();
  swapcontext(&s.fibers[s.cur].ctx, &s.main_ctx);
}

inline void syncthreads() {
  State& s = S();
  s.fibers[s.cur].state = kBar;
  yield_to_scheduler();
}

template <class T>
T shfl_xor(unsigned mask, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  State& s = S();
  Fiber& f = s.fibers[s.cur];
  const int lane = s.cur & 31;
  if (!((mask >> lane) & 1u)) die("__shfl_xor_sync from a lane not named in its mask");
  std::memcpy(f.in, &v, sizeof(T));
  f.shfl_mask = mask;
  f.shfl_off = off;
  f.state = kShfl;
  yield_to_scheduler();
  T r;
  std::memcpy(&r, s.fibers[s.cur].out, sizeof(T));
  return r;
}

// ---- memory ----------------------------------------------------------------------------------
inline bool in_bounds(const void* p, size_t n) {
  State& s = S();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = s.allocs.upper_bound(a);
  if (it == s.allocs.begin()) return false;
  --it;
  return a >= it->first && a + n <= it->first + it->second;
}
// A GPU faults on an access of 2, 4, 8 or 16 bytes at an address that is not a multiple of its size
// (a vector load from a misaligned pointer); so does the emulator.
inline void check_aligned(const void* p, size_t n, const char* what) {
  if (n <= 16 && (n & (n - 1)) == 0 && (reinterpret_cast<uintptr_t>(p) & (n - 1)) != 0) {
    std::fprintf(stderr, "emu: %s of %zu bytes at %p\n", what, n, p);
    die("misaligned access");
  }
}
inline void check_read(const void* p, size_t n) {
  if (!in_bounds(p, n)) {
    std::fprintf(stderr, "emu: read of %zu bytes at %p\n", n, p);
    die("out-of-bounds read");
  }
  check_aligned(p, n, "read");
}
inline void note_write(const void* p, size_t n) {
  State& s = S();
  if (!in_bounds(p, n)) {
    std::fprintf(stderr, "emu: write of %zu bytes at %p\n", n, p);
    die("out-of-bounds write");
  }
  check_aligned(p, n, "write");
  const int64_t id = static_cast<int64_t>(s.bx) * 4096 + s.cur;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t g = a & ~uintptr_t{1}; g < a + n; g += 2) {
    auto ins = s.writers.emplace(g, id);
    if (!ins.second && ins.first->second != id) {
      std::fprintf(stderr, "emu: %p written by writer %lld and %lld\n", p,
                   static_cast<long long>(ins.first->second), static_cast<long long>(id));
      die("two threads wrote the same address in one launch");
    }
  }
}

// ---- shared memory ---------------------------------------------------------------------------
struct SharedBase {
  virtual void poison() = 0;
  virtual ~SharedBase() = default;
};

// N elements of T in "shared memory", with a shadow per element: who wrote it and who read it in
// which barrier interval. Accessed through operator[] (a proxy that checks every read and write).
template <class T, int N>
struct SharedArray : SharedBase {
  T data[N];
  struct Shadow {
    bool written = false;
    uint64_t w_epoch = ~uint64_t{0}, r_epoch = ~uint64_t{0};
    int writer = -1, reader = -1;  // reader -2: several threads read in r_epoch
  } shadow[N];

  SharedArray() {
    S().shared.push_back(this);
    poison();
  }
  void poison() override {
    std::memset(static_cast<void*>(data), 0xff, sizeof data);
    for (auto& x : shadow) x = Shadow{};
  }
  void check_index(int i) {
    if (i < 0 || i >= N) die("shared memory index out of bounds");
  }
  T read(int i) {
    check_index(i);
    State& s = S();
    Shadow& h = shadow[i];
    if (!h.written) die("read of shared memory that no thread of this block has written");
    if (h.w_epoch == s.epoch && h.writer != s.cur)
      die("shared memory race: read of a slot another thread wrote since the last barrier");
    if (h.r_epoch == s.epoch && h.reader != s.cur) {
      h.reader = -2;
    } else if (h.r_epoch != s.epoch) {
      h.r_epoch = s.epoch;
      h.reader = s.cur;
    }
    return data[i];
  }
  void write(int i, const T& v) {
    check_index(i);
    State& s = S();
    Shadow& h = shadow[i];
    if (h.w_epoch == s.epoch && h.writer != s.cur)
      die("shared memory race: two threads wrote one slot since the last barrier");
    if (h.r_epoch == s.epoch && h.reader != s.cur)
      die("shared memory race: write to a slot another thread read since the last barrier");
    h.written = true;
    h.w_epoch = s.epoch;
    h.writer = s.cur;
    data[i] = v;
  }
  struct Ref {
    SharedArray* a;
    int i;
    operator T() const { return a->read(i); }
    Ref& operator=(const T& v) {
      a->write(i, v);
      return *this;
    }
  };
  Ref operator[](int i) { return Ref{this, i}; }
};

inline cudaError_t Malloc(void** p, size_t n) {
  const size_t bytes = ((n + 255) / 256) * 256 + 256;
  void* q = std::aligned_alloc(256, bytes);
  if (!q) return cudaErrorMemoryAllocation;
  std::memset(q, 0xff, bytes);
  S().allocs[reinterpret_cast<uintptr_t>(q)] = n;  // only the n bytes asked for are valid
  *p = q;
  return cudaSuccess;
}
inline cudaError_t Free(void* p) {
  if (!p) return cudaSuccess;
  auto& a = S().allocs;
  auto it = a.find(reinterpret_cast<uintptr_t>(p));
  if (it == a.end()) return cudaErrorInvalidValue;
  a.erase(it);
  std::free(p);
  return cudaSuccess;
}

// ---- launch ----------------------------------------------------------------------------------
inline void fiber_entry() {
  State& s = S();
  (*s.body)();
  s.fibers[s.cur].state = kDone;
  // returning resumes uc_link (the scheduler)
}

inline void run_block() {
  State& s = S();
  const int n = static_cast<int>(s.bdx);
  constexpr size_t kStack = 256 * 1024;
  while (static_cast<int>(s.stacks.size()) < n) s.stacks.push_back(new char[kStack]);
  s.fibers.assign(n, Fiber{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[t];
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &s.main_ctx;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (SharedBase* a : s.shared) a->poison();
  ++s.epoch;
  // The order of this block's threads: ascending, descending or shuffled, in turn.
  s.order.resize(n);
  for (int t = 0; t < n; ++t) s.order[t] = t;
  const int64_t kind = s.blocks_run++ % 3;
  if (kind == 1) std::reverse(s.order.begin(), s.order.end());
  if (kind == 2) std::shuffle(s.order.begin(), s.order.end(), std::mt19937(static_cast<unsigned>(s.blocks_run)));
  for (;;) {
    bool ran = false;
    for (int t : s.order) {
      if (s.fibers[t].state != kRun) continue;
      s.cur = t;
      swapcontext(&s.main_ctx, &s.fibers[t].ctx);
      ran = true;
    }
    s.cur = -1;
    int done = 0, bar = 0;
    for (auto& f : s.fibers) {
      done += f.state == kDone;
      bar += f.state == kBar;
    }
    if (done == n) return;
    if (ran) continue;
    // open shuffles whose lanes have all arrived
    bool opened = false;
    for (int t = 0; t < n; ++t) {
      Fiber& f = s.fibers[t];
      if (f.state != kShfl) continue;
      const int warp0 = t & ~31;
      bool all = true;
      for (int l = 0; l < 32 && all; ++l) {
        if (!((f.shfl_mask >> l) & 1u)) continue;
        const int u = warp0 + l;
        if (u >= n) die("shuffle mask names a lane past the block");
        const Fiber& g = s.fibers[u];
        if (g.state == kDone) die("shuffle mask names an exited lane");
        if (g.state != kShfl) all = false;
        else if (g.shfl_mask != f.shfl_mask) die("lanes of one shuffle with different masks");
      }
      if (!all) continue;
      const unsigned mask = f.shfl_mask;
      for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Fiber& g = s.fibers[warp0 + l];
        const int partner = l ^ g.shfl_off;
        if (partner > 31 || !((mask >> partner) & 1u)) die("shuffle partner outside the mask");
        std::memcpy(g.out, s.fibers[warp0 + partner].in, 8);
      }
      for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) s.fibers[warp0 + l].state = kRun;
      opened = true;
    }
    if (opened) continue;
    if (bar > 0 && bar + done == n) {
      if (done > 0) die("__syncthreads while some threads of the block have exited");
      for (auto& f : s.fibers) f.state = kRun;
      ++s.epoch;
      continue;
    }
    die("deadlock: threads wait at barriers that cannot open");
  }
}

inline void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
  State& s = S();
  if (block == 0 || block > 1024) die("bad block size");
  s.writers.clear();
  s.body = &body;
  s.gx = grid;
  s.bdx = block;
  for (unsigned b = 0; b < grid; ++b) {
    s.bx = b;
    run_block();
  }
  s.body = nullptr;
  ++s.launches;
}

}  // namespace emu

// ---- the runtime calls the launchers and the self-test make --------------------------------
#define cudaMalloc(p, n) ::emu::Malloc(reinterpret_cast<void**>(p), (n))
#define cudaFree(p) ::emu::Free(p)
#define cudaMallocAsync(p, n, stream) ((void)(stream), ::emu::Malloc(reinterpret_cast<void**>(p), (n)))
#define cudaFreeAsync(p, stream) ((void)(stream), ::emu::Free(p))
#define cudaMemcpy(d, s, n, k) (std::memcpy((d), (s), (n)), cudaSuccess)
#define cudaMemset(d, v, n) (std::memset((d), (v), (n)), cudaSuccess)
#define cudaDeviceSynchronize() cudaSuccess
#define cudaGetLastError() cudaSuccess
#define cudaGetDeviceCount(p) (*(p) = 1, cudaSuccess)
#define cudaGetErrorString(e) "emulated"
