//! Device memory: `DBuf` (owned, dtype-tagged, freed in stream order) and `DView` (a borrowed
//! window into one that carries its length and dtype, so launch wrappers can bounds-check).
//!
//! Device memory is not Rust memory: kernels may read and write any view they are given, and two
//! views into one buffer (q and k inside fused QKV) may both be written. What keeps this sound is
//! stream order (every op of a device runs on its one stream) and the bounds each wrapper checks.

use std::marker::PhantomData;

use cudarc::driver::{CudaSlice, DevicePtr};
use half::{bf16, f16};

use super::device::CudaDev;
use crate::error::{Error, Result};

/// Element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    F16,
    I32,
    U32,
    I64,
    /// Raw bytes (reshard copies).
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::Bf16 | DType::F16)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

/// Host element types that map 1:1 onto a device dtype.
pub trait HostElem: bytemuck::Pod {
    const DTYPE: DType;
}
impl HostElem for f32 {
    const DTYPE: DType = DType::F32;
}
impl HostElem for bf16 {
    const DTYPE: DType = DType::Bf16;
}
impl HostElem for f16 {
    const DTYPE: DType = DType::F16;
}
impl HostElem for i32 {
    const DTYPE: DType = DType::I32;
}
impl HostElem for u32 {
    const DTYPE: DType = DType::U32;
}
impl HostElem for i64 {
    const DTYPE: DType = DType::I64;
}
impl HostElem for u8 {
    const DTYPE: DType = DType::U8;
}

/// An owned device buffer of `len` elements of `dtype`. Freed in stream order on drop.
pub struct DBuf {
    mem: CudaSlice<u8>,
    len: usize,
    dtype: DType,
}

impl DBuf {
    /// `len` elements, every byte set to `byte` (0xFF makes NaN in every float dtype: a poison).
    pub fn filled(dev: &CudaDev, dtype: DType, len: usize, byte: u8) -> Result<Self> {
        let bytes = checked_bytes(dtype, len)?;
        let b = DBuf {
            mem: dev.alloc_bytes(bytes)?,
            len,
            dtype,
        };
        // SAFETY: the allocation holds at least `bytes` bytes.
        unsafe { dev.memset(b.ptr(), byte, bytes)? };
        Ok(b)
    }

    /// `len` elements left as the allocator gives them: for buffers a kernel or copy fills
    /// completely before anything reads them (a switch's message buffers).
    pub(crate) fn uninit(dev: &CudaDev, dtype: DType, len: usize) -> Result<Self> {
        let bytes = checked_bytes(dtype, len)?;
        Ok(DBuf {
            mem: dev.alloc_bytes(bytes)?,
            len,
            dtype,
        })
    }

    /// `len` zero elements.
    pub fn zeros(dev: &CudaDev, dtype: DType, len: usize) -> Result<Self> {
        Self::filled(dev, dtype, len, 0)
    }

    /// A copy of `data` on the device.
    pub fn from_slice<T: HostElem>(dev: &CudaDev, data: &[T]) -> Result<Self> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let b = DBuf {
            mem: dev.alloc_bytes(bytes.len())?,
            len: data.len(),
            dtype: T::DTYPE,
        };
        // SAFETY: the allocation holds exactly `bytes.len()` bytes (at least one).
        unsafe { dev.htod(b.ptr(), bytes)? };
        Ok(b)
    }

    /// f32 host data converted (round to nearest even) to the float `dtype` on the way up.
    pub fn from_f32(dev: &CudaDev, data: &[f32], dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_slice(dev, data),
            DType::Bf16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                Self::from_slice(dev, &v)
            }
            DType::F16 => {
                let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                Self::from_slice(dev, &v)
            }
            other => Err(Error::Device(format!(
                "from_f32: {} is not a float dtype",
                other.name()
            ))),
        }
    }

    /// Copies the whole buffer to the host (waits for the stream).
    pub fn to_vec<T: HostElem>(&self, dev: &CudaDev) -> Result<Vec<T>> {
        self.view().to_vec(dev)
    }

    /// The buffer's float contents widened to f32 (waits for the stream).
    pub fn to_f32(&self, dev: &CudaDev) -> Result<Vec<f32>> {
        self.view().to_f32(dev)
    }

    /// Overwrites elements `offset ..` with `data` (same dtype).
    pub fn write<T: HostElem>(&mut self, dev: &CudaDev, offset: usize, data: &[T]) -> Result<()> {
        let v = self.view().slice(offset, data.len())?;
        v.check_dtype(T::DTYPE, "write")?;
        // SAFETY: `slice` checked that `data.len()` elements fit after `offset`.
        unsafe { dev.htod(v.ptr(), bytemuck::cast_slice(data)) }
    }

    /// Sets every byte to `byte`.
    pub fn fill_bytes(&mut self, dev: &CudaDev, byte: u8) -> Result<()> {
        // SAFETY: exactly the buffer's bytes.
        unsafe { dev.memset(self.ptr(), byte, self.len * self.dtype.size()) }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// The whole buffer as a view.
    pub fn view(&self) -> DView<'_> {
        DView {
            ptr: self.ptr(),
            len: self.len,
            dtype: self.dtype,
            _owner: PhantomData,
        }
    }

    fn ptr(&self) -> u64 {
        // With event tracking disabled (see CudaDev::new) the returned guard records nothing.
        let (p, _guard) = self.mem.device_ptr(self.mem.stream());
        p
    }
}

