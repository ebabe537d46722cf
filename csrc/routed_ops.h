// The operations as bound to Python: any list of tensors in, per-dtype buckets to the kernels,
// and back the positions the kernels do not take (a non-contiguous tensor, or a gradient whose dtype
// differs from its weight's) for the caller to run on another backend.
//
// Doing this routing here rather than in Python keeps the per-tensor cost of a step to a few
// nanoseconds: a ResNet-50 step touches 161 tensors three times.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

namespace sam {

using Tensors = std::vector<at::Tensor>;
using Positions = std::vector<int64_t>;

struct Routing {
  std::vector<std::vector<size_t>> buckets;  // positions taken, one bucket per weight dtype
  Positions skipped;                         // positions left to the caller
};

// Routes position i to a bucket when weights[i] and others[k][i] are contiguous and of one dtype.
inline Routing route(const Tensors& weights, std::initializer_list<const Tensors*> others) {
  for (const Tensors* list : others)
    TORCH_CHECK(list->size() == weights.size(), "sam_kernels: tensor lists of different lengths (", list->size(),
                " and ", weights.size(), ")");
  Routing routing;
  std::map<at::ScalarType, size_t> bucket_of;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    bool ok = w.is_contiguous();
    for (const Tensors* list : others) {
      const at::Tensor& t = (*list)[i];
      ok = ok && t.is_contiguous() && t.scalar_type() == w.scalar_type();
    }
    if (!ok) {
      routing.skipped.push_back(static_cast<int64_t>(i));
      continue;
    }
    auto [it, added] = bucket_of.emplace(w.scalar_type(), routing.buckets.size());
    if (added) routing.buckets.emplace_back();
    routing.buckets[it->second].push_back(i);
  }
  return routing;
}

template <typename T>
std::vector<T> pick(const std::vector<T>& items, const std::vector<size_t>& positions) {
  std::vector<T> out;
  out.reserve(positions.size());
  for (size_t i : positions) out.push_back(items[i]);
  return out;
}

// Each per-tensor list of `lists` picked at `positions`.
template <typename T>
std::vector<std::vector<T>> pick_each(const std::vector<std::vector<T>>& lists, const std::vector<size_t>& positions) {
  std::vector<std::vector<T>> out;
  out.reserve(lists.size());
  for (const auto& list : lists) {
    TORCH_CHECK(list.size() >= positions.size(), "sam_kernels: a per-tensor list is shorter than the tensor lists");
    out.push_back(pick(list, positions));
  }
  return out;
}

// Sum of per-bucket totals: float32, or float64 when any bucket was float64 (None when there is none).
inline c10::optional<at::Tensor> add_totals(const Tensors& parts) {
  if (parts.empty()) return c10::nullopt;
  if (parts.size() == 1) return parts.front();
  bool any_double = false;
  for (const auto& p : parts) any_double = any_double || p.scalar_type() == at::kDouble;
  at::Tensor total = parts.front().to(any_double ? at::kDouble : at::kFloat);
  for (size_t k = 1; k < parts.size(); ++k) total = total + parts[k].to(total.scalar_type());
  return total;
}

// The routed form of one backend's operations. Ops has static member pointers to its functions
// (sam_host:: or sam_cuda::, see bindings.cpp), each taking lists of one dtype.
template <typename Ops>
struct Routed {
  static std::tuple<Tensors, Positions> filter_norms(const Tensors& tensors) {
    const Routing r = route(tensors, {});
    Tensors out(tensors.size());
    for (const auto& b : r.buckets) {
      Tensors norms = Ops::filter_norms(pick(tensors, b));
      for (size_t k = 0; k < b.size(); ++k) out[b[k]] = norms[k];
    }
    return {out, r.skipped};
  }

  static std::tuple<c10::optional<at::Tensor>, Positions> scaled_grad_sq_sum(const Tensors& params,
                                                                             const Tensors& grads,
                                                                             const std::vector<double>& etas,
                                                                             int64_t mode) {
    const Routing r = route(params, {&grads});
    Tensors parts;
    for (const auto& b : r.buckets) parts.push_back(Ops::scaled_grad_sq_sum(pick(params, b), pick(grads, b), pick(etas, b), mode));
    return {add_totals(parts), r.skipped};
  }

  static Positions perturb_(const Tensors& params, const Tensors& grads, const Tensors& saved, const Tensors& scales,
                            const std::vector<double>& etas, int64_t mode, bool p_inf) {
    const Routing r = route(params, {&grads, &saved});
    for (const auto& b : r.buckets)
      Ops::perturb_(pick(params, b), pick(grads, b), pick(saved, b), pick(scales, b), pick(etas, b), mode, p_inf);
    return r.skipped;
  }

  static Positions restore_(const Tensors& params, const Tensors& saved) {
    const Routing r = route(params, {&saved});
    for (const auto& b : r.buckets) Ops::restore_(pick(params, b), pick(saved, b));
    return r.skipped;
  }

  static Positions add_noise_(const Tensors& params, const Tensors& saved, const std::vector<double>& gammas,
                              uint64_t seed, const Positions& tensor_indices, int64_t step, const Positions& offsets) {
    const Routing r = route(params, {&saved});
    for (const auto& b : r.buckets)
      Ops::add_noise_(pick(params, b), pick(saved, b), pick(gammas, b), seed, pick(tensor_indices, b), step,
                      pick(offsets, b));
    return r.skipped;
  }

