// Packer for rollout samples -> Megatron packed (THD) / CP / SP layouts. Placeholder module: the packer issue
// fills in the functions; cu_seqlens is the first real one.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

// cu_seqlens[i+1] = cu_seqlens[i] + ceil(len[i] / align) * align   (int64 lengths -> int32 offsets)
static py::array_t<int32_t> cu_seqlens(py::array_t<int64_t, py::array::c_style> lengths, int64_t align) {
  if (align <= 0) throw py::value_error("align must be > 0, got " + std::to_string(align));
  auto len = lengths.unchecked<1>();
  py::array_t<int32_t> out(len.shape(0) + 1);
  auto o = out.mutable_unchecked<1>();
  int64_t acc = 0;
  o(0) = 0;
  for (py::ssize_t i = 0; i < len.shape(0); ++i) {
    if (len(i) < 0) throw py::value_error("sample " + std::to_string(i) + ": length must be >= 0");
    acc += (len(i) + align - 1) / align * align;
    o(i + 1) = static_cast<int32_t>(acc);
  }
  return out;
}

PYBIND11_MODULE(_packer, m) {
  m.doc() = "vespo-megatron C++ packer";
  m.def("cu_seqlens", &cu_seqlens, py::arg("lengths"), py::arg("align") = 1);
}
