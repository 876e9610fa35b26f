// CUDA registration of editrt_native::cleanup_labels: checks, device buffers, launch (cleanup_cuda.cu).
//
// Everything stays on the labels' device and the current stream. The one host synchronisation is the range
// check of the labels (one aminmax, two scalars back): out-of-range ids would index the per-element arrays.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "cleanup.h"

namespace editrt_native {
namespace {

std::tuple<at::Tensor, at::Tensor> cleanup_labels_cuda(const at::Tensor& labels_in, int64_t num_elements,
                                                       int64_t opening) {
  TORCH_CHECK_VALUE(labels_in.dim() == 2, "cleanup_labels: labels must be a 2-D [H, W] label map; got ",
              labels_in.dim(), "-D with shape ", labels_in.sizes());
  TORCH_CHECK_VALUE(labels_in.scalar_type() == at::kLong, "cleanup_labels: labels must be int64; got ",
              labels_in.scalar_type());
  TORCH_CHECK_VALUE(num_elements >= 0 && num_elements < std::numeric_limits<int32_t>::max(),
              "cleanup_labels: num_elements must be in [0, 2^31 - 1); got ", num_elements);
  TORCH_CHECK_VALUE(opening >= 0, "cleanup_labels: opening (3x3 iterations) must be >= 0; got ", opening);
  TORCH_CHECK_VALUE(labels_in.numel() < std::numeric_limits<int32_t>::max(),
              "cleanup_labels: at most 2^31 - 1 pixels; got shape ", labels_in.sizes());
  const c10::cuda::CUDAGuard guard(labels_in.device());
  const at::Tensor labels = labels_in.contiguous();
  const int H = static_cast<int>(labels.size(0));
  const int W = static_cast<int>(labels.size(1));
  const int N = static_cast<int>(num_elements);
  const int64_t P = labels.numel();
  // Grid rows are blocks of 8 rows (65535 at most); warp sums of 32 row / column indices stay in 32 bits.
  TORCH_CHECK_VALUE(H <= 65535 * 8 && W <= (1 << 26), "cleanup_labels (CUDA): at most 524280 rows and 2^26 "
                    "columns; got shape ", labels.sizes());
  if (P > 0) {
    const auto [lo, hi] = at::aminmax(labels);
    const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
    TORCH_CHECK_VALUE(low >= -1 && high < N, "cleanup_labels: labels must lie in [-1, num_elements = ", N,
                "); found values from ", low, " to ", high);
  }

  at::Tensor out = at::empty({H, W}, labels.options());
  at::Tensor stats = at::empty({N, 7}, labels.options());
  const auto bytes = labels.options().dtype(at::kByte);
  const auto ints = labels.options().dtype(at::kInt);
  at::Tensor mask_a = at::empty({P}, bytes), mask_b = at::empty({P}, bytes);
  at::Tensor parent = at::empty({P}, ints), piece_size = at::empty({P}, ints);
  at::Tensor best = at::empty({N}, labels.options());  // unsigned 64-bit keys in int64 storage
  const CleanupCudaBuffers buffers{mask_a.data_ptr<uint8_t>(), mask_b.data_ptr<uint8_t>(),
                                   parent.data_ptr<int32_t>(), piece_size.data_ptr<int32_t>(),
                                   reinterpret_cast<unsigned long long*>(best.data_ptr<int64_t>())};
  cleanup_labels_cuda_launch(labels.data_ptr<int64_t>(), out.data_ptr<int64_t>(), stats.data_ptr<int64_t>(), H,
                             W, N, static_cast<int>(opening), buffers, c10::cuda::getCurrentCUDAStream());
  const cudaError_t launched = cudaGetLastError();
  TORCH_CHECK(launched == cudaSuccess, "cleanup_labels: CUDA launch failed: ", cudaGetErrorString(launched));
  return {out, stats};
}

}  // namespace
}  // namespace editrt_native

TORCH_LIBRARY_IMPL(editrt_native, CUDA, m) { m.impl("cleanup_labels", &editrt_native::cleanup_labels_cuda); }
