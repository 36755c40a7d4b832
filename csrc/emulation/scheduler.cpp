// The emulation's GPU: every CUDA thread of a launch is a user-space fiber (ucontext) on the calling OS thread.
//
// A launch runs its blocks in order (seed 0) or in a random order with `resident` blocks alive at once. A fiber runs
// until it returns, waits (warp collective, __syncthreads) or, in a random schedule, reaches a switch point (atomic,
// volatile_load/volatile_store, collective): the host loop below then draws which runnable fiber goes on. A warp
// collective completes when every lane of its mask has arrived (lock-step at the collective, as on a GPU); the lanes
// then leave with their results. Misuse that hangs or is undefined on a GPU (a lane of the mask returned, lanes with
// different masks or collectives, a deadlock) ends the launch with an error that C10_CUDA_KERNEL_LAUNCH_CHECK raises.
//
// Sanitizers (csrc/emulation/sanitize.py): under AddressSanitizer the stack switches are announced
// (__sanitizer_*_switch_fiber); under ThreadSanitizer every CUDA thread is a TSan fiber, switched without
// synchronization, so TSan sees the threads of a launch as concurrent: only atomics order them, as on a GPU (a launch
// orders itself after the host's earlier work and before its later work). The scheduler's own bookkeeping is not
// instrumented (CLOUDS_EMU_UNCHECKED), and each TSan fiber gets a fresh stack.
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CLOUDS_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define CLOUDS_EMU_TSAN 1
#define CLOUDS_EMU_UNCHECKED __attribute__((no_sanitize_thread))
#else
#define CLOUDS_EMU_UNCHECKED
#endif

namespace clouds_emu {

thread_local const ThreadIds* current = nullptr;

namespace {

#if defined(CLOUDS_EMU_ASAN) || defined(CLOUDS_EMU_TSAN)
constexpr size_t kStackBytes = 512 << 10;  // instrumented frames are larger
#else
constexpr size_t kStackBytes = 64 << 10;
#endif
constexpr size_t kGuardBytes = 4096;  // a PROT_NONE page below each stack: an overflow faults instead of corrupting

enum class State : uint8_t { kRunnable, kWaiting, kDone };
enum class Reason : uint8_t { kYield, kWait, kExit };

struct Block;

struct Fiber {
  ThreadIds ids;
  ucontext_t ctx;
  Block* block;
  unsigned warp, lane;
  State state;
  bool at_barrier;  // waits in __syncthreads (else, when waiting, in a warp collective)
  char* stack;      // kStackBytes, from the pool
  uint64_t result;
  void* asan_fake_stack;
  void* tsan_fiber;
};

struct Warp {
  unsigned members = 0;  // lanes that exist (the last warp of a block may be partial)
  unsigned exited = 0;   // lanes that returned
  unsigned arrived = 0;  // lanes waiting in the pending collective
  unsigned mask = 0;     // its mask (kActiveMask: every lane that has not returned)
  Collective op = kActiveMask;
  uint64_t value[32];
  int src[32];
};

struct Block {
  std::vector<Fiber> fibers;  // sized once per launch: the memory the kernel reads threadIdx from is never rewritten
  std::vector<Warp> warps;    // by instrumented code (a ThreadSanitizer report otherwise)
  bool active = false;
  unsigned live = 0, at_barrier = 0;
  int barrier_token = 0;  // ThreadSanitizer: __syncthreads releases and acquires here
};

struct Scheduler {
  int64_t seed = 0;
  unsigned resident = 8;
  uint64_t rng = 0;
  int64_t stats[4] = {0, 0, 0, 0};  // launches, threads, switches, collectives

