// Declares the fasp_ext op library once; kernels are registered per device in csrc/cpu/*.cpp and
// csrc/cuda/*.cu with TORCH_LIBRARY_IMPL. The semantics are those of fasp_ext/reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fasp_ext._C loads this shared object, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fasp_ext, m) {
  // s += sum over tokens of x^2; H += X^T X when H is given. fp32 accumulation.
  m.def("accumulate_stats(Tensor X, Tensor(a!) s, Tensor(b!)? H) -> ()");
  // Kept group indices (int64, ascending) of the k best sqrt(s_j) * sum_i |W[i,j]| scores.
  m.def("score_select(Tensor W, Tensor s, int k, Tensor? groups, int segments) -> Tensor");
  // (W', report[path, lambda, attempts]) of the damped least-squares restoration.
  m.def("restore(Tensor W, Tensor H, Tensor kept, float damp, bool use_fp64, int max_retries) -> (Tensor, Tensor)");
}
