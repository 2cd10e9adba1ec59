// mosaic_fast._C: patchify / unpatchify of 3D volumes on raw CPU buffers (no libtorch linkage).
//
// A (B, C, D, H, W) volume, cut into non-overlapping (pd, ph, pw) patches, becomes the (B, L, K)
// patch matrix of a Conv3d with kernel == stride: L = (D/pd)(H/ph)(W/pw) tokens ordered (d', h', w')
// (Conv3d's flatten(2)), and K = C*pd*ph*pw entries per patch ordered (c, d, h, w), which is the
// order of the Conv3d weight (E, C, pd, ph, pw) flattened to (E, K). patchify3d fuses the dtype
// conversion (uint8 or float32 in, float32 out) and an affine intensity normalisation x*scale + shift;
// unpatchify3d is its adjoint (out = scale * fold(patches)), which gives the input gradient.
//
// Buffers are exchanged as numpy arrays (torch.Tensor.numpy() views: zero-copy). The GIL is released
// while the loops run; the loops are OpenMP-parallel over the B*L patches (each patch owns a disjoint
// region of the volume, so the inverse is race-free too).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

// Below this many output elements the loop runs on one thread (thread start-up would dominate).
constexpr int64_t kParallelMinElements = 1 << 15;

struct Geometry {
  int64_t B, C, D, H, W;
  int64_t pd, ph, pw;
  int64_t nd, nh, nw, L, K;
};

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": must be C-contiguous (call .contiguous() first)");
}

Geometry make_geometry(const std::vector<int64_t>& vol, const std::vector<int64_t>& patch, const char* name) {
  if (patch.size() != 3) throw py::value_error("patch_size: expected 3 values (pd, ph, pw)");
  Geometry g{};
  g.B = vol[0], g.C = vol[1], g.D = vol[2], g.H = vol[3], g.W = vol[4];
  g.pd = patch[0], g.ph = patch[1], g.pw = patch[2];
  if (g.pd <= 0 || g.ph <= 0 || g.pw <= 0) {
    std::ostringstream s;
    s << "patch_size: must be positive, got (" << g.pd << ", " << g.ph << ", " << g.pw << ")";
    throw py::value_error(s.str());
  }
  if (g.D % g.pd || g.H % g.ph || g.W % g.pw) {
    std::ostringstream s;
    s << name << ": volume (" << g.D << ", " << g.H << ", " << g.W << ") is not divisible by patch_size ("
      << g.pd << ", " << g.ph << ", " << g.pw << ")";
    throw py::value_error(s.str());
  }
  g.nd = g.D / g.pd, g.nh = g.H / g.ph, g.nw = g.W / g.pw;
  g.L = g.nd * g.nh * g.nw;
  g.K = g.C * g.pd * g.ph * g.pw;
  return g;
}

void check_out(const py::array& out, const std::vector<int64_t>& expected, const char* name) {
  if (!out.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(name) + ": expected dtype float32, got " + dtype_str(out));
  bool same = out.ndim() == static_cast<py::ssize_t>(expected.size());
  for (size_t i = 0; same && i < expected.size(); ++i) same = out.shape(i) == expected[i];
  if (!same) {
    std::ostringstream s;
    s << name << ": expected shape (";
    for (size_t i = 0; i < expected.size(); ++i) s << (i ? ", " : "") << expected[i];
    s << "), got " << shape_str(out);
    throw py::value_error(s.str());
  }
  require_c_contiguous(out, name);
  if (!out.writeable()) throw py::value_error(std::string(name) + ": must be writeable");
}

void check_no_overlap(const py::array& a, const py::array& b, const char* name_a, const char* name_b) {
  auto pa = reinterpret_cast<uintptr_t>(a.data()), pb = reinterpret_cast<uintptr_t>(b.data());
  auto ea = pa + static_cast<uintptr_t>(a.nbytes()), eb = pb + static_cast<uintptr_t>(b.nbytes());
  if (a.nbytes() && b.nbytes() && pa < eb && pb < ea)
    throw py::value_error(std::string(name_b) + ": must not overlap " + name_a);
}

int resolve_threads(int num_threads) {
  if (num_threads < 0) throw py::value_error("num_threads: must be >= 0 (0 = OpenMP default)");
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  return 1;
#endif
}

template <typename T>
void patchify_impl(const T* __restrict x, float* __restrict out, const Geometry& g, float scale, float shift,
                   int threads) {
  const int64_t HW = g.H * g.W, DHW = g.D * HW, n = g.B * g.L;
  const bool parallel = threads > 1 && n * g.K >= kParallelMinElements;
  (void)parallel;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t p = 0; p < n; ++p) {
    const int64_t b = p / g.L, l = p % g.L;
    const int64_t iw = l % g.nw, ih = (l / g.nw) % g.nh, id = l / (g.nw * g.nh);
    const T* base = x + b * g.C * DHW + id * g.pd * HW + ih * g.ph * g.W + iw * g.pw;
    float* o = out + p * g.K;
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t dd = 0; dd < g.pd; ++dd)
        for (int64_t hh = 0; hh < g.ph; ++hh) {
          const T* row = base + c * DHW + dd * HW + hh * g.W;
#pragma omp simd
          for (int64_t ww = 0; ww < g.pw; ++ww) o[ww] = static_cast<float>(row[ww]) * scale + shift;
          o += g.pw;
        }
  }
}

