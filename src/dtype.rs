//! The one floating-point storage type enum: weights on disk, weights held by a rank, and (on GPU
//! ranks) activations and the KV cache.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Storage precision. The CPU reference always computes in f32: at `Bf16`/`F16` it rounds the
/// weights to that precision and keeps them as f32 (an exact emulation of a bf16 engine's weights).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
    /// `f32`, `bf16` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!("unknown dtype `{s}` (expected f32, bf16 or f16)"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes() {
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>().unwrap(), d);
        }
        assert_eq!(Dtype::F32.size_bytes(), 4);
        assert_eq!(Dtype::Bf16.size_bytes(), 2);
        assert!("fp8".parse::<Dtype>().is_err());
    }
}
