// Tests for the low-rank KV factorisation (src/convert/lowrank.*), all against float64 references.
#include "convert/lowrank.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"

namespace mlaforge {
namespace {

using at::Tensor;

const at::TensorOptions kDbl = at::TensorOptions().dtype(at::kDouble);

// Random orthogonal [d, d].
Tensor rand_orth(int64_t d) { return std::get<0>(at::linalg_qr(at::randn({d, d}, kDbl))); }

// Square root A = Q diag(sqrt(e)) of a covariance C = A A^T with eigenvalues 10^hi .. 10^lo and a random basis.
Tensor cov_sqrt(int64_t d, double hi, double lo) {
  const Tensor e = at::pow(10.0, at::linspace(hi, lo, d, kDbl));
  return rand_orth(d) * e.sqrt().unsqueeze(0);
}

ModalityGram gram_from_sqrt(const Tensor& A, int64_t n) { return {A.matmul(A.t()) * static_cast<double>(n), n}; }
Tensor samples(const Tensor& A, int64_t n) { return at::randn({n, A.size(0)}, kDbl).matmul(A.t()); }  // [n, d]
ModalityGram gram_from_samples(const Tensor& X) { return {X.t().matmul(X), X.size(0)}; }

double rel(const Tensor& a, const Tensor& b) { return (a - b).norm().item<double>() / b.norm().item<double>(); }
Tensor product(const Factors& f) { return f.up.matmul(f.down); }
// tr(M S M^T) / tr(W S W^T).
double out_err(const Tensor& W, const Tensor& M, const Tensor& S) {
  const Tensor E = W - M;
  return (E.matmul(S) * E).sum().item<double>() / (W.matmul(S) * W).sum().item<double>();
}
// Sample estimate sum ||(W - M) x||^2 / sum ||W x||^2 over rows of X [n, d].
double sample_err(const Tensor& W, const Tensor& M, const Tensor& X) {
  return X.matmul((W - M).t()).pow(2).sum().item<double>() / X.matmul(W.t()).pow(2).sum().item<double>();
}

LowRankOptions opts(LowRankMethod m, KvLatent kv, bool decoupled, int64_t rank) {
  LowRankOptions o;
  o.method = m;
  o.kv = kv;
  o.decoupled = decoupled;
  o.rank = rank;
  return o;
}

const char* name(LowRankMethod m) { return m == LowRankMethod::Whitened ? "whitened" : "svd"; }
const char* name(KvLatent kv) { return kv == KvLatent::Joint ? "joint" : "split"; }

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(LowRank, FullRankFormula) {
  EXPECT_EQ(full_rank(112, 48, 64, KvLatent::Joint), 64);
  EXPECT_EQ(full_rank(112, 48, 64, KvLatent::Split), 48 + 64);
  EXPECT_EQ(full_rank(80, 32, 96, KvLatent::Joint), 80);
  EXPECT_EQ(full_rank(80, 32, 96, KvLatent::Split), 80);
  EXPECT_EQ(full_rank(40, 0, 64, KvLatent::Split), 40);
}

// The key invariant: at full rank up * down == W for every option, including singular and indefinite S.
TEST(LowRank, FullRankIsExactForEveryCombination) {
  at::manual_seed(1);
  struct Shape {
    int64_t k, v, d;
  };
  const std::vector<Shape> shapes = {{48, 64, 64}, {32, 48, 96}, {0, 40, 64}};
  for (const Shape& sh : shapes) {
    const int64_t d = sh.d, rows = sh.k + sh.v;
    const Tensor W = at::randn({rows, d}, kDbl);
    // Gram pairs (image, text): well conditioned; rank deficient (fewer tokens than d, dead channels);
    // ill conditioned (eigenvalues over 15 decades plus one massive-activation channel); indefinite (forces
    // the eigendecomposition fallback).
    std::vector<std::tuple<std::string, ModalityGram, ModalityGram>> grams;
    grams.emplace_back("well", gram_from_sqrt(cov_sqrt(d, 1, -1), 500), gram_from_sqrt(cov_sqrt(d, 1, -1), 700));
    {
      Tensor Xt = at::randn({30, d}, kDbl);
      Xt.narrow(1, 0, 8).zero_();
      grams.emplace_back("rank-deficient", gram_from_samples(at::randn({10, d}, kDbl)), gram_from_samples(Xt));
    }
    {
      Tensor A = cov_sqrt(d, 3, -12);
      ModalityGram gi = gram_from_sqrt(A, 100);
      gi.gram[0][0] += 1e6 * 100;
      grams.emplace_back("ill-conditioned", gi, gram_from_sqrt(cov_sqrt(d, 0, -15), 100));
    }
    {
      const Tensor Q = rand_orth(d);
      Tensor e = at::ones({d}, kDbl);
      e[0] = -5.0;
      e[1] = -1.0;
      grams.emplace_back("indefinite", ModalityGram{Q.matmul(at::diag(e)).matmul(Q.t()) * 50.0, 50},
                         gram_from_sqrt(cov_sqrt(d, 1, -1), 50));
    }
    for (const auto& [gname, gi, gt] : grams) {
      for (LowRankMethod m : {LowRankMethod::Whitened, LowRankMethod::Svd}) {
        for (KvLatent kv : {KvLatent::Joint, KvLatent::Split}) {
          for (bool dec : {true, false}) {
            const int64_t R = full_rank(rows, sh.k, d, kv);
            SCOPED_TRACE(std::string(gname) + " " + name(m) + " " + name(kv) + (dec ? " decoupled" : " shared") +
                         " k=" + std::to_string(sh.k) + " d=" + std::to_string(d));
            const LowRankResult r = factorize_kv(W, sh.k, gi, gt, opts(m, kv, dec, R));
            for (const Factors* f : {&r.image, &r.text}) {
              ASSERT_EQ(f->down.scalar_type(), at::kDouble);
              ASSERT_EQ(f->down.sizes(), (std::vector<int64_t>{R, d}));
              ASSERT_EQ(f->up.sizes(), (std::vector<int64_t>{rows, R}));
              EXPECT_LT(rel(product(*f), W), 1e-10);
            }
            if (gname != "indefinite") {  // with an indefinite S the "error" is not a norm
              EXPECT_LT(r.rel_error_image, 1e-18);
              EXPECT_LT(r.rel_error_text, 1e-18);
            }
            if (m == LowRankMethod::Whitened && gname == "indefinite" && dec) {
              EXPECT_EQ(r.damping, "image: eigh fallback (clamped 2 eigenvalues); text: cholesky eps=1e-6");
            }
            if (m == LowRankMethod::Svd) {
              EXPECT_EQ(r.damping, "none (svd)");
            }
          }
        }
      }
    }
  }
}

// Worst case for the damping at a realistic width: a rank-1 Gram (cond(S + lambda I) ~ d / eps) and a Gram
// dominated by one massive-activation channel over fewer tokens than d.
TEST(LowRank, FullRankIsExactAtWidth384WithSingularGram) {
  at::manual_seed(11);
  const int64_t d = 384, k = 128, v = 256;
  const Tensor W = at::randn({k + v, d}, kDbl);
  const Tensor x = at::randn({1, d}, kDbl);
  Tensor X = at::randn({50, d}, kDbl);
  X.select(1, 0).mul_(1000.0);
  for (KvLatent kv : {KvLatent::Joint, KvLatent::Split}) {
    const LowRankResult r = factorize_kv(W, k, gram_from_samples(x), gram_from_samples(X),
                                         opts(LowRankMethod::Whitened, kv, true, full_rank(k + v, k, d, kv)));
    EXPECT_LT(rel(product(r.image), W), 1e-10) << name(kv);
    EXPECT_LT(rel(product(r.text), W), 1e-10) << name(kv);
    std::printf("  [%s d=%ld] full-rank reconstruction: rank-1 Gram %.3g, outlier Gram %.3g\n", name(kv),
                static_cast<long>(d), rel(product(r.image), W), rel(product(r.text), W));
  }
}

TEST(LowRank, AcceptsFloatInputsAndReturnsDouble) {
  at::manual_seed(2);
  const Tensor W = at::randn({48, 32}, kDbl).to(at::kHalf);
  const ModalityGram g = gram_from_sqrt(cov_sqrt(32, 1, -1), 100);
  const ModalityGram gf{g.gram.to(at::kFloat), g.count};
  const LowRankResult r = factorize_kv(W, 16, gf, gf, opts(LowRankMethod::Whitened, KvLatent::Joint, true, 32));
  EXPECT_EQ(r.image.up.scalar_type(), at::kDouble);
  EXPECT_LT(rel(product(r.image), W.to(at::kDouble)), 1e-10);
}

// Activation-aware whitening is better on the output error, plain SVD on the parameter distance.
TEST(LowRank, WhitenedBeatsSvdOnOutputErrorAndSvdWinsOnParameters) {
  at::manual_seed(3);
  const int64_t d = 128, k = 64, v = 64, R = 32;
  const Tensor W = at::randn({k + v, d}, kDbl);
  const ModalityGram g = gram_from_sqrt(cov_sqrt(d, 3, -3), 1000);  // 6 decades of anisotropy
  for (KvLatent kv : {KvLatent::Joint, KvLatent::Split}) {
    const LowRankResult wh = factorize_kv(W, k, g, g, opts(LowRankMethod::Whitened, kv, false, R));
    const LowRankResult sv = factorize_kv(W, k, g, g, opts(LowRankMethod::Svd, kv, false, R));
    const double pw = rel(product(wh.image), W), ps = rel(product(sv.image), W);
    std::printf("  [%s R=%ld/%ld] output error: whitened %.4g svd %.4g | param distance: whitened %.4g svd %.4g\n",
                name(kv), static_cast<long>(R), static_cast<long>(d), wh.rel_error_image, sv.rel_error_image, pw, ps);
    EXPECT_LT(wh.rel_error_image, 0.5 * sv.rel_error_image);
    EXPECT_LT(ps, pw);
    // Plain SVD is Eckart-Young in the parameter norm (joint): ||W - M||_F^2 = discarded sigma^2.
    if (kv == KvLatent::Joint) {
      const Tensor s = at::linalg_svdvals(W);
      const double expect = s.narrow(0, R, s.size(0) - R).pow(2).sum().item<double>() / s.pow(2).sum().item<double>();
      EXPECT_NEAR(ps * ps, expect, 1e-12);
    }
  }
}

TEST(LowRank, SvdIgnoresGram) {
  at::manual_seed(4);
  const int64_t d = 64;
  const Tensor W = at::randn({96, d}, kDbl);
  const ModalityGram a = gram_from_sqrt(cov_sqrt(d, 2, -2), 100), b = gram_from_sqrt(cov_sqrt(d, 0, 0), 100);
  const LowRankResult r1 = factorize_kv(W, 32, a, b, opts(LowRankMethod::Svd, KvLatent::Joint, true, 16));
  const LowRankResult r2 = factorize_kv(W, 32, b, ModalityGram{}, opts(LowRankMethod::Svd, KvLatent::Joint, true, 16));
  EXPECT_LT(rel(product(r1.image), product(r2.image)), 1e-12);
  EXPECT_LT(rel(product(r1.image), product(r1.text)), 1e-15);
  EXPECT_EQ(r2.rel_error_text, 0.0);  // no text tokens: nothing to measure
}

TEST(LowRank, DecoupledNoWorseThanSharedPerModality) {
  at::manual_seed(5);
  const int64_t d = 96, k = 48, v = 64, R = 24;
  const Tensor W = at::randn({k + v, d}, kDbl);
  // Very different second moments: different principal directions, different spectra, unequal token counts.
  const ModalityGram gi = gram_from_sqrt(cov_sqrt(d, 2, -2), 3000), gt = gram_from_sqrt(cov_sqrt(d, 1, -3), 1000);
  for (KvLatent kv : {KvLatent::Joint, KvLatent::Split}) {
    const LowRankResult dec = factorize_kv(W, k, gi, gt, opts(LowRankMethod::Whitened, kv, true, R));
    const LowRankResult sh = factorize_kv(W, k, gi, gt, opts(LowRankMethod::Whitened, kv, false, R));
    std::printf("  [%s R=%ld] image: decoupled %.4g shared %.4g | text: decoupled %.4g shared %.4g\n", name(kv),
                static_cast<long>(R), dec.rel_error_image, sh.rel_error_image, dec.rel_error_text, sh.rel_error_text);
    // Tolerance covers the 1e-6 relative damping (decoupled is optimal for the damped S_m).
    EXPECT_LE(dec.rel_error_image, sh.rel_error_image * (1 + 1e-6));
    EXPECT_LE(dec.rel_error_text, sh.rel_error_text * (1 + 1e-6));
    EXPECT_LT(dec.rel_error_text, 0.9 * sh.rel_error_text);  // and clearly better for the minority modality
    // Shared uses one pair for both modalities.
    EXPECT_TRUE(sh.image.up.is_same(sh.text.up));
    EXPECT_FALSE(dec.image.up.is_same(dec.text.up));
  }
}

// Whitened error = discarded sigma^2 of W L / tr(W S W^T) with S = L L^T the damped second moment, and no
// other rank-R factorisation does better.
TEST(LowRank, WhitenedIsEckartYoungOptimal) {
  at::manual_seed(6);
  const int64_t d = 80, k = 40, v = 56, R = 20;
  const Tensor W = at::randn({k + v, d}, kDbl);
  const ModalityGram gi = gram_from_sqrt(cov_sqrt(d, 2, -2), 400), gt = gram_from_sqrt(cov_sqrt(d, 1, -1), 600);
  const Tensor S = gi.gram / 400.0;
  const Tensor Sd = S + at::eye(d, kDbl) * (1e-6 * S.diagonal().mean().item<double>());
  const Tensor L = at::linalg_cholesky(Sd);
  auto eckart_young = [&](const Tensor& Wb, int64_t r) {
    const Tensor s = at::linalg_svdvals(Wb.matmul(L));
    return s.narrow(0, r, s.size(0) - r).pow(2).sum().item<double>() / s.pow(2).sum().item<double>();
  };

  const LowRankResult j = factorize_kv(W, k, gi, gt, opts(LowRankMethod::Whitened, KvLatent::Joint, true, R));
  EXPECT_EQ(j.damping, "image: cholesky eps=1e-6; text: cholesky eps=1e-6");
  const double ey = eckart_young(W, R);
  std::printf("  [joint R=%ld] Eckart-Young %.6g, direct (damped S) %.6g, reported (undamped S) %.6g\n",
              static_cast<long>(R), ey, out_err(W, product(j.image), Sd), j.rel_error_image);
  EXPECT_NEAR(out_err(W, product(j.image), Sd), ey, 1e-10 * ey);
  EXPECT_NEAR(j.rel_error_image, ey, 1e-4 * ey);
  EXPECT_NEAR(j.rel_error_image, out_err(W, product(j.image), S), 1e-10 * ey);

  // Perturbing either factor, or using the text factors for image tokens, only makes it worse.
  const Tensor M = product(j.image);
  for (int t = 0; t < 3; ++t) {
    const Tensor up = j.image.up + 1e-2 * at::randn_like(j.image.up);
    const Tensor down = j.image.down + 1e-2 * at::randn_like(j.image.down);
    EXPECT_GT(out_err(W, up.matmul(j.image.down), Sd), out_err(W, M, Sd));
    EXPECT_GT(out_err(W, j.image.up.matmul(down), Sd), out_err(W, M, Sd));
  }
  EXPECT_GT(out_err(W, product(j.text), S), j.rel_error_image);

  // Split: each half is Eckart-Young on its own rows.
  const LowRankResult s = factorize_kv(W, k, gi, gt, opts(LowRankMethod::Whitened, KvLatent::Split, true, R));
  const Tensor Ms = product(s.image);
  EXPECT_NEAR(out_err(W.narrow(0, 0, k), Ms.narrow(0, 0, k), Sd), eckart_young(W.narrow(0, 0, k), R / 2), 1e-10);
  EXPECT_NEAR(out_err(W.narrow(0, k, v), Ms.narrow(0, k, v), Sd), eckart_young(W.narrow(0, k, v), R / 2), 1e-10);
  EXPECT_NEAR(s.key_error_image, eckart_young(W.narrow(0, 0, k), R / 2), 1e-4);
  EXPECT_NEAR(s.value_error_image, eckart_young(W.narrow(0, k, v), R / 2), 1e-4);
  // Joint shares the budget across K and V, so it is no worse overall than a fixed half/half split.
  EXPECT_LE(j.rel_error_image, s.rel_error_image * (1 + 1e-6));
  std::printf("  [R=%ld] image error joint %.4g split %.4g (keys %.4g values %.4g)\n", static_cast<long>(R),
              j.rel_error_image, s.rel_error_image, s.key_error_image, s.value_error_image);
}

// Reported errors are the sample errors on the calibration tokens themselves, and estimate fresh tokens.
TEST(LowRank, ReportedErrorsMatchSamples) {
  at::manual_seed(7);
  const int64_t d = 64, k = 32, v = 48, R = 16;
  const Tensor W = at::randn({k + v, d}, kDbl);
  const Tensor Ai = cov_sqrt(d, 1.5, -1.5), At = cov_sqrt(d, 1, -2);
  const Tensor Xi = samples(Ai, 3000), Xt = samples(At, 2000);
  // Fresh tokens, through their Grams (same value as summing over the samples, 20000 x fewer flops per use).
  const Tensor Fi = gram_from_samples(samples(Ai, 20000)).gram, Ft = gram_from_samples(samples(At, 20000)).gram;
  for (KvLatent kv : {KvLatent::Joint, KvLatent::Split}) {
    for (bool dec : {true, false}) {
      SCOPED_TRACE(std::string(name(kv)) + (dec ? " decoupled" : " shared"));
      const LowRankResult r =
          factorize_kv(W, k, gram_from_samples(Xi), gram_from_samples(Xt), opts(LowRankMethod::Whitened, kv, dec, R));
      const Tensor Mi = product(r.image), Mt = product(r.text);
      EXPECT_NEAR(r.rel_error_image, sample_err(W, Mi, Xi), 1e-10);
      EXPECT_NEAR(r.rel_error_text, sample_err(W, Mt, Xt), 1e-10);
      auto K = [&](const Tensor& t) { return t.narrow(0, 0, k); };
      auto V = [&](const Tensor& t) { return t.narrow(0, k, v); };
      EXPECT_NEAR(r.key_error_image, sample_err(K(W), K(Mi), Xi), 1e-10);
      EXPECT_NEAR(r.value_error_text, sample_err(V(W), V(Mt), Xt), 1e-10);
      EXPECT_NEAR(r.key_error_text, sample_err(K(W), K(Mt), Xt), 1e-10);
      EXPECT_NEAR(r.value_error_image, sample_err(V(W), V(Mi), Xi), 1e-10);
      // Fresh tokens from the same distributions (held-out error is a bit higher than in-sample).
      const double fi = out_err(W, Mi, Fi), ft = out_err(W, Mt, Ft);
      std::printf("  [%s %s R=%ld] image reported %.4g fresh %.4g | text reported %.4g fresh %.4g\n", name(kv),
                  dec ? "decoupled" : "shared", static_cast<long>(R), r.rel_error_image, fi, r.rel_error_text, ft);
      EXPECT_NEAR(r.rel_error_image, fi, 0.1 * fi);
      EXPECT_NEAR(r.rel_error_text, ft, 0.1 * ft);
    }
  }
}

TEST(LowRank, SplitHasBlockStructure) {
  at::manual_seed(8);
  const int64_t d = 64, k = 32, v = 48, R = 24;
  const Tensor W = at::randn({k + v, d}, kDbl);
  const ModalityGram gi = gram_from_sqrt(cov_sqrt(d, 2, -2), 100), gt = gram_from_sqrt(cov_sqrt(d, 1, -1), 100);
  const LowRankResult r = factorize_kv(W, k, gi, gt, opts(LowRankMethod::Whitened, KvLatent::Split, true, R));
  EXPECT_EQ(r.key_rank, R / 2);
  EXPECT_EQ(r.value_rank, R / 2);
  for (const Factors* f : {&r.image, &r.text}) {
    // Keys read only c_k = latent[:R/2], values only c_v = latent[R/2:].
    EXPECT_EQ(f->up.narrow(0, 0, k).narrow(1, R / 2, R / 2).abs().max().item<double>(), 0.0);
    EXPECT_EQ(f->up.narrow(0, k, v).narrow(1, 0, R / 2).abs().max().item<double>(), 0.0);
  }
  // The key block is exactly the rank-R/2 factorisation of W_k alone (values do not influence it).
  const Tensor Wk = W.narrow(0, 0, k);
  const LowRankResult kr = factorize_kv(Wk, 0, gi, gt, opts(LowRankMethod::Whitened, KvLatent::Joint, true, R / 2));
  EXPECT_LT(rel(product(r.image).narrow(0, 0, k), product(kr.image)), 1e-10);
  EXPECT_LT(rel(product(r.text).narrow(0, 0, k), product(kr.text)), 1e-10);
  EXPECT_EQ(kr.key_rank, 0);  // joint reports no split widths

  // Narrow key side: the rank beyond min(k_rows, d) goes to the values.
  const Tensor W2 = at::randn({16 + 48, d}, kDbl);
  const LowRankResult o = factorize_kv(W2, 16, gi, gt, opts(LowRankMethod::Whitened, KvLatent::Split, true, 40));
  EXPECT_EQ(o.key_rank, 16);
  EXPECT_EQ(o.value_rank, 24);
  EXPECT_LT(o.key_error_image, 1e-18);  // keys kept at full rank

  // No key rows: the whole (possibly odd) rank goes to values.
  const LowRankResult z = factorize_kv(W2, 0, gi, gt, opts(LowRankMethod::Whitened, KvLatent::Split, true, 7));
  EXPECT_EQ(z.key_rank, 0);
  EXPECT_EQ(z.value_rank, 7);
  EXPECT_EQ(z.key_error_image, 0.0);
}

TEST(LowRank, SharedWithOneModality) {
  at::manual_seed(9);
  const int64_t d = 48;
  const Tensor W = at::randn({64, d}, kDbl);
  const ModalityGram gt = gram_from_sqrt(cov_sqrt(d, 2, -2), 100);
  const LowRankResult a =
      factorize_kv(W, 16, ModalityGram{}, gt, opts(LowRankMethod::Whitened, KvLatent::Joint, false, 12));
  const LowRankResult b = factorize_kv(W, 16, gt, gt, opts(LowRankMethod::Whitened, KvLatent::Joint, true, 12));
  EXPECT_LT(rel(product(a.text), product(b.text)), 1e-10);  // pooled S == S_text
  EXPECT_EQ(a.rel_error_image, 0.0);
  EXPECT_GT(a.rel_error_text, 0.0);
}

TEST(LowRank, Errors) {
  at::manual_seed(10);
  const int64_t d = 32;
  const Tensor W = at::randn({40, d}, kDbl);  // 16 key rows + 24 value rows
  const ModalityGram g = gram_from_sqrt(cov_sqrt(d, 1, -1), 100);
  const ModalityGram none{};
  auto run = [&](const Tensor& w, int64_t k, const ModalityGram& gi, const ModalityGram& gt, LowRankOptions o) {
    return [=] { factorize_kv(w, k, gi, gt, o, "layer 3"); };
  };
  const auto J = KvLatent::Joint, S = KvLatent::Split;
  const auto Wh = LowRankMethod::Whitened;
  expect_error(run(W, 16, g, g, opts(Wh, J, true, 0)), "layer 3: latent rank must be positive, got 0");
  expect_error(run(W, 16, g, g, opts(Wh, J, true, -4)), "must be positive");
  expect_error(run(W, 16, g, g, opts(Wh, J, true, 33)), "exceeds the full rank 32");
  expect_error(run(W, 16, g, g, opts(Wh, S, true, 42)), "exceeds the full rank 40");
  expect_error(run(W, 16, g, g, opts(Wh, S, true, 7)), "even rank, got 7");
  expect_error(run(W, 16, g, none, opts(Wh, J, true, 8)), "needs text calibration tokens");
  expect_error(run(W, 16, none, g, opts(Wh, J, true, 8)), "needs image calibration tokens");
  expect_error(run(W, 16, none, none, opts(Wh, J, false, 8)), "got 0 image and 0 text");
  expect_error(run(W, 16, ModalityGram{at::eye(d + 1, kDbl), 5}, g, opts(Wh, J, true, 8)),
               "image Gram has shape [33, 33], expected [32, 32]");
  expect_error(run(W, 16, ModalityGram{Tensor(), 5}, g, opts(Wh, J, true, 8)), "no Gram matrix");
  expect_error(run(W, 16, ModalityGram{at::zeros({d, d}, kDbl), 5}, g, opts(Wh, J, true, 8)), "non-positive trace");
  expect_error(run(W.flatten(), 16, g, g, opts(Wh, J, true, 8)), "must be a 2-D");
  expect_error(run(W, 40, g, g, opts(Wh, J, true, 8)), "key rows 40 out of range");
  expect_error(run(W, -1, g, g, opts(Wh, J, true, 8)), "key rows -1 out of range");
  Tensor Wn = W.clone();
  Wn[0][0] = std::numeric_limits<double>::quiet_NaN();
  expect_error(run(Wn, 16, g, g, opts(Wh, J, true, 8)), "non-finite");
  Tensor Gn = g.gram.clone();
  Gn[1][1] = std::numeric_limits<double>::infinity();
  expect_error(run(W, 16, g, ModalityGram{Gn, 100}, opts(Wh, J, true, 8)), "text Gram has non-finite");
}

}  // namespace
}  // namespace mlaforge
