// blas.cpp - the cuBLAS subset pat calls (cublasGemmEx and handle management), on the CPU.
//
// cublasGemmEx is column-major C = alpha * op(A) * op(B) + beta * C with f32, f16 or bf16 storage
// and f32 compute: every product is accumulated in f32 in k order and rounded once to C's dtype
// (cuBLAS may split k and use FMA, so results agree to rounding, not bitwise). Operand ranges are
// checked against live device allocations.
#include "emu_driver.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

namespace {

enum : int { OK = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum : int { COMPUTE_32F = 68, COMPUTE_32F_PEDANTIC = 69, COMPUTE_32F_FAST_16F = 74,
             COMPUTE_32F_FAST_16BF = 75, COMPUTE_32F_FAST_TF32 = 77 };

struct Handle {
    void* stream = nullptr;
};

size_t elem_size(int t) { return t == R_32F ? 4 : (t == R_16F || t == R_16BF) ? 2 : 0; }

float load(const void* base, size_t i, int t) {
    switch (t) {
    case R_32F: return static_cast<const float*>(base)[i];
    case R_16F: return __half2float(static_cast<const __half*>(base)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    }
}

void store(void* base, size_t i, int t, float v) {
    switch (t) {
    case R_32F: static_cast<float*>(base)[i] = v; break;
    case R_16F: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    }
}

// Bytes spanned by a column-major rows x cols operand with leading dimension ld.
size_t span(int rows, int cols, int ld, int t) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * elem_size(t);
}

} // namespace

extern "C" {

int cublasCreate_v2(void** h) {
    if (!h) return INVALID_VALUE;
    if (emud::current_device() < 0) return NOT_INITIALIZED;
    *h = new Handle;
    return OK;
}
int cublasDestroy_v2(void* h) {
    delete static_cast<Handle*>(h);
    return OK;
}
int cublasSetStream_v2(void* h, void* s) {
    if (!h) return NOT_INITIALIZED;
    static_cast<Handle*>(h)->stream = s;
    return OK;
}
int cublasSetMathMode(void* h, int) { return h ? OK : NOT_INITIALIZED; }
int cublasSetWorkspace_v2(void* h, void*, size_t) { return h ? OK : NOT_INITIALIZED; }

int cublasGemmEx(void* h, int transa, int transb, int m, int n, int k, const void* alpha,
                 const void* A, int a_type, int lda, const void* B, int b_type, int ldb,
                 const void* beta, void* C, int c_type, int ldc, int compute, int /*algo*/) {
    if (!h) return NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0 || !alpha || !beta) return INVALID_VALUE;
    if (transa < 0 || transa > 1 || transb < 0 || transb > 1) {
        emud::say("cublasGemmEx: only CUBLAS_OP_N and CUBLAS_OP_T are emulated");
        return NOT_SUPPORTED;
    }
    if (!elem_size(a_type) || !elem_size(b_type) || !elem_size(c_type)) {
        emud::say("cublasGemmEx: data type not emulated (f32, f16, bf16 are)");
        return NOT_SUPPORTED;
    }
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_PEDANTIC && compute != COMPUTE_32F_FAST_16F &&
        compute != COMPUTE_32F_FAST_16BF && compute != COMPUTE_32F_FAST_TF32) {
        emud::say("cublasGemmEx: compute type " + std::to_string(compute) + " not emulated (f32 ones are)");
        return NOT_SUPPORTED;
    }
    const int a_rows = transa ? k : m, a_cols = transa ? m : k;
    const int b_rows = transb ? n : k, b_cols = transb ? k : n;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) {
        emud::say("cublasGemmEx: leading dimension smaller than the operand's rows");
        return INVALID_VALUE;
    }
    if (m == 0 || n == 0) return OK;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    // In stream order, after whatever is queued ahead of it (e.g. an NCCL all-reduce of A).
    const int r = emud::submit(static_cast<Handle*>(h)->stream, [=](bool) {
        if ((k > 0 && (!emud::check_device_range((uint64_t)(uintptr_t)A, span(a_rows, a_cols, lda, a_type), "cublasGemmEx A") ||
                       !emud::check_device_range((uint64_t)(uintptr_t)B, span(b_rows, b_cols, ldb, b_type), "cublasGemmEx B"))) ||
            !emud::check_device_range((uint64_t)(uintptr_t)C, span(m, n, ldc, c_type), "cublasGemmEx C"))
            return 719; // CUDA_ERROR_LAUNCH_FAILED, as a faulting kernel reports at the next sync
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                float acc = 0.0f;
                for (int p = 0; p < k; ++p) {
                    const size_t ai = transa ? (size_t)p + (size_t)i * lda : (size_t)i + (size_t)p * lda;
                    const size_t bi = transb ? (size_t)j + (size_t)p * ldb : (size_t)p + (size_t)j * ldb;
                    acc += load(A, ai, a_type) * load(B, bi, b_type);
                }
                const size_t ci = (size_t)i + (size_t)j * ldc;
                // beta == 0 must not read C (it may hold NaN), as in cuBLAS.
                store(C, ci, c_type, be == 0.0f ? al * acc : al * acc + be * load(C, ci, c_type));
            }
        return 0;
    });
    if (r) return EXECUTION_FAILED;
    return OK;
}

} // extern "C"
