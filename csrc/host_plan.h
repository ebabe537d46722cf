// The cached step plan of backend="cpp" (docs/DESIGN.md §5): one object per optimizer and param list,
// one call per phase of a step, no per-tensor Python and no torch op between the passes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace sam_host {

// Built once over an optimizer's parameters in their stable order (every param of every group, frozen
// ones too: position i is the tensor number j of the R-SAM noise stream). Each phase reads the
// parameters' current data and gradients itself (so .to(), a new storage, a param gaining or losing its
// gradient need no rebuild), checks everything it will touch before its first write, and returns -1,
// having written nothing, when it cannot take the step here (a non-contiguous or sparse tensor, a
// gradient whose dtype, shape or device differs from its weight's, a weight changed mid-step): the
// caller then runs that phase on the generic path, which raises the errors that need raising.
// Every write to a weight bumps its version counter, as torch's in-place ops do.
class StepPlan {
 public:
  // group_of[i]: the param group of param i; skip_flag (0-d bool) and skip_count (0-d int64) are CPU
  // tensors that each first step writes: whether its norm was non-finite (perturbation skipped).
  StepPlan(std::vector<at::Tensor> params, std::vector<int64_t> group_of, int64_t num_groups, at::Tensor skip_flag,
           at::Tensor skip_count);

  // SAM/ASAM (mode 0 SAM, 1 element-wise, 2 filter-wise): over the params with a gradient, one pass
  // for Σ(t⊙g)² (filter norms computed there and kept), then saved ← w, w ← w + ε. Per-group ρ, η.
  int64_t sam_first_step(const std::vector<double>& rhos, const std::vector<double>& etas, int64_t mode, bool p_inf);
  // R-SAM noise_step over the params with requires_grad: norms of w kept, saved ← w, w ← w + δ₀.
  int64_t add_noise(const std::vector<double>& gammas, uint64_t seed, int64_t step);
  // R-SAM first step: noised params without a gradient restored; over the rest, one pass for
  // (Σδ₀², Σg², Σλδ₀·g, Σλ²g²), then w ← saved + a·δ₀ + b·g.
  int64_t rsam_first_step(const std::vector<double>& rhos, const std::vector<double>& gammas,
                          const std::vector<double>& lams, uint64_t seed, int64_t step);
  // w ← saved for the params the last phase moved; -1 (nothing written) when one of them changed
  // dtype, shape or layout since (the caller converts or refuses).
  int64_t restore();

  std::vector<int64_t> active() const;  // positions the last phase moved
  void clear_active() { views_.clear(); }
  at::Tensor saved(int64_t i) const;  // undefined until a phase needed it
  void set_saved(int64_t i, const at::Tensor& buffer);
  int64_t size() const { return static_cast<int64_t>(params_.size()); }

  // What a pass needs of one param, read once per phase: raw addresses, sizes, dtype, group.
  struct View {
    int64_t i;
    void* w;
    const void* g;
    void* s;
    int64_t numel, rows, fsize;  // rows/fsize: filters of an ndim >= 2 tensor; 0 for ndim <= 1
    at::ScalarType dtype;
    int64_t group;
  };

 private:
  bool view_of(int64_t i, bool with_grad, View& view);
  bool disjoint(const std::vector<View>& views);
  bool begin_step(bool with_grad);
  void record_skip(bool skipped);

  std::vector<at::Tensor> params_;
  std::vector<int64_t> group_of_;
  int64_t num_groups_;
  std::vector<at::Tensor> saved_;
  std::vector<std::vector<double>> norms_;  // per-filter norms of the last pass that computed them
  std::vector<View> views_;                 // the params the last phase moved
  std::vector<View> scratch_;
  std::vector<bool> kept_;  // per scratch_ view: the R-SAM sums pass left delta0 in the weight
  at::Tensor skip_flag_, skip_count_;
  uint64_t checked_layout_ = 0;  // signature of the last set of weight addresses found disjoint
};

}  // namespace sam_host