  static std::tuple<c10::optional<at::Tensor>, Positions> noise_grad_sums(
      const Tensors& grads, const Tensors& saved, const std::vector<double>& gammas, const std::vector<double>& lams,
      uint64_t seed, const Positions& tensor_indices, int64_t step, const Positions& offsets) {
    const Routing r = route(saved, {&grads});
    Tensors parts;
    for (const auto& b : r.buckets)
      parts.push_back(Ops::noise_grad_sums(pick(grads, b), pick(saved, b), pick(gammas, b), pick(lams, b), seed,
                                           pick(tensor_indices, b), step, pick(offsets, b)));
    return {add_totals(parts), r.skipped};
  }

  static Positions mix_perturb_(const Tensors& params, const Tensors& grads, const Tensors& saved,
                                const Tensors& noise_coefs, const Tensors& grad_coefs, const std::vector<double>& gammas,
                                uint64_t seed, const Positions& tensor_indices, int64_t step, const Positions& offsets) {
    const Routing r = route(params, {&grads, &saved});
    for (const auto& b : r.buckets)
      Ops::mix_perturb_(pick(params, b), pick(grads, b), pick(saved, b), pick(noise_coefs, b), pick(grad_coefs, b),
                        pick(gammas, b), seed, pick(tensor_indices, b), step, pick(offsets, b));
    return r.skipped;
  }

  // The fused second step (fused_step_ops.inc). Members of a class template are instantiated only when
  // bound, so a backend without these functions binds the rest.
  static Positions restore_sgd_(const Tensors& params, const Tensors& saved, const Tensors& grads,
                                const Tensors& momenta, const Tensors& skips,
                                const std::vector<std::vector<double>>& hypers) {
    const Routing r = route(params, {&saved, &grads, &momenta});
    for (const auto& b : r.buckets)
      Ops::restore_sgd_(pick(params, b), pick(saved, b), pick(grads, b), pick(momenta, b), pick(skips, b),
                        pick_each(hypers, b));
    return r.skipped;
  }

  static Positions restore_adam_(const Tensors& params, const Tensors& saved, const Tensors& grads,
                                 const Tensors& exp_avgs, const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                                 const Tensors& skips, const std::vector<std::vector<double>>& hypers) {
    const Routing r = route(params, {&saved, &grads, &exp_avgs, &exp_avg_sqs, &max_exp_avg_sqs});
    for (const auto& b : r.buckets)
      Ops::restore_adam_(pick(params, b), pick(saved, b), pick(grads, b), pick(exp_avgs, b), pick(exp_avg_sqs, b),
                         pick(max_exp_avg_sqs, b), pick(skips, b), pick_each(hypers, b));
    return r.skipped;
  }

  static std::tuple<c10::optional<at::Tensor>, Positions> msam_sgd_(const Tensors& params, const Tensors& grads,
                                                                    const Tensors& momenta, const Tensors& shifts,
                                                                    const Tensors& skips,
                                                                    const std::vector<std::vector<double>>& hypers) {
    const Routing r = route(params, {&grads, &momenta});
    Tensors parts;
    for (const auto& b : r.buckets)
      parts.push_back(Ops::msam_sgd_(pick(params, b), pick(grads, b), pick(momenta, b), pick(shifts, b),
                                     pick(skips, b), pick_each(hypers, b)));
    return {add_totals(parts), r.skipped};
  }

  // The SAM family (family_ops.inc); instantiated only when bound.
  static Positions copy_(const Tensors& targets, const Tensors& sources) {
    const Routing r = route(targets, {&sources});
    for (const auto& b : r.buckets) Ops::copy_(pick(targets, b), pick(sources, b));
    return r.skipped;
  }

  static std::tuple<c10::optional<at::Tensor>, Positions> pair_sums(const Tensors& firsts, const Tensors& seconds) {
    const Routing r = route(firsts, {&seconds});
    Tensors parts;
    for (const auto& b : r.buckets) parts.push_back(Ops::pair_sums(pick(firsts, b), pick(seconds, b)));
    return {add_totals(parts), r.skipped};
  }

  static Positions combine_(const Tensors& targets, const Tensors& others, const Tensors& target_coefs,
                            const Tensors& other_coefs) {
    const Routing r = route(targets, {&others});
    for (const auto& b : r.buckets)
      Ops::combine_(pick(targets, b), pick(others, b), pick(target_coefs, b), pick(other_coefs, b));
    return r.skipped;
  }

  static Positions split_difference_(const Tensors& grads, const Tensors& firsts, const Tensors& skips) {
    const Routing r = route(grads, {&firsts});
    for (const auto& b : r.buckets) Ops::split_difference_(pick(grads, b), pick(firsts, b), pick(skips, b));
    return r.skipped;
  }

  static std::tuple<c10::optional<at::Tensor>, Positions> residual_sq_sum(const Tensors& params, const Tensors& grads,
                                                                          const Tensors& moments,
                                                                          const std::vector<double>& sigmas) {
    const Routing r = route(params, {&grads, &moments});
    Tensors parts;
    for (const auto& b : r.buckets)
      parts.push_back(Ops::residual_sq_sum(pick(params, b), pick(grads, b), pick(moments, b), pick(sigmas, b)));
    return {add_totals(parts), r.skipped};
  }

  static Positions residual_perturb_(const Tensors& params, const Tensors& grads, const Tensors& moments,
                                     const Tensors& saved, const Tensors& scales, const std::vector<double>& sigmas,
                                     const std::vector<double>& lmbdas) {
    const Routing r = route(params, {&grads, &moments, &saved});
    for (const auto& b : r.buckets)
      Ops::residual_perturb_(pick(params, b), pick(grads, b), pick(moments, b), pick(saved, b), pick(scales, b),
                             pick(sigmas, b), pick(lmbdas, b));
    return r.skipped;
  }
};

}  // namespace sam
