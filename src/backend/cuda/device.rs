//! `CudaDev`: the driver probe and one device handle (context, stream, loaded kernels, cuBLAS).
//!
//! cudarc is built with dynamic loading: the first driver call dlopens `libcuda` and *panics* if it
//! is missing, so [`probe`] checks for the library (and for cuBLAS) before anything else, and every
//! constructor goes through it. All work a `CudaDev` issues goes to its single stream, so work is
//! ordered without events; cudarc's per-buffer event tracking is switched off for the same reason.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction, CUmodule, CUresult};
use cudarc::driver::{result, CudaContext, CudaEvent, CudaSlice, CudaStream};

use super::{dev_err, kernels};
use crate::error::{Error, Result};

/// Checks that the CUDA driver and cuBLAS can be loaded and that a device exists; returns the
/// device count. Never panics: a missing library or device is an `Error::Device`.
pub fn probe() -> Result<usize> {
    // SAFETY: `is_culib_present` only tries to dlopen the candidate library names and closes them.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Device("no CUDA driver found (libcuda.so.1)".into()));
    }
    match result::init() {
        Ok(()) => {}
        Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => {
            return Err(Error::Device("no CUDA device".into()))
        }
        Err(e) => return Err(Error::Device(format!("cuInit failed: {e}"))),
    }
    let n = result::device::get_count().map_err(dev_err("cuDeviceGetCount"))?;
    if n <= 0 {
        return Err(Error::Device("no CUDA device".into()));
    }
    // SAFETY: as above, a dlopen probe of the cuBLAS library names.
    if !unsafe { blas_sys::is_culib_present() } {
        return Err(Error::Device(
            "cuBLAS not found (libcublas.so.13 or .12); put the folder holding libcublas*.so* \
             on LD_LIBRARY_PATH (see scripts/gpu-check.sh)"
                .into(),
        ));
    }
    Ok(n as usize)
}

/// Makes the device's default memory pool (which serves the stream-ordered allocations of every
/// `DBuf`) keep freed memory instead of returning it to the driver at each synchronize: a decode
/// step allocates and frees its activations, and re-mapping them every step costs far more than
/// the kernels of a small batch. Best effort: on failure allocations still work, only slower.
fn keep_pool_memory(ctx: &CudaContext) {
    let Some(pool) = default_pool(ctx) else {
        return;
    };
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to a cuuint64_t, which `threshold` is.
    let _ = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
    };
}

/// The default memory pool of `ctx`'s device, with `ctx` bound; `None` when it cannot be had.
fn default_pool(ctx: &CudaContext) -> Option<sys::CUmemoryPool> {
    ctx.bind_to_thread().ok()?;
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    let got = unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) };
    // SAFETY: on success cuDeviceGetDefaultMemPool initialised `pool`.
    (got == CUresult::CUDA_SUCCESS).then(|| unsafe { pool.assume_init() })
}

/// Bytes the device's default memory pool holds but no buffer uses (freed `DBuf`s it keeps, see
/// [`keep_pool_memory`]): allocatable though the driver does not count them as free. 0 when the
/// pool cannot be queried.
fn pool_idle_bytes(ctx: &CudaContext) -> usize {
    let Some(pool) = default_pool(ctx) else {
        return 0;
    };
    let attr = |a: sys::CUmemPool_attribute| -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: both attributes take a pointer to a cuuint64_t, which `v` is.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut c_void) };
        (r == CUresult::CUDA_SUCCESS).then_some(v)
    };
    use sys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT as RESERVED, CU_MEMPOOL_ATTR_USED_MEM_CURRENT as USED,
    };
    match (attr(RESERVED), attr(USED)) {
        (Some(r), Some(u)) => r.saturating_sub(u) as usize,
        _ => 0,
    }
}

/// Binds `ctx` for a destructor. cudarc's `bind_to_thread` first returns (and clears) any error
/// recorded earlier, so a second try binds after a stale error.
fn bind_for_drop(ctx: &CudaContext) -> bool {
    ctx.bind_to_thread().is_ok() || ctx.bind_to_thread().is_ok()
}

/// A loaded fatbin; unloaded on drop.
struct Module {
    name: &'static str,
    raw: CUmodule,
    ctx: Arc<CudaContext>,
}

impl Drop for Module {
    fn drop(&mut self) {
        if bind_for_drop(&self.ctx) {
            // SAFETY: `raw` came from cuModuleLoadData in this context and is unloaded only here;
            // no function handle outlives the `CudaDev` that owns this module.
            let _ = unsafe { result::module::unload(self.raw) };
        }
    }
}

/// A cuBLAS handle bound to one stream; destroyed on drop.
struct Blas {
    handle: blas_sys::cublasHandle_t,
    ctx: Arc<CudaContext>,
}

impl Drop for Blas {
    fn drop(&mut self) {
        if bind_for_drop(&self.ctx) {
            // SAFETY: the handle was created by cublasCreate and is destroyed exactly once, here.
            let _ = unsafe { blas::destroy_handle(self.handle) };
        }
    }
}

