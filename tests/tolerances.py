"""Every numerical tolerance of the suite, by dtype. Gradients are looser than outputs (they sum
over more terms); relative-RMS bounds are for long reductions whose max error grows with length.

Tables map a dtype to the keywords of `np.testing.assert_allclose` / `chex.assert_trees_all_close`
(`**tolerances.output(jnp.float32)`, `**tolerances.ELEMENTWISE[jnp.float32]`); scalars are bounds
for one kind of check, named by what it measures.
"""

import jax.numpy as jnp
import numpy as np

# Output comparisons against a float32 / float64 reference: (atol, rtol).
OUTPUT = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD = {jnp.float32: dict(atol=1e-4, rtol=1e-4), jnp.bfloat16: dict(atol=6e-2, rtol=6e-2)}
# Relative RMS error ||a - b|| / ||b|| for whole tensors.
REL_RMS = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}
GRAD_REL_RMS = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2}
# bf16 inputs against the same computation in fp32 (on the same values, or on the unrounded inputs:
# the inputs' rounding to bf16 fits in the bound).
BF16_VS_FP32_REL_RMS = 3e-2
# Linear attention through second-order Taylor features (H² per head) against the direct form: a
# longer sum than first-order features, a little more rounding.
SECOND_ORDER_FEATURES_REL_RMS = {jnp.float32: 5e-5}
# Token-by-token decoding (a running sum of unstabilized exp features over tens of steps) against
# the parallel form: rounding accumulates with every step.
STEPWISE_DECODE_REL_RMS = {jnp.float32: 1e-4}

# Small computations against their closed form (float64 or Python floats): rounding only.
# Values float32 holds exactly (powers of two): only the conversion of the expected values.
EXACT_VALUES = {jnp.float32: dict(rtol=1e-7)}
# A few elementwise operations (exp, max, a product of constants) on O(1) nonzero values.
ELEMENTWISE = {jnp.float32: dict(rtol=1e-6)}
# |derivative - closed form| for the derivative of a few elementwise operations, O(1): rounding only.
ELEMENTWISE_DERIVATIVE_ABS = 1e-6
# Gate values in [0, 1] from a few elementwise operations against their closed form: float32
# rounding at the scale of 1 (also the slack of the bounds a gate must stay between).
GATE_VALUES = {jnp.float32: dict(atol=1e-7)}
# log(w' / w) of two float32 attention weights (rows of ~10 weights of 1e-3..1): rounding of each log,
# for comparisons that are ties in exact arithmetic.
LOG_WEIGHT_ABS = 1e-5
# A sum or norm over a few features, or a ratio of such sums.
FEATURE_SUM = {jnp.float32: dict(rtol=1e-5)}
# A sum of a few dozen O(1) terms that cancel to 0 in exact arithmetic (the z-scores of a row of
# scores, absolute): float32 rounding of the terms.
CANCELLING_SUM_ABS = 1e-5
# A polynomial kernel's value `1 + x + x²/2` (x a dot product): a short sum, values near 0 possible.
KERNEL_VALUE = {jnp.float32: dict(atol=1e-5, rtol=1e-5)}
# Cosine similarities in [-1, 1]: relative near ±1, absolute near 0.
COSINE = {jnp.float32: dict(atol=1e-6, rtol=1e-5)}
# Attention weights in [0, 1] from exponents in the thousands, against a float64 log-space
# reference.
STABILIZED_WEIGHTS = {jnp.float32: dict(atol=1e-5)}
# Off-diagonal of the Gram matrix of float32 QR factors (zero in exact arithmetic).
ORTHOGONALITY = {jnp.float32: dict(atol=1e-4)}
# Gram matrix of a closed-form orthonormal basis (DCT rows computed in float64, stored in float32)
# against the identity: the storage rounding only.
ORTHONORMAL_ROWS = {jnp.float32: dict(atol=1e-6)}
# Numerical rank of a float32 matrix of O(1) entries: singular values below this are rounding
# (which leaves them near 1e-6), not rank.
RANK_SINGULAR_VALUE_MIN = 1e-4
# A float64 quantity that is >= 1 in exact arithmetic, after float64 rounding.
FLOAT64_ROUNDING = 1e-9
# Two float64 computations of the same O(1) sum in different orders (a folded linear map against
# explicit loops): float64 rounding only.
FLOAT64_REORDERED = dict(rtol=1e-10, atol=1e-12)
# Sum of softmax-normalized weights computed in float64 (a product of two row-stochastic matrices)
# against 1: float64 rounding only.
FLOAT64_WEIGHT_SUM = dict(rtol=1e-12)
# A running sum (cumulative distribution) of a few dozen float32 weights in [0, 1] that sum to 1:
# the rounding of each weight, summed.
CUMULATIVE_WEIGHT_ABS = 1e-6
# g1·o1 - g2·o2 of two float32 attention outputs with gains g up to 1e3, divided back by the gain
# (OpAmp's large-CMRR limit): the products' rounding grows with the gain (measured 1.4e-5 at 1e3).
AMPLIFIED_DIFFERENCE = dict(rtol=1e-4)

