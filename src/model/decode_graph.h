// Decoding steps replayed from a CUDA graph. A decoding step launches about 30 ATen ops per layer; on the
// H200 the host needs ~20 ms to launch those of a 28-layer 7B decoder while the GPU runs them in ~10 ms
// at batch 16 and 8K context, so eagerly the step is bound by the host. A graph captured once per cache
// shape launches the whole step at once (docs/inference.md: decoding twice as fast).
//
// What changes from step to step lives in device buffers the graph reads (tokens, positions, the new
// position's pool slots, the block table, each row's attended range, the window's slots, the K/V write
// position); the host fills them before each replay. The first kEagerStepsBeforeCapture steps of a cache
// shape run eagerly (on the capture stream, which also warms up cuBLAS there), the next one captures the
// graph, and it is dropped when rows leave or join or the cache grows (KVCache::graph). Continuous batching
// changes the shape every few steps on short answers; waiting keeps such shapes from paying for a capture
// (evaluating the bundled model on the H200 took 3.6-5.9 s with captures after 1 or 3 eager steps, 2.2-2.9 s
// without graphs). A long generation still replays its graph for all but the first steps of a shape.
#pragma once
#include <ATen/core/Tensor.h>

namespace mlaforge {

class DecoderLM;
struct KVCache;

constexpr int kEagerStepsBeforeCapture = 8;

// DecoderLM::decode_step on a cache with cuda_graph set: tokens [B, 1], pos [3, B, 1] -> logits [B, vocab].
at::Tensor graph_decode_step(const DecoderLM& model, const at::Tensor& tokens, const at::Tensor& pos, KVCache& cache);

}  // namespace mlaforge
