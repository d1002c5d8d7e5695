// Fused CPU kernels of the projection M and the backprojection R (scripts/operators.py).
//
// The same sampling as the pure-PyTorch path (the tables of scripts/geometry.py, the same
// linear interpolation formula as torch.lerp, the same order of summation over directions),
// without materialising the interpolated samples: each sample is read, interpolated and
// reduced in one pass, so M and R read the volume about once per direction.
// Built at first use by scripts/fused.py (torch.utils.cpp_extension); the pure path stays
// the reference, and the only one in exported (TorchScript / ONNX) models.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// The kernels' loops are compiled twice, for AVX2 and for the baseline x86-64 instruction set
// (GCC picks one when the module loads); elsewhere they are compiled once, as they are.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define UNET25D_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define UNET25D_CLONES
#endif

void check_cpu_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// acc[z] = op(acc[z], lerp(a[z], b[z], w)) for z < e, with torch.lerp's formula
// (aten/src/ATen/native/Lerp.h: exact at both ends of the weight range); the branch on w is
// taken once per row of e values, so the loop over z vectorises
template <typename scalar_t, typename Op>
inline void lerp_into(scalar_t* acc, const scalar_t* a, const scalar_t* b, scalar_t w, int64_t e, Op op) {
  if (std::abs(w) < scalar_t(0.5)) {
    for (int64_t z = 0; z < e; ++z) acc[z] = op(acc[z], a[z] + w * (b[z] - a[z]));
  } else {
    const scalar_t v = scalar_t(1) - w;
    for (int64_t z = 0; z < e; ++z) acc[z] = op(acc[z], b[z] - (b[z] - a[z]) * v);
  }
}

// bins [begin, end) of one direction's projection: each walks all rows (neighbouring bins of a
// row read neighbouring voxels), its accumulators stay in cache
template <typename scalar_t, typename index_t>
UNET25D_CLONES void project_bins(const scalar_t* plane, const index_t* first, int64_t offset,
                                 const scalar_t* weight, const bool* inside, const scalar_t* fill, scalar_t* out,
                                 int64_t rows, int64_t bins, int64_t e, int64_t reduction, scalar_t step,
                                 int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    std::copy(fill, fill + e, out + j * e);
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t s = r * bins + j;
      if (!inside[s]) continue;
      const scalar_t* a = plane + static_cast<int64_t>(first[s]) * e;
      const scalar_t* b = a + offset * e;
      scalar_t* acc = out + j * e;
      if (reduction == 0) {
        lerp_into(acc, a, b, weight[s], e, [](scalar_t x, scalar_t y) { return std::max(x, y); });
      } else if (reduction == 1) {
        lerp_into(acc, a, b, weight[s], e, [](scalar_t x, scalar_t y) { return x + y; });
      } else {
        lerp_into(acc, a, b, weight[s], e, [](scalar_t x, scalar_t y) { return std::min(x, y); });
      }
    }
  }
  if (reduction == 1) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t z = 0; z < e; ++z) out[j * e + z] *= step;
    }
  }
}

// voxels [begin, end) of the backprojection: the average over the directions of each one's
// interpolated detector row
template <typename scalar_t, typename index_t>
UNET25D_CLONES void backproject_voxels(const scalar_t* detector, const index_t* index, const scalar_t* weight,
                                       scalar_t* out, int64_t directions, int64_t bins, int64_t voxels, int64_t e,
                                       int64_t begin, int64_t end) {
  const scalar_t scale = scalar_t(1) / static_cast<scalar_t>(directions);
  for (int64_t v = begin; v < end; ++v) {
    scalar_t* acc = out + v * e;
    for (int64_t j = 0; j < directions; ++j) {
      const scalar_t* lo = detector + (j * bins + static_cast<int64_t>(index[j * voxels + v])) * e;
      const scalar_t w = weight[j * voxels + v];
      if (j == 0) {
        lerp_into(acc, lo, lo + e, w, e, [](scalar_t, scalar_t y) { return y; });
      } else {
        lerp_into(acc, lo, lo + e, w, e, [](scalar_t x, scalar_t y) { return x + y; });
      }
    }
    for (int64_t z = 0; z < e; ++z) acc[z] *= scale;
  }
}