void unpatchify_impl(const float* __restrict patches, float* __restrict out, const Geometry& g, float scale,
                     int threads) {
  const int64_t HW = g.H * g.W, DHW = g.D * HW, n = g.B * g.L;
  const bool parallel = threads > 1 && n * g.K >= kParallelMinElements;
  (void)parallel;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t p = 0; p < n; ++p) {
    const int64_t b = p / g.L, l = p % g.L;
    const int64_t iw = l % g.nw, ih = (l / g.nw) % g.nh, id = l / (g.nw * g.nh);
    float* base = out + b * g.C * DHW + id * g.pd * HW + ih * g.ph * g.W + iw * g.pw;
    const float* src = patches + p * g.K;
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t dd = 0; dd < g.pd; ++dd)
        for (int64_t hh = 0; hh < g.ph; ++hh) {
          float* row = base + c * DHW + dd * HW + hh * g.W;
#pragma omp simd
          for (int64_t ww = 0; ww < g.pw; ++ww) row[ww] = src[ww] * scale;
          src += g.pw;
        }
  }
}

std::vector<int64_t> shape_of(const py::array& a) {
  std::vector<int64_t> s(a.ndim());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
  return s;
}

py::array patchify3d(const py::array& x, const std::vector<int64_t>& patch_size, float scale, float shift,
                     py::object out, int num_threads) {
  if (x.ndim() != 5) throw py::value_error("x: expected a 5-D (B, C, D, H, W) volume, got shape " + shape_str(x));
  const bool is_u8 = x.dtype().is(py::dtype::of<uint8_t>());
  const bool is_f32 = x.dtype().is(py::dtype::of<float>());
  if (!is_u8 && !is_f32) throw py::type_error("x: expected dtype uint8 or float32, got " + dtype_str(x));
  require_c_contiguous(x, "x");
  const Geometry g = make_geometry(shape_of(x), patch_size, "x");
  const std::vector<int64_t> out_shape{g.B, g.L, g.K};
  py::array result = out.is_none() ? py::array_t<float>(out_shape) : out.cast<py::array>();
  check_out(result, out_shape, "out");
  check_no_overlap(x, result, "x", "out");
  const int threads = resolve_threads(num_threads);
  float* dst = static_cast<float*>(result.mutable_data());
  {
    py::gil_scoped_release release;
    if (is_u8)
      patchify_impl(static_cast<const uint8_t*>(x.data()), dst, g, scale, shift, threads);
    else
      patchify_impl(static_cast<const float*>(x.data()), dst, g, scale, shift, threads);
  }
  return result;
}

py::array unpatchify3d(const py::array& patches, const std::vector<int64_t>& volume_shape,
                       const std::vector<int64_t>& patch_size, float scale, py::object out, int num_threads) {
  if (volume_shape.size() != 5) throw py::value_error("volume_shape: expected 5 values (B, C, D, H, W)");
  for (int64_t s : volume_shape)
    if (s < 0) throw py::value_error("volume_shape: sizes must be >= 0");
  if (!patches.dtype().is(py::dtype::of<float>()))
    throw py::type_error("patches: expected dtype float32, got " + dtype_str(patches));
  const Geometry g = make_geometry(volume_shape, patch_size, "volume_shape");
  bool ok = patches.ndim() == 3 && patches.shape(0) == g.B && patches.shape(1) == g.L && patches.shape(2) == g.K;
  if (!ok) {
    std::ostringstream s;
    s << "patches: expected shape (" << g.B << ", " << g.L << ", " << g.K << ") for volume_shape, got "
      << shape_str(patches);
    throw py::value_error(s.str());
  }
  require_c_contiguous(patches, "patches");
  py::array result = out.is_none() ? py::array_t<float>(volume_shape) : out.cast<py::array>();
  check_out(result, volume_shape, "out");
  check_no_overlap(patches, result, "patches", "out");
  const int threads = resolve_threads(num_threads);
  float* dst = static_cast<float*>(result.mutable_data());
  {
    py::gil_scoped_release release;
    unpatchify_impl(static_cast<const float*>(patches.data()), dst, g, scale, threads);
  }
  return result;
}

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["max_threads"] = 1;
#endif
  info["dtypes"] = py::make_tuple("uint8", "float32");
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mosaic_fast._C: OpenMP patchify/unpatchify of 3D volumes on CPU buffers (no libtorch linkage)";
  m.def("patchify3d", &patchify3d, py::arg("x"), py::arg("patch_size"), py::arg("scale") = 1.0f,
        py::arg("shift") = 0.0f, py::arg("out") = py::none(), py::arg("num_threads") = 0,
        R"doc(Cut a C-contiguous (B, C, D, H, W) uint8/float32 volume into the (B, L, C*pd*ph*pw) float32
patch matrix of a Conv3d with kernel == stride, computing x*scale + shift on the way.

Tokens are ordered (d', h', w'), patch entries (c, d, h, w). ``out`` (optional, float32, C-contiguous,
not overlapping x) receives the result; it is returned. The GIL is released; ``num_threads`` = 0 uses
the OpenMP default.)doc");
  m.def("unpatchify3d", &unpatchify3d, py::arg("patches"), py::arg("volume_shape"), py::arg("patch_size"),
        py::arg("scale") = 1.0f, py::arg("out") = py::none(), py::arg("num_threads") = 0,
        R"doc(Adjoint of patchify3d: fold a C-contiguous (B, L, K) float32 patch matrix back into a
(B, C, D, H, W) float32 volume, multiplied by ``scale``. With scale = s this is the input gradient of
patchify3d(x, scale=s); with scale = 1 it inverts patchify3d(x) exactly.)doc");
  m.def("build_info", &build_info, "How the extension was built: {'openmp': bool, 'max_threads': int, 'dtypes'}");
}
