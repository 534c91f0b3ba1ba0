//! Safetensors checkpoints read through mmap: single file or sharded with an index; f32/bf16/f16.
//!
//! Ranks read only the rows they own (`read_rows`), converting to f32 on the way, so loading a
//! shard never materialises the whole tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where one tensor lives, validated at open time.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

/// An opened checkpoint: every shard mmapped, every tensor header validated.
pub struct Checkpoint {
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
}

fn elem_bytes(dt: Dtype) -> Option<usize> {
    match dt {
        Dtype::F32 => Some(4),
        Dtype::BF16 | Dtype::F16 => Some(2),
        _ => None,
    }
}

impl Checkpoint {
    /// Opens `DIR/model.safetensors`, or the shards listed in `DIR/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(crate::model::config::strip_bom(&text))
                .map_err(|e| Error::checkpoint(&index, format!("not valid JSON: {e}")))?;
            let map = match v.get("weight_map") {
                Some(serde_json::Value::Object(m)) => m,
                Some(other) => {
                    return Err(Error::checkpoint(
                        &index,
                        format!("`weight_map` must be an object of tensor -> file, got {other}"),
                    ))
                }
                None => return Err(Error::checkpoint(&index, "missing object `weight_map`")),
            };
            if map.is_empty() {
                return Err(Error::checkpoint(
                    &index,
                    "`weight_map` is empty: it must name the shard file of every tensor",
                ));
            }
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let f = file.as_str().ok_or_else(|| {
                    Error::checkpoint(&index, format!("weight_map[{tensor}] is not a file name"))
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(Error::checkpoint(
                        &index,
                        format!("shard name `{f}` must be a plain file name"),
                    ));
                }
                if !names.iter().any(|n| n == f) {
                    names.push(f.to_string());
                }
            }
            names.sort();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::checkpoint(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ));
            }
            vec![single]
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            if path.is_dir() {
                return Err(Error::checkpoint(
                    &path,
                    "is a directory, expected a safetensors file",
                ));
            }
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the file is opened read-only and mapped privately; we never write through the
            // map. Another process truncating it while we read is outside what we can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                let which = header_mismatch(&mmap).map_or(String::new(), |m| format!(" ({m})"));
                Error::checkpoint(&path, format!("not a valid safetensors file: {e}{which}"))
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                if elem_bytes(view.dtype()).is_none() {
                    return Err(Error::checkpoint(
                        &path,
                        format!(
                            "tensor `{name}` has dtype {:?}; supported: F32, BF16, F16",
                            view.dtype()
                        ),
                    ));
                }
                let start = view.data().as_ptr() as usize - base;
                let info = TensorInfo {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    shard: i,
                    start,
                    end: start + view.data().len(),
                };
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(Error::checkpoint(
                        &path,
                        format!("tensor `{name}` appears in two shards"),
                    ));
                }
            }
            shards.push(Shard { path, mmap });
        }
        Ok(Checkpoint { shards, tensors })
    }

    /// Every tensor's name and header, in no particular order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Errors, naming a tensor and the file holding it, when the checkpoint has decoder layers
    /// past the config's `num_layers` (`model.layers.{i}.` with `i >= num_layers`): the config
    /// does not describe this checkpoint, and running the first layers alone would be a silent
    /// wrong answer.
    pub fn check_layer_count(&self, num_layers: usize) -> Result<()> {
        let past = self
            .tensors
            .iter()
            .filter_map(|(name, info)| {
                let rest = name.strip_prefix("model.layers.")?;
                let i: usize = rest.split('.').next()?.parse().ok()?;
                (i >= num_layers).then_some((i, name, info.shard))
            })
            .max();
        match past {
            None => Ok(()),
            Some((i, name, shard)) => Err(Error::checkpoint(
                &self.shards[shard].path,
                format!(
                    "holds decoder layer {i} (tensor `{name}`) but config.json has \
                     num_hidden_layers {num_layers}: the config does not describe this checkpoint"
                ),
            )),
        }
    }

    /// Validated header of `name`, checking its shape against `expected`.
    pub fn info(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo> {
        let info = self.tensors.get(name).ok_or_else(|| {
            Error::checkpoint(self.path_hint(), format!("missing tensor `{name}`"))
        })?;
        if info.shape != expected {
            return Err(Error::checkpoint(
                &self.shards[info.shard].path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    info.shape, expected
                ),
            ));
        }
        Ok(info)
    }

    fn path_hint(&self) -> &Path {
        self.shards
            .first()
            .map(|s| s.path.as_path())
            .unwrap_or(Path::new("checkpoint"))
    }

    /// Rows `rows` of a 2-D (or 1-D, one row) tensor of shape `expected`, as f32, row-major.
    pub fn read_rows(
        &self,
        name: &str,
        expected: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let info = self.info(name, expected)?;
        // A 0-D or 1-D tensor is one row.
        let (n_rows, cols) = match expected {
            [] => (1, 1),
            [n] => (1, *n),
            _ => (expected[0], expected[1..].iter().product()),
        };
        if rows.end > n_rows || rows.start > rows.end {
            return Err(Error::checkpoint(
                self.path_hint(),
                format!("rows {rows:?} out of range for `{name}` with {n_rows} rows"),
            ));
        }
        let eb = elem_bytes(info.dtype).unwrap_or(4);
        let bytes = &self.shards[info.shard].mmap[info.start..info.end];
        let sel = &bytes[rows.start * cols * eb..rows.end * cols * eb];
        let v = decode(info.dtype, sel);
        // NaN or inf weights give garbage tokens without any other sign: refuse them here, where
        // every weight is read.
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::checkpoint(
                &self.shards[info.shard].path,
                format!(
                    "tensor `{name}` holds a non-finite value ({}) at row {}, column {}",
                    v[i],
                    rows.start + i / cols.max(1),
                    i % cols.max(1)
                ),
            ));
        }
        Ok(v)
    }

    /// The whole tensor as f32.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let rows = if expected.len() <= 1 { 1 } else { expected[0] };
        self.read_rows(name, expected, 0..rows)
    }

    /// Columns `cols` of a 2-D tensor [rows, n], returned transposed as [cols.len(), rows]
    /// (row-parallel weights are stored with the split axis outermost).
    pub fn read_cols_transposed(
        &self,
        name: &str,
        expected: &[usize; 2],
        cols: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let [r, c] = *expected;
        if cols.end > c || cols.start > cols.end {
            return Err(Error::checkpoint(
                self.path_hint(),
                format!("columns {cols:?} out of range for `{name}` with {c} columns"),
            ));
        }
        let full = self.read(name, expected)?;
        let w = cols.len();
        let mut out = vec![0f32; w * r];
        for i in 0..r {
            for (j, col) in cols.clone().enumerate() {
                out[j * r + i] = full[i * c + col];
            }
        }
        Ok(out)
    }
}