  ucontext_t host;
  Fiber* running = nullptr;
  Reason reason = Reason::kExit;
  Fiber* woken[1024];  // made runnable by the running fiber (a completed collective or barrier)
  unsigned n_woken = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  char error[512] = "";       // why the running launch failed
  char last_error[768] = "";  // what cudaGetLastError reports
  cudaError_t last_code = cudaSuccess;
  std::vector<char*> free_stacks;
  void* asan_host_fake = nullptr;
  const void* asan_host_bottom = nullptr;
  size_t asan_host_size = 0;
  void* tsan_host = nullptr;
  int launch_token = 0, done_token = 0;  // ThreadSanitizer: host -> launch -> host ordering
};

thread_local Scheduler S;

CLOUDS_EMU_UNCHECKED uint64_t next_random() {  // splitmix64
  uint64_t z = (S.rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---- stacks ----

CLOUDS_EMU_UNCHECKED char* take_stack() {
#ifndef CLOUDS_EMU_TSAN  // under TSan a fresh mapping: munmap forgets the previous owner's accesses
  if (!S.free_stacks.empty()) {
    char* s = S.free_stacks.back();
    S.free_stacks.pop_back();
    return s;
  }
#endif
  void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "clouds emulation: cannot map a %zu KiB fiber stack\n", kStackBytes >> 10);
    std::abort();
  }
  mprotect(m, kGuardBytes, PROT_NONE);
  return static_cast<char*>(m) + kGuardBytes;
}

CLOUDS_EMU_UNCHECKED void give_stack(char* s) {
#ifdef CLOUDS_EMU_TSAN
  munmap(s - kGuardBytes, kStackBytes + kGuardBytes);
#else
#ifdef CLOUDS_EMU_ASAN
  __asan_unpoison_memory_region(s, kStackBytes);  // a fiber abandoned mid-call leaves poisoned redzones
#endif
  S.free_stacks.push_back(s);
#endif
}

// ---- switching ----

CLOUDS_EMU_UNCHECKED void fail(const char* format, ...) {
  if (S.error[0]) return;  // the first error wins
  va_list args;
  va_start(args, format);
  std::vsnprintf(S.error, sizeof(S.error), format, args);
  va_end(args);
}

// From the running fiber back to the host loop; returns when the host runs this fiber again.
CLOUDS_EMU_UNCHECKED void to_host(Fiber* f, Reason reason) {
  S.reason = reason;
#ifdef CLOUDS_EMU_ASAN
  __sanitizer_start_switch_fiber(reason == Reason::kExit ? nullptr : &f->asan_fake_stack, S.asan_host_bottom,
                                 S.asan_host_size);
#endif
#ifdef CLOUDS_EMU_TSAN
  __tsan_switch_to_fiber(S.tsan_host, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&f->ctx, &S.host);
#ifdef CLOUDS_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &S.asan_host_bottom, &S.asan_host_size);
#endif
}

CLOUDS_EMU_UNCHECKED void wake(Fiber* f) {
  f->state = State::kRunnable;
  S.woken[S.n_woken++] = f;
}

// The pending collective of w, if every lane it waits for has arrived: results, then the waiting lanes go on.
CLOUDS_EMU_UNCHECKED bool complete(Warp& w, Block& b, unsigned warp_index, const Fiber* self) {
  const unsigned expect = w.op == kActiveMask ? w.members & ~w.exited : w.mask;
  if (w.arrived == 0 || w.arrived != expect) return false;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(w.arrived >> lane & 1)) continue;
    uint64_t r = 0;
    if (w.op == kActiveMask) {
      r = w.arrived;
    } else if (w.op == kMatchAny) {
      for (unsigned k = 0; k < 32; ++k) r |= uint64_t{(w.arrived >> k & 1) && w.value[k] == w.value[lane]} << k;
    } else if (w.op == kBallot) {
      for (unsigned k = 0; k < 32; ++k) r |= uint64_t{(w.arrived >> k & 1) && w.value[k] != 0} << k;
    } else {  // kShfl: a source lane outside the mask is undefined on a GPU; here the lane keeps its value
      r = (w.arrived >> w.src[lane] & 1) ? w.value[w.src[lane]] : w.value[lane];
    }
    Fiber& f = b.fibers[warp_index * 32 + lane];
    f.result = r;
    if (&f != self) wake(&f);
  }
  w.arrived = 0;
  return true;
}

// ---- the fiber's side ----

CLOUDS_EMU_UNCHECKED void release_barrier(Block& b) {
  for (Fiber& g : b.fibers)
    if (g.state == State::kWaiting && g.at_barrier) {
      g.at_barrier = false;
      wake(&g);
    }
  b.at_barrier = 0;
}

CLOUDS_EMU_UNCHECKED void thread_exit(Fiber* f) {
  Block& b = *f->block;
  Warp& w = b.warps[f->warp];
  f->state = State::kDone;
  w.exited |= 1u << f->lane;
  --b.live;
  if (w.arrived && w.op != kActiveMask && (w.mask >> f->lane & 1))
    fail("lane %u of warp %u (block %u) returned while lanes 0x%08x wait for it in a warp collective with mask "
         "0x%08x (a hang on a GPU)", f->lane, f->warp, f->ids.block_idx.x, w.arrived, w.mask);
  complete(w, b, f->warp, f);
  if (b.at_barrier && b.at_barrier == b.live) release_barrier(b);
}

