// CPU implementation of the label-map clean-up (see cleanup.h for what it computes): plain C++17, no torch
// header, so it compiles in seconds and with the vectoriser on; cleanup_cpu.cpp registers it as the op.
//
// Single-threaded on purpose: the scipy path it is benchmarked against (bench row partition-cleanup) runs on
// one core, so the ratio compares like with like, and the op leaves the other cores to the caller.
//
// CPU algorithm, O(H*W) byte passes plus union-find over row runs; its cost does not grow with N:
//   masks     the int64 labels are read once, row by row (range check, then three byte maps: label >= 0,
//             same label as the right neighbour, same label as the lower neighbour); only two rows of
//             labels are ever held, as int16 when N <= 32767 (else int32). Every later per-pixel pass reads
//             bytes, in branch-free loops the compiler vectorises at -O2 (no -march flag: the library runs
//             on other CPUs than it is built on).
//   opening   per iteration a separable label-aware erosion (row triple, then column triple: a pixel stays
//             when its whole 3x3 window is inside the image, still set, and of its label), then as many
//             label-aware dilations (a pixel comes back when a 3x3 neighbour of its label is set). Why
//             per-element scipy on a bounding-box crop gives the same sets: the crop only adds background
//             around the box, and every eroded / re-dilated set stays inside its element.
//   pieces    horizontal runs of surviving pixels of one label, numbered in raster order: each row's byte
//             maps are packed into 64-bit words, word operations mark every run's first and last pixel, and
//             count-trailing-zeros loops list them (no per-pixel branch). Runs of consecutive rows that
//             overlap and share a label are joined by union-find, a root always linked under the smaller
//             index, so each piece's root is its first run in raster order (the order ndimage.label numbers
//             pieces in).
//   largest   roots visited in raster order, a strictly larger piece replaces the element's best: ties keep
//             the first piece, as scipy's argmax over ndimage.label's numbering does.
//   output    a branch-free pass writes every surviving pixel's label (-1 elsewhere); then the runs of the
//             pieces that are not kept (few: small islands) are cleared, and the kept runs make the statistics.
//
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cleanup.h"

