// Megatron packed-sequence layout (mirror of vespo_megatron/packing/layout.py; same numbers, same errors).
// Sequence i has n_i real tokens, padded to P_i = ceil(n_i / 2cp)·2cp and cut into 2cp chunks of c_i = P_i / 2cp;
// CP rank r keeps chunks r and 2cp−1−r. Its local pack is the concatenation over sequences (sequence i starts at
// local slot cu_padded[i] / cp), padded at the tail to t slots, t a multiple of lcm(sp, tail_align).
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace packer {
namespace py = pybind11;

struct Layout {
  int64_t cp = 1, sp = 1, tail_align = 1, t = 0;
  std::vector<int64_t> n, padded, cu, cu_padded;  // [S], [S], [S+1], [S+1]

  size_t size() const { return n.size(); }
  int64_t body() const { return cu_padded.back() / cp; }  // local slots before the tail pad
};

inline void check_parallel(int64_t cp, int64_t sp, int64_t tail_align) {
  const std::pair<const char*, int64_t> args[] = {{"cp", cp}, {"sp", sp}, {"tail_align", tail_align}};
  for (const auto& [name, value] : args)
    if (value < 1) throw py::value_error(std::string(name) + " must be a positive integer, got " + std::to_string(value));
}

inline Layout make_layout(std::vector<int64_t> n, int64_t cp, int64_t sp, int64_t tail_align) {
  check_parallel(cp, sp, tail_align);
  for (size_t i = 0; i < n.size(); ++i)
    if (n[i] < 0)
      throw py::value_error("sequence " + std::to_string(i) + ": length " + std::to_string(n[i]) + " < 0");
  Layout L;
  L.cp = cp, L.sp = sp, L.tail_align = tail_align, L.n = std::move(n);
  const size_t S = L.size();
  const int64_t two_cp = 2 * cp;
  L.padded.resize(S);
  L.cu.assign(S + 1, 0);
  L.cu_padded.assign(S + 1, 0);
  for (size_t i = 0; i < S; ++i) {
    L.padded[i] = (L.n[i] + two_cp - 1) / two_cp * two_cp;
    L.cu[i + 1] = L.cu[i] + L.n[i];
    L.cu_padded[i + 1] = L.cu_padded[i] + L.padded[i];
  }
  if (L.cu_padded[S] > std::numeric_limits<int32_t>::max())
    throw py::value_error("micro-batch of " + std::to_string(L.cu_padded[S]) +
                          " padded tokens overflows int32 cu_seqlens");
  const int64_t align = std::lcm(sp, tail_align);
  L.t = (L.body() + align - 1) / align * align;
  return L;
}

// Calls f(dst, pos, len) for the two chunks of sequence i kept by CP rank r: local slots [dst, dst + len) hold
// positions [pos, pos + len) of the padded sequence.
template <class F>
inline void for_each_chunk(const Layout& L, int64_t r, size_t i, F&& f) {
  const int64_t c = L.padded[i] / (2 * L.cp), base = L.cu_padded[i] / L.cp;
  f(base, r * c, c);
  f(base + c, (2 * L.cp - 1 - r) * c, c);
}

// [a, b) ∩ [lo, hi) as [x, y); empty when y <= x.
struct Span {
  int64_t x, y;
  int64_t size() const { return y > x ? y - x : 0; }
};
inline Span clip(int64_t a, int64_t b, int64_t lo, int64_t hi) { return {std::max(a, lo), std::min(b, hi)}; }

}  // namespace packer