CLOUDS_EMU_UNCHECKED void entry() {
  Fiber* f = S.running;
#ifdef CLOUDS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &S.asan_host_bottom, &S.asan_host_size);
#endif
#ifdef CLOUDS_EMU_TSAN
  __tsan_acquire(&S.launch_token);
#endif
  S.body(S.arg);
#ifdef CLOUDS_EMU_TSAN
  __tsan_release(&S.done_token);
#endif
  thread_exit(f);
  to_host(f, Reason::kExit);  // never resumed
}

Fiber* running_fiber(const char* what) {
  if (!S.running) {
    std::fprintf(stderr, "clouds emulation: %s called outside a kernel\n", what);
    std::abort();
  }
  return S.running;
}

}  // namespace

CLOUDS_EMU_UNCHECKED void switch_point() {
  if (S.seed == 0 || !S.running) return;
  ++S.stats[2];
  to_host(S.running, Reason::kYield);
}

CLOUDS_EMU_UNCHECKED uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int src_lane) {
  switch_point();
  Fiber* f = running_fiber("a warp collective");
  Block& b = *f->block;
  Warp& w = b.warps[f->warp];
  const unsigned me = 1u << f->lane;
  ++S.stats[3];
  if (op == kActiveMask) {
    mask = w.members & ~w.exited;
  } else if (!(mask & me) || (mask & ~w.members) || (mask & w.exited)) {
    fail("warp %u (block %u), lane %u: mask 0x%08x must hold the calling lane and only lanes that exist and have "
         "not returned (0x%08x)", f->warp, f->ids.block_idx.x, f->lane, mask, w.members & ~w.exited);
    to_host(f, Reason::kWait);
  }
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
  } else if (w.op != op || (op != kActiveMask && w.mask != mask)) {
    fail("warp %u (block %u): lane %u called collective %d with mask 0x%08x while lanes 0x%08x wait in collective %d "
         "with mask 0x%08x (undefined on a GPU)", f->warp, f->ids.block_idx.x, f->lane, op, mask, w.arrived, w.op,
         w.mask);
    to_host(f, Reason::kWait);
  }
  w.value[f->lane] = value;
  w.src[f->lane] = src_lane;
  w.arrived |= me;
  if (!complete(w, b, f->warp, f)) {
    f->state = State::kWaiting;
    f->result = 0;
    to_host(f, Reason::kWait);
  }
  return f->result;
}

CLOUDS_EMU_UNCHECKED void sync_threads() {
  switch_point();
  Fiber* f = running_fiber("__syncthreads");
  Block& b = *f->block;
#ifdef CLOUDS_EMU_TSAN
  __tsan_release(&b.barrier_token);
#endif
  if (++b.at_barrier == b.live) {
    release_barrier(b);
  } else {
    f->state = State::kWaiting;
    f->at_barrier = true;
    to_host(f, Reason::kWait);
  }
#ifdef CLOUDS_EMU_TSAN
  __tsan_acquire(&b.barrier_token);
#endif
}

// ---- the host's side ----

namespace {

CLOUDS_EMU_UNCHECKED void start_block(Block& b, uint64_t linear, dim3 grid, dim3 block) {
  const unsigned n = block.x * block.y * block.z;
  if (b.fibers.size() != n) b.fibers.resize(n);
  b.warps.assign((n + 31) / 32, Warp{});
  b.active = true;
  b.live = n;
  b.at_barrier = 0;
  const uint3 bid{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                  static_cast<unsigned>(linear / (uint64_t{grid.x} * grid.y))};
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.ids = {{t % block.x, t / block.x % block.y, t / (block.x * block.y)}, bid, block, grid};
    f.block = &b;
    f.warp = t / 32;
    f.lane = t % 32;
    f.state = State::kRunnable;
    f.at_barrier = false;
    f.stack = take_stack();
    f.result = 0;
    f.asan_fake_stack = nullptr;
    b.warps[f.warp].members |= 1u << f.lane;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, entry, 0);
#ifdef CLOUDS_EMU_TSAN
    f.tsan_fiber = __tsan_create_fiber(0);
#endif
  }
  S.stats[1] += n;
}

CLOUDS_EMU_UNCHECKED void end_block(Block& b) {
  for (Fiber& f : b.fibers) {
    give_stack(f.stack);
#ifdef CLOUDS_EMU_TSAN
    __tsan_destroy_fiber(f.tsan_fiber);
#endif
  }
  b.active = false;
}

CLOUDS_EMU_UNCHECKED void run(Fiber* f) {
  S.running = f;
  current = &f->ids;
#ifdef CLOUDS_EMU_ASAN
  __sanitizer_start_switch_fiber(&S.asan_host_fake, f->stack, kStackBytes);
#endif
#ifdef CLOUDS_EMU_TSAN
  __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&S.host, &f->ctx);
