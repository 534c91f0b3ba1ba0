/*
 * params.h - parameter structs for every kernel in the cuda/ .cu files, shared with Rust.
 *
 * Plain C (C99): fixed-width integers, no C++ features, so nvcc compiles it into the kernels and
 * bindgen turns it into Rust: the output is committed as src/backend/cuda/params.rs. After editing
 * this file run `scripts/check-params-bindings.sh --fix` (CI checks for drift; build.rs refuses
 * bindings made from another version of this file). Each kernel takes exactly one of these
 * structs *by value* as its only argument; the Rust wrapper fills it and passes a pointer to it as
 * the single entry of the launch argument array.
 *
 * Conventions
 *  - Device pointers are PatDevPtr (a CUdeviceptr, u64 in Rust). "nullable" means 0 is allowed.
 *  - Element counts and strides are in elements of the tensor's dtype unless the name says bytes.
 *  - 8-byte fields come first so the layout has no padding surprises; bindgen's compile-time layout
 *    checks (in params.rs) check it.
 *  - "T" below is the kernel's dtype (bf16, f16 or f32, from the entry-point suffix).
 *  - Limits marked "caller checks" are not re-checked on the device: a kernel cannot report errors,
 *    so the Rust wrapper validates them and returns an error value instead of launching.
 */
#ifndef PAT_PARAMS_H
#define PAT_PARAMS_H

#include <stdint.h>

typedef uint64_t PatDevPtr;

/* Threads per block the kernels are written for (launch with exactly these). */
#define PAT_PAGED_ATTN_THREADS 128   /* paged_attention_* */
#define PAT_PAGED_ATTN_REDUCE_THREADS 128 /* paged_attention_reduce_* */
#define PAT_PREFILL_ATTN_THREADS 128 /* prefill_attention_* */
#define PAT_SAMPLE_THREADS 1024      /* argmax_*, sample_* */
/* Query tokens per CTA of prefill_attention_<dt>_hd{64,128,256}. */
#define PAT_PREFILL_BQ_HD64 64
#define PAT_PREFILL_BQ_HD128 64
#define PAT_PREFILL_BQ_HD256 16
/* Limits (caller checks). */
#define PAT_MAX_GQA 8                /* num_q_heads / num_kv_heads in paged attention */
#define PAT_MAX_HEAD_DIM 256
#define PAT_MAX_PARTITIONS 1024      /* ceil(max context / partition_size) in paged attention */
#define PAT_MAX_ALLREDUCE_INPUTS 16

/* embedding_<dt>: out[t, :] = table[ids[t] - vocab_start, :] if the id is in
 * [vocab_start, vocab_start + vocab_local), else zeros. */
typedef struct PatEmbeddingParams {
    PatDevPtr out;      /* T   [n_tokens, hidden] */
    PatDevPtr ids;      /* u32 [n_tokens] */
    PatDevPtr table;    /* T   [vocab_local, hidden] (this rank's vocab shard) */
    int32_t n_tokens;
    int32_t hidden;
    int32_t vocab_start; /* first global token id held by this shard */
    int32_t vocab_local; /* rows in this shard */
} PatEmbeddingParams;

/* rmsnorm_<dt>: out = x * rsqrt(mean(x^2) + eps) * weight, per row.
 * fused_add_rmsnorm_<dt>: r = x + residual; residual = r; out = rmsnorm(r) * weight.
 * out may alias x. */
typedef struct PatRmsNormParams {
    PatDevPtr out;      /* T [n_rows, dim] */
    PatDevPtr x;        /* T [n_rows, dim] */
    PatDevPtr residual; /* T [n_rows, dim], read and written; fused variant only (0 otherwise) */
    PatDevPtr weight;   /* T [dim] */
    int32_t n_rows;
    int32_t dim;
    float eps;
    int32_t _pad;
} PatRmsNormParams;

/* qk_norm_<dt> (in rmsnorm.cu): Qwen3 per-head RMSNorm over head_dim, in place on q and k. */
typedef struct PatQkNormParams {
    PatDevPtr q;        /* T, token t head h at q + t*q_token_stride + h*head_dim */
    PatDevPtr k;        /* T, token t head h at k + t*k_token_stride + h*head_dim */
    PatDevPtr q_weight; /* T [head_dim] */
    PatDevPtr k_weight; /* T [head_dim] */
    int32_t n_tokens;
    int32_t num_q_heads;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t q_token_stride; /* >= num_q_heads*head_dim; larger when q is a view into fused QKV */
    int32_t k_token_stride;
    float eps;
    int32_t _pad;
} PatQkNormParams;

