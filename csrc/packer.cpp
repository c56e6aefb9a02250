// C++ packer: variable-length rollout samples -> Megatron packed layout (THD, per-sequence pad to 2·cp, CP zig-zag,
// tail pad; SP slices are views) and per-token outputs back to per-sequence arrays. numpy buffers only, no torch
// headers; the copies run with the GIL released. Same API, numbers and errors as vespo_megatron/packing/reference.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "packer_layout.hpp"
#include "packer_parallel.hpp"
#include "packer_samples.hpp"

namespace packer {
namespace {

template <class T>
T* ptr(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}

std::vector<int64_t> to_vector(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& a) {
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

py::array_t<int32_t> to_int32(const std::vector<int64_t>& v) {
  py::array_t<int32_t> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// Output buffers of one micro-batch; per-token arrays are [cp, t], routing [cp, t, layers, topk].
struct Outputs {
  int64_t *tokens, *position, *seq_index;
  float *loss_mask, *lp = nullptr;
  bool* valid = nullptr;
  uint8_t* routing = nullptr;
};

class Packer {
 public:
  Packer(const Layout& L, const Batch& b, const Outputs& o) : L_(L), b_(b), o_(o), row_(b.row_bytes()) {
    filler_.resize(row_);
    for (int64_t k = 0; k < b.layers * b.topk; ++k) set_id(filler_.data() + k * b.routing_item, k % b.topk);
  }

  // Items k = r·(S+1) + i: sequence i of CP rank r for i < S, the tail pad of rank r for i = S.
  void run() const {
    const int64_t S = static_cast<int64_t>(L_.size()), slot = 33 + row_;  // bytes written per slot
    auto slots = [&](int64_t k) { return k % (S + 1) == S ? L_.t - L_.body() : L_.padded[k % (S + 1)] / L_.cp; };
    parallel_ranges(L_.cp * (S + 1), L_.cp * L_.t * slot, [&](int64_t k) { return slots(k) * slot; },
                    [&](int64_t begin, int64_t end) {
                      for (int64_t k = begin; k < end; ++k) item(k / (S + 1), static_cast<size_t>(k % (S + 1)));
                    });
  }

 private:
  void item(int64_t r, size_t i) const {
    if (i == L_.size()) return pad(r * L_.t + L_.body(), L_.t - L_.body());
    for_each_chunk(L_, r, i, [&](int64_t dst, int64_t pos, int64_t len) { chunk(r * L_.t + dst, i, pos, len); });
  }

  void set_id(uint8_t* p, int64_t id) const {
    if (b_.routing_item == 1) *p = static_cast<uint8_t>(id);
    else if (b_.routing_item == 2) { const uint16_t v = static_cast<uint16_t>(id); std::memcpy(p, &v, 2); }
    else { const int32_t v = static_cast<int32_t>(id); std::memcpy(p, &v, 4); }
  }

  void fill_routing(int64_t o, int64_t len) const {
    for (int64_t k = 0; k < len; ++k) std::memcpy(o_.routing + (o + k) * row_, filler_.data(), row_);
  }

  // Slots [o, o + len): pads of no sequence (tail) or beyond the real tokens.
  void pad(int64_t o, int64_t len) const {
    std::fill_n(o_.position + o, len, 0);
    std::fill_n(o_.seq_index + o, len, -1);
    blank(o, len);
    if (o_.routing) fill_routing(o, len);
  }

  // Zero tokens, loss mask and rollout log-probs of slots [o, o + len).
  void blank(int64_t o, int64_t len) const {
    std::fill_n(o_.tokens + o, len, 0);
    std::fill_n(o_.loss_mask + o, len, 0.f);
    if (o_.lp) std::fill_n(o_.lp + o, len, 0.f), std::fill_n(o_.valid + o, len, false);
  }

  template <class In>
  static void convert(int64_t* dst, const void* src, int64_t from, int64_t len) {
    std::copy_n(static_cast<const In*>(src) + from, len, dst);
  }

  static void copy_ids(int64_t* dst, const void* src, bool is64, int64_t from, int64_t len) {
    if (is64) convert<int64_t>(dst, src, from, len);
    else convert<int32_t>(dst, src, from, len);
  }

  // Local slots [o, o + len) hold positions [pos, pos + len) of padded sequence i.
  void chunk(int64_t o, size_t i, int64_t pos, int64_t len) const {
    const SampleView& s = b_.samples[i];
    const int64_t n = L_.n[i], end = pos + len, seq = static_cast<int64_t>(i);
    for (int64_t k = 0; k < len; ++k) o_.position[o + k] = pos + k, o_.seq_index[o + k] = pos + k < n ? seq : -1;
    blank(o, len);  // then overwrite the real tokens (routing: below, no double write)
    const Span prompt = clip(pos, end, 0, s.P), resp = clip(pos, end, s.P, n);
    copy_ids(o_.tokens + o + (prompt.x - pos), s.prompt, s.prompt64, prompt.x, prompt.size());
    copy_ids(o_.tokens + o + (resp.x - pos), s.response, s.response64, resp.x - s.P, resp.size());
    float* mask = o_.loss_mask + o + (resp.x - pos);
    if (!s.mask) std::fill_n(mask, resp.size(), 1.f);
    else std::copy_n(s.mask + (resp.x - s.P), resp.size(), mask);  // bool / uint8 0|1 -> float
    if (o_.lp) {
      const Span lp = clip(pos, end, s.P, s.P + s.lp_kept);
      float* dst = o_.lp + o + (lp.x - pos);
      if (s.lp64) std::copy_n(static_cast<const double*>(s.lp) + (lp.x - s.P), lp.size(), dst);
      else std::copy_n(static_cast<const float*>(s.lp) + (lp.x - s.P), lp.size(), dst);
      std::fill_n(o_.valid + o + (lp.x - pos), lp.size(), true);
    }
    if (o_.routing) {
      const Span rows = clip(pos, end, 0, n - 1);  // row p: the forward whose input is token p
      std::memcpy(o_.routing + (o + rows.x - pos) * row_, s.routing + rows.x * row_, rows.size() * row_);
      const int64_t first_filler = std::max(pos, n - 1);
      fill_routing(o + (first_filler - pos), end - first_filler);
    }
  }

  const Layout& L_;
  const Batch& b_;
  const Outputs& o_;
  const int64_t row_;
  std::vector<uint8_t> filler_;
};

// Pass 2 over all samples in parallel; raises the error of the first failing sample.
void check_all_values(const Batch& b) {
  const int64_t S = static_cast<int64_t>(b.samples.size());
  std::vector<std::string> errors(S);
  int64_t total = 0;
  for (const SampleView& s : b.samples) total += (s.P + s.R) * 16;
  {
    py::gil_scoped_release nogil;
    parallel_ranges(S, total, [&](int64_t i) { return (b.samples[i].P + b.samples[i].R) * 16; },
                    [&](int64_t begin, int64_t end) {
                      for (int64_t i = begin; i < end; ++i) try {
                          check_values(b.samples[i], b.ids[i]);
                        } catch (const std::exception& e) {
                          errors[i] = e.what();
                          return;
                        }
                    });
  }
  for (const std::string& e : errors)
    if (!e.empty()) throw py::value_error(e);
}

py::dict stats(const Layout& L, const Batch& b) {
  int64_t resp = 0, missing = 0, truncated = 0, s_missing = 0, s_truncated = 0;
  for (const SampleView& s : b.samples) {
    const int64_t miss = b.has_lp ? s.R - s.lp_kept : 0, cut = s.lp_given - s.lp_kept;
    resp += s.R, missing += miss, truncated += cut, s_missing += miss > 0, s_truncated += cut > 0;
  }
  const int64_t S = static_cast<int64_t>(L.size()), padded = L.cu_padded.back();
  py::dict d;
  d["samples"] = S, d["tokens"] = L.cu.back(), d["response_tokens"] = resp, d["padded_tokens"] = padded;
  d["tail_pad_tokens"] = L.cp * L.t - padded, d["logprobs_missing"] = missing, d["logprobs_truncated"] = truncated;
  d["samples_missing"] = s_missing, d["samples_truncated"] = s_truncated;
  d["routing_filler_rows"] = b.has_routing ? S : 0;
  return d;
}

py::dict pack(const py::list& prompts, const py::list& responses, const py::list& masks, const py::list& logprobs,
              const py::list& routings, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids,
              int64_t cp, int64_t sp, int64_t tail_align, bool truncate) {
  const size_t S = prompts.size();
  for (const py::list* l : {&responses, &masks, &logprobs, &routings})
    if (l->size() != S) throw py::value_error("every per-sample list must have one entry per sample");
  if (static_cast<size_t>(ids.size()) != S) throw py::value_error("sample_ids must have one id per sample");
  Batch b;
  b.samples.resize(S);
  b.ids = to_vector(ids);
  for (size_t i = 0; i < S; ++i) check_structure(prompts, responses, masks, logprobs, routings, truncate, b, i);
  std::vector<int64_t> n(S), plen(S), rlen(S);
  for (size_t i = 0; i < S; ++i) plen[i] = b.samples[i].P, rlen[i] = b.samples[i].R, n[i] = plen[i] + rlen[i];
  check_all_values(b);
  const Layout L = make_layout(n, cp, sp, tail_align);

  const std::vector<py::ssize_t> shape = {cp, L.t};
  py::array tokens(py::dtype::of<int64_t>(), shape), position(py::dtype::of<int64_t>(), shape),
      seq_index(py::dtype::of<int64_t>(), shape), loss_mask(py::dtype::of<float>(), shape);
  Outputs o{ptr<int64_t>(tokens), ptr<int64_t>(position), ptr<int64_t>(seq_index), ptr<float>(loss_mask)};
  py::object lp = py::none(), valid = py::none(), routing = py::none();
  if (b.has_lp) {
    py::array lp_a(py::dtype::of<float>(), shape), valid_a(py::dtype::of<bool>(), shape);
    o.lp = ptr<float>(lp_a), o.valid = ptr<bool>(valid_a), lp = lp_a, valid = valid_a;
  }
  if (b.has_routing) {
    py::array r(b.routing_dtype, std::vector<py::ssize_t>{cp, L.t, b.layers, b.topk});
    o.routing = ptr<uint8_t>(r), routing = r;
  }
  {
    py::gil_scoped_release nogil;
    Packer(L, b, o).run();
  }
  py::dict out;
  out["tokens"] = tokens, out["position_ids"] = position, out["seq_index"] = seq_index, out["loss_mask"] = loss_mask;
  out["rollout_logprobs"] = lp, out["rollout_logprob_valid"] = valid, out["routing"] = routing;
  out["prompt_lens"] = py::array_t<int64_t>(S, plen.data()), out["response_lens"] = py::array_t<int64_t>(S, rlen.data());
  out["cu_seqlens"] = to_int32(L.cu), out["cu_seqlens_padded"] = to_int32(L.cu_padded);
  out["stats"] = stats(L, b);
  return out;
}

// values [cp, t, ...] (any dtype, C-contiguous) -> [Σ n_i, ...]: the real tokens in stream order.
py::array unpack(const py::array& values, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lens,
                 int64_t cp, int64_t sp, int64_t tail_align) {
  const Layout L = make_layout(to_vector(lens), cp, sp, tail_align);
  if (values.ndim() < 2 || values.shape(0) != cp || values.shape(1) != L.t || !(values.flags() & py::array::c_style))
    throw py::value_error("values: expected a C-contiguous array of shape (" + std::to_string(cp) + ", " +
                          std::to_string(L.t) + ", ...)");
  std::vector<py::ssize_t> shape(values.shape(), values.shape() + values.ndim());
  int64_t row = values.itemsize();
  for (size_t d = 2; d < shape.size(); ++d) row *= shape[d];
  shape.erase(shape.begin());
  shape[0] = L.cu.back();
  py::array out(values.dtype(), shape);
  const auto* src = static_cast<const uint8_t*>(values.data());
  auto* dst = static_cast<uint8_t*>(out.mutable_data());
  {
    py::gil_scoped_release nogil;
    const int64_t S = static_cast<int64_t>(L.size());
    parallel_ranges(cp * S, L.cu.back() * row, [&](int64_t k) { return L.n[k % S] / cp * row; },
                    [&](int64_t begin, int64_t end) {
                      for (int64_t k = begin; k < end; ++k) {
                        const int64_t r = k / S;
                        const size_t i = static_cast<size_t>(k % S);
                        for_each_chunk(L, r, i, [&](int64_t o, int64_t pos, int64_t len) {
                          const Span real = clip(pos, pos + len, 0, L.n[i]);
                          std::memcpy(dst + (L.cu[i] + real.x) * row, src + (r * L.t + o + real.x - pos) * row,
                                      real.size() * row);
                        });
                      }
                    });
  }
  return out;
}

// The index maps of layout.build_layout: position / seq_index / gather [cp, t] int64, cu arrays, sp bounds.
py::dict layout(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lens, int64_t cp, int64_t sp,
                int64_t tail_align) {
  const Layout L = make_layout(to_vector(lens), cp, sp, tail_align);
  py::array_t<int64_t> position({cp, L.t}), seq_index({cp, L.t}), gather({cp, L.t}), bounds(sp + 1);
  int64_t *pos_p = position.mutable_data(), *seq_p = seq_index.mutable_data(), *g_p = gather.mutable_data();
  for (int64_t r = 0; r < cp; ++r) {
    const int64_t row = r * L.t;
    for (size_t i = 0; i < L.size(); ++i)
      for_each_chunk(L, r, i, [&](int64_t o, int64_t pos, int64_t len) {
        for (int64_t k = 0, p = pos; k < len; ++k, ++p) {
          const bool real = p < L.n[i];
          pos_p[row + o + k] = p, seq_p[row + o + k] = real ? int64_t(i) : -1, g_p[row + o + k] = real ? L.cu[i] + p : -1;
        }
      });
    std::fill(pos_p + row + L.body(), pos_p + row + L.t, 0);
    std::fill(seq_p + row + L.body(), seq_p + row + L.t, -1);
    std::fill(g_p + row + L.body(), g_p + row + L.t, -1);
  }
  for (int64_t s = 0; s <= sp; ++s) bounds.mutable_data()[s] = s * (L.t / sp);
  py::dict d;
  d["position"] = position, d["seq_index"] = seq_index, d["gather"] = gather, d["sp_bounds"] = bounds;
  d["cu_seqlens"] = to_int32(L.cu), d["cu_seqlens_padded"] = to_int32(L.cu_padded);
  return d;
}

}  // namespace
}  // namespace packer

namespace py = pybind11;

PYBIND11_MODULE(_packer, m) {
  m.doc() = "vespo-megatron C++ packer (see vespo_megatron/packing)";
  m.def("pack", &packer::pack, py::arg("prompts"), py::arg("responses"), py::arg("loss_masks"),
        py::arg("rollout_logprobs"), py::arg("routings"), py::arg("sample_ids"), py::arg("cp"), py::arg("sp"),
        py::arg("tail_align"), py::arg("truncate"));
  m.def("unpack", &packer::unpack, py::arg("values"), py::arg("seq_lens"), py::arg("cp"), py::arg("sp"),
        py::arg("tail_align"));
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(n));
    packer::thread_setting() = n;
  }, py::arg("num_threads"));
  m.def("get_num_threads", [] { return packer::thread_setting().load(); });
  m.def("layout", &packer::layout, py::arg("seq_lens"), py::arg("cp"), py::arg("sp"), py::arg("tail_align"));
}
