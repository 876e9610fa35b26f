// Label-map clean-up of the elements partition (paper 001 Algorithm 2, last step), shared declarations.
//
// For a label map L [H, W] (element ids 0..N-1, -1 = dropped) the op computes, for every element at once:
//   1. a 3x3 binary opening of each element's pixel set, `opening` iterations (pixels outside the image
//      count as background, as scipy's binary_erosion(border_value=0) on the element's bounding box),
//   2. the 4-connected pieces of what is left (two pixels connect when both survive and share a label),
//   3. the largest piece of each element (ties: the piece whose first pixel comes first in raster order);
//      every other pixel becomes -1,
// and the statistics of the result: stats [N, 7] int64 = (count, sum of columns, sum of rows, x0, y0, x1,
// y1), box inclusive, (0, 0, 0, -1, -1, -1, -1) for an element with no pixel left.
//
// The oracle is the per-element scipy path (kernels/cleanup.py, clean_labels_reference): equal label maps.
#pragma once

#include <cstdint>

namespace editrt_native {

constexpr int64_t kStatsColumns = 7;  // count, sum_x, sum_y, x0, y0, x1, y1

// CPU clean-up (cleanup_host.cpp). labels L [H, W] row-major; writes out O [H, W] and stats S [N, 7].
// Returns -1, or the index of the first pixel whose label is outside [-1, N) (then O and S are undefined).
int64_t cleanup_labels_host(const int64_t* L, int H, int W, int N, int opening, int64_t* O, int64_t* S);

}  // namespace editrt_native

#ifdef EDITRT_WITH_CUDA
#include <cuda_runtime_api.h>

namespace editrt_native {

// Scratch the CUDA launcher needs, all device memory of H*W (masks, parent, size) or N (best) entries.
struct CleanupCudaBuffers {
  uint8_t* mask_a;          // [H*W]
  uint8_t* mask_b;          // [H*W]
  int32_t* parent;          // [H*W] union-find forest, then each pixel's root
  int32_t* piece_size;      // [H*W] zeroed by the launcher; pixel count of the piece rooted there
  unsigned long long* best; // [N] zeroed by the launcher; (size << 32) | ~root of each element's largest piece
};

// labels: [H, W] int64 contiguous on the device, values in [-1, N) (checked by the caller).
// out: [H, W] int64; stats: [N, 7] int64. Everything is enqueued on `stream`; nothing is synchronised.
void cleanup_labels_cuda_launch(const int64_t* labels, int64_t* out, int64_t* stats, int H, int W, int N,
                                int opening, const CleanupCudaBuffers& buffers, cudaStream_t stream);

}  // namespace editrt_native
#endif
