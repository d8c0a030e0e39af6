#include "model/decode_graph.h"

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "core/error.h"
#include "model/decoder.h"

#ifdef MLAFORGE_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mlaforge {

#ifdef MLAFORGE_WITH_CUDA

struct DecodeGraph {
  // What the capture depends on: batch, capacity, block-table width and the addresses of the cache's
  // tensors (select/append/grow replace them).
  std::vector<int64_t> shape;
  int eager_steps = 0;  // eager steps run on `stream` for this shape
  // Inputs the graph reads, refilled before every replay.
  at::Tensor tokens, pos, write_pos;                           // [B, 1], [3, B, 1], [1] int64
  at::Tensor new_slots, table, seq_begin, seq_end;             // latent cache
  at::Tensor win_valid, win_slots;                             // --kv-window
  at::Tensor logits;                                           // the graph's output [B, vocab]
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  c10::optional<c10::cuda::CUDAStream> stream;                 // capture must not run on the default stream
};

namespace {

std::vector<int64_t> cache_shape(const KVCache& c) {
  auto addr = [](const void* p) { return int64_t(reinterpret_cast<intptr_t>(p)); };
  auto first = [&](const std::vector<at::Tensor>& v) { return v.empty() ? int64_t(0) : addr(v[0].data_ptr()); };
  return {c.batch(),         c.capacity,      c.block_table.defined() ? c.block_table.size(1) : 0,
          addr(c.pool.get()), addr(c.key_valid.data_ptr()), first(c.k), first(c.v), first(c.win_rope),
          first(c.win_latent), c.win_img.defined() ? addr(c.win_img.data_ptr()) : 0};
}

// The graph input `dst` takes the values the host just computed into `cache_field`, and the cache then
// refers to dst, so the kernels captured from it read dst at every replay.
void refill(at::Tensor& dst, at::Tensor& cache_field) {
  if (!dst.defined()) dst = at::empty_like(cache_field);
  dst.copy_(cache_field);
  cache_field = dst;
}

}  // namespace

at::Tensor graph_decode_step(const DecoderLM& model, const at::Tensor& tokens, const at::Tensor& pos, KVCache& cache) {
  const int64_t B = tokens.size(0), start = cache.len, S = start + 1;
  const at::Device dev = tokens.device();
  check(dev.is_cuda(), "decode", "CUDA graphs need the tokens on a CUDA device");
  // A K/V cache is attended over its whole capacity: a multiple of 64 keeps the rows of the scores
  // [.., capacity] aligned for cuBLAS's fast kernels (at capacity 8227 the original's step ran 2.3x slower).
  if (!cache.is_latent() && cache.capacity % 64 != 0) reserve_capacity(cache, (cache.capacity + 63) / 64 * 64);
  // Host side, outside the graph: blocks and slots of the new position, the key mask's new column.
  reserve_positions(cache, at::ones({B, 1}, at::TensorOptions().dtype(at::kBool).device(dev)), S);
  cache.key_valid.narrow(1, start, 1).fill_(true);

  const std::vector<int64_t> shape = cache_shape(cache);
  if (!cache.graph || cache.graph->shape != shape) {
    cache.graph = std::make_shared<DecodeGraph>();
    cache.graph->shape = shape;
  }
  DecodeGraph& g = *cache.graph;
  if (!g.tokens.defined()) {
    g.tokens = at::empty({B, 1}, tokens.options().dtype(at::kLong));
    g.pos = at::empty({3, B, 1}, tokens.options().dtype(at::kLong));
    g.write_pos = at::empty({1}, tokens.options().dtype(at::kLong));
  }
  g.tokens.copy_(tokens.view({B, 1}));
  g.pos.copy_(pos.view({3, B, 1}));
  g.write_pos.fill_(start);
  if (cache.is_latent()) {
    refill(g.new_slots, cache.new_slots);
    refill(g.table, cache.paged.block_table);
    refill(g.seq_begin, cache.paged.seq_begin);
    refill(g.seq_end, cache.paged.seq_end);
    if (cache.window > 0) {
      refill(g.win_valid, cache.win_valid);
      refill(g.win_slots, cache.win_slots);
    }
  }
  at::Tensor out;
  if (!g.graph) {
    if (!g.stream) g.stream = c10::cuda::getStreamFromPool(false, dev.index());
    c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(dev.index());
    at::cuda::CUDAEvent inputs_ready;
    inputs_ready.record(main);
    inputs_ready.block(*g.stream);
    {
      c10::cuda::CUDAStreamGuard on_side(*g.stream);
      if (g.eager_steps < kEagerStepsBeforeCapture) {
        out = model.decode_device(g.tokens, g.pos, g.write_pos, cache);
        out.record_stream(main);  // allocated on the side stream, read on the main one
        ++g.eager_steps;
      } else {
        g.graph = std::make_unique<at::cuda::CUDAGraph>();
        g.graph->capture_begin();
        g.logits = model.decode_device(g.tokens, g.pos, g.write_pos, cache);
        g.graph->capture_end();
      }
    }
    at::cuda::CUDAEvent side_done;
    side_done.record(*g.stream);
    side_done.block(main);
  }
  if (g.graph) {
    g.graph->replay();
    out = g.logits.clone();  // the next replay overwrites g.logits
  }
  cache.len = S;
  return out;
}

#else

struct DecodeGraph {};

at::Tensor graph_decode_step(const DecoderLM&, const at::Tensor&, const at::Tensor&, KVCache&) {
  fail("decode", "CUDA graphs need the CUDA build (configure against libtorch with CUDA)");
}

#endif

}  // namespace mlaforge
