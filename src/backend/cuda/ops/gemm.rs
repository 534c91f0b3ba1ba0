//! GEMMs through cuBLAS (`cublasGemmEx`, f32 compute for every storage dtype), row-major views.
//!
//! cuBLAS is column-major; a row-major [r, c] matrix is the column-major [c, r] transpose, so
//! row-major `out = x · op(w)` is computed as column-major `outᵀ = op(w)ᵀ · xᵀ`.

use std::ffi::c_void;

use cudarc::cublas::result as blas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};

use super::super::buffer::{DType, DView};
use super::super::dev_err;
use super::super::device::CudaDev;
use super::{i32_of, same_float};
use crate::error::Result;

fn cuda_type(dt: DType) -> cudaDataType_t {
    match dt {
        DType::Bf16 => cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
        _ => cudaDataType_t::CUDA_R_32F,
    }
}

/// Column-major C[m, n] = op(A) · B with A given as (`a`, `a_trans`, `lda`), B = (`b`, ldb = k).
struct Gemm<'a> {
    out: DView<'a>,
    a: DView<'a>,
    b: DView<'a>,
    m: usize,
    n: usize,
    k: usize,
    a_trans: bool,
    lda: usize,
}

fn run(dev: &CudaDev, g: Gemm<'_>, what: &str) -> Result<()> {
    let dt = same_float(&[g.out, g.a, g.b], what)?;
    g.out.need(g.n * g.m, what)?;
    g.a.need(g.m * g.k, what)?;
    g.b.need(g.n * g.k, what)?;
    let (m, n, k) = (i32_of(g.m, "m")?, i32_of(g.n, "n")?, i32_of(g.k, "k")?);
    let lda = i32_of(g.lda.max(1), "lda")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: zeros, without relying on cuBLAS's k = 0 quick return.
        // SAFETY: out holds n*m elements (checked above).
        return unsafe { dev.memset(g.out.ptr(), 0, g.n * g.m * dt.size()) };
    }
    let (alpha, beta) = (1.0f32, 0.0f32);
    let ty = cuda_type(dt);
    let op_a = if g.a_trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    };
    dev.bind()?;
    super::count_launch();
    // SAFETY: the handle is bound to this device's stream; out holds n*m, a m*k and b n*k elements
    // of the dtype passed as the cuBLAS data type, with the leading dimensions used here; alpha and
    // beta are host f32 scalars, as CUBLAS_COMPUTE_32F with the default pointer mode expects.
    unsafe {
        blas::gemm_ex(
            dev.blas_handle(),
            op_a,
            cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            &alpha as *const f32 as *const c_void,
            g.a.ptr() as *const c_void,
            ty,
            lda,
            g.b.ptr() as *const c_void,
            ty,
            k,
            &beta as *const f32 as *const c_void,
            g.out.ptr() as *mut c_void,
            ty,
            m,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(dev_err(format!("{what} ({n}x{k} · {k}x{m})")))
}

/// `out[n, m] = x[n, k] · w[m, k]ᵀ` (weights stored [out, in], like `cpu::matmul_nt`).
pub fn gemm_nt(
    dev: &CudaDev,
    out: DView<'_>,
    x: DView<'_>,
    w: DView<'_>,
    n: usize,
    k: usize,
    m: usize,
) -> Result<()> {
    // outᵀ[m, n] = w[m, k] · xᵀ: w row-major [m, k] is column-major [k, m] -> op T, lda = k.
    let g = Gemm {
        out,
        a: w,
        b: x,
        m,
        n,
        k,
        a_trans: true,
        lda: k,
    };
    run(dev, g, "gemm_nt")
}

/// `out[n, m] = x[n, k] · w[k, m]` (row-parallel weights stored [in, out], like `cpu::matmul_nn`).
pub fn gemm_nn(
    dev: &CudaDev,
    out: DView<'_>,
    x: DView<'_>,
    w: DView<'_>,
    n: usize,
    k: usize,
    m: usize,
) -> Result<()> {
    // outᵀ[m, n] = wᵀ · xᵀ: w row-major [k, m] is column-major [m, k] -> op N, lda = m.
    let g = Gemm {
        out,
        a: w,
        b: x,
        m,
        n,
        k,
        a_trans: false,
        lda: m,
    };
    run(dev, g, "gemm_nn")
}
