#include "model/kv_cache.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "core/device.h"
#include "core/error.h"

namespace mlaforge {

int64_t KVCache::bytes() const {
  int64_t b = pool ? pool->bytes() : 0;
  for (const auto* list : {&k, &v, &win_rope, &win_latent})
    for (auto& t : *list) b += t.numel() * t.element_size();
  if (win_img.defined()) b += win_img.numel() * win_img.element_size();
  return b;
}

namespace {

// Widens the per-position tensors to `capacity` positions (zeros / no blocks beyond the old end).
void grow(KVCache& c, int64_t capacity) {
  const int64_t B = c.batch(), extra = capacity - c.capacity;
  c.key_valid = at::cat({c.key_valid, at::zeros({B, extra}, c.key_valid.options())}, 1);
  for (auto* list : {&c.k, &c.v})
    for (auto& t : *list) t = at::cat({t, at::zeros({B, t.size(1), extra, t.size(3)}, t.options())}, 2);
  c.capacity = capacity;
  if (c.is_latent()) {
    const int64_t bs = c.pool->block_size(), width = (capacity + bs - 1) / bs;
    for (auto& row : c.blocks) row.resize(size_t(width), -1);
  }
}

// The device block table from `blocks`, unowned blocks pointing at the scratch block.
void upload_table(KVCache& c) {
  const int64_t B = c.batch(), width = c.blocks.empty() ? 0 : int64_t(c.blocks[0].size());
  std::vector<int32_t> flat;
  flat.reserve(size_t(B * width));
  for (const auto& row : c.blocks)
    for (int32_t b : row) flat.push_back(b < 0 ? c.scratch_block : b);
  c.block_table = upload(at::tensor(flat, at::kInt).view({B, width}), c.key_valid.device());
}

}  // namespace

void reserve_positions(KVCache& c, const at::Tensor& valid, int64_t S) {
  const int64_t start = c.len, T = S - start, B = c.batch();
  check(valid.size(0) == B && valid.size(1) == T, "kv cache", "valid is [", valid.size(0), ", ", valid.size(1),
        "], the step is [", B, ", ", T, "]");
  if (S > c.capacity) grow(c, std::max(S, c.capacity + c.capacity / 2));
  if (!c.is_latent()) return;
  const int64_t bs = c.pool->block_size();
  // Rows without a real token yet start at their first valid new position.
  bool missing = false;
  for (int64_t b : c.row_begin) missing |= b == KVCache::kNoToken;
  if (missing || T > 1) {
    at::Tensor v = valid.to(at::kCPU).to(at::kBool).contiguous();
    const bool* vp = v.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      if (c.row_begin[size_t(b)] < start) continue;
      for (int64_t t = 0; t < T; ++t)
        if (vp[b * T + t]) {
          c.row_begin[size_t(b)] = std::min(c.row_begin[size_t(b)], start + t);
          break;
        }
    }
  }
  // Blocks for positions [row_begin, S) of every row.
  bool changed = c.block_table.size(1) != int64_t(c.blocks.empty() ? 0 : c.blocks[0].size());
  for (int64_t b = 0; b < B; ++b) {
    auto& row = c.blocks[size_t(b)];
    const int64_t first = std::min(c.row_begin[size_t(b)], S - 1) / bs;
    for (int64_t i = first; i <= (S - 1) / bs; ++i)
      if (row[size_t(i)] < 0) {
        row[size_t(i)] = c.pool->allocate(1)[0];
        changed = true;
      }
  }
  if (changed) upload_table(c);
  // Pool slots of positions [0, S): [B, S]; the new ones [B*T]; the attended range of each row.
  auto dev = c.block_table.device();
  c.all_slots = position_slots(c.block_table, bs, S);
  c.new_slots = c.all_slots.narrow(1, start, T).reshape({-1});
  std::vector<int32_t> begin(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) begin[size_t(b)] = int32_t(std::min(c.row_begin[size_t(b)], S - 1));
  at::Tensor bt = upload(at::tensor(begin, at::kInt), dev);  // no stream sync: steps queue ahead
  if (c.window == 0) {
    c.paged = PagedBatch{c.block_table, bt, at::full_like(bt, S)};
    return;
  }
  // --kv-window: the pool serves [begin, S - W), the window slots [max(begin, S - W), S); slot j holds
  // position S-1 - ((S-1-j) mod W). The call's last min(T, W) new positions go to the window too.
  const int64_t W = c.window;
  std::vector<int32_t> end(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) end[size_t(b)] = std::max(begin[size_t(b)], int32_t(std::max<int64_t>(0, S - W)));
  at::Tensor et = upload(at::tensor(end, at::kInt), dev);
  c.paged = PagedBatch{c.block_table, bt, et};
  auto lopts = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor slot_pos = (S - 1) - at::remainder((S - 1) - at::arange(W, lopts), W);  // [W]
  c.win_valid = (slot_pos.view({1, W}) >= et.to(at::kLong).view({B, 1})) & (slot_pos.view({1, W}) >= 0);
  const int64_t w = std::min(T, W);
  c.win_first = T - w;
  c.win_slots = at::remainder(at::arange(S - w, S, lopts), W);
  c.win_read_slots = at::remainder(at::arange(S - std::min(S, W), S, lopts), W);
}

void reserve_capacity(KVCache& c, int64_t capacity) {
  if (capacity > c.capacity) grow(c, capacity);
}