fn decode(dt: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dt {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// Rounds every value to the nearest bf16 (the CPU reference emulates bf16 weights this way).
pub fn round_to_bf16(v: &mut [f32]) {
    for x in v {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

/// Rounds every value to the nearest f16 (ties to even; out of range becomes ±inf).
pub fn round_to_f16(v: &mut [f32]) {
    for x in v {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

/// On a header the safetensors crate refused: the first tensor whose shape and dtype do not
/// span its `data_offsets`, or whose offsets run past the file, named (its message does not).
fn header_mismatch(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    // The safetensors crate's own bound on a header (100 MB): past it, nothing to name.
    if n > 100_000_000 {
        return None;
    }
    let header = bytes.get(8..8usize.checked_add(usize::try_from(n).ok()?)?)?;
    let data = (bytes.len() - 8 - header.len()) as u128;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut entries: Vec<(&String, &serde_json::Value)> =
        map.iter().filter(|(k, _)| *k != "__metadata__").collect();
    entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap_or(0));
    for (name, v) in entries {
        let size: u128 = match v["dtype"].as_str().unwrap_or("") {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            _ => continue,
        };
        let shape: Option<Vec<u128>> = v["shape"]
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(u128::from))
            .collect();
        let offsets: Option<Vec<u128>> = v["data_offsets"]
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(u128::from))
            .collect();
        let (Some(shape), Some(offsets)) = (shape, offsets) else {
            return Some(format!(
                "tensor `{name}`: `shape` and `data_offsets` must be lists of whole numbers"
            ));
        };
        let [start, end] = offsets[..] else {
            return Some(format!(
                "tensor `{name}`: `data_offsets` must be [start, end]"
            ));
        };
        let want = shape.iter().try_fold(size, |a, &d| a.checked_mul(d));
        if end < start || want != Some(end - start) {
            return Some(format!(
                "tensor `{name}`: shape {shape:?} of {} is {}, but data_offsets [{start}, {end}] \
                 span {}",
                v["dtype"].as_str().unwrap_or("?"),
                want.map_or("more bytes than any file".to_string(), |w| format!(
                    "{w} bytes"
                )),
                end.saturating_sub(start)
            ));
        }
        if end > data {
            return Some(format!(
                "tensor `{name}`: data_offsets end at {end}, past the {data} bytes of data"
            ));
        }
    }
    None
}
