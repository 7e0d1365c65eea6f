// The sampling sweeps for AVX-512 CPUs; setup.py builds this file with ATen's AVX512 flags (-mavx512f ...).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/sweeps.h"