/* rope_<dt>: HF "rotate_half" RoPE in place on q and k. */
typedef struct PatRopeParams {
    PatDevPtr q;         /* T, as in PatQkNormParams */
    PatDevPtr k;         /* T */
    PatDevPtr positions; /* i32 [n_tokens] absolute positions */
    PatDevPtr inv_freq;  /* f32 [head_dim/2], scaling (default / llama3) already applied on host */
    int32_t n_tokens;
    int32_t num_q_heads;
    int32_t num_kv_heads;
    int32_t head_dim;       /* even */
    int32_t q_token_stride;
    int32_t k_token_stride;
} PatRopeParams;

/* silu_and_mul_<dt>: out[r, i] = silu(in[r, i]) * in[r, inter + i]. */
typedef struct PatSiluMulParams {
    PatDevPtr out;   /* T [n_rows, inter] */
    PatDevPtr input; /* T [n_rows, 2*inter] = [gate | up] per row */
    int32_t n_rows;
    int32_t inter;
} PatSiluMulParams;

/* kv_append_<dt>: scatter new k/v rows into the paged cache by slot. */
typedef struct PatKvAppendParams {
    PatDevPtr k_cache;      /* T [num_blocks, num_kv_heads, block_size, head_dim] */
    PatDevPtr v_cache;      /* T, same layout */
    PatDevPtr k;            /* T, token t head h at k + t*k_token_stride + h*head_dim */
    PatDevPtr v;            /* T, token t head h at v + t*v_token_stride + h*head_dim */
    PatDevPtr slot_mapping; /* i64 [n_tokens]: block*block_size + offset, or -1 to skip */
    int32_t n_tokens;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t block_size;
    int32_t k_token_stride;
    int32_t v_token_stride;
} PatKvAppendParams;

/* paged_attention_<dt>_hd{64,128,256} and paged_attention_reduce_<dt>: decode attention. */
typedef struct PatPagedAttentionParams {
    PatDevPtr out;          /* T [num_seqs, num_q_heads, head_dim] */
    PatDevPtr q;            /* T, seq s head h at q + s*q_token_stride + h*head_dim */
    PatDevPtr k_cache;      /* T [num_blocks, num_kv_heads, block_size, head_dim] */
    PatDevPtr v_cache;      /* T, same layout */
    PatDevPtr block_tables; /* i32 [num_seqs, max_blocks_per_seq] */
    PatDevPtr context_lens; /* i32 [num_seqs], tokens in cache including the current one */
    PatDevPtr tmp_out;      /* f32 [num_seqs, num_q_heads, max_partitions, head_dim]; nullable if max_partitions == 1 */
    PatDevPtr tmp_max;      /* f32 [num_seqs, num_q_heads, max_partitions]; nullable likewise */
    PatDevPtr tmp_sum;      /* f32 [num_seqs, num_q_heads, max_partitions]; nullable likewise */
    float scale;            /* softmax scale, usually 1/sqrt(head_dim) */
    int32_t num_seqs;
    int32_t num_q_heads;
    int32_t num_kv_heads;   /* divides num_q_heads, ratio <= PAT_MAX_GQA (caller checks) */
    int32_t head_dim;       /* <= the entry point's hd suffix */
    int32_t block_size;
    int32_t max_blocks_per_seq;
    int32_t q_token_stride;
    int32_t partition_size; /* tokens per split-K partition, multiple of block_size; <= 0: no split */
    int32_t max_partitions; /* grid.z; ceil(max context_len / partition_size), 1 if no split */
    int32_t _pad;
} PatPagedAttentionParams;

/* prefill_attention_<dt>_hd{64,128,256}: causal varlen attention over the paged cache. */
typedef struct PatPrefillAttentionParams {
    PatDevPtr out;          /* T [total_tokens, num_q_heads, head_dim] */
    PatDevPtr q;            /* T, token t head h at q + t*q_token_stride + h*head_dim */
    PatDevPtr k_cache;      /* T [num_blocks, num_kv_heads, block_size, head_dim] */
    PatDevPtr v_cache;      /* T */
    PatDevPtr block_tables; /* i32 [num_seqs, max_blocks_per_seq] */
    PatDevPtr cu_seqlens_q; /* i32 [num_seqs + 1], prefix sums of query (new) tokens */
    PatDevPtr context_lens; /* i32 [num_seqs], tokens in cache incl. this chunk (>= query len) */
    float scale;
    int32_t num_seqs;
    int32_t num_q_heads;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t block_size;
    int32_t max_blocks_per_seq;
    int32_t q_token_stride;
} PatPrefillAttentionParams;

