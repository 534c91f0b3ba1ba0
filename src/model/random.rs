//! Random tensors for `model::init`: each tensor's bytes generated on demand, deterministically
//! from (seed, name), in fixed-size chunks so the result does not depend on the thread count.

use std::borrow::Cow;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{tensor::View, Dtype as StDtype};

use crate::dtype::Dtype;

/// (bytes per element, safetensors dtype, config.json `torch_dtype`) of a storage dtype.
pub(crate) fn info(d: Dtype) -> (usize, StDtype, &'static str) {
    match d {
        Dtype::F32 => (4, StDtype::F32, "float32"),
        Dtype::Bf16 => (2, StDtype::BF16, "bfloat16"),
        Dtype::F16 => (2, StDtype::F16, "float16"),
    }
}

/// 64-bit FNV-1a: a stable hash of tensor names (std's hasher may change between releases).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
    /// Uniform, std 1.
    Embedding,
    /// Uniform, std 1/sqrt(fan_in).
    Linear { fan_in: usize },
    /// 1 + uniform noise of std 0.1.
    Norm,
}

/// Elements per independently seeded ChaCha stream: fixed, so the bytes do not depend on thread count.
pub(crate) const CHUNK: usize = 1 << 16;

/// A tensor whose bytes are generated on demand in `data()`, deterministically from (seed, name).
pub(crate) struct LazyTensor {
    pub shape: Vec<usize>,
    init: Init,
    dtype: Dtype,
    seed: u64,
}

impl LazyTensor {
    /// Tensor `name` of a model drawn with `seed`, stored as `dtype`.
    pub fn new(
        name: &str,
        shape: Vec<usize>,
        init: Init,
        seed: u64,
        dtype: Dtype,
    ) -> (String, Self) {
        let seed = seed ^ fnv1a64(name.as_bytes());
        (
            name.to_string(),
            LazyTensor {
                shape,
                init,
                dtype,
                seed,
            },
        )
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Fills chunk `index` (`out` holds its bytes).
    pub fn fill_chunk(&self, index: usize, out: &mut [u8]) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index as u64);
        let (offset, half_width) = match self.init {
            Init::Embedding => (0.0, 3f32.sqrt()),
            Init::Linear { fan_in } => (0.0, (3.0 / fan_in.max(1) as f32).sqrt()),
            Init::Norm => (1.0, 0.1 * 3f32.sqrt()),
        };
        let eb = info(self.dtype).0;
        for dst in out.chunks_exact_mut(eb) {
            // 24 random bits -> [0, 1) exactly representable in f32.
            let u = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
            let v = offset + (2.0 * u - 1.0) * half_width;
            match self.dtype {
                Dtype::F32 => dst.copy_from_slice(&v.to_le_bytes()),
                Dtype::Bf16 => dst.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                Dtype::F16 => dst.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            }
        }
    }

    /// Generates all bytes, spreading runs of whole chunks over up to `threads` threads.
    pub fn generate(&self, threads: usize) -> Vec<u8> {
        let chunk_bytes = CHUNK * info(self.dtype).0;
        let mut buf = vec![0u8; self.data_len()];
        let n_chunks = buf.len().div_ceil(chunk_bytes).max(1);
        let per_thread = n_chunks.div_ceil(threads.clamp(1, n_chunks));
        std::thread::scope(|s| {
            for (t, run) in buf.chunks_mut(per_thread * chunk_bytes).enumerate() {
                s.spawn(move || {
                    for (i, c) in run.chunks_mut(chunk_bytes).enumerate() {
                        self.fill_chunk(t * per_thread + i, c);
                    }
                });
            }
        });
        buf
    }
}

impl View for LazyTensor {
    fn dtype(&self) -> StDtype {
        info(self.dtype).1
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Cow::Owned(self.generate(threads))
    }
    fn data_len(&self) -> usize {
        self.numel() * info(self.dtype).0
    }
}
