// Rotary position embeddings of the decoder: 1-D RoPE and Qwen2-VL's multimodal M-RoPE.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace mlaforge {

// inv_freq[k] = theta^(-2k/dim), k < dim/2, computed in float32 as transformers does.
at::Tensor rope_inv_freq(int64_t dim, double theta);

// cos/sin for positions pos [3, B, T] (temporal, height, width; all equal for text and 1-D RoPE).
// Returns [B, T, head_dim] each: pair k (dims k and k + head_dim/2) turns by the axis that
// mrope_section assigns to k (empty section: axis 0 for every pair).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& pos, const at::Tensor& inv_freq,
                                               const std::vector<int64_t>& mrope_section);

// transformers' get_rope_index for one unpadded sequence: text runs advance all three axes together;
// an image block of LLM grid (t, h, w) = (grid_t, grid_h/merge, grid_w/merge) gets (t, row, column) offset
// by the position where it starts; the following text starts at max + 1.
// ids: the sequence; each image takes the next t*h*w image_token_id tokens, images in llm_grids order.
// time_step: temporal index per frame, 1 for Qwen2-VL; 0 for Qwen2.5-VL, whose temporal index is
// frame * seconds per frame * tokens_per_second and seconds per frame is 0 for images.
// Returns [3, L] int64 and sets *next_position to max + 1 (the position of the first generated token).
at::Tensor mrope_positions(const std::vector<int64_t>& ids, int64_t image_token_id,
                           const std::vector<std::array<int64_t, 3>>& llm_grids, int64_t* next_position,
                           int64_t time_step = 1);

}  // namespace mlaforge
