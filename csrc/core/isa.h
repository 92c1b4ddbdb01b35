// The CPU kernels are compiled once per ISA (baseline, AVX2, AVX512). Every inline function they
// use must then live in a per-ISA namespace, or the linker may keep an AVX512 copy of an inline
// function for the baseline kernels (an illegal instruction on an older CPU). CUDA and the glue
// see no CPU_CAPABILITY and use plain vae_fast::.
#pragma once
#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
#define VF_ISA_NS_BEGIN namespace CPU_CAPABILITY {
#define VF_ISA_NS_END }
#else
#define VF_ISA_NS_BEGIN
#define VF_ISA_NS_END
#endif
