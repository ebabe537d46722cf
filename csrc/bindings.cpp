// pybind11 module sam_kernels._C: the host operations and, when built with CUDA (SAM_WITH_CUDA), the
// device ones. Both submodules expose the same functions with the same signatures: the routed forms
// of routed_ops.h, which take any lists and return the positions they left to the caller.
#include <torch/extension.h>

#include "host_ops.h"
#include "host_plan.h"
#include "routed_ops.h"
#ifdef SAM_WITH_CUDA
#include "cuda_ops.h"
#endif

namespace py = pybind11;

namespace {

// The operations of one native backend: its functions on lists of one dtype (csrc/operations.inc).
struct HostOps {
  static constexpr auto filter_norms = &sam_host::filter_norms;
  static constexpr auto scaled_grad_sq_sum = &sam_host::scaled_grad_sq_sum;
  static constexpr auto perturb_ = &sam_host::perturb_;
  static constexpr auto restore_ = &sam_host::restore_;
  static constexpr auto add_noise_ = &sam_host::add_noise_;
  static constexpr auto noise_grad_sums = &sam_host::noise_grad_sums;
  static constexpr auto mix_perturb_ = &sam_host::mix_perturb_;
  static constexpr auto standard_normal = &sam_host::standard_normal;
  static constexpr auto restore_sgd_ = &sam_host::restore_sgd_;
  static constexpr auto restore_adam_ = &sam_host::restore_adam_;
  static constexpr auto msam_sgd_ = &sam_host::msam_sgd_;
  static constexpr auto copy_ = &sam_host::copy_;
  static constexpr auto pair_sums = &sam_host::pair_sums;
  static constexpr auto combine_ = &sam_host::combine_;
  static constexpr auto split_difference_ = &sam_host::split_difference_;
  static constexpr auto residual_sq_sum = &sam_host::residual_sq_sum;
  static constexpr auto residual_perturb_ = &sam_host::residual_perturb_;
};

#ifdef SAM_WITH_CUDA
struct CudaOps {
  static constexpr auto filter_norms = &sam_cuda::filter_norms;
  static constexpr auto scaled_grad_sq_sum = &sam_cuda::scaled_grad_sq_sum;
  static constexpr auto perturb_ = &sam_cuda::perturb_;
  static constexpr auto restore_ = &sam_cuda::restore_;
  static constexpr auto add_noise_ = &sam_cuda::add_noise_;
  static constexpr auto noise_grad_sums = &sam_cuda::noise_grad_sums;
  static constexpr auto mix_perturb_ = &sam_cuda::mix_perturb_;
  static constexpr auto standard_normal = &sam_cuda::standard_normal;
  static constexpr auto restore_sgd_ = &sam_cuda::restore_sgd_;
  static constexpr auto restore_adam_ = &sam_cuda::restore_adam_;
  static constexpr auto msam_sgd_ = &sam_cuda::msam_sgd_;
  static constexpr auto copy_ = &sam_cuda::copy_;
  static constexpr auto pair_sums = &sam_cuda::pair_sums;
  static constexpr auto combine_ = &sam_cuda::combine_;
  static constexpr auto split_difference_ = &sam_cuda::split_difference_;
  static constexpr auto residual_sq_sum = &sam_cuda::residual_sq_sum;
  static constexpr auto residual_perturb_ = &sam_cuda::residual_perturb_;
};
#endif

// Binds one backend's operations on `module`: each takes any lists, buckets them by dtype
// (routed_ops.h) and returns (or returns last) the positions it did not take.
template <typename Ops>
void bind_operations(py::module_& module) {
  using R = sam::Routed<Ops>;
  module.def("filter_norms", &R::filter_norms, "||f_i|| per filter (ndim >= 2), |w| otherwise");
  module.def("scaled_grad_sq_sum", &R::scaled_grad_sq_sum, "sum of (t * g)^2 over the list");
  module.def("perturb_", &R::perturb_, "saved <- w; w <- w + eps");
  module.def("restore_", &R::restore_, "w <- saved, bit-exactly");
  module.def("add_noise_", &R::add_noise_, "saved <- w; w <- w + delta0 (Philox stream)");
  module.def("noise_grad_sums", &R::noise_grad_sums, "(sum d^2, sum g^2, sum l d g, sum l^2 g^2)");
  module.def("mix_perturb_", &R::mix_perturb_, "w <- saved + a delta0 + b g");
  module.def("standard_normal", Ops::standard_normal, "the noise stream (numel, seed, j, step, offset)");
}

// Binds the fused second step's operations (fused_step_ops.inc) of a backend that has them.
template <typename Ops>
void bind_fused_step(py::module_& module) {
  using R = sam::Routed<Ops>;
  module.def("restore_sgd_", &R::restore_sgd_, "w <- saved, then torch.optim.SGD's update (one pass)");
  module.def("restore_adam_", &R::restore_adam_, "w <- saved, then torch.optim.Adam(W)'s update (one pass)");
}

// Binds Momentum-SAM's fused step (fused_step_ops.inc) of a backend that has it.
template <typename Ops>
void bind_msam_step(py::module_& module) {
  using R = sam::Routed<Ops>;
  module.def("msam_sgd_", &R::msam_sgd_, "w <- w + c m, SGD's update, sum of the new m^2 (one pass)");
}

// Binds the SAM family's operations (family_ops.inc) of a backend that has them.
template <typename Ops>
void bind_family_ops(py::module_& module) {
  using R = sam::Routed<Ops>;
  module.def("copy_", &R::copy_, "target <- source, bit for bit");
  module.def("pair_sums", &R::pair_sums, "(sum x y, sum x^2, sum y^2)");
  module.def("combine_", &R::combine_, "x <- a x + b y (a zero coefficient's term counts 0)");
  module.def("split_difference_", &R::split_difference_, "firsts <- grads - firsts; grads <- old firsts");
  module.def("residual_sq_sum", &R::residual_sq_sum, "sum (g - sigma m)^2");
  module.def("residual_perturb_", &R::residual_perturb_, "saved <- w; w <- w + s (g - sigma m); m <- EMA");
}

void bind_step_plan(py::module_& host) {
  using sam_host::StepPlan;
  py::class_<StepPlan>(host, "StepPlan", "the cached step plan of backend='cpp' (csrc/host_plan.h)")
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, int64_t, at::Tensor, at::Tensor>(),
           py::arg("params"), py::arg("group_of"), py::arg("num_groups"), py::arg("skip_flag"), py::arg("skip_count"))
      .def("sam_first_step", &StepPlan::sam_first_step, py::arg("rhos"), py::arg("etas"), py::arg("mode"),
           py::arg("p_inf"))
      .def("add_noise", &StepPlan::add_noise, py::arg("gammas"), py::arg("seed"), py::arg("step"))
      .def("rsam_first_step", &StepPlan::rsam_first_step, py::arg("rhos"), py::arg("gammas"), py::arg("lams"),
           py::arg("seed"), py::arg("step"))
      .def("restore", &StepPlan::restore)
      .def("active", &StepPlan::active)
      .def("clear_active", &StepPlan::clear_active)
      .def("saved", &StepPlan::saved)
      .def("set_saved", &StepPlan::set_saved)
      .def("__len__", &StepPlan::size);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sam_kernels native extension: host (at::parallel_for) and CUDA multi-tensor backend operations";
  auto host = m.def_submodule("host", "operations on CPU tensors (backend='cpp')");
  bind_operations<HostOps>(host);
  bind_fused_step<HostOps>(host);
  bind_msam_step<HostOps>(host);
  bind_family_ops<HostOps>(host);
  bind_step_plan(host);
  host.def("philox4x32_10", &sam_host::philox4x32_10, "Philox4x32-10 of one counter (4 words) and key (2 words)");
#ifdef SAM_WITH_CUDA
  m.attr("HAS_CUDA") = true;
  auto cuda = m.def_submodule("cuda", "operations on CUDA tensors of one device (backend='cuda')");
  bind_operations<CudaOps>(cuda);
  bind_fused_step<CudaOps>(cuda);
  bind_msam_step<CudaOps>(cuda);
  bind_family_ops<CudaOps>(cuda);
#else
  m.attr("HAS_CUDA") = false;
#endif
}