fn checked_bytes(dtype: DType, len: usize) -> Result<usize> {
    len.checked_mul(dtype.size()).ok_or_else(|| {
        Error::Device(format!(
            "buffer of {len} {} elements overflows",
            dtype.name()
        ))
    })
}

/// A window of `len` elements of `dtype` starting at a device address, borrowed from a `DBuf`.
#[derive(Clone, Copy, Debug)]
pub struct DView<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    _owner: PhantomData<&'a DBuf>,
}

impl<'a> DView<'a> {
    /// A view of `len` elements of `dtype` at device address `ptr`.
    ///
    /// # Safety
    /// `ptr .. ptr + len * dtype.size()` must be device memory (of this GPU) that stays allocated
    /// for `'a` and for as long as work using the view may still run on any stream.
    pub unsafe fn from_raw(ptr: u64, len: usize, dtype: DType) -> DView<'a> {
        DView {
            ptr,
            len,
            dtype,
            _owner: PhantomData,
        }
    }

    /// Device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Elements `offset .. offset + len`.
    pub fn slice(self, offset: usize, len: usize) -> Result<DView<'a>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(DView {
                ptr: self.ptr + (offset * self.dtype.size()) as u64,
                len,
                ..self
            }),
            _ => Err(Error::Device(format!(
                "view [{offset}, {offset}+{len}) outside a buffer of {} elements",
                self.len
            ))),
        }
    }

    /// Elements `offset ..` to the end.
    pub fn at(self, offset: usize) -> Result<DView<'a>> {
        let len = self.len.checked_sub(offset).ok_or_else(|| {
            Error::Device(format!(
                "offset {offset} past a buffer of {} elements",
                self.len
            ))
        })?;
        self.slice(offset, len)
    }

    /// Errors unless this view has dtype `want`.
    pub fn check_dtype(&self, want: DType, what: &str) -> Result<()> {
        if self.dtype == want {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "{what}: expected a {} buffer, got {}",
                want.name(),
                self.dtype.name()
            )))
        }
    }

    /// Errors unless the view holds at least `need` elements.
    pub fn need(&self, need: usize, what: &str) -> Result<()> {
        if self.len >= need {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "{what}: buffer has {} elements, needs {need}",
                self.len
            )))
        }
    }

    /// Copies the view to the host (waits for the stream).
    pub fn to_vec<T: HostElem>(&self, dev: &CudaDev) -> Result<Vec<T>> {
        self.check_dtype(T::DTYPE, "to_vec")?;
        let mut out = vec![T::zeroed(); self.len];
        // SAFETY: the view spans exactly `len` elements of T inside a live buffer.
        unsafe { dev.dtoh(bytemuck::cast_slice_mut(&mut out), self.ptr)? };
        Ok(out)
    }

    /// Overwrites the view's first `data.len()` elements with `data` converted to its float dtype.
    pub fn write_f32(&self, dev: &CudaDev, data: &[f32]) -> Result<()> {
        self.need(data.len(), "write_f32")?;
        let bytes: Vec<u8> = match self.dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::Bf16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::F16 => {
                let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            other => {
                return Err(Error::Device(format!(
                    "write_f32: {} is not a float dtype",
                    other.name()
                )))
            }
        };
        // SAFETY: the view holds at least data.len() elements of its dtype (checked above).
        unsafe { dev.htod(self.ptr, &bytes) }
    }

    /// Float contents widened to f32 (waits for the stream).
    pub fn to_f32(&self, dev: &CudaDev) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_vec(dev),
            DType::Bf16 => Ok(self
                .to_vec::<bf16>(dev)?
                .into_iter()
                .map(bf16::to_f32)
                .collect()),
            DType::F16 => Ok(self
                .to_vec::<f16>(dev)?
                .into_iter()
                .map(f16::to_f32)
                .collect()),
            other => Err(Error::Device(format!(
                "to_f32: {} is not a float dtype",
                other.name()
            ))),
        }
    }
}
