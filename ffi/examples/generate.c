/* generate.c: greedy generation through pat's C ABI, with a live tensor-parallel switch.
 *
 *   generate MODEL_DIR MAX_NEW_TOKENS SWITCH_AFTER IDS [IDS ...]
 *
 * Opens MODEL_DIR, makes an engine of 2 ranks at tp 1 (two replicas), adds one request per IDS
 * argument (comma-separated prompt token ids, e.g. 1,2,3; end of sequence ignored, so each
 * request generates exactly MAX_NEW_TOKENS tokens), runs SWITCH_AFTER steps (step 0 is the
 * prefill), switches to tp 2 (one replica of both ranks: weights resharded in place, KV migrated),
 * runs to the end and prints one JSON line per request, in index order, with the fields of
 * `pat generate`: {"index", "input_ids", "output_ids", "finish_reason"}. The switch report goes to
 * stderr. SWITCH_AFTER 3 matches `pat generate --world 2 --tp 1 --reconfigure 2:2
 * --kv-transfer migrate --ignore-eos`.
 *
 * Build (see README, "Embedding pat"):
 *   cc -std=c11 -I ffi/include ffi/examples/generate.c -L target/release -lpat_ffi -o generate
 *   cc -std=c11 -I ffi/include ffi/examples/generate.c target/release/libpat_ffi.a \
 *      -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o generate
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pat.h"

/* Exits with the status name and pat's message when a call fails. */
static void check(pat_status st, const char *what) {
  if (st == PAT_OK) return;
  char msg[512];
  pat_last_error_message(msg, sizeof msg);
  fprintf(stderr, "generate: %s: %s: %s\n", what, pat_status_name(st), msg);
  exit(1);
}

/* Parses "1,2,3" into a new array; returns its length (0 on a malformed list). */
static size_t parse_ids(const char *s, uint32_t **out) {
  size_t cap = strlen(s) / 2 + 1, n = 0;
  uint32_t *ids = malloc(cap * sizeof *ids);
  const char *p = s;
  while (*p) {
    char *end;
    unsigned long v = strtoul(p, &end, 10);
    if (end == p || n == cap || v > UINT32_MAX) { free(ids); return 0; }
    ids[n++] = (uint32_t)v;
    p = *end == ',' ? end + 1 : end;
    if (*end && *end != ',') { free(ids); return 0; }
  }
  *out = ids;
  return n;
}

static void print_ids(const uint32_t *ids, size_t n) {
  putchar('[');
  for (size_t i = 0; i < n; i++) printf(i ? ",%u" : "%u", ids[i]);
  putchar(']');
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s MODEL_DIR MAX_NEW_TOKENS SWITCH_AFTER IDS [IDS ...]\n", argv[0]);
    return 2;
  }
  if (pat_abi_version() != PAT_ABI_VERSION) {
    fprintf(stderr, "generate: libpat_ffi has ABI %u, pat.h describes %u\n", pat_abi_version(),
            PAT_ABI_VERSION);
    return 1;
  }
  uint32_t max_new = (uint32_t)strtoul(argv[2], NULL, 10);
  unsigned long switch_after = strtoul(argv[3], NULL, 10);
  size_t n_req = (size_t)(argc - 4);

  pat_model *model = NULL;
  check(pat_model_open(argv[1], &model), "pat_model_open");
  pat_engine_params params = pat_engine_default_params();
  params.world = 2;
  params.tp = 1;
  pat_engine *engine = NULL;
  check(pat_engine_new(model, &params, &engine), "pat_engine_new");
  pat_model_free(model); /* the engine holds its own shards */

  uint32_t **prompts = calloc(n_req, sizeof *prompts);
  size_t *prompt_len = calloc(n_req, sizeof *prompt_len);
  for (size_t i = 0; i < n_req; i++) {
    prompt_len[i] = parse_ids(argv[4 + i], &prompts[i]);
    if (prompt_len[i] == 0) {
      fprintf(stderr, "generate: `%s` is not a comma-separated list of token ids\n", argv[4 + i]);
      return 2;
    }
    uint64_t index;
    check(pat_engine_add_request(engine, prompts[i], prompt_len[i], max_new, 1, &index),
          "pat_engine_add_request");
  }

  /* What a step's activations may take (a long queue of prompts is prefilled over several
     steps); an embedder sharing GPUs with a trainer calls this again after the trainer ran. */
  uint64_t cap;
  check(pat_engine_refresh_step_cap(engine, &cap), "pat_engine_refresh_step_cap");
  fprintf(stderr, "{\"step_cap_bytes\":%llu}\n", (unsigned long long)cap);

  pat_engine_info info;
  check(pat_engine_get_info(engine, &info), "pat_engine_get_info");
  for (unsigned long step = 0; info.n_live > 0; step++) {
    if (step == switch_after) {
      pat_switch_params sw = pat_switch_default_params();
      sw.new_tp = 2;
      sw.kv_policy = PAT_KV_MIGRATE;
      pat_switch_report r;
      check(pat_engine_reconfigure(engine, &sw, &r), "pat_engine_reconfigure");
      fprintf(stderr,
              "{\"from_tp\":%u,\"to_tp\":%u,\"n_inflight\":%llu,\"n_migrated\":%llu,"
              "\"bytes_cross_rank\":%llu,\"weight_bytes_cross_rank\":%llu,\"total_ms\":%.3f}\n",
              r.from_tp, r.to_tp, (unsigned long long)r.n_inflight,
              (unsigned long long)r.n_migrated, (unsigned long long)r.bytes_cross_rank,
              (unsigned long long)r.weight_bytes_cross_rank, r.total_ms);
    }
    check(pat_engine_step(engine, NULL), "pat_engine_step");
    check(pat_engine_get_info(engine, &info), "pat_engine_get_info");
  }

  /* Outputs come out in index order; ask for each one's length, then take it. */
  for (;;) {
    pat_output out;
    size_t n = 0;
    pat_status st = pat_engine_take_output(engine, &out, NULL, 0, &n);
    if (st == PAT_NO_OUTPUT) break;
    uint32_t *ids = NULL;
    if (st == PAT_BUFFER_TOO_SMALL) {
      ids = malloc(n * sizeof *ids);
      check(pat_engine_take_output(engine, &out, ids, n, &n), "pat_engine_take_output");
    } else {
      check(st, "pat_engine_take_output"); /* PAT_OK: an empty output, taken */
    }
    printf("{\"index\":%llu,\"input_ids\":", (unsigned long long)out.index);
    print_ids(prompts[out.index], prompt_len[out.index]);
    printf(",\"output_ids\":");
    print_ids(ids, n);
    printf(",\"finish_reason\":\"%s\"}\n", out.finish_reason == PAT_FINISH_STOP ? "stop" : "length");
    free(ids);
  }

  pat_engine_free(engine);
  for (size_t i = 0; i < n_req; i++) free(prompts[i]);
  free(prompts);
  free(prompt_len);
  return 0;
}
