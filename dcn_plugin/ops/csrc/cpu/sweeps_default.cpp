// The sampling sweeps for CPUs without AVX2, built with the compiler's baseline flags.
#define CPU_CAPABILITY DEFAULT
#include "cpu/sweeps.h"
