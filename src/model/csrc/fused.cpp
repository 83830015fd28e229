// Two ATen multi-tensor kernels that tch's generated bindings leave out (its generator skips every
// `_fused_adam*` and `_foreach*` operator): AdamW over all parameters in one kernel, and the EMA's lerp
// over all tensors in one kernel. On a GPU each replaces hundreds of small launches per training step; on a
// CPU the fused AdamW reads and writes each element once instead of through a dozen temporaries.
//
// Tensors arrive as tch's handles (`at::Tensor*`). A C++ exception must not cross into Rust: each entry
// point returns NULL on success or a malloc'ed message that the caller frees.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> gather(at::Tensor* const* tensors, size_t count) {
    std::vector<at::Tensor> list;
    list.reserve(count);
    for (size_t i = 0; i < count; ++i) list.push_back(*tensors[i]);
    return list;
}

char* copy_message(const char* what) {
    size_t len = std::strlen(what);
    char* copy = static_cast<char*>(std::malloc(len + 1));
    if (copy != nullptr) std::memcpy(copy, what, len + 1);
    return copy;
}

template <typename F>
char* guarded(F&& body) {
    try {
        body();
        return nullptr;
    } catch (const std::exception& e) {
        return copy_message(e.what());
    } catch (...) {
        return copy_message("unknown C++ exception");
    }
}

}  // namespace

extern "C" {

// `steps` holds each parameter's update count including this update (PyTorch's convention): the kernel
// derives the bias corrections from it.
char* lineguard_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                            at::Tensor* const* exp_avg_sqs, at::Tensor* const* steps, size_t count, double lr,
                            double beta1, double beta2, double weight_decay, double eps) {
    return guarded([&] {
        at::_fused_adamw_(gather(params, count), gather(grads, count), gather(exp_avgs, count),
                          gather(exp_avg_sqs, count), {}, gather(steps, count), lr, beta1, beta2, weight_decay,
                          eps, /*amsgrad=*/false, /*maximize=*/false);
    });
}

// targets[i] += weight * (ends[i] - targets[i]) for every i, in place.
char* lineguard_foreach_lerp(at::Tensor* const* targets, at::Tensor* const* ends, size_t count, double weight) {
    return guarded([&] { at::_foreach_lerp_(gather(targets, count), gather(ends, count), at::Scalar(weight)); });
}

}  // extern "C"
