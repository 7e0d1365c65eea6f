// The sampling sweeps for AVX-512 CPUs; setup.py builds this file with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma, as ATen builds its AVX512 kernels.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/sweeps.h"