void select_cache_rows(KVCache& c, const at::Tensor& rows) {
  c.graph.reset();  // captured for the old rows' tensors
  for (auto* list : {&c.k, &c.v, &c.win_rope, &c.win_latent})
    for (auto& t : *list) t = t.index_select(0, rows.to(t.device()));  // [B, ...] -> [n, ...]
  if (c.win_img.defined()) c.win_img = c.win_img.index_select(0, rows.to(c.win_img.device()));
  if (c.is_latent()) {
    // Kept rows keep their blocks; the others' go back to the pool.
    at::Tensor r = rows.to(at::kCPU).to(at::kLong).contiguous();
    std::vector<bool> kept(c.blocks.size(), false);
    std::vector<std::vector<int32_t>> blocks;
    std::vector<int64_t> begin;
    for (int64_t i = 0; i < r.numel(); ++i) {
      const int64_t row = r.data_ptr<int64_t>()[i];
      check(row >= 0 && row < int64_t(kept.size()) && !kept[size_t(row)], "kv cache", "row ", row,
            " selected twice or out of range");
      kept[size_t(row)] = true;
      blocks.push_back(c.blocks[size_t(row)]);
      begin.push_back(c.row_begin[size_t(row)]);
    }
    for (size_t row = 0; row < kept.size(); ++row) {
      if (kept[row]) continue;
      std::vector<int32_t> owned;
      for (int32_t b : c.blocks[row])
        if (b >= 0) owned.push_back(b);
      c.pool->release(owned);
    }
    c.blocks = std::move(blocks);
    c.row_begin = std::move(begin);
    c.block_table = c.block_table.index_select(0, rows.to(c.block_table.device()));
  }
  c.key_valid = c.key_valid.index_select(0, rows.to(c.key_valid.device()));  // [B, capacity] -> [n, capacity]
}

void append_cache_rows(KVCache& c, const KVCache& j) {
  check(c.is_latent() == j.is_latent() && c.k.size() == j.k.size(), "kv cache", "joining rows use another cache kind");
  check(j.len <= c.len, "kv cache", "joining rows hold ", j.len, " positions, the batch only ", c.len);
  const int64_t shift = c.len - j.len, n = j.batch(), L = c.len;
  c.graph.reset();  // captured for the old rows' tensors
  if (L > c.capacity) grow(c, L);
  // key_valid: [n, capacity], the joining rows' validity shifted right by `shift`.
  at::Tensor kv = at::zeros({n, c.capacity}, c.key_valid.options());
  kv.narrow(1, shift, j.len).copy_(j.key_valid.narrow(1, 0, j.len));
  c.key_valid = at::cat({c.key_valid, kv}, 0);
  for (size_t l = 0; l < c.k.size(); ++l) {
    for (auto [dst, src] : {std::pair{&c.k[l], &j.k[l]}, std::pair{&c.v[l], &j.v[l]}}) {
      at::Tensor rows = at::zeros({n, dst->size(1), c.capacity, dst->size(3)}, dst->options());
      rows.narrow(2, shift, j.len).copy_(src->narrow(2, 0, j.len));
      *dst = at::cat({*dst, rows}, 0);
    }
  }
  if (!c.is_latent()) return;
  check(c.window == j.window, "kv cache", "joining rows keep a window of ", j.window, " positions, the batch ", c.window);
  if (c.window > 0) {
    // Window slot d holds position p_d = L-1 - ((L-1-d) mod W); the joining rows had it at p_d - shift.
    const int64_t W = c.window;
    std::vector<int64_t> src(static_cast<size_t>(W));
    for (int64_t d = 0; d < W; ++d) {
      const int64_t p = L - 1 - (((L - 1 - d) % W) + W) % W;  // < 0: the slot holds nothing yet
      src[size_t(d)] = p - shift >= 0 ? (p - shift) % W : d;  // before the joining rows' start: never attended
    }
    at::Tensor idx = upload(at::tensor(src, at::kLong), c.win_img.device());
    for (size_t l = 0; l < c.win_rope.size(); ++l) {
      c.win_rope[l] = at::cat({c.win_rope[l], j.win_rope[l].index_select(1, idx)}, 0);
      c.win_latent[l] = at::cat({c.win_latent[l], j.win_latent[l].index_select(1, idx)}, 0);
    }
    c.win_img = at::cat({c.win_img, j.win_img.index_select(1, idx)}, 0);
  }
  const int64_t bs = c.pool->block_size(), width = int64_t(c.blocks[0].size());
  std::vector<int64_t> from, to;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t jb = j.row_begin[size_t(r)];
    std::vector<int32_t> row(size_t(width), -1);
    const int64_t begin = std::min(jb, j.len) + shift;
    for (int64_t p = begin; p < L; ++p) {
      auto& blk = row[size_t(p / bs)];
      if (blk < 0) blk = c.pool->allocate(1)[0];
      const int64_t src_pos = p - shift;
      from.push_back(int64_t(j.blocks[size_t(r)][size_t(src_pos / bs)]) * bs + src_pos % bs);
      to.push_back(int64_t(blk) * bs + p % bs);
    }
    c.blocks.push_back(std::move(row));
    c.row_begin.push_back(jb == KVCache::kNoToken ? KVCache::kNoToken : jb + shift);
  }
  if (!from.empty()) {
    auto dev = c.block_table.device();
    c.pool->copy_slots(*j.pool, upload(at::tensor(from, at::kLong), dev), upload(at::tensor(to, at::kLong), dev));
  }
  upload_table(c);
}

}  // namespace mlaforge
