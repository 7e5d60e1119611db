// Runs a rewritten kernel launch (kernel<<<blocks, threads, 0, stream>>>(args) becomes
// emulate_launch(blocks, threads, [&] { kernel(args); })) one thread at a time.
// Kernels with __syncthreads (block reductions in __shared__ memory) run through
// emulate_launch_synced: each thread of a block is a fiber (ucontext) that runs until it reaches a
// barrier or returns; once every thread of the block has stopped at the barrier, all resume, in
// thread order. Still one thread at a time and deterministic; a barrier that some threads of the
// block skip (they returned) is reported as an error, as it is undefined behaviour on a GPU.
#pragma once
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "cuda_runtime.h"

template <class Kernel>
void emulate_launch(unsigned blocks, unsigned threads, Kernel kernel) {
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    for (unsigned t = 0; t < threads; ++t) {
      threadIdx.x = t;
      kernel();
    }
  }
}

namespace emulation {
constexpr size_t kFiberStack = 64 * 1024;
struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline const std::function<void()>* body = nullptr;
inline bool in_fiber = false;

inline void fiber_entry() {
  (*body)();
  fibers[threadIdx.x].done = true;  // returns to the scheduler through uc_link
}
}  // namespace emulation

inline void __syncthreads() {
  if (!emulation::in_fiber) return;  // a kernel run by emulate_launch: one thread only, nothing to wait for
  swapcontext(&emulation::fibers[threadIdx.x].context, &emulation::scheduler);
}

template <class Kernel>
void emulate_launch_synced(unsigned blocks, unsigned threads, Kernel kernel) {
  using namespace emulation;
  const std::function<void()> run = kernel;
  body = &run;
  fibers.resize(threads);
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    for (Fiber& f : fibers) {
      f.stack.resize(kFiberStack);
      f.done = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler;
      makecontext(&f.context, fiber_entry, 0);
    }
    for (;;) {  // one round: every thread runs to its next barrier, or to its end
      unsigned finished = 0;
      in_fiber = true;
      for (unsigned t = 0; t < threads; ++t) {
        threadIdx.x = t;
        swapcontext(&scheduler, &fibers[t].context);
        finished += fibers[t].done ? 1 : 0;
      }
      in_fiber = false;
      if (finished == threads) break;
      if (finished != 0) {
        std::fprintf(stderr, "emulate_launch_synced: block %u: %u of %u threads returned while others wait at "
                     "__syncthreads\n", b, finished, threads);
        std::abort();
      }
    }
  }
  body = nullptr;
}
