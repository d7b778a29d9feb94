// fasp_ext::build_info() -> str: a JSON record of how this library was built (written by
// setup.py or CMake into the generated header fasp_build_config.h). fasp_ext.build_info() reads it.
#include <torch/library.h>

#include <string>

#include "fasp_build_config.h"

#ifndef FASP_EXT_BUILD_JSON
#define FASP_EXT_BUILD_JSON "{}"
#endif

TORCH_LIBRARY_FRAGMENT(fasp_ext, m) {
  m.def("build_info() -> str", []() -> std::string { return FASP_EXT_BUILD_JSON; });
}