#ifdef CLOUDS_EMU_ASAN
  __sanitizer_finish_switch_fiber(S.asan_host_fake, nullptr, nullptr);
#endif
  S.running = nullptr;
  current = nullptr;
}

CLOUDS_EMU_UNCHECKED bool valid_config(dim3 grid, dim3 block) {
  return grid.x >= 1 && grid.x <= 0x7FFFFFFFu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 &&
         block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
         uint64_t{block.x} * block.y * block.z <= 1024;
}

}  // namespace

CLOUDS_EMU_UNCHECKED void launch(dim3 grid, dim3 block, const char* kernel, void (*body)(void*), void* arg) {
  if (S.running) {
    std::fprintf(stderr, "clouds emulation: %s launched from a kernel (dynamic parallelism is not emulated)\n", kernel);
    std::abort();
  }
  ++S.stats[0];
  if (!valid_config(grid, block)) {
    if (S.last_code == cudaSuccess) {
      S.last_code = cudaErrorInvalidConfiguration;
      std::snprintf(S.last_error, sizeof(S.last_error),
                    "invalid configuration argument (emulated launch of %s with grid (%u, %u, %u), block (%u, %u, %u))",
                    kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z);
    }
    return;
  }
#ifdef CLOUDS_EMU_TSAN
  S.tsan_host = __tsan_get_current_fiber();
  __tsan_release(&S.launch_token);
#endif
  S.body = body;
  S.arg = arg;
  S.error[0] = '\0';
  const bool random = S.seed != 0;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (random) {  // a random order of the blocks
    order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    for (uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
  }
  const size_t slots = random ? std::min<uint64_t>(S.resident, blocks) : 1;
  std::vector<std::unique_ptr<Block>> resident(slots);
  for (auto& b : resident) b = std::make_unique<Block>();
  std::vector<Fiber*> runnable;
  size_t head = 0;  // in order: runnable[head..] is a queue
  uint64_t next = 0, live_blocks = 0;

  for (size_t s = 0; s < slots; ++s, ++next, ++live_blocks) {
    start_block(*resident[s], random ? order[next] : next, grid, block);
    for (Fiber& f : resident[s]->fibers) runnable.push_back(&f);
  }
  while (live_blocks > 0 && !S.error[0]) {
    if (head == runnable.size()) {
      fail("deadlock in %s: %llu blocks have threads that wait at a warp collective or __syncthreads that cannot "
           "complete", kernel, static_cast<unsigned long long>(live_blocks));
      break;
    }
    Fiber* f;
    if (random) {
      const size_t k = head + next_random() % (runnable.size() - head);
      f = runnable[k];
      runnable[k] = runnable.back();
      runnable.pop_back();
    } else {
      f = runnable[head++];
      if (head == runnable.size()) runnable.clear(), head = 0;
    }
    S.n_woken = 0;
    run(f);
    if (S.reason == Reason::kYield) runnable.push_back(f);
    runnable.insert(runnable.end(), S.woken, S.woken + S.n_woken);
    Block& b = *f->block;
    if (S.reason == Reason::kExit && b.live == 0) {  // the block is done: the next one takes its slot
      end_block(b);
      --live_blocks;
      if (next < blocks) {
        start_block(b, random ? order[next] : next, grid, block);
        ++next;
        ++live_blocks;
        for (Fiber& g : b.fibers) runnable.push_back(&g);
      }
    }
  }
  if (S.error[0]) {  // abandon the threads still alive
    for (auto& b : resident)
      if (b->active) end_block(*b);
    if (S.last_code == cudaSuccess) {
      S.last_code = cudaErrorLaunchFailure;
      std::snprintf(S.last_error, sizeof(S.last_error), "unspecified launch failure (emulated launch of %s: %s)",
                    kernel, S.error);
    }
  }
#ifdef CLOUDS_EMU_TSAN
  __tsan_acquire(&S.done_token);
#endif
}

CLOUDS_EMU_UNCHECKED cudaError_t last_error(const char** message, bool clear) {
  const cudaError_t code = S.last_code;
  if (message) *message = code == cudaSuccess ? "no error" : S.last_error;
  if (clear) S.last_code = cudaSuccess;  // the message stays readable until the next error
  return code;
}

void set_schedule(int64_t seed, int64_t resident_blocks) {
  S.seed = seed;
  S.rng = static_cast<uint64_t>(seed);
  S.resident = static_cast<unsigned>(std::clamp<int64_t>(resident_blocks, 1, 64));
  std::fill(S.stats, S.stats + 4, 0);
}

void get_stats(int64_t out[4]) { std::copy(S.stats, S.stats + 4, out); }

}  // namespace clouds_emu
