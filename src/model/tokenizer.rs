//! Tokenizer: load tokenizer.json, encode/decode, and the built-in byte-level tokenizer.

use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// Id of the padding token of the built-in tokenizer.
pub const PAD_ID: u32 = 0;
/// Id of the beginning-of-sequence token of the built-in tokenizer.
pub const BOS_ID: u32 = 1;
/// Id of the end-of-sequence token of the built-in tokenizer.
pub const EOS_ID: u32 = 2;
/// First id of the 256 byte tokens of the built-in tokenizer (they occupy `BYTE_BASE..BYTE_BASE+256`).
pub const BYTE_BASE: u32 = 3;
/// Smallest vocabulary the built-in tokenizer can have: 3 specials + 256 bytes.
pub const MIN_BYTE_LEVEL_VOCAB: usize = 259;

/// A HF tokenizer (tokenizer.json) with the engine's error handling.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// One past the largest id in the vocabulary, added tokens included.
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

fn tok_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

/// GPT-2's reversible byte -> printable unicode char table: printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards in byte order.
fn byte_to_char_table() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let code = if printable(b) {
            u32::from(b)
        } else {
            let c = next;
            next += 1;
            c
        };
        // Codes are below 0x200, all valid scalar values.
        table[usize::from(b)] = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

impl Tokenizer {
    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
            .max(inner.get_vocab_size(true));
        Tokenizer { inner, vocab_size }
    }

    /// Loads a HF tokenizer.json; errors name the path.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            tok_err(
                path.display(),
                format!(
                    "not a tokenizer the Hugging Face tokenizers library can read ({e}); \
                     remove it to run on token ids (outputs then carry no text)"
                ),
            )
        })?;
        Ok(Self::wrap(inner))
    }

    /// Loads DIR/tokenizer.json if present.
    pub fn load_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if path.is_file() {
            Self::load(&path).map(Some)
        } else if path.exists() {
            // A directory (or anything but a file) where the tokenizer belongs: say so rather
            // than run without it.
            Err(Error::Tokenizer(format!("{}: not a file", path.display())))
        } else {
            Ok(None)
        }
    }

    /// Encodes with the tokenizer's own special-token handling (adds BOS where its post-processor does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// How many tokens `text` encodes to, with the tokenizer's special tokens (BOS where its
    /// post-processor adds one) or without.
    pub fn count(&self, text: &str, special: bool) -> Result<usize> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.len())
    }

    /// Decodes, skipping special tokens. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err("decode", e))
    }

    /// The built-in byte-level tokenizer: id 0 `<pad>`, 1 `<bos>`, 2 `<eos>` (special), ids 3..259
    /// the 256 bytes (GPT-2 byte->unicode mapping, ByteLevel pre-tokenizer and decoder, BPE with no
    /// merges), ids 259..vocab_size special `<|unused_N|>`; a post-processor prepends `<bos>`.
    pub fn byte_level(vocab_size: usize) -> Result<Self> {
        if vocab_size < MIN_BYTE_LEVEL_VOCAB {
            return Err(Error::Tokenizer(format!(
                "byte-level tokenizer needs vocab_size >= {MIN_BYTE_LEVEL_VOCAB} (3 specials + 256 bytes), got {vocab_size}"
            )));
        }
        let max_id = u32::try_from(vocab_size - 1).map_err(|_| {
            Error::Tokenizer(format!("vocab_size {vocab_size} does not fit in u32 ids"))
        })?;
        let mut specials: Vec<(String, u32)> = vec![
            ("<pad>".to_string(), PAD_ID),
            ("<bos>".to_string(), BOS_ID),
            ("<eos>".to_string(), EOS_ID),
        ];
        let first_unused = MIN_BYTE_LEVEL_VOCAB as u32;
        specials.extend(
            (first_unused..=max_id).map(|id| (format!("<|unused_{}|>", id - first_unused), id)),
        );

        let mut vocab: Vocab = specials.iter().cloned().collect();
        for (b, c) in byte_to_char_table().iter().enumerate() {
            vocab.insert(c.to_string(), BYTE_BASE + b as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(|e| tok_err("building byte-level BPE", e))?;

        let post = TemplateProcessing::builder()
            .try_single("<bos> $A")
            .map_err(|e| tok_err("post-processor template", e))?
            .try_pair("<bos> $A <bos>:1 $B:1")
            .map_err(|e| tok_err("post-processor template", e))?
            .special_tokens(vec![("<bos>", BOS_ID)])
            .build()
            .map_err(|e| tok_err("post-processor", e))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(post));
        inner
            .add_special_tokens(specials.into_iter().map(|(s, _)| AddedToken::from(s, true)))
            .map_err(|e| tok_err("adding special tokens", e))?;
        Ok(Self::wrap(inner))
    }

    /// Writes the tokenizer as tokenizer.json to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| tok_err(path.display(), e))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    /// One past the largest token id (added/special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of `token` (special tokens included), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::byte_level(320).expect("byte-level tokenizer")
    }

    #[test]
    fn utf8_round_trip() {
        let t = tok();
        for text in [
            "Hello, world!",
            "  leading and trailing spaces  ",
            "caf\u{e9} na\u{ef}ve \u{e0} la cr\u{e8}me br\u{fb}l\u{e9}e",
            "emoji \u{1F600}\u{1F680} and flags \u{1F1EB}\u{1F1F7}",
            "\u{4E2D}\u{6587}\u{6D4B}\u{8BD5} \u{65E5}\u{672C}\u{8A9E}",
            "tabs\tand\nnewlines\r\n",
            "",
        ] {
            let ids = t.encode(text).expect("encode");
            assert_eq!(t.decode(&ids).expect("decode"), text, "ids {ids:?}");
        }
    }

    #[test]
    fn encode_starts_with_bos() {
        let t = tok();
        assert_eq!(t.encode("abc").expect("encode")[0], BOS_ID);
        assert_eq!(t.encode("").expect("encode"), vec![BOS_ID]);
    }

    #[test]
    fn every_byte_has_a_distinct_id() {
        let t = tok();
        let mut seen = std::collections::HashSet::new();
        let table = byte_to_char_table();
        for (b, c) in table.iter().enumerate() {
            let id = t.token_to_id(&c.to_string()).expect("byte token in vocab");
            assert_eq!(id, BYTE_BASE + b as u32);
            assert!(seen.insert(id));
        }
        // Encoding raw text: every ASCII byte becomes exactly its own id.
        let text: String = (0u8..128).map(char::from).collect();
        let ids = t.encode(&text).expect("encode");
        assert_eq!(ids.len(), 129);
        for (i, id) in ids[1..].iter().enumerate() {
            assert_eq!(*id, BYTE_BASE + i as u32);
        }
        assert!(ids[1..].iter().all(|&id| (3..259).contains(&id)));
    }

    #[test]
    fn save_then_load_gives_identical_encodings() {
        let t = tok();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.json");
        t.save(&path).expect("save");
        let u = Tokenizer::load(&path).expect("load");
        let loaded = Tokenizer::load_dir(dir.path()).expect("load_dir");
        assert!(loaded.is_some());
        assert_eq!(u.vocab_size(), t.vocab_size());
        for text in ["hello world", "\u{1F600} \u{4E2D}", "<bos>x<eos>", "a  b"] {
            assert_eq!(u.encode(text).expect("enc"), t.encode(text).expect("enc"));
        }
    }

    #[test]
    fn decode_special_and_unused_ids() {
        let t = tok();
        let ids: Vec<u32> = (0..320).chain([320, 10_000, u32::MAX]).collect();
        let s = t.decode(&ids).expect("decode");
        assert!(!s.contains("<bos>") && !s.contains("unused"));
        assert_eq!(t.decode(&[BOS_ID, 259, EOS_ID]).expect("decode"), "");
        assert_eq!(t.token_to_id("<|unused_0|>"), Some(259));
        assert_eq!(t.token_to_id("<|unused_60|>"), Some(319));
        assert_eq!(t.vocab_size(), 320);
    }

    #[test]
    fn special_text_maps_to_special_ids() {
        let t = tok();
        let ids = t.encode("a<eos>").expect("encode");
        assert_eq!(ids, vec![BOS_ID, BYTE_BASE + u32::from(b'a'), EOS_ID]);
    }

    #[test]
    fn small_vocab_errors() {
        assert!(matches!(
            Tokenizer::byte_level(258),
            Err(Error::Tokenizer(_))
        ));
        assert!(matches!(Tokenizer::byte_level(0), Err(Error::Tokenizer(_))));
        assert_eq!(Tokenizer::byte_level(259).expect("259").vocab_size(), 259);
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.json");
        let e = Tokenizer::load(&missing).expect_err("missing");
        assert!(e.to_string().contains("nope.json"));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").expect("write");
        let e = Tokenizer::load(&bad).expect_err("bad");
        assert!(e.to_string().contains("bad.json"));
        assert!(Tokenizer::load_dir(dir.path()).expect("load_dir").is_none());
        std::fs::create_dir(dir.path().join("tokenizer.json")).expect("mkdir");
        let e = Tokenizer::load_dir(dir.path()).expect_err("a directory");
        assert!(e.to_string().contains("tokenizer.json: not a file"), "{e}");
    }
}
