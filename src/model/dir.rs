//! `ModelDir`: an HF model directory opened as one value: config, mmapped checkpoint, and the
//! tokenizer when the directory has one.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::Checkpoint;

/// An opened model directory. The checkpoint is memory-mapped, so opening is cheap whatever the
/// model's size; ranks read only their shards from it.
pub struct ModelDir {
    pub path: PathBuf,
    pub cfg: ModelConfig,
    pub ck: Checkpoint,
    /// `tokenizer.json`, when present (a directory without one runs on token ids).
    pub tok: Option<Tokenizer>,
}

impl ModelDir {
    /// Opens `dir`: `config.json`, `model.safetensors` or its sharded index, and an optional
    /// `tokenizer.json`. Every problem names the file and field.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            let why = if dir.exists() {
                "not a directory"
            } else {
                "does not exist"
            };
            return Err(Error::Invalid(format!(
                "model directory {}: {why}",
                dir.display()
            )));
        }
        // Only a config.json that is not there (a dangling link included): one that cannot be
        // read is ModelConfig::load's to report.
        if matches!(dir.join("config.json").try_exists(), Ok(false)) {
            return Err(Error::Invalid(format!(
                "model directory {}: no config.json (a model in the Hugging Face layout: \
                 config.json, model.safetensors or its index, tokenizer.json; `pat init-model` \
                 makes one)",
                dir.display()
            )));
        }
        let cfg = ModelConfig::load(dir)?;
        let ck = Checkpoint::open(dir)?;
        ck.check_layer_count(cfg.num_layers)?;
        Ok(ModelDir {
            path: dir.to_path_buf(),
            cfg,
            ck,
            tok: Tokenizer::load_dir(dir)?,
        })
    }

    /// The tokenizer, or an error saying the directory has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tok.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "{} has no tokenizer.json: give token ids instead of text",
                self.path.display()
            ))
        })
    }
}
