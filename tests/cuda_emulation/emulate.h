// Runs a rewritten kernel launch (kernel<<<blocks, threads, 0, stream>>>(args) becomes
// emulate_launch(blocks, threads, [&] { kernel(args); })) one thread at a time.
#pragma once
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
