// CPU implementation of the label-map clean-up (see cleanup.h for what it computes): plain C++17, no torch
// header, so it compiles in seconds and with the vectoriser on; cleanup_cpu.cpp registers it as the op.
//
// CPU algorithm, O(H*W) byte passes plus union-find over row runs; its cost does not grow with N:
//   opening   labels are read once into two byte maps (same label as the right / lower neighbour); then per
//             iteration a separable label-aware erosion (row triple, then column triple: a pixel stays when
//             its whole 3x3 window is inside the image, still set, and of its label), then as many
//             label-aware dilations (a pixel comes back when a 3x3 neighbour of its label is set). Why
//             per-element scipy on a bounding-box crop gives the same sets: the crop only adds background
//             around the box, and every eroded / re-dilated set stays inside its element.
//   pieces    horizontal runs of surviving pixels of one label, numbered in raster order; runs of
//             consecutive rows that share a column and a label are joined by union-find, a root always
//             linked under the smaller index, so each piece's root is its first run in raster order (the
//             order ndimage.label numbers pieces in).
//   largest   roots visited in raster order, a strictly larger piece replaces the element's best: ties keep
//             the first piece, as scipy's argmax over ndimage.label's numbering does.
//
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cleanup.h"

namespace editrt_native {
namespace {

// Neighbour relations, computed once from the int64 labels so every later pass reads bytes:
// same_right[p] = p and its right neighbour exist and share a label; same_down[p] likewise with the pixel below.
struct Neighbours {
  std::vector<uint8_t> same_right, same_down;
};

// One label-aware 3x3 erosion: out[p] = p's 3x3 window lies in the image, is set in `in`, and has p's label.
// Separable: a row triple of one label (row pass), then three such triples stacked with equal labels.
void erode(const Neighbours& nb, const uint8_t* __restrict__ in, uint8_t* __restrict__ row,
           uint8_t* __restrict__ out, int H, int W) {
  const uint8_t* __restrict__ sr = nb.same_right.data();
  const uint8_t* __restrict__ sd = nb.same_down.data();
  for (int i = 0; i < H; ++i) {
    const int64_t p0 = static_cast<int64_t>(i) * W;
    const uint8_t* e = in + p0;
    const uint8_t* r_ = sr + p0;
    uint8_t* r = row + p0;
    r[0] = 0;
    r[W - 1] = 0;
    for (int j = 1; j < W - 1; ++j) r[j] = e[j - 1] & e[j] & e[j + 1] & r_[j - 1] & r_[j];
  }
  std::fill(out, out + W, 0);
  std::fill(out + static_cast<int64_t>(H - 1) * W, out + static_cast<int64_t>(H) * W, 0);
  for (int i = 1; i < H - 1; ++i) {
    const int64_t p0 = static_cast<int64_t>(i) * W;
    const uint8_t* r = row + p0;
    const uint8_t* d_ = sd + p0;
    uint8_t* o = out + p0;
    for (int j = 0; j < W; ++j) o[j] = r[j - W] & r[j] & r[j + W] & d_[j - W] & d_[j];
  }
}

// One label-aware 3x3 dilation: out[p] = some pixel of p's label in p's 3x3 window is set in `in`.
// Separable as well: every intermediate set stays inside its element (see the file comment).
void dilate(const Neighbours& nb, const uint8_t* __restrict__ in, uint8_t* __restrict__ row,
            uint8_t* __restrict__ out, int H, int W) {
  const uint8_t* __restrict__ sr = nb.same_right.data();
  const uint8_t* __restrict__ sd = nb.same_down.data();
  for (int i = 0; i < H; ++i) {
    const int64_t p0 = static_cast<int64_t>(i) * W;
    const uint8_t* d = in + p0;
    const uint8_t* r_ = sr + p0;
    uint8_t* r = row + p0;
    r[0] = d[0] | (W > 1 ? d[1] & r_[0] : 0);
    for (int j = 1; j < W - 1; ++j) r[j] = d[j] | (d[j - 1] & r_[j - 1]) | (d[j + 1] & r_[j]);
    if (W > 1) r[W - 1] = d[W - 1] | (d[W - 2] & r_[W - 2]);
  }
  for (int i = 0; i < H; ++i) {
    const int64_t p0 = static_cast<int64_t>(i) * W;
    const uint8_t* r = row + p0;
    const uint8_t* d_ = sd + p0;
    uint8_t* o = out + p0;
    if (i > 0 && i < H - 1) {
      for (int j = 0; j < W; ++j) o[j] = r[j] | (r[j - W] & d_[j - W]) | (r[j + W] & d_[j]);
    } else {
      for (int j = 0; j < W; ++j) {
        uint8_t v = r[j];
        if (i > 0) v |= r[j - W] & d_[j - W];
        if (i < H - 1) v |= r[j + W] & d_[j];
        o[j] = v;
      }
    }
  }
}

// A horizontal run of surviving pixels of one label: the unit the piece search works on.
struct Run {
  int32_t row, start, end;  // columns [start, end)
  int32_t parent;           // union-find over run indices (runs are in raster order)
};

inline int32_t find_root(std::vector<Run>& runs, int32_t x) {
  while (runs[x].parent != x) {
    runs[x].parent = runs[runs[x].parent].parent;  // path halving
    x = runs[x].parent;
  }
  return x;
}

// Joins two pieces; the larger root goes under the smaller, so a root is its piece's first run in raster
// order, which holds the piece's first pixel.
inline void unite(std::vector<Run>& runs, int32_t a, int32_t b) {
  a = find_root(runs, a);
  b = find_root(runs, b);
  if (a < b) {
    runs[b].parent = a;
  } else if (b < a) {
    runs[a].parent = b;
  }
}

}  // namespace

int64_t cleanup_labels_host(const int64_t* L, int H, int W, int N, int opening, int64_t* O, int64_t* S) {
  const int64_t P = static_cast<int64_t>(H) * W;
  for (int n = 0; n < N; ++n) {
    int64_t* s = S + n * kStatsColumns;
    s[0] = s[1] = s[2] = 0;
    s[3] = s[4] = s[5] = s[6] = -1;
  }
  if (P == 0) return -1;

  // 0. Range check and the neighbour relations, one pass over the labels.
  Neighbours nb{std::vector<uint8_t>(P), std::vector<uint8_t>(P)};
  std::vector<uint8_t> keep(P), row(P), other(P);
  int64_t out_of_range = -1;
  for (int i = 0; i < H; ++i) {
    const int64_t p0 = static_cast<int64_t>(i) * W;
    const int64_t* l = L + p0;
    uint8_t* k = keep.data() + p0;
    uint8_t* sr = nb.same_right.data() + p0;
    uint8_t* sd = nb.same_down.data() + p0;
    uint8_t bad = 0;
    for (int j = 0; j < W; ++j) {
      bad |= (l[j] < -1) | (l[j] >= N);
      k[j] = l[j] >= 0;
    }
    if (bad && out_of_range < 0) {
      for (int j = 0; j < W && out_of_range < 0; ++j) {
        if (l[j] < -1 || l[j] >= N) out_of_range = p0 + j;
      }
    }
    for (int j = 0; j < W - 1; ++j) sr[j] = (l[j] == l[j + 1]) & (l[j] >= 0);
    sr[W - 1] = 0;
    if (i < H - 1) {
      for (int j = 0; j < W; ++j) sd[j] = (l[j] == l[j + W]) & (l[j] >= 0);
    } else {
      std::fill(sd, sd + W, 0);
    }
  }
  if (out_of_range >= 0) return out_of_range;

  // 1. Opening: `keep` ends as the union of every element's opened set.
  for (int k = 0; k < opening; ++k) {
    erode(nb, keep.data(), row.data(), other.data(), H, W);
    keep.swap(other);
  }
  for (int k = 0; k < opening; ++k) {
    dilate(nb, keep.data(), row.data(), other.data(), H, W);
    keep.swap(other);
  }

  // 2. Pieces: runs of surviving pixels of one label, in raster order; runs of consecutive rows that share
  //    a column and a label are joined (4-connectivity).
  std::vector<Run> runs;
  runs.reserve(static_cast<size_t>(H) * 8);
  std::vector<int32_t> row_first(H + 1);
  for (int i = 0; i < H; ++i) {
    row_first[i] = static_cast<int32_t>(runs.size());
    const int64_t p0 = static_cast<int64_t>(i) * W;
    const uint8_t* k = keep.data() + p0;
    const uint8_t* sr = nb.same_right.data() + p0;
    int j = 0;
    while (j < W) {
      if (!k[j]) {
        ++j;
        continue;
      }
      const int start = j;
      while (j + 1 < W && k[j + 1] && sr[j]) ++j;
      const int32_t id = static_cast<int32_t>(runs.size());
      runs.push_back({i, start, j + 1, id});
      ++j;
    }
  }
  row_first[H] = static_cast<int32_t>(runs.size());
  for (int i = 1; i < H; ++i) {
    int32_t a = row_first[i - 1], b = row_first[i];
    const int32_t a_end = row_first[i], b_end = row_first[i + 1];
    const int64_t* up = L + static_cast<int64_t>(i - 1) * W;
    const int64_t* here = L + static_cast<int64_t>(i) * W;
    while (a < a_end && b < b_end) {
      const Run& ra = runs[a];
      const Run& rb = runs[b];
      if (ra.start < rb.end && rb.start < ra.end && up[ra.start] == here[rb.start]) unite(runs, a, b);
      if (ra.end < rb.end) {
        ++a;
      } else {
        ++b;
      }
    }
  }

  // 3. Each element's largest piece: roots in raster order, strictly larger wins (ties: the first piece).
  const int32_t R = static_cast<int32_t>(runs.size());
  std::vector<int64_t> piece_size(R, 0);
  for (int32_t r = 0; r < R; ++r) {
    // parent <= index, so in index order the parent already points at its root.
    runs[r].parent = runs[runs[r].parent].parent;
    piece_size[runs[r].parent] += runs[r].end - runs[r].start;
  }
  std::vector<int32_t> best_root(N, -1);
  std::vector<int64_t> best_size(N, 0);
  for (int32_t r = 0; r < R; ++r) {
    if (runs[r].parent != r) continue;
    const int64_t n = L[static_cast<int64_t>(runs[r].row) * W + runs[r].start];
    if (piece_size[r] > best_size[n]) {
      best_size[n] = piece_size[r];
      best_root[n] = r;
    }
  }

  // 4. Output labels and the statistics of what is kept.
  std::fill(O, O + P, -1);
  for (int32_t r = 0; r < R; ++r) {
    const Run& run = runs[r];
    const int64_t p0 = static_cast<int64_t>(run.row) * W;
    const int64_t n = L[p0 + run.start];
    if (run.parent != best_root[n]) continue;
    std::fill(O + p0 + run.start, O + p0 + run.end, n);
    const int64_t length = run.end - run.start;
    int64_t* s = S + n * kStatsColumns;
    const bool first = s[0] == 0;
    s[0] += length;
    s[1] += length * (run.start + run.end - 1) / 2;  // sum of start..end-1
    s[2] += length * run.row;
    s[3] = first ? run.start : std::min<int64_t>(s[3], run.start);
    s[4] = first ? run.row : s[4];  // runs come in raster order: the first row is the top one
    s[5] = std::max<int64_t>(s[5], run.end - 1);
    s[6] = run.row;
  }
  return -1;
}

}  // namespace editrt_native