namespace editrt_native {
namespace {

// Scratch that is fully written before it is read: no zero-filling (std::vector<uint8_t>(n) would memset).
using Bytes = std::unique_ptr<uint8_t[]>;

// One label-aware 3x3 erosion: out[p] = p's 3x3 window lies in the image, is set in `in`, and has p's label.
// Separable: a row triple of one label (row pass), then three such triples stacked with equal labels.
void erode(const uint8_t* __restrict__ sr, const uint8_t* __restrict__ sd, const uint8_t* __restrict__ in,
           uint8_t* __restrict__ row, uint8_t* __restrict__ out, int H, int W) {
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
void dilate(const uint8_t* __restrict__ sr, const uint8_t* __restrict__ sd, const uint8_t* __restrict__ in,
            uint8_t* __restrict__ row, uint8_t* __restrict__ out, int H, int W) {
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

// Reads the int64 labels row by row: the range check, then the byte maps keep (label >= 0), same_right and
// same_down (the last row of same_down is left to the caller). Labels are compared as T, the narrowest type
// that holds [-1, N): int16 lanes pack to bytes in one step. Returns -1, or the first bad pixel's index.
template <typename T>
int64_t read_labels(const int64_t* L, int H, int W, int N, uint8_t* keep, uint8_t* same_right, uint8_t* same_down) {
  std::vector<T> label_rows(2 * static_cast<size_t>(W) + 2);  // two rows, each with one spare entry
  T* prev = label_rows.data();
  T* cur = label_rows.data() + W + 1;
  const uint32_t n_plus = static_cast<uint32_t>(N);
  for (int i = 0; i < H; ++i) {
    const int64_t p0 = static_cast<int64_t>(i) * W;
    const int64_t* l = L + p0;
    uint32_t bad = 0;
    for (int j = 0; j < W; ++j) {
      const uint64_t v = static_cast<uint64_t>(l[j]);
      const uint32_t lo = static_cast<uint32_t>(v);
      const uint32_t hi = static_cast<uint32_t>(v >> 32);
      bad |= hi ^ static_cast<uint32_t>(static_cast<int32_t>(lo) >> 31);
      bad |= static_cast<uint32_t>(lo + 1u > n_plus);
      cur[j] = static_cast<T>(static_cast<int32_t>(lo));
    }
    if (bad) {
      for (int j = 0; j < W; ++j) {
        if (l[j] < -1 || l[j] >= N) return p0 + j;
      }
    }
    uint8_t* k = keep + p0;
    uint8_t* sr = same_right + p0;
    cur[W] = -1;  // no right neighbour
    if (i > 0) {
      uint8_t* sd = same_down + p0 - W;
      for (int j = 0; j < W; ++j) {
        const uint8_t set = cur[j] >= 0;
        k[j] = set;
        sr[j] = (cur[j] == cur[j + 1]) & set;
        sd[j] = (prev[j] == cur[j]) & (prev[j] >= 0);
      }
    } else {
      for (int j = 0; j < W; ++j) {
        const uint8_t set = cur[j] >= 0;
        k[j] = set;
        sr[j] = (cur[j] == cur[j + 1]) & set;
      }
    }
    std::swap(prev, cur);
  }
  return -1;
}

// Packs a row of 0/1 bytes into bits, pixel j at bit j % 64 of word j / 64; words[W / 64 rounded up] is 0.
inline void pack_bits(const uint8_t* bytes, int W, uint64_t* words) {
  const int n_words = (W + 63) / 64;
  std::fill(words, words + n_words + 1, uint64_t{0});
  const int whole = W / 8;
  for (int g = 0; g < whole; ++g) {
    uint64_t x;
    std::memcpy(&x, bytes + 8 * g, 8);
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x);  // byte 0 of memory in the low byte, as on little-endian machines
#endif
    // bytes b0..b7 in {0, 1} -> the 8-bit number b0 + 2 b1 + ... + 128 b7 in the top byte (no carries)
    const uint64_t packed = (x * 0x0102040810204080ull) >> 56;
    words[g / 8] |= packed << (8 * (g % 8));
  }
  for (int j = 8 * whole; j < W; ++j) words[j / 64] |= static_cast<uint64_t>(bytes[j]) << (j % 64);
}

// Writes the positions of the set bits of words[0, n_words) in increasing order; returns how many.
inline int set_bit_positions(const uint64_t* words, int n_words, int32_t* out) {
  int n = 0;
  for (int w = 0; w < n_words; ++w) {
    uint64_t x = words[w];
    while (x) {
      out[n++] = 64 * w + __builtin_ctzll(x);
      x &= x - 1;
    }
  }
  return n;
}

// A horizontal run of surviving pixels of one label: the unit the piece search works on.
struct Run {
  int32_t start, end;  // columns [start, end)
  int32_t label;
  int32_t parent;  // union-find over run indices (runs are in raster order)
};

inline int32_t find_root(Run* runs, int32_t x) {
  while (runs[x].parent != x) {
    runs[x].parent = runs[runs[x].parent].parent;  // path halving
    x = runs[x].parent;
  }
  return x;
}

// Joins two pieces; the larger root goes under the smaller, so a root is its piece's first run in raster
// order, which holds the piece's first pixel.
inline void unite(Run* runs, int32_t a, int32_t b) {
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

  // 0. Range check and the byte maps, one pass over the labels. A label is valid when its int64 value is an
  //    int32 (high word = sign of the low word) and the low word + 1 lies in [0, N] (unsigned): 32-bit
  //    arithmetic only, which vectorises without 64-bit compares (not in baseline x86-64).
  Bytes keep(new uint8_t[P]), same_right(new uint8_t[P]), same_down(new uint8_t[P]);
  Bytes row(new uint8_t[P]), other(new uint8_t[P]);
  const int64_t bad = N <= 32767 ? read_labels<int16_t>(L, H, W, N, keep.get(), same_right.get(), same_down.get())
                                 : read_labels<int32_t>(L, H, W, N, keep.get(), same_right.get(), same_down.get());
  if (bad >= 0) return bad;
  std::fill(same_down.get() + P - W, same_down.get() + P, 0);
  const uint8_t* sr_all = same_right.get();
  const uint8_t* sd_all = same_down.get();

  // 1. Opening: `keep` ends as the union of every element's opened set.
  for (int k = 0; k < opening; ++k) {
    erode(sr_all, sd_all, keep.get(), row.get(), other.get(), H, W);
    keep.swap(other);
  }
  for (int k = 0; k < opening; ++k) {
    dilate(sr_all, sd_all, keep.get(), row.get(), other.get(), H, W);
    keep.swap(other);
  }

  // 2. Pieces: runs of surviving pixels of one label, in raster order; runs of consecutive rows that overlap
  //    and share a label are joined (4-connectivity: both pixels of the shared column survive).
  // At most W runs a row (one-pixel runs of alternating labels); only the filled part is ever touched.
  const int64_t max_runs = P;
  std::unique_ptr<Run[]> run_store(new Run[max_runs]);
  Run* rs = run_store.get();
  int32_t n_total = 0;
  std::vector<int32_t> row_first(static_cast<size_t>(H) + 1);
  const int words = (W + 63) / 64;
  std::vector<uint64_t> bits(4 * static_cast<size_t>(words) + 2, 0);
  uint64_t* K = bits.data();               // pixel survives
  uint64_t* J = K + words + 1;             // pixel and its right neighbour both survive, same label; J[words] = 0
  uint64_t* first = J + words + 1;         // a run's first pixel
  uint64_t* last = first + words;          // a run's last pixel
  std::vector<int32_t> starts(W), ends(W);
  for (int i = 0; i < H; ++i) {
    row_first[i] = n_total;
    const int64_t p0 = static_cast<int64_t>(i) * W;
    pack_bits(keep.get() + p0, W, K);
    pack_bits(sr_all + p0, W, J);
    for (int w = 0; w < words; ++w) J[w] &= K[w] & ((K[w] >> 1) | (K[w + 1] << 63));
    for (int w = 0; w < words; ++w) {
      const uint64_t joined_from_left = (J[w] << 1) | (w > 0 ? J[w - 1] >> 63 : 0);
      first[w] = K[w] & ~joined_from_left;
      last[w] = K[w] & ~J[w];
    }
    const int n_runs = set_bit_positions(first, words, starts.data());
    set_bit_positions(last, words, ends.data());
    const int64_t* l = L + p0;
    Run* row_runs = rs + n_total;
    for (int r = 0; r < n_runs; ++r) {
      row_runs[r] = {starts[r], ends[r] + 1, static_cast<int32_t>(l[starts[r]]), n_total + r};
    }
    n_total += n_runs;
  }
  row_first[H] = n_total;
  for (int i = 1; i < H; ++i) {
    int32_t a = row_first[i - 1], b = row_first[i];
    const int32_t a_end = row_first[i], b_end = row_first[i + 1];
    while (a < a_end && b < b_end) {
      const Run& ra = rs[a];
      const Run& rb = rs[b];
      if (ra.start < rb.end && rb.start < ra.end && ra.label == rb.label) unite(rs, a, b);
      if (ra.end < rb.end) {
        ++a;
      } else {
        ++b;
      }
    }
  }

  // 3. Each element's largest piece: roots in raster order, strictly larger wins (ties: the first piece).
  const int32_t R = n_total;
  std::vector<int32_t> piece_size(R, 0);  // < 2^31 pixels (checked by the op)
  for (int32_t r = 0; r < R; ++r) {
    // parent <= index, so in index order the parent already points at its root.
    rs[r].parent = rs[rs[r].parent].parent;
    piece_size[rs[r].parent] += rs[r].end - rs[r].start;
  }
  std::vector<int32_t> best_root(N, -1);
  std::vector<int32_t> best_size(N, 0);
  for (int32_t r = 0; r < R; ++r) {
    if (rs[r].parent != r) continue;
    const int32_t n = rs[r].label;
    if (piece_size[r] > best_size[n]) {
      best_size[n] = piece_size[r];
      best_root[n] = r;
    }
  }

  // 4. Output labels: a branch-free pass writes every surviving pixel's label (-1 elsewhere), then the runs
  //    of the pieces that are not kept (few: small islands) are cleared; the kept runs make the statistics.
  const uint8_t* kept = keep.get();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t m = -static_cast<int64_t>(kept[p]);  // all ones where the pixel survived the opening
    O[p] = (L[p] & m) | ~m;
  }
  for (int i = 0; i < H; ++i) {
    int64_t* o = O + static_cast<int64_t>(i) * W;
    for (int32_t r = row_first[i]; r < row_first[i + 1]; ++r) {
      const Run& run = rs[r];
      const int32_t n = run.label;
      if (run.parent != best_root[n]) {
        std::fill(o + run.start, o + run.end, int64_t{-1});
        continue;
      }
      const int64_t length = run.end - run.start;
      int64_t* s = S + static_cast<int64_t>(n) * kStatsColumns;
      const bool first = s[0] == 0;
      s[0] += length;
      s[1] += length * (run.start + run.end - 1) / 2;  // sum of start..end-1
      s[2] += length * i;
      s[3] = first ? run.start : std::min<int64_t>(s[3], run.start);
      s[4] = first ? i : s[4];  // runs come in raster order: the first row is the top one
      s[5] = std::max<int64_t>(s[5], run.end - 1);
      s[6] = i;
    }
  }
  return -1;
}

}  // namespace editrt_native
