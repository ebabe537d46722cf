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

namespace {
SAM_OPS_OF(sam_host);
#ifdef SAM_WITH_CUDA
SAM_OPS_OF(sam_cuda);
#endif
}  // namespace

// Every operation returns (or returns last) the positions it did not take.
#define SAM_BIND_OPERATIONS(module, ns)                                                                     \
  using ns##_routed = sam::Routed<ns##_ops>;                                                              \
  module.def("filter_norms", &ns##_routed::filter_norms, "||f_i|| per filter (ndim >= 2), |w| otherwise"); \
  module.def("scaled_grad_sq_sum", &ns##_routed::scaled_grad_sq_sum, "sum of (t * g)^2 over the list");    \
  module.def("perturb_", &ns##_routed::perturb_, "saved <- w; w <- w + eps");                               \
  module.def("restore_", &ns##_routed::restore_, "w <- saved, bit-exactly");                                \
  module.def("add_noise_", &ns##_routed::add_noise_, "saved <- w; w <- w + delta0 (Philox stream)");        \
  module.def("noise_grad_sums", &ns##_routed::noise_grad_sums, "(sum d^2, sum g^2, sum l d g, sum l^2 g^2)"); \
  module.def("mix_perturb_", &ns##_routed::mix_perturb_, "w <- saved + a delta0 + b g");                    \
  module.def("standard_normal", &ns::standard_normal, "the noise stream (numel, seed, j, step, offset)")

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sam_kernels native extension: host (at::parallel_for) and CUDA multi-tensor backend operations";
  auto host = m.def_submodule("host", "operations on CPU tensors (backend='cpp')");
  SAM_BIND_OPERATIONS(host, sam_host);
  namespace py = pybind11;
  py::class_<sam_host::StepPlan>(host, "StepPlan", "the cached step plan of backend='cpp' (csrc/host_plan.h)")
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, int64_t, at::Tensor, at::Tensor>(),
           py::arg("params"), py::arg("group_of"), py::arg("num_groups"), py::arg("skip_flag"), py::arg("skip_count"))
      .def("sam_first_step", &sam_host::StepPlan::sam_first_step, py::arg("rhos"), py::arg("etas"), py::arg("mode"),
           py::arg("p_inf"))
      .def("add_noise", &sam_host::StepPlan::add_noise, py::arg("gammas"), py::arg("seed"), py::arg("step"))
      .def("rsam_first_step", &sam_host::StepPlan::rsam_first_step, py::arg("rhos"), py::arg("gammas"),
           py::arg("lams"), py::arg("seed"), py::arg("step"))
      .def("restore", &sam_host::StepPlan::restore)
      .def("active", &sam_host::StepPlan::active)
      .def("clear_active", &sam_host::StepPlan::clear_active)
      .def("saved", &sam_host::StepPlan::saved)
      .def("set_saved", &sam_host::StepPlan::set_saved)
      .def("__len__", &sam_host::StepPlan::size);
  host.def("philox4x32_10", &sam_host::philox4x32_10, "Philox4x32-10 of one counter (4 words) and key (2 words)");
#ifdef SAM_WITH_CUDA
  m.attr("HAS_CUDA") = true;
  auto cuda = m.def_submodule("cuda", "operations on CUDA tensors of one device (backend='cuda')");
  SAM_BIND_OPERATIONS(cuda, sam_cuda);
#else
  m.attr("HAS_CUDA") = false;
#endif
}
