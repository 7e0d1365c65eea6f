// The sampling sweeps for AVX2 CPUs; setup.py builds this file with -mavx2 -mfma -mf16c.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/sweeps.h"
