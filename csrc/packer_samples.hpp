// Parse and validate rollout samples (mirror of vespo_megatron/packing/validation.py: same checks, same order,
// same messages). Pass 1 (needs the GIL) checks structure and collects raw pointers; pass 2 (no Python objects)
// checks values. Every failure is ValueError("sample <id>: <field>: <what>").
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace packer {
namespace py = pybind11;

struct SampleView {
  const void* prompt = nullptr;
  const void* response = nullptr;
  bool prompt64 = false, response64 = false;  // int64 (else int32) token ids
  int64_t P = 0, R = 0;
  const uint8_t* mask = nullptr;  // bool or uint8 [R]; nullptr = all ones
  bool mask_u8 = false;
  const void* lp = nullptr;  // float32 or float64 [lp_given]
  bool lp64 = false;
  int64_t lp_given = 0, lp_kept = 0;
  const uint8_t* routing = nullptr;  // [P + R − 1, layers, topk]
};

struct Batch {
  std::vector<SampleView> samples;
  std::vector<int64_t> ids;
  bool has_lp = false, has_routing = false;
  py::object routing_dtype;
  int64_t layers = 0, topk = 0, routing_item = 0;
  int64_t row_bytes() const { return layers * topk * routing_item; }
};

[[noreturn]] inline void fail(int64_t sid, const char* field, const std::string& what) {
  throw py::value_error("sample " + std::to_string(sid) + ": " + field + ": " + what);
}

// Checks type, ndim, dtype (one of `names`) and C-contiguity; returns the index of the dtype in `names`.
inline size_t check_array(py::handle obj, int64_t sid, const char* field, int ndim,
                          const std::vector<std::string>& names, py::array& out) {
  if (!py::isinstance<py::array>(obj))
    fail(sid, field, "expected a numpy array, got " + py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  out = py::reinterpret_borrow<py::array>(obj);
  if (out.ndim() != ndim)
    fail(sid, field, "expected a " + std::to_string(ndim) + "-D array, got " + std::to_string(out.ndim()) + "-D");
  const std::string dt = py::str(out.dtype());
  for (size_t k = 0; k < names.size(); ++k)
    if (names[k] == dt) {
      if (!(out.flags() & py::array::c_style)) fail(sid, field, "array is not C-contiguous");
      return k;
    }
  std::string allowed;
  for (const auto& name : names) allowed += (allowed.empty() ? "" : ", ") + name;
  fail(sid, field, "dtype " + dt + " not one of " + allowed);
}

inline bool check_presence(const py::list& values, const Batch& b, size_t i, const char* field) {
  const bool here = !values[i].is_none(), first = !values[0].is_none();
  if (here != first)
    fail(b.ids[i], field, std::string(here ? "present while sample " : "missing while sample ") +
                              std::to_string(b.ids[0]) + (here ? " has none" : " has one"));
  return here;
}

inline void check_routing(py::handle obj, Batch& b, size_t i, int64_t tokens, SampleView& s) {
  static const std::vector<std::string> kDtypes = {"uint8", "uint16", "int32"};
  static const int64_t kLimits[] = {int64_t(1) << 8, int64_t(1) << 16, int64_t(1) << 31};
  const int64_t sid = b.ids[i];
  py::array r;
  const size_t kind = check_array(obj, sid, "routing", 3, kDtypes, r);
  const int64_t layers = r.shape(1), topk = r.shape(2);
  const std::string dt = py::str(r.dtype());
  if (i == 0) {
    if (layers < 1 || topk < 1)
      fail(sid, "routing", "layers " + std::to_string(layers) + " and topk " + std::to_string(topk) + " must be >= 1");
    if (topk > kLimits[kind])
      fail(sid, "routing", "topk " + std::to_string(topk) + " > " + std::to_string(kLimits[kind]) +
                               " distinct ids of " + dt);
    b.routing_dtype = r.dtype(), b.layers = layers, b.topk = topk, b.routing_item = r.itemsize();
  } else {
    const std::string dt0 = py::str(b.routing_dtype);
    if (dt != dt0) fail(sid, "routing", "dtype " + dt + " differs from sample " + std::to_string(b.ids[0]) + " (" + dt0 + ")");
    const std::pair<const char*, std::pair<int64_t, int64_t>> dims[] = {{"layers", {layers, b.layers}},
                                                                       {"topk", {topk, b.topk}}};
    for (const auto& [name, v] : dims)
      if (v.first != v.second)
        fail(sid, "routing", std::string(name) + " " + std::to_string(v.first) + " differs from sample " +
                                 std::to_string(b.ids[0]) + " (" + std::to_string(v.second) + ")");
  }
  if (r.shape(0) != tokens - 1)
    fail(sid, "routing", std::to_string(r.shape(0)) + " rows for " + std::to_string(tokens) + " tokens (expected " +
                             std::to_string(tokens - 1) + ": one per forward, none for the last token)");
  s.routing = static_cast<const uint8_t*>(r.data());
}

// Pass 1 for sample i.
inline void check_structure(const py::list& prompts, const py::list& responses, const py::list& masks,
                            const py::list& logprobs, const py::list& routings, bool truncate, Batch& b, size_t i) {
  static const std::vector<std::string> kIds = {"int32", "int64"}, kMask = {"bool", "uint8"},
                                        kLp = {"float32", "float64"};
  const int64_t sid = b.ids[i];
  SampleView& s = b.samples[i];
  py::array a;
  s.prompt64 = check_array(prompts[i], sid, "prompt", 1, kIds, a) == 1;
  s.prompt = a.data(), s.P = a.shape(0);
  if (s.P == 0) fail(sid, "prompt", "empty (the first token has no prediction)");
  s.response64 = check_array(responses[i], sid, "response", 1, kIds, a) == 1;
  s.response = a.data(), s.R = a.shape(0);
  if (!masks[i].is_none()) {
    s.mask_u8 = check_array(masks[i], sid, "loss_mask", 1, kMask, a) == 1;
    s.mask = static_cast<const uint8_t*>(a.data());
    if (a.shape(0) != s.R)
      fail(sid, "loss_mask", "length " + std::to_string(a.shape(0)) + " != response length " + std::to_string(s.R));
  }
  if ((b.has_lp = check_presence(logprobs, b, i, "rollout_logprobs"))) {
    s.lp64 = check_array(logprobs[i], sid, "rollout_logprobs", 1, kLp, a) == 1;
    s.lp = a.data(), s.lp_given = a.shape(0);
    if (s.lp_given > s.R && !truncate)
      fail(sid, "rollout_logprobs", std::to_string(s.lp_given) + " values for " + std::to_string(s.R) +
                                        " response tokens (pass truncate=True to drop the extra ones)");
    s.lp_kept = std::min(s.lp_given, s.R);
  }
  if ((b.has_routing = check_presence(routings, b, i, "routing"))) check_routing(routings[i], b, i, s.P + s.R, s);
}

template <class T>
int64_t first_negative(const T* p, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (p[j] < 0) return j;
  return -1;
}

template <class T>
void check_logprobs(const T* p, int64_t n, int64_t sid) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = p[j];
    if (v <= 0 && v != -INFINITY) continue;
    const char* what = std::isnan(v) ? "is NaN" : v < 0 ? "is -inf" : "is positive (log-probs are <= 0)";
    fail(sid, "rollout_logprobs", "index " + std::to_string(j) + " " + what);
  }
}

inline void check_ids(const void* p, bool is64, int64_t n, int64_t sid, const char* field) {
  const int64_t j = is64 ? first_negative(static_cast<const int64_t*>(p), n)
                         : first_negative(static_cast<const int32_t*>(p), n);
  if (j >= 0) fail(sid, field, "index " + std::to_string(j) + " holds a negative token id");
}

// Pass 2 for sample s (no Python objects touched).
inline void check_values(const SampleView& s, int64_t sid) {
  check_ids(s.prompt, s.prompt64, s.P, sid, "prompt");
  check_ids(s.response, s.response64, s.R, sid, "response");
  if (s.mask && s.mask_u8)
    for (int64_t j = 0; j < s.R; ++j)
      if (s.mask[j] > 1) fail(sid, "loss_mask", "index " + std::to_string(j) + " is not 0 or 1");
  if (s.lp) {
    if (s.lp64) check_logprobs(static_cast<const double*>(s.lp), s.lp_given, sid);
    else check_logprobs(static_cast<const float*>(s.lp), s.lp_given, sid);
  }
}

}  // namespace packer
