// The attention cache of a decoding batch and the operations continuous batching needs on it:
// rows leave (select_cache_rows), rows join (append_cache_rows), and it grows as decoding goes on.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <climits>
#include <memory>
#include <string>
#include <vector>

#include "infer/latent_pool.h"

namespace mlaforge {

struct DecodeGraph;  // model/decode_graph.cpp: a captured decoding step and its input buffers

// The attention cache of every layer for a batch whose rows share position indices 0..len-1 (rows
// shorter than others are left-padded). Either the keys and values (original attention, or MLA
// expanded), or MLA's paged latent cache (DESIGN.md section 3): per token the rotated rotary keys,
// the latent and the modality bit, read by the absorbed decode. A latent row owns blocks only from
// its first real token on; padding before it maps to a scratch block, so it costs no memory.
struct KVCache {
  std::vector<at::Tensor> k, v;              // [B, g, capacity, dh] (rotated keys)
  std::shared_ptr<LatentPool> pool;          // latent cache: shared block pool
  std::vector<std::vector<int32_t>> blocks;  // latent cache: row -> block of positions [i*bs, (i+1)*bs), -1: none
  static constexpr int64_t kNoToken = INT64_MAX;
  std::vector<int64_t> row_begin;            // latent cache: row -> its first real position (kNoToken: none yet)
  int32_t scratch_block = -1;                // latent cache: where padding positions are written
  at::Tensor block_table;                    // latent cache: [B, capacity / bs] int32 on the pool's device
  at::Tensor key_valid;                      // [B, capacity]: false for left padding
  int64_t len = 0;       // positions written so far
  int64_t capacity = 0;  // positions the tensors have room for (grows with reserve_positions)
  bool is_latent() const { return pool != nullptr; }
  int64_t batch() const { return key_valid.size(0); }
  int64_t bytes() const;  // allocated bytes of the per-token storage (the whole pool for a latent cache)
  // Per forward call (latent cache): flat pool slots of the new positions [B*T] and of all positions
  // [B, S], and the decoding view of the batch.
  at::Tensor new_slots, all_slots;
  PagedBatch paged;
  // --kv-window (latent cache): the last `window` positions of every row also kept unquantized, position p
  // in slot p % window. The pool keeps every position as well (prefill reads it); decoding attends the
  // pool for [row begin, S - window) and these slots for the rest (paged.seq_end is cut accordingly).
  int64_t window = 0;
  std::vector<at::Tensor> win_rope, win_latent;  // per layer: [B, window, g, 2r], [B, window, R]
  at::Tensor win_img;                            // [B, window] bool
  // Per forward call: [B, window] the slots a decoding step attends; the slots of the last new positions
  // and where they start among the call's T new positions; the slots of positions [S - min(S, window), S)
  // (what prefill reads from the window).
  at::Tensor win_valid, win_slots, win_read_slots;
  int64_t win_first = 0;
  // Decoding steps on a CUDA device replay a captured CUDA graph (DecoderLM::decode_step): the option,
  // and the graph of the cache's current shape (rebuilt when rows leave or join or the cache grows).
  bool cuda_graph = false;
  std::shared_ptr<DecodeGraph> graph;
};

// How a cache stores tokens: --kv-cache / --kv-rope, and whether an MLA model caches the expanded
// keys and values instead of its latent (training, comparisons and tests).
struct CacheOptions {
  std::string latent = "auto";  // auto (the compute dtype), f32, bf16, int8, int4
  std::string rope = "auto";    // auto (bf16 when the latent is bf16 or quantized), f32, bf16, int8
  int64_t block_size = 64;
  int64_t window = 0;  // --kv-window: recent positions also kept unquantized (latent cache)
  bool expanded = false;
  bool cuda_graph = true;  // on a CUDA device, decoding steps replay a captured CUDA graph (--no-cuda-graph)
};

// Makes room for positions [0, S) and, for a latent cache, gives every row blocks for its positions
// from its first real one to S-1; `valid` [B, T] marks which of the new positions [len, S) are real.
// Then fills new_slots / all_slots / paged for the forward pass writing [len, S).
void reserve_positions(KVCache& cache, const at::Tensor& valid, int64_t S);

// Widens the per-position tensors to at least `capacity` positions (no-op when they hold that many).
void reserve_capacity(KVCache& cache, int64_t capacity);

// Keeps the batch rows `rows` ([n] int64 indices into the cache's batch, in that order) of every
// per-row tensor, copying them; a latent cache hands the dropped rows' blocks back to the pool.
void select_cache_rows(KVCache& cache, const at::Tensor& rows);

// Appends the rows of `joining` (a cache of the same model and options holding joining.len
// positions) to `cache`, position p of a joining row becoming position p + (cache.len - joining.len):
// the joining rows end where the running rows are (cache.len >= joining.len).
void append_cache_rows(KVCache& cache, const KVCache& joining);

}  // namespace mlaforge
