// CUDA implementation of the label-map clean-up (see cleanup.h for what it computes).
//
// Plain CUDA, no torch headers (fast to compile); cleanup_cuda.cpp allocates and checks. One thread per
// pixel, 32 x 8 blocks (a warp is 32 consecutive pixels of a row), everything on the caller's stream:
//   erode / dilate   one kernel per 3x3 iteration, the same label-aware rules as the CPU code;
//   pieces           union-find with atomicMin linking (Playne & Hawick, "A new algorithm for parallel
//                    connected-component labelling on GPUs", 2018): every pixel starts as its own root,
//                    `merge` joins it to its left and upper neighbour of the same label, always hanging the
//                    larger root under the smaller, so each piece ends rooted at its first pixel in raster
//                    order; `compress` points every pixel at its root. Long snakes and spirals need no
//                    iteration count: a union completes through the atomics whatever the path length.
//   sizes            one atomicAdd per surviving pixel on its root's counter;
//   largest          per root one 64-bit atomicMax of (size << 32) | (2^32 - 1 - root) into its element's
//                    slot: the largest piece wins, and among equal sizes the smallest root (the first piece).
//   output + stats   labels, then counts / sums / boxes with warp-aggregated atomics (lanes holding the same
//                    element reduce with __reduce_*_sync, one lane per element and warp does the atomics).
#include <cuda_runtime.h>

#include <cstdint>

#include "cleanup.h"

namespace editrt_native {
namespace {

constexpr int kBlockX = 32;
constexpr int kBlockY = 8;

__global__ void init_mask_kernel(const int64_t* __restrict__ L, uint8_t* __restrict__ keep, int P) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < P) keep[p] = L[p] >= 0;
}

__global__ void erode_kernel(const int64_t* __restrict__ L, const uint8_t* __restrict__ in,
                             uint8_t* __restrict__ out, int H, int W) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  if (i >= H || j >= W) return;
  const int p = i * W + j;
  uint8_t v = 0;
  if (i > 0 && i < H - 1 && j > 0 && j < W - 1) {
    const int64_t l = L[p];
    v = 1;
    for (int di = -1; di <= 1; ++di) {
      for (int dj = -1; dj <= 1; ++dj) {
        const int q = p + di * W + dj;
        v &= in[q] & (L[q] == l);
      }
    }
  }
  out[p] = v;
}

__global__ void dilate_kernel(const int64_t* __restrict__ L, const uint8_t* __restrict__ in,
                              uint8_t* __restrict__ out, int H, int W) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  if (i >= H || j >= W) return;
  const int p = i * W + j;
  const int64_t l = L[p];
  uint8_t v = 0;
  if (l >= 0) {
    for (int di = -1; di <= 1; ++di) {
      const int ii = i + di;
      if (ii < 0 || ii >= H) continue;
      for (int dj = -1; dj <= 1; ++dj) {
        const int jj = j + dj;
        if (jj < 0 || jj >= W) continue;
        const int q = ii * W + jj;
        v |= in[q] & (L[q] == l);
      }
    }
  }
  out[p] = v;
}

// Parents only ever decrease, so a stale read still lies on the path to the current root.
__device__ __forceinline__ int find_root(const volatile int32_t* parent, int x) {
  int next = parent[x];
  while (next != x) {
    x = next;
    next = parent[x];
  }
  return x;
}

__device__ void unite(int32_t* parent, int a, int b) {
  while (true) {
    a = find_root(parent, a);
    b = find_root(parent, b);
    if (a == b) return;
    if (a > b) {
      const int t = a;
      a = b;
      b = t;
    }
    // b is (was) a root: hang it under a unless another thread re-parented it first, then retry.
    const int old = atomicMin(&parent[b], a);
    if (old == b) return;
    b = old;
  }
}

__global__ void init_parent_kernel(int32_t* __restrict__ parent, int P) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < P) parent[p] = p;
}

__global__ void merge_kernel(const int64_t* __restrict__ L, const uint8_t* __restrict__ keep, int32_t* parent,
                             int H, int W) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  if (i >= H || j >= W) return;
  const int p = i * W + j;
  if (!keep[p]) return;
  const int64_t l = L[p];
  if (j > 0 && keep[p - 1] && L[p - 1] == l) unite(parent, p - 1, p);
  if (i > 0 && keep[p - W] && L[p - W] == l) unite(parent, p - W, p);
}

__global__ void compress_and_count_kernel(const uint8_t* __restrict__ keep, int32_t* parent,
                                          int32_t* __restrict__ piece_size, int P) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= P || !keep[p]) return;
  const int r = find_root(parent, p);
  parent[p] = r;
  atomicAdd(&piece_size[r], 1);
}

__global__ void largest_kernel(const int64_t* __restrict__ L, const uint8_t* __restrict__ keep,
                               const int32_t* __restrict__ parent, const int32_t* __restrict__ piece_size,
                               unsigned long long* __restrict__ best, int P) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= P || !keep[r] || parent[r] != r) return;
  const unsigned long long key = (static_cast<unsigned long long>(piece_size[r]) << 32) |
                                 static_cast<unsigned long long>(0xFFFFFFFFu - static_cast<uint32_t>(r));
  atomicMax(&best[L[r]], key);
}

__global__ void init_stats_kernel(int64_t* __restrict__ stats, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  int64_t* s = stats + 7 * static_cast<int64_t>(n);
  s[0] = s[1] = s[2] = 0;
  s[3] = s[4] = 0x7FFFFFFFFFFFFFFFLL;
  s[5] = s[6] = -1;
}