/// (free, total) bytes of device `ordinal`'s memory, read through its primary context (cheap:
/// no stream, module or cuBLAS handle is made).
pub fn mem_info_of(ordinal: usize) -> Result<(usize, usize)> {
    CudaContext::new(ordinal)
        .map_err(dev_err("creating the CUDA context"))?
        .mem_get_info()
        .map_err(dev_err("reading memory info"))
}

/// One device as seen by one rank: a context handle (the device's primary context), one stream,
/// every embedded kernel module, and a cuBLAS handle on that stream. Thread-confined.
pub struct CudaDev {
    // Field order is drop order: handles go before the context they live in.
    funcs: RefCell<HashMap<String, CUfunction>>,
    blas: Blas,
    modules: Vec<Module>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    ordinal: usize,
    name: String,
    num_sms: u32,
}

impl Drop for CudaDev {
    fn drop(&mut self) {
        // Nothing may still run when the modules and the cuBLAS handle go (the fields drop next).
        // The raw call: cudarc's `synchronize` returns early on an error recorded earlier.
        if bind_for_drop(&self.ctx) {
            // SAFETY: the stream belongs to this context and is destroyed only after this.
            let _ = unsafe { sys::cuStreamSynchronize(self.stream.cu_stream()) };
        }
    }
}

impl CudaDev {
    /// Opens device `ordinal`: probes the driver, makes a stream, loads every kernel fatbin and
    /// creates a cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe()?;
        if ordinal >= count {
            return Err(Error::Device(format!(
                "device {ordinal} requested but only {count} CUDA device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev_err("creating the CUDA context"))?;
        // SAFETY: every buffer this device allocates is used on its one stream, and cross-stream
        // use (the same-device comm) is ordered with explicit events, so cudarc's automatic
        // per-buffer events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev_err("creating a stream"))?;
        keep_pool_memory(&ctx);
        let mut modules = Vec::with_capacity(kernels::KERNELS.len());
        for (name, image) in kernels::KERNELS {
            // SAFETY: `image` is a complete fatbin produced by nvcc and embedded 16-byte aligned
            // by build.rs; the driver parses it in place and copies what it needs.
            let raw = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(dev_err(format!(
                    "loading kernels from cuda/{name}.cu (no SASS or PTX for this GPU/driver?)"
                )))?;
            modules.push(Module {
                name,
                raw,
                ctx: ctx.clone(),
            });
        }
        let handle = blas::create_handle().map_err(dev_err("creating the cuBLAS handle"))?;
        let blas = Blas {
            handle,
            ctx: ctx.clone(),
        };
        // SAFETY: both handles are valid and belong to this context.
        unsafe { blas::set_stream(handle, stream.cu_stream() as blas_sys::cudaStream_t) }
            .map_err(dev_err("binding cuBLAS to the stream"))?;
        let name = ctx.name().map_err(dev_err("reading the device name"))?;
        let num_sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(dev_err("reading the SM count"))?;
        Ok(CudaDev {
            funcs: RefCell::new(HashMap::new()),
            blas,
            modules,
            stream,
            ctx,
            ordinal,
            name,
            num_sms: num_sms.max(1) as u32,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn num_sms(&self) -> u32 {
        self.num_sms
    }
    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx
            .compute_capability()
            .map_err(dev_err("reading the compute capability"))
    }
    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(dev_err("reading memory info"))
    }

    /// Bytes a new allocation of any size can get: the memory pool first gives the driver back
    /// what it keeps from freed buffers (pieces the size of earlier allocations, which serve
    /// only allocations that fit one of them), then the driver's free memory plus whatever the
    /// pool could not give back. Buffers freed in stream order count once their stream has
    /// reached the free (synchronize first).
    pub fn allocatable_bytes(&self) -> Result<usize> {
        if let Some(pool) = default_pool(&self.ctx) {
            // SAFETY: a live pool handle. Best effort: a pool that cannot trim keeps its memory,
            // which the idle bytes below still count.
            let _ = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
        }
        let (free, _) = self.mem_info()?;
        Ok(free + pool_idle_bytes(&self.ctx))
    }

    /// This device's default memory pool once all work in its context has run.
    fn drained_pool(&self) -> Result<sys::CUmemoryPool> {
        self.synchronize_device()?;
        default_pool(&self.ctx)
            .ok_or_else(|| Error::Device("the device's default memory pool is unavailable".into()))
    }

    /// (bytes in use now, the most in use since the last [`CudaDev::reset_pool_peak`]) of the
    /// stream-ordered allocations on this device (its default memory pool, which serves every
    /// `DBuf` of every context on it), after waiting for all work in this device's context, so
    /// buffers freed in stream order no longer count. For tests that measure what a step
    /// allocates.
    pub fn pool_used(&self) -> Result<(u64, u64)> {
        use sys::CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_USED_MEM_CURRENT as NOW, CU_MEMPOOL_ATTR_USED_MEM_HIGH as HIGH,
        };
        let pool = self.drained_pool()?;
        let attr = |a: sys::CUmemPool_attribute| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: both attributes take a pointer to a cuuint64_t, which `v` is.
            let r =
                unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut c_void) };
            match r {
                CUresult::CUDA_SUCCESS => Ok(v),
                e => Err(Error::Device(format!(
                    "reading the memory pool's use: {e:?}"
                ))),
            }
        };
        Ok((attr(NOW)?, attr(HIGH)?))
    }