template <typename scalar_t, typename index_t>
void project_kernel(const scalar_t* plane, const index_t* first, int64_t offset, const scalar_t* weight,
                    const bool* inside, const scalar_t* fill, scalar_t* out, int64_t rows, int64_t bins, int64_t e,
                    int64_t reduction, scalar_t step) {
  at::parallel_for(0, bins, 16, [&](int64_t begin, int64_t end) {
    project_bins(plane, first, offset, weight, inside, fill, out, rows, bins, e, reduction, step, begin, end);
  });
}

template <typename scalar_t, typename index_t>
void backproject_kernel(const scalar_t* detector, const index_t* index, const scalar_t* weight, scalar_t* out,
                        int64_t directions, int64_t bins, int64_t voxels, int64_t e) {
  at::parallel_for(0, voxels, 64, [&](int64_t begin, int64_t end) {
    backproject_voxels(detector, index, weight, out, directions, bins, voxels, e, begin, end);
  });
}

}  // namespace

// plane (H*W, E); first, weight, inside (L, N_s); fill (E,) -> (N_s, E)
torch::Tensor project(torch::Tensor plane, torch::Tensor first, int64_t offset, torch::Tensor weight,
                      torch::Tensor inside, torch::Tensor fill, int64_t reduction, double step) {
  check_cpu_contiguous(plane, "plane");
  check_cpu_contiguous(first, "first");
  check_cpu_contiguous(weight, "weight");
  check_cpu_contiguous(inside, "inside");
  check_cpu_contiguous(fill, "fill");
  TORCH_CHECK(plane.dim() == 2 && first.dim() == 2, "plane and tables must be 2D");
  TORCH_CHECK(weight.sizes() == first.sizes() && inside.sizes() == first.sizes(), "table shapes differ");
  TORCH_CHECK(inside.scalar_type() == torch::kBool, "inside must be bool");
  TORCH_CHECK(weight.scalar_type() == plane.scalar_type() && fill.scalar_type() == plane.scalar_type(),
              "weight, fill and plane must share a dtype");
  TORCH_CHECK(fill.numel() == plane.size(1), "fill must hold one value per column");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0 (max), 1 (sum) or 2 (min)");
  const int64_t rows = first.size(0), bins = first.size(1), e = plane.size(1);
  auto out = torch::empty({bins, e}, plane.options());
  AT_DISPATCH_FLOATING_TYPES(plane.scalar_type(), "project", [&] {
    AT_DISPATCH_INDEX_TYPES(first.scalar_type(), "project_index", [&] {
      project_kernel<scalar_t, index_t>(plane.data_ptr<scalar_t>(), first.data_ptr<index_t>(), offset,
                                        weight.data_ptr<scalar_t>(), inside.data_ptr<bool>(),
                                        fill.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, bins, e,
                                        reduction, static_cast<scalar_t>(step));
    });
  });
  return out;
}

// detector (p', N_s, E); index, weight (p', H*W) -> (H*W, E), the average over the p' directions
torch::Tensor backproject(torch::Tensor detector, torch::Tensor index, torch::Tensor weight) {
  check_cpu_contiguous(detector, "detector");
  check_cpu_contiguous(index, "index");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(detector.dim() == 3 && index.dim() == 2 && weight.sizes() == index.sizes(), "bad shapes");
  TORCH_CHECK(index.size(0) == detector.size(0), "one table per direction");
  TORCH_CHECK(weight.scalar_type() == detector.scalar_type(), "weight and detector must share a dtype");
  const int64_t directions = detector.size(0), bins = detector.size(1), e = detector.size(2);
  const int64_t voxels = index.size(1);
  auto out = torch::empty({voxels, e}, detector.options());
  AT_DISPATCH_FLOATING_TYPES(detector.scalar_type(), "backproject", [&] {
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "backproject_index", [&] {
      backproject_kernel<scalar_t, index_t>(detector.data_ptr<scalar_t>(), index.data_ptr<index_t>(),
                                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), directions,
                                            bins, voxels, e);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project", &project, "fused M of one direction");
  m.def("backproject", &backproject, "fused R over the given directions");
}
