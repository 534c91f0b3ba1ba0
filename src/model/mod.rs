//! The model: HF config, safetensors checkpoint, per-rank decoder, sampling, random-model init, tokenizer.

pub mod config;
pub mod decoder;
pub mod dims;
pub mod dir;
pub mod init;
mod random;
pub mod rank_weights;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use dims::ModelDims;
pub use dir::ModelDir;