# Approximations and estimates against what they approximate (bounds set by the approximation, see
# each test).
# Temperatures the bisection finds on one random draw against the authors' regression fit (an
# empirical formula, not an identity).
LOGNORMAL_TEMPERATURE_FIT = dict(rtol=0.15)
# Entropies (nats) of attention rows over T = 128 keys across four temperatures: attention that
# cannot concentrate stays this close to log T; softmax's entropy spans more than this fraction of
# log T; an estimate that tracks it correlates above ENTROPY_CORRELATION_MIN and never strays by
# more than ENTROPY_GAP_MAX_FRACTION of that span.
UNIFORM_ENTROPY_GAP = 0.05
ENTROPY_SPAN_MIN_FRACTION = 0.4
ENTROPY_CORRELATION_MIN = 0.98
ENTROPY_GAP_MAX_FRACTION = 0.4
# Group attention with one group per cluster of keys (noise 0.05 around each centre) against
# softmax attention: relative RMS from the within-cluster spread.
CLUSTER_GROUPS_REL_RMS = 0.05
# The exponent 2 s ‖q‖ d of RITA's grouping bound exp(±·) on the test's clustered keys: below this
# the bound is tight enough to mean something.
GROUPING_SLACK_MAX = 0.5
# Monte-Carlo convergence of random-feature attention over eight draws: the error ratio for 8x and
# 64x the features (1/√m predicts 2.8 and 8; eight draws leave room for noise), and the relative
# error left with 256 features (scores scaled by 0.5).
MC_ERROR_RATIO_8X_MIN = 1.8
MC_ERROR_RATIO_64X_MIN = 4.0
RANDOM_FEATURES_256_REL_ERROR_MAX = 0.15
# Standard deviation of the row norms of a projection drawn with chi-distributed norms (about 0.7
# for H = 8): rows all normalized to √H would give 0.
RANDOM_NORM_SPREAD_MIN = 0.1
# A trained FFN's held-out error over the best token-wise map's (measured 0.53 and 0.38): a map
# that does not mix tokens cannot go below 1.
LEARNED_MIXING_ERROR_RATIO_MAX = 0.7
# Ratio of a quantity that is first order in a small parameter ε, at 2ε over ε, against 2: the
# second-order term (about 0.2% for FoPE's broken relative property at σ = 0.01) and float32
# rounding of the O(1) logits the spreads are taken from.
FIRST_ORDER_RATIO = dict(rtol=1e-2)
# Column sums of a Sinkhorn attention plan after its default 100 iterations against the uniform key
# marginal (rows are exact by construction): what is left of the iteration's convergence, not
# rounding.
SINKHORN_MARGINAL_ABS = 1e-3
# Delta Attention's corrected output over the sliding window's, both against dense attention, when
# queries vary slowly within a group (relative RMS; measured 0.37 and 0.39 on two draws): the
# transferred anchor differences remove most of the sparse error, not all.
DELTA_CORRECTION_ERROR_RATIO_MAX = 0.5
# Re-ttention's output from statistics cached one step earlier over the sparse output's, both against
# full attention at the new step, inputs drifted by ε = 0.01-0.02 (relative RMS; measured 0.0085):
# the error left is first order in the drift.
RETTENTION_DRIFT_ERROR_RATIO_MAX = 0.05
# QAdA's predicted bulk attention mass (a Gaussian model of ~1000 bulk keys' scores, fitted to their
# mean and covariance) against the true mass, in [0, 1]: the sampling error of a log-normal sum
# (measured at most 0.032 across the range).
GAUSSIAN_BULK_MASS = dict(atol=0.05)
# How far from the 0.5 threshold the oracle masses of heads built to be local or long-range lie, so
# that the detector's labels are tested on unambiguous heads.
HEAD_MASS_MARGIN = 0.3

# Quantized attention (SageAttention, SageAttention3) against full precision; bounds from the papers'
# claims or measured margins, see each test.
# Cosine similarity of int8 SageAttention's output on N(0, 1) inputs (the claim; measured
# 0.99993 at T = 128, H = 64).
SAGE_INT8_COSINE_MIN = 0.999
# Relative L1 error without key smoothing over that with it, when 4 of 64 key channels carry a
# common offset of 20 (measured 4.3): smoothing recovers what the offset costs int8.
SMOOTHING_ERROR_REDUCTION_MIN = 2.0
# Relative RMS error of SageAttention3's FP4 output over int8 SageAttention's on N(0, 1) inputs
# (measured 16): 4-bit values with 1x16 blocks against 8-bit ones.
FP4_OVER_INT8_ERROR_RATIO_MIN = 5.0
# Misplaced weight mass of one-level over two-level FP4 quantization of peaked softmax rows
# (measured 1.95).
TWO_LEVEL_GAIN_MIN = 1.5
# Quadrature-weighted attention on a latitude-longitude grid against the unweighted sum, both measured
# against the integral on a near-uniform point set (measured 52x smaller at 12 x 24): the weights must
# cut the error at least this much.
QUADRATURE_ERROR_REDUCTION_MIN = 10.0
# Context parallelism: the most loaded device's unmasked causal tiles over the least loaded's (the
# issue's "within 10%"; the zigzag layout gives exactly equal counts).
LOAD_BALANCE_MAX_RATIO = 1.1
# Cosine similarity of SageBwd's (8-bit) gradients with exact attention's on N(0, 1) inputs
# (measured 0.9992-0.9996 for dq, dk, dv at T = 64, H = 32, causal).
SAGEBWD_GRAD_COSINE_MIN = 0.99