/* argmax_<dt>: per row, index of the largest logit (ties -> lowest index). */
typedef struct PatArgmaxParams {
    PatDevPtr logits;  /* T [n_rows, row_stride], first `vocab` columns are considered */
    PatDevPtr out_idx; /* u32 [n_rows]: argmax + index_offset */
    PatDevPtr out_val; /* f32 [n_rows], the max logit; nullable (for distributed argmax) */
    int32_t n_rows;
    int32_t vocab;
    int32_t row_stride;
    int32_t index_offset; /* added to the index, e.g. this rank's vocab_start */
} PatArgmaxParams;

/* sample_<dt>: temperature -> top-k -> top-p -> inverse-CDF draw with a host uniform per row. */
typedef struct PatSampleParams {
    PatDevPtr logits;   /* T [n_rows, row_stride], first `vocab` columns are considered */
    PatDevPtr out_idx;  /* u32 [n_rows] */
    PatDevPtr uniforms; /* f32 [n_rows] in [0, 1) */
    float temperature;  /* <= 0: greedy (argmax) */
    float top_p;        /* (0, 1]; >= 1 disables */
    int32_t top_k;      /* <= 0 or >= vocab disables */
    int32_t n_rows;
    int32_t vocab;
    int32_t row_stride;
} PatSampleParams;

/* all_reduce_sum_<dt>: out = in[0] + in[1] + ... (rank order, f32 accumulation), written to every
 * outputs[j]. Outputs may alias inputs. */
typedef struct PatAllReduceParams {
    PatDevPtr inputs[PAT_MAX_ALLREDUCE_INPUTS];  /* T [n_elems] each; first num_inputs used */
    PatDevPtr outputs[PAT_MAX_ALLREDUCE_INPUTS]; /* T [n_elems] each; first num_outputs used */
    int64_t n_elems;
    int32_t num_inputs;
    int32_t num_outputs;
} PatAllReduceParams;

/* strided_copy: rows x row_bytes from src (src_stride bytes apart) to dst (dst_stride apart). */
typedef struct PatStridedCopyParams {
    PatDevPtr dst;
    PatDevPtr src;
    int64_t rows;
    int64_t row_bytes;
    int64_t dst_stride; /* bytes */
    int64_t src_stride; /* bytes */
} PatStridedCopyParams;

/* kv_gather / kv_scatter: head slice [head_start, head_start + num_heads) of listed cache blocks
 * <-> contiguous staging [2 (K then V), num_list_blocks, num_heads, block_size, head_dim]. */
typedef struct PatKvGatherParams {
    PatDevPtr k_cache;   /* [num_blocks, cache_heads, block_size, head_dim] */
    PatDevPtr v_cache;
    PatDevPtr staging;
    PatDevPtr block_ids; /* i32 [num_list_blocks], physical block index in the cache */
    int32_t num_list_blocks;
    int32_t cache_heads;
    int32_t head_start;
    int32_t num_heads;
    int32_t block_size;
    int32_t head_dim;
    int32_t elem_bytes;  /* 2 for bf16/f16, 4 for f32 */
    int32_t _pad;
} PatKvGatherParams;

/* kv_copy: head slice [src_head_start, + num_heads) of listed blocks of one cache into head slice
 * [dst_head_start, + num_heads) of listed blocks of another (same block_size, head_dim, dtype). */
typedef struct PatKvCopyParams {
    PatDevPtr src_k;     /* [src blocks, src_heads, block_size, head_dim] */
    PatDevPtr src_v;
    PatDevPtr dst_k;     /* [dst blocks, dst_heads, block_size, head_dim] */
    PatDevPtr dst_v;
    PatDevPtr src_ids;   /* i32 [num_list_blocks], physical block index in the source cache */
    PatDevPtr dst_ids;   /* i32 [num_list_blocks], physical block index in the destination cache */
    int32_t num_list_blocks;
    int32_t src_heads;
    int32_t src_head_start;
    int32_t dst_heads;
    int32_t dst_head_start;
    int32_t num_heads;
    int32_t block_size;
    int32_t head_dim;
    int32_t elem_bytes;  /* 2 for bf16/f16, 4 for f32 */
    int32_t _pad;
} PatKvCopyParams;

#endif /* PAT_PARAMS_H */
