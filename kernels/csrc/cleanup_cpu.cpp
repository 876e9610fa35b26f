// The op's schema, its CPU and Meta registrations (the CPU algorithm is cleanup_host.cpp).
//
//   editrt_native::cleanup_labels(Tensor labels, int num_elements, int opening) -> (Tensor labels, Tensor stats)
//
// Input errors are TORCH_CHECK_VALUE: Python sees a ValueError with a one-line message. This file follows the
// C++ standard the installed torch's headers require (C++20 from torch 2.10 on); the algorithm files are C++17.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "cleanup.h"

namespace editrt_native {
namespace {

void check_common(const at::Tensor& labels, int64_t num_elements, int64_t opening) {
  TORCH_CHECK_VALUE(labels.dim() == 2, "cleanup_labels: labels must be a 2-D [H, W] label map; got ", labels.dim(),
              "-D with shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, "cleanup_labels: labels must be int64; got ",
              labels.scalar_type());
  TORCH_CHECK_VALUE(num_elements >= 0 && num_elements < std::numeric_limits<int32_t>::max(),
              "cleanup_labels: num_elements must be in [0, 2^31 - 1); got ", num_elements);
  TORCH_CHECK_VALUE(opening >= 0, "cleanup_labels: opening (3x3 iterations) must be >= 0; got ", opening);
  TORCH_CHECK_VALUE(labels.numel() < std::numeric_limits<int32_t>::max(),
              "cleanup_labels: at most 2^31 - 1 pixels; got shape ", labels.sizes());
}

std::tuple<at::Tensor, at::Tensor> cleanup_labels_cpu(const at::Tensor& labels_in, int64_t num_elements,
                                                      int64_t opening) {
  check_common(labels_in, num_elements, opening);
  TORCH_CHECK(labels_in.device().is_cpu(), "cleanup_labels (CPU): labels must be on the CPU; got ",
              labels_in.device());
  const at::Tensor labels = labels_in.contiguous();
  const int H = static_cast<int>(labels.size(0));
  const int W = static_cast<int>(labels.size(1));
  const int N = static_cast<int>(num_elements);
  const int64_t* L = labels.data_ptr<int64_t>();

  at::Tensor out = at::empty({H, W}, labels.options());
  at::Tensor stats = at::empty({N, kStatsColumns}, labels.options());
  const int64_t bad = cleanup_labels_host(L, H, W, N, static_cast<int>(opening), out.data_ptr<int64_t>(),
                                          stats.data_ptr<int64_t>());
  TORCH_CHECK_VALUE(bad < 0, "cleanup_labels: labels must lie in [-1, num_elements = ", N, "); found ",
                    bad < 0 ? 0 : L[bad], " at row ", bad / W, ", column ", bad % W);
  return {out, stats};
}

// Shapes only (torch.compile, fake tensors): the same checks that need no data.
std::tuple<at::Tensor, at::Tensor> cleanup_labels_meta(const at::Tensor& labels, int64_t num_elements,
                                                       int64_t opening) {
  check_common(labels, num_elements, opening);
  return {at::empty_like(labels, at::MemoryFormat::Contiguous), at::empty({num_elements, kStatsColumns},
                                                                         labels.options())};
}

}  // namespace
}  // namespace editrt_native

TORCH_LIBRARY(editrt_native, m) {
  m.def("cleanup_labels(Tensor labels, int num_elements, int opening) -> (Tensor labels, Tensor stats)");
}

TORCH_LIBRARY_IMPL(editrt_native, CPU, m) { m.impl("cleanup_labels", &editrt_native::cleanup_labels_cpu); }

TORCH_LIBRARY_IMPL(editrt_native, Meta, m) { m.impl("cleanup_labels", &editrt_native::cleanup_labels_meta); }