# Memory growth of compiled forward+backward passes (XLA's sizes, bounded by the expected growth).
# Largest intermediate at 2T over that at T: 2 for linear growth, plus tiling slack; a `[T, T]`
# intermediate makes it 4.
MEMORY_DOUBLING_RATIO_MAX = 2.5
# Temporary bytes at 8T over 8x those at T: linear growth plus allocation slack (quadratic gives 8).
MEMORY_LINEAR_SLACK = 1.25

# Statistics of random draws (bounds set by the number of draws, see each test).
# |mean| / standard error of a zero-mean quantity: exceeded with probability below 1e-5 per entry.
Z_SCORE_MAX = 4.5
# Sample covariance of 3000 draws against the identity (each entry's standard error is ~0.026).
SAMPLE_COVARIANCE = dict(atol=0.15)
# Empirical frequencies of 20000 draws against their probabilities (standard error below 0.0036).
SAMPLED_FREQUENCY = dict(atol=0.015)
# Absolute slack of a sample-mean bound: float32 rounding of O(1) draws, for entries whose draws
# barely vary (their standard error is ~0).
SAMPLE_MEAN_SLACK = 1e-6
# Standard errors a sample statistic may stray from its expectation (seeds fixed; a 5-sigma miss has
# probability < 1e-6 per entry).
SIGMAS = 5

# Lower bounds: a change that should reach an output moves it by more than this (far above float32
# rounding, far below what a real dependence does), so a test of "unchanged elsewhere" also checks
# that the change was felt.
CHANGED_REL_RMS = 1e-3           # an input the operator reads (relative RMS of the output change)
PARAM_CHANGED_REL_RMS = 1e-4     # one learned array of a mechanism moved
CHANGED_MAX_ABS = 1e-3           # activations or logits after a change of what they see (tokens,
                                 # positions, a random key, an update rule, a mixing filter)
CHANGED_POOLED_MAX_ABS = 1e-4    # a pooled summary after a change of a single token
CHANGED_MAX_REL = 1e-3           # approximate attention weights against exact ones (max |ratio - 1|)
DISTINCT_MIN_ABS = 1e-3          # per-head estimates from inputs of different spread (smallest gap)
STRONG_CHANGE_REL_RMS = 1e-2     # an O(1) change of keys or values (a new draw, k·(-2), v + 3)
STATE_CHANGED_MAX_ABS = 1e-2     # a memory state after an O(1) write that the other rule skips
OTHER_FORMULA_REL_RMS = 0.1      # another formula on the same inputs (softmax for α/‖α‖ pooling)
# Per-element |change| that tells the entries a change reached from those it did not: rounding of
# O(1) outputs stays below it, a real change goes far above.
REACHED_ABS = 1e-6


def key(dtype):
  return jnp.dtype(dtype).type


def output(dtype):
  return OUTPUT[key(dtype)]


def grad(dtype):
  return GRAD[key(dtype)]


def rel_rms(a, b):
  """||a - b|| / ||b|| in float32 (0 when both are zero). On the host: an eager JAX reduction would
  compile a program per shape."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  den = np.sqrt(np.mean(b * b))
  return float(np.sqrt(np.mean((a - b) ** 2)) / (1.0 if den == 0 else den))
# A float32 central difference with step 1e-3 against an exact tangent (jax.jvp): truncation
# O(eps²) plus rounding O(ulp / eps) ≈ 1e-4 on O(1) values.
CENTRAL_DIFFERENCE_FP32 = dict(atol=2e-3, rtol=2e-3)
# GPU kernels (compiled, tests/kernels/gpu_test.py) against the float32 reference at production-like
# sizes: Triton may run float32 dots in TF32 (10-bit mantissa), and bf16 tiles round p and dS.
GPU_KERNEL_REL_RMS = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2}
GPU_KERNEL_GRAD_REL_RMS = {jnp.float32: 5e-3, jnp.bfloat16: 4e-2}

# Compiled FLOPs at 4x the pixels over those at 1x, for a module linear in H·W (DaViT's channel
# group attention): 4 up to the fixed per-image softmax over C_g x C_g scores (measured 3.99 at
# 6x8 -> 12x16, C=16); quadratic cost would give 16.
FLOPS_LINEAR_SCALING = dict(rtol=0.10)

# A packaged pretrained encoder against sentence-transformers' embeddings of the same texts: the
# issue's bound on the cosine distance (float32 on both sides; measured 1.2e-7), and its attention
# maps against the reference model's (float32 softmax of the same logits; measured 1.3e-6).
EMBEDDING_COSINE_DISTANCE = 1e-4
PRETRAINED_ATTENTION = dict(atol=1e-5)