    /// Restarts the high watermark [`CudaDev::pool_used`] reports at what is in use now (after
    /// waiting for all work in this device's context).
    pub fn reset_pool_peak(&self) -> Result<()> {
        let pool = self.drained_pool()?;
        let mut zero: u64 = 0;
        // SAFETY: the high watermark attribute takes a pointer to a cuuint64_t (only 0, which
        // resets it), which `zero` is.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut c_void,
            )
        };
        match r {
            CUresult::CUDA_SUCCESS => Ok(()),
            e => Err(Error::Device(format!(
                "resetting the memory pool's peak: {e:?}"
            ))),
        }
    }

    /// Waits for all work on the device in this process (every stream of its context: the
    /// ranks sharing a GPU share its primary context).
    pub fn synchronize_device(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(dev_err("context synchronize"))
    }

    /// Waits for all work issued on this device's stream; reports asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(dev_err("stream synchronize"))?;
        self.ctx
            .check_err()
            .map_err(dev_err("deferred driver error"))
    }

    /// Makes this device's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(dev_err("binding the CUDA context"))
    }

    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    pub(crate) fn blas_handle(&self) -> blas_sys::cublasHandle_t {
        self.blas.handle
    }

    /// The kernel entry point `symbol` (e.g. "rmsnorm_bf16"), looked up once in the loaded modules.
    pub(crate) fn function(&self, symbol: &str) -> Result<CUfunction> {
        if let Some(f) = self.funcs.borrow().get(symbol) {
            return Ok(*f);
        }
        let c = CString::new(symbol)
            .map_err(|_| Error::Device(format!("bad kernel name {symbol:?}")))?;
        self.bind()?;
        for m in &self.modules {
            // SAFETY: `m.raw` is a loaded module of this context; a missing name is an error code.
            match unsafe { result::module::get_function(m.raw, c.clone()) } {
                Ok(f) => {
                    self.funcs.borrow_mut().insert(symbol.to_owned(), f);
                    return Ok(f);
                }
                Err(e) if e.0 == CUresult::CUDA_ERROR_NOT_FOUND => continue,
                Err(e) => {
                    return Err(Error::Device(format!(
                        "looking up kernel {symbol} in cuda/{}.cu: {e}",
                        m.name
                    )))
                }
            }
        }
        Err(Error::Device(format!(
            "kernel {symbol} not found in any of the loaded modules"
        )))
    }

    /// Errors unless kernel entry point `symbol` exists in the loaded modules.
    pub fn check_kernel(&self, symbol: &str) -> Result<()> {
        self.function(symbol).map(|_| ())
    }

    /// `n` bytes of uninitialised device memory, allocated in stream order.
    pub(crate) fn alloc_bytes(&self, n: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: the memory is uninitialised; every caller (DBuf) fills it before it is read.
        unsafe { self.stream.alloc::<u8>(n.max(1)) }
            .map_err(dev_err(format!("allocating {n} bytes of device memory")))
    }

    /// Copies host bytes to device address `dst` (stream ordered; the host buffer may be dropped
    /// on return, the driver stages pageable memory before returning).
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must be device memory of this context, not freed before the copy.
    pub(crate) unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        result::memcpy_htod_async(dst, src, self.cu_stream()).map_err(dev_err("copy to device"))
    }

    /// Copies device bytes at `src` into `dst` and waits for the copy.
    ///
    /// # Safety
    /// `src .. src + dst.len()` must be device memory of this context.
    pub(crate) unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        result::memcpy_dtoh_async(dst, src, self.cu_stream()).map_err(dev_err("copy to host"))?;
        self.synchronize()
    }

    /// Device-to-device copy of `bytes` bytes on this stream.
    ///
    /// # Safety
    /// Both ranges must be device memory visible to this context, not freed before the copy.
    pub(crate) unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        result::memcpy_dtod_async(dst, src, bytes, self.cu_stream())
            .map_err(dev_err("device-to-device copy"))
    }

    /// Sets `bytes` bytes at `dst` to `value`.
    ///
    /// # Safety
    /// `dst .. dst + bytes` must be device memory of this context.
    pub(crate) unsafe fn memset(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        result::memset_d8_async(dst, value, bytes, self.cu_stream()).map_err(dev_err("memset"))
    }

    /// A new event (timing disabled) for cross-stream ordering.
    pub(crate) fn new_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(None)
            .map_err(dev_err("creating an event"))
    }

    /// Records `ev` at the current end of this device's stream.
    pub(crate) fn record(&self, ev: &CudaEvent) -> Result<()> {
        ev.record(&self.stream)
            .map_err(dev_err("recording an event"))
    }

    /// Makes this device's stream wait for `ev` (recorded on any stream of the same GPU).
    pub(crate) fn wait(&self, ev: &CudaEvent) -> Result<()> {
        self.stream
            .wait(ev)
            .map_err(dev_err("waiting for an event"))
    }
}
