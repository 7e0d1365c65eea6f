// What the op file of dcn_plugin::deform_conv (deform_conv.cpp) shares with its kernels: the workspace limit.
#pragma once

#include <cstdint>

namespace dcn_plugin {

// Bytes of scratch memory the drivers may use for one kind of buffer (a thread's columns, the
// threads' private copies of the images they scatter onto, their weight-gradient sums); the Triton
// driver reads it through dcn_plugin::_workspace_limit.
int64_t workspace_limit();

}  // namespace dcn_plugin
