//! The public step times the component model's default H100 parameters are checked against
//! (H100 SXM, each with its source), and how far a model time is from a measured range.

/// A public step-time measurement the default H100 parameters are checked against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CalibrationPoint {
    /// "llama3-8b" or "qwen3-14b".
    pub shape: &'static str,
    pub tp: usize,
    pub batch: usize,
    pub context: usize,
    /// The measured range (ms); a single number has lo == hi.
    pub lo_ms: f64,
    pub hi_ms: f64,
    pub source: &'static str,
}

const LAMBDA: &str = "vLLM 0.6, H100 SXM (LambdaLabsML/vllm-benchmark)";
const ENERGY: &str = "vLLM, H100, median ITL (ml-energy/leaderboard)";

/// Public decode step times (H100 SXM, NVLink, bf16), each with its source.
pub const CALIBRATION: [CalibrationPoint; 12] = [
    cp("llama3-8b", 1, 1, 512, 7.05, 7.5, LAMBDA),
    cp("llama3-8b", 8, 1, 512, 2.9, 3.5, LAMBDA),
    cp("llama3-8b", 1, 8, 1024, 7.3, 7.3, ENERGY),
    cp("llama3-8b", 1, 32, 1024, 8.9, 8.9, ENERGY),
    cp("llama3-8b", 1, 64, 1024, 11.5, 11.5, ENERGY),
    cp("llama3-8b", 1, 128, 1024, 16.5, 16.5, ENERGY),
    cp("llama3-8b", 1, 256, 1024, 26.1, 26.1, ENERGY),
    cp("llama3-8b", 1, 512, 1024, 47.4, 47.4, ENERGY),
    cp("qwen3-14b", 1, 8, 1024, 12.5, 12.5, ENERGY),
    cp("qwen3-14b", 1, 32, 1024, 15.0, 15.0, ENERGY),
    cp("qwen3-14b", 1, 128, 1024, 26.2, 26.2, ENERGY),
    cp("qwen3-14b", 1, 256, 1024, 38.4, 38.4, ENERGY),
];

const fn cp(
    shape: &'static str,
    tp: usize,
    batch: usize,
    context: usize,
    lo_ms: f64,
    hi_ms: f64,
    source: &'static str,
) -> CalibrationPoint {
    CalibrationPoint {
        shape,
        tp,
        batch,
        context,
        lo_ms,
        hi_ms,
        source,
    }
}

/// Relative error of `model_ms` against a measured range: 0 inside it, else the distance to the
/// nearer end over that end.
pub fn range_error(model_ms: f64, lo: f64, hi: f64) -> f64 {
    if model_ms < lo {
        (model_ms - lo) / lo
    } else if model_ms > hi {
        (model_ms - hi) / hi
    } else {
        0.0
    }
}
