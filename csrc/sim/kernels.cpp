// The shipped CUDA kernels compiled for the host (common/tfk_cuda.h host
// mode), for the tfk._sim extension: same sources as tfk._C, run on the CPU.
// A C++ file that includes the .cu files, because build tools send anything
// named .cu to nvcc. No torch headers here (host mode defines CUDA's names).
#include "attention/attention_bwd.cu"
#include "attention/attention_fwd.cu"
#include "kvcache/kvcache_fwd.cu"
#include "linear/linear_fwd.cu"
#include "linear/linear_stats.cu"
#include "moe/moe_elementwise.cu"
#include "moe/moe_gemm.cu"
#include "moe/moe_gemm_tn.cu"
#include "moe/moe_route.cu"