__global__ void output_kernel(const int64_t* __restrict__ L, const uint8_t* __restrict__ keep,
                              const int32_t* __restrict__ parent, const unsigned long long* __restrict__ best,
                              int64_t* __restrict__ out, int64_t* __restrict__ stats, int H, int W) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  const bool inside = i < H && j < W;
  int element = -1;
  if (inside) {
    const int p = i * W + j;
    const int64_t l = L[p];
    if (keep[p]) {
      const int best_root = static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(best[l] & 0xFFFFFFFFull));
      if (parent[p] == best_root) element = static_cast<int>(l);
    }
    out[p] = element;
  }
  // Warp-aggregated statistics: every lane takes part (no early return above).
  const unsigned group = __match_any_sync(0xFFFFFFFFu, element);
  if (element < 0) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned count = __reduce_add_sync(group, 1u);
  const unsigned sum_x = __reduce_add_sync(group, static_cast<unsigned>(j));
  const unsigned sum_y = __reduce_add_sync(group, static_cast<unsigned>(i));
  const unsigned min_x = __reduce_min_sync(group, static_cast<unsigned>(j));
  const unsigned min_y = __reduce_min_sync(group, static_cast<unsigned>(i));
  const unsigned max_x = __reduce_max_sync(group, static_cast<unsigned>(j));
  const unsigned max_y = __reduce_max_sync(group, static_cast<unsigned>(i));
  const bool leader = (threadIdx.x + blockDim.x * threadIdx.y) % 32 == static_cast<unsigned>(__ffs(group) - 1);
#else
  // Before sm_80 (no __reduce_*_sync): one lane per pixel does its own atomics.
  const unsigned count = 1, sum_x = j, sum_y = i, min_x = j, min_y = i, max_x = j, max_y = i;
  const bool leader = true;
#endif
  if (!leader) return;
  int64_t* s = stats + 7 * static_cast<int64_t>(element);
  atomicAdd(reinterpret_cast<unsigned long long*>(s + 0), static_cast<unsigned long long>(count));
  atomicAdd(reinterpret_cast<unsigned long long*>(s + 1), static_cast<unsigned long long>(sum_x));
  atomicAdd(reinterpret_cast<unsigned long long*>(s + 2), static_cast<unsigned long long>(sum_y));
  atomicMin(reinterpret_cast<long long*>(s + 3), static_cast<long long>(min_x));
  atomicMin(reinterpret_cast<long long*>(s + 4), static_cast<long long>(min_y));
  atomicMax(reinterpret_cast<long long*>(s + 5), static_cast<long long>(max_x));
  atomicMax(reinterpret_cast<long long*>(s + 6), static_cast<long long>(max_y));
}

__global__ void finish_stats_kernel(int64_t* __restrict__ stats, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  int64_t* s = stats + 7 * static_cast<int64_t>(n);
  if (s[0] == 0) s[3] = s[4] = -1;
}

inline unsigned blocks_for(int64_t count, int threads) { return static_cast<unsigned>((count + threads - 1) / threads); }

}  // namespace

void cleanup_labels_cuda_launch(const int64_t* labels, int64_t* out, int64_t* stats, int H, int W, int N,
                                int opening, const CleanupCudaBuffers& b, cudaStream_t stream) {
  const int P = H * W;
  constexpr int kThreads = 256;
  if (N > 0) init_stats_kernel<<<blocks_for(N, kThreads), kThreads, 0, stream>>>(stats, N);
  if (P > 0) {
    const dim3 block(kBlockX, kBlockY);
    const dim3 grid(blocks_for(W, kBlockX), blocks_for(H, kBlockY));
    const unsigned flat = blocks_for(P, kThreads);

    // 1. Opening, ping-ponging between the two masks.
    uint8_t* keep = b.mask_a;
    uint8_t* spare = b.mask_b;
    init_mask_kernel<<<flat, kThreads, 0, stream>>>(labels, keep, P);
    for (int k = 0; k < opening; ++k) {
      erode_kernel<<<grid, block, 0, stream>>>(labels, keep, spare, H, W);
      uint8_t* t = keep; keep = spare; spare = t;
    }
    for (int k = 0; k < opening; ++k) {
      dilate_kernel<<<grid, block, 0, stream>>>(labels, keep, spare, H, W);
      uint8_t* t = keep; keep = spare; spare = t;
    }

    // 2. Pieces and their sizes.
    cudaMemsetAsync(b.piece_size, 0, sizeof(int32_t) * static_cast<size_t>(P), stream);
    if (N > 0) cudaMemsetAsync(b.best, 0, sizeof(unsigned long long) * static_cast<size_t>(N), stream);
    init_parent_kernel<<<flat, kThreads, 0, stream>>>(b.parent, P);
    merge_kernel<<<grid, block, 0, stream>>>(labels, keep, b.parent, H, W);
    compress_and_count_kernel<<<flat, kThreads, 0, stream>>>(keep, b.parent, b.piece_size, P);

    // 3. Each element's largest piece, 4. labels and statistics.
    largest_kernel<<<flat, kThreads, 0, stream>>>(labels, keep, b.parent, b.piece_size, b.best, P);
    output_kernel<<<grid, block, 0, stream>>>(labels, keep, b.parent, b.best, out, stats, H, W);
  }
  if (N > 0) finish_stats_kernel<<<blocks_for(N, kThreads), kThreads, 0, stream>>>(stats, N);
}

}  // namespace editrt_native
