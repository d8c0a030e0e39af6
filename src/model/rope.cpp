#include "model/rope.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "core/error.h"

namespace mlaforge {

at::Tensor rope_inv_freq(int64_t dim, double theta) {
  at::Tensor exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / float(dim);
  return 1.0 / at::pow(at::scalar_tensor(theta, at::kFloat), exponent);
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& pos, const at::Tensor& inv_freq,
                                               const std::vector<int64_t>& mrope_section) {
  // freqs[a, b, t, k] = pos[a, b, t] * inv_freq[k]: [3, B, T, P]
  at::Tensor freqs = pos.to(at::kFloat).unsqueeze(-1) * inv_freq.to(pos.device()).view({1, 1, 1, -1});
  at::Tensor chosen;  // [B, T, P]
  if (mrope_section.empty()) {
    chosen = freqs[0];
  } else {
    std::vector<at::Tensor> parts;
    int64_t start = 0;
    for (size_t i = 0; i < mrope_section.size(); ++i) {
      parts.push_back(freqs[int64_t(i)].narrow(-1, start, mrope_section[i]));
      start += mrope_section[i];
    }
    chosen = at::cat(parts, -1);
  }
  at::Tensor emb = at::cat({chosen, chosen}, -1);  // [B, T, head_dim]
  return {emb.cos(), emb.sin()};
}

at::Tensor mrope_positions(const std::vector<int64_t>& ids, int64_t image_token_id,
                           const std::vector<std::array<int64_t, 3>>& llm_grids, int64_t* next_position,
                           int64_t time_step) {
  const int64_t L = int64_t(ids.size());
  at::Tensor pos = at::empty({3, L}, at::kLong);
  auto p = pos.accessor<int64_t, 2>();
  int64_t next = 0;  // position of the next text token
  size_t image = 0;
  int64_t i = 0;
  while (i < L) {
    if (ids[size_t(i)] != image_token_id) {
      for (int a = 0; a < 3; ++a) p[a][i] = next;
      ++next;
      ++i;
      continue;
    }
    if (image >= llm_grids.size()) throw Error(str("more image token runs than images (", llm_grids.size(), ")"));
    const auto& g = llm_grids[image++];
    const int64_t n = g[0] * g[1] * g[2];
    if (i + n > L) throw Error("image token run shorter than its image's features");
    int64_t mx = 0;
    for (int64_t t = 0; t < g[0]; ++t)
      for (int64_t h = 0; h < g[1]; ++h)
        for (int64_t w = 0; w < g[2]; ++w, ++i) {
          p[0][i] = next + t * time_step;
          p[1][i] = next + h;
          p[2][i] = next + w;
          mx = std::max({mx, t * time_step, h, w});
        }
    next += mx + 1;
  }
  if (image != llm_grids.size()) throw Error(str("found ", image, " image token runs for ", llm_grids.size(), " images"));
  *next_position = next;
  return pos;
}

}  // namespace mlaforge
