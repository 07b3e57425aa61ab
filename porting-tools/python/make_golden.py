#!/usr/bin/env python3
"""Generate golden reference outputs for lmspec from mlx-lm.

A golden case is either a tiny, randomly initialised float32 model built with
mlx-lm (optionally quantized), saved the way mlx-lm saves a converted model,
or an existing model directory that mlx-lm can load (``--model-dir``),
together with reference outputs computed by mlx-lm itself:

    goldens/NAME/
        model/config.json          mlx-lm style config ("model_type", ...,
                                   "quantization" block when quantized)
        model/model.safetensors    parameters under mlx-lm's names
                                   (tree_flatten(model.parameters())), or in
                                   a Hugging Face layout for cases with
                                   "hf_layout" (gpt2, qwen3_moe_hf; see
                                   HF_LAYOUTS)
                                   (model/ only for generated cases)
        golden.safetensors         tokens                int32 [P]
                                   logits                float32 [P, V]
                                   prefill_decode_logits float32 [P, V]
                                   greedy                int32 [G]
                                   tap.NAME              float32 [1, ...]
        meta.json                  provenance, generation settings, tap list
                                   (MoE cases: "routing", see make_case)

where P = PROMPT_LEN (or the length of --prompt-tokens), V = vocab_size and
G = GREEDY_TOKENS.

* ``logits``: one forward pass over the whole prompt, without a cache.
* ``tap.NAME``: intermediate values of that same forward, captured from
  mlx-lm's modules and named like the engine's taps (``layers.0.attn.q``,
  ...); see the TAPS table below and README.md. ``tap.logits`` repeats
  ``logits`` with its batch axis.
* ``prefill_decode_logits``: the same positions computed with a fresh KV
  cache (``make_prompt_cache``: the model's own make_cache where it has one,
  e.g. ArraysCache conv / recurrent states for lfm2, mamba2, qwen3_next):
  the first PREFILL_SPLIT tokens in one forward, then the remaining tokens
  one at a time.
* ``greedy``: GREEDY_TOKENS tokens produced by ``mlx_lm.generate.generate_step``
  with an argmax sampler (it prefills all but the last prompt token, then
  feeds the last prompt token and each generated token one at a time).

Usage (from the repository root):

    .venv/bin/python porting-tools/python/make_golden.py --all
    .venv/bin/python porting-tools/python/make_golden.py --case llama
    .venv/bin/python porting-tools/python/make_golden.py --case NAME \\
        --model-type TYPE --config-json '{...}' \\
        [--quantize BITS --group-size G [--quant-overrides '{...}']] \\
        [--hf-layout gpt2|qwen3_moe] [--drop-params lm_head.weight] \\
        [--seed 0] [--prompt-tokens 1,2,3] --out goldens/NAME
    .venv/bin/python porting-tools/python/make_golden.py --case NAME \\
        --model-dir DIR [--prompt-tokens 1,2,3] [--out DIR2]

``--case NAME`` alone regenerates the case from the CASES table below (an
entry may also set "seed", "hf_layout" and "drop_params").
``--compare-to DIR`` checks, after writing, that every non-tap entry of each
case equals the one in DIR/CASE (a copy of goldens/ taken before).
``--case NAME --search-seeds N`` writes nothing: it reports the first seed
in 0..N-1 without a greedy or routing near-tie (see MIN_GREEDY_MARGIN).
"""

import argparse
import copy
import json
import math
import shlex
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_config, load_model, quantize_model, save_config



def _gather_qmm_without_global_scale():
    """mlx-lm 0.32.2's QuantizedSwitchLinear (quantized MoE experts) always
    passes global_scale= (None except for nvfp4 with a per-expert scale) to
    mx.gather_qmm, which mlx 0.32.2 does not accept: quantized MoE models do
    not run with this pair of versions. Where mlx lacks the argument, accept
    and drop it when None (what it means); anything else is an error."""
    if "global_scale" in (mx.gather_qmm.__doc__ or ""):
        return
    gather_qmm = mx.gather_qmm

    def compat(*args, global_scale=None, **kwargs):
        if global_scale is not None:
            raise NotImplementedError("this mlx has no gather_qmm(global_scale=...)")
        return gather_qmm(*args, **kwargs)

    mx.gather_qmm = compat


_gather_qmm_without_global_scale()

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "porting-tools/python/make_golden.py"
PYTHON = ".venv/bin/python"

PROMPT_LEN = 12
PREFILL_SPLIT = 8
GREEDY_TOKENS = 32

# Seeds of generated cases are chosen (--search-seeds) so that no greedy step
# is a near-tie: smallest top-1 minus top-2 logit over the greedy steps at
# least MIN_GREEDY_MARGIN; and for MoE models no expert choice is one: the
# k-th best routing score (softmax / sigmoid probability, mixtral's logit)
# at least MIN_ROUTING_MARGIN above the next, over the prompt and the greedy
# tokens, and the same for the group choice of group-limited routing.
MIN_GREEDY_MARGIN = 0.005
MIN_ROUTING_MARGIN = 0.001

# Size budget of a generated case directory (model/ included): over it the
# per-head ("detail") taps are left out, then the wide MLP ones.
MAX_CASE_BYTES = 600_000
# Taps of the MLP's intermediate width, left out after the per-head ones.
WIDE_TAP_SUFFIXES = (".mlp.gate", ".mlp.up", ".mlp.gate_up")

# Scales of the random initialisation: large enough that the logits are far
# from uniform and the norm weights have a visible effect.
WEIGHT_STD = 0.15
BIAS_STD = 0.1
NORM_STD = 0.1
# Depthwise causal convolutions (lfm2's short conv, mamba2's and qwen3_next's
# conv1d; nn.Conv1d weights [C, K, 1]): with WEIGHT_STD each output is a sum
# of only K = 3..4 small terms, which shrinks the signal ~3x per conv and
# leaves mamba2's SSM term negligible next to its D skip; 0.5 ~ 1/sqrt(K).
CONV_STD = 0.5
# dt range of the dt_bias init (see SPECIAL_INITS): wider than mamba2's own
# [0.001, 0.1], whose dt, with these small random B and C, leaves mamba2's
# SSM term ~5x smaller than its D skip (about 0.6x with this range).
DT_MIN = 0.01
DT_MAX = 0.5

BASE_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

# BASE_CONFIG keys a model type does not read (mlx-lm ignores them, but an
# engine reading config.json could be misled): left out of its config.
TYPE_UNUSED_BASE_KEYS = {
    # gpt2 names everything differently (n_embd, n_head, ...).
    "gpt2": list(BASE_CONFIG),
    # rotary_emb_base / layer_norm_eps; MHA only; the MLP is 4 * hidden.
    "gpt_neox": ["num_key_value_heads", "rms_norm_eps", "rope_theta"],
    "phi": ["rms_norm_eps"],
    "starcoder2": ["rms_norm_eps"],
    "cohere": ["rms_norm_eps"],
    "stablelm": ["rms_norm_eps"],
    # norm_eps instead; always tied (tie_word_embeddings is not read).
    "lfm2": ["rms_norm_eps"],
    # No attention, no rope; layer_norm_epsilon instead.
    "mamba2": ["num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
               "max_position_embeddings"],
}

# Extra keys a model type requires beyond BASE_CONFIG.
TYPE_DEFAULTS = {
    "llama": {"rope_traditional": False},
    "mistral": {"rope_traditional": False},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    # mlx-lm's gemma models always tie the head to the embedding.
    "gemma": {"head_dim": 16, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 16, "tie_word_embeddings": True},
    # gemma3_text ties only when the checkpoint has no lm_head.weight (the
    # config key is ignored); the case drops it (drop_params).
    "gemma3_text": {"head_dim": 16, "tie_word_embeddings": True},
    "phi": {"layer_norm_eps": 1e-5},
    "phi3": {},
    "starcoder2": {"norm_epsilon": 1e-5, "use_bias": True, "tie_word_embeddings": True},
    "gpt2": {
        # Positions 0..43 are used (12 prompt + 32 greedy tokens).
        "n_ctx": 48,
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 48,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 256,
        "tie_word_embeddings": True,
    },
    "gpt_neox": {
        # mlx-lm's MLP is 4 * hidden_size whatever intermediate_size says.
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "layer_norm_eps": 1e-5,
        "rotary_emb_base": 10000,
        "use_parallel_residual": True,
    },
    "olmo2": {},
    "cohere": {"layer_norm_eps": 1e-5, "use_qk_norm": False, "layer_norm_bias": False,
               "tie_word_embeddings": True},
    "granite": {"attention_bias": False, "mlp_bias": False},
    "stablelm": {"layer_norm_eps": 1e-5, "use_qkv_bias": True,
                 "use_parallel_residual": False, "qk_layernorm": False},
    "internlm2": {"bias": False},
    "smollm3": {"tie_word_embeddings": True},
    "minicpm": {},
    # MoE and hybrid families: the keys their ModelArgs require, small enough
    # that a case directory (weights included) stays near MAX_CASE_BYTES.
    "mixtral": {"rope_traditional": False, "num_local_experts": 4, "num_experts_per_tok": 2,
                "intermediate_size": 32},
    # mlx-lm's qwen2_moe reads neither decoder_sparse_step (every layer is
    # sparse) nor norm_topk_prob (the top-k softmax weights are never
    # renormalized); the values written say what it does (as Qwen1.5-MoE's
    # config does). intermediate_size is required but unused.
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 40, "decoder_sparse_step": 1,
                  "norm_topk_prob": False},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": True},
    # MLA: q 16 (no rope) + 8 (rope) per head, latent kv 32, v 16 per head;
    # num_key_value_heads is read but unused (as in DeepSeek's configs, = heads).
    # mlx-lm's v2 attention needs a rope_scaling with a factor (1.0: plain rope).
    "deepseek_v2": {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": None,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
                    "attention_bias": False, "rope_scaling": {"type": "yarn", "factor": 1.0}},
    "deepseek_v3": {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
                    "attention_bias": False},
    "lfm2": {"norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": 64,
             "block_ff_dim": 64, "intermediate_size": 64, "block_multiple_of": 16,
             "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False,
             "rope_theta": 1000000.0, "tie_word_embeddings": True,
             "layer_types": ["conv", "full_attention"]},
    # intermediate_size is required but unused (the mixer is num_heads *
    # head_dim wide); time_step_rank is read but unused.
    "mamba2": {"num_heads": 8, "head_dim": 16, "intermediate_size": 128, "state_size": 16,
               "layer_norm_epsilon": 1e-5, "conv_kernel": 4, "n_groups": 1, "use_bias": False,
               "use_conv_bias": True, "time_step_limit": [0.0, 100.0], "time_step_rank": 4,
               "tie_word_embeddings": True},
    "qwen3_next": {"head_dim": 16, "partial_rotary_factor": 0.25, "full_attention_interval": 2,
                   "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                   "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
                   "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 32, "norm_topk_prob": True},
}

CASES = [
    {"name": "llama", "model_type": "llama", "config": {}},
    {
        "name": "llama_rope_llama3",
        "model_type": "llama",
        "config": {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": True,
        },
    },
    {"name": "mistral", "model_type": "mistral", "config": {"rope_theta": 1000000.0}},
    {"name": "qwen2", "model_type": "qwen2", "config": {"tie_word_embeddings": True}},
    {
        "name": "qwen3",
        "model_type": "qwen3",
        "config": {"head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2},
    },
    {
        "name": "llama_q4",
        "model_type": "llama",
        "config": {},
        "quantize": {
            "bits": 4,
            "group_size": 32,
            "overrides": {
                "lm_head": {"group_size": 32, "bits": 8},
                "model.layers.1.mlp.down_proj": False,
            },
        },
    },
    {
        "name": "llama_yarn",
        "model_type": "llama",
        "config": {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
            }
        },
    },
    {
        "name": "llama_linear_rope",
        "model_type": "llama",
        "config": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    },
    # head_dim 32: a quantized KV cache (group size 32) needs head_dim
    # divisible by the group size; used by make_generation_goldens.py.
    {
        "name": "llama_hd32",
        "model_type": "llama",
        "config": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32},
    },
    # One case per further mlx-lm model_type (case name = model_type). Seeds
    # are picked so that the greedy continuation has no near-tie (smallest
    # top-2 logit gap of the greedy steps >= 0.005) and is not one repeated
    # token.
    # head_dim 32 with 4 heads: the attention is 128 wide, not hidden_size.
    {
        "name": "gemma",
        "model_type": "gemma",
        "config": {"head_dim": 32, "intermediate_size": 96},
    },
    # Both softcaps bite: attention scores reach ~+-5 before the cap, and the
    # final cap 6 takes the top logits (~9 before it) to ~5.4 (a cap of 3
    # would squash every top logit to ~2.98).
    {
        "name": "gemma2",
        "model_type": "gemma2",
        "config": {
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 6.0,
            "query_pre_attn_scalar": 24,
        },
        "seed": 17,
    },
    # Layers 0, 1, 3 sliding (window 6, local rope base), layer 2 global
    # (rope_theta with linear scaling); tied head (no lm_head.weight).
    {
        "name": "gemma3_text",
        "model_type": "gemma3_text",
        "config": {
            "num_hidden_layers": 4,
            "intermediate_size": 32,
            "rms_norm_eps": 1e-6,
            "sliding_window": 6,
            "sliding_window_pattern": 3,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "query_pre_attn_scalar": 32,
        },
        "drop_params": ["lm_head.weight"],
        "seed": 5,
    },
    {"name": "phi", "model_type": "phi", "config": {"partial_rotary_factor": 0.5}, "seed": 1},
    # longrope: mlx-lm always uses long_factor (short_factor is unused) and
    # scales the rotated dims by sqrt(1 + ln(512 / 16) / ln(16)) = 1.5.
    {
        "name": "phi3",
        "model_type": "phi3",
        "config": {
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 16,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0, 1.2, 1.5, 2.0],
                "long_factor": [1.0, 3.0, 9.0, 27.0],
            },
        },
        "seed": 1,
    },
    {
        "name": "starcoder2",
        "model_type": "starcoder2",
        "config": {"rope_theta": 100000.0},
        "seed": 1,
    },
    # model.safetensors in Hugging Face's layout (see gpt2_to_hf).
    {"name": "gpt2", "model_type": "gpt2", "config": {}, "hf_layout": "gpt2"},
    {"name": "gpt_neox", "model_type": "gpt_neox", "config": {"rotary_pct": 0.25}, "seed": 4},
    {"name": "olmo2", "model_type": "olmo2", "config": {}, "seed": 4},
    {"name": "cohere", "model_type": "cohere", "config": {"logit_scale": 0.5}, "seed": 2},
    # LayerNorms with a bias (layer_norm_bias).
    {"name": "cohere_ln_bias", "model_type": "cohere",
     "config": {"logit_scale": 0.5, "layer_norm_bias": True}, "seed": 0},
    # One LayerNorm feeding attention and MLP in parallel.
    {"name": "stablelm_parallel", "model_type": "stablelm",
     "config": {"partial_rotary_factor": 0.25, "use_parallel_residual": True}, "seed": 3},
    # A sliding-window layer (window shorter than the prompt) before a full one.
    {"name": "llama_sliding", "model_type": "llama",
     "config": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3}},
    # rope_theta only under rope_parameters (transformers >= 5 layout).
    {"name": "qwen3_rope_parameters", "model_type": "qwen3",
     "config": {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}},
    # Untied: with the embedding multiplier the tied head predicts the
    # current token again (a single repeated greedy token).
    {
        "name": "granite",
        "model_type": "granite",
        "config": {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.15,
            "logits_scaling": 2.0,
        },
        "seed": 2,
    },
    {
        "name": "stablelm",
        "model_type": "stablelm",
        "config": {"partial_rotary_factor": 0.25},
        "seed": 3,
    },
    {"name": "internlm2", "model_type": "internlm2", "config": {}},
    # NoPE in layers 1 and 3 (the list wins over no_rope_layer_interval,
    # whose default 4 would give [1, 1, 1, 0]).
    {
        "name": "smollm3",
        "model_type": "smollm3",
        "config": {"num_hidden_layers": 4, "intermediate_size": 32, "no_rope_layers": [1, 0, 1, 0]},
        "seed": 4,
    },
    # Untied: mlx-lm divides by hidden_size / dim_model_base only before an
    # untied lm_head.
    {
        "name": "minicpm",
        "model_type": "minicpm",
        "config": {"scale_emb": 12.0, "scale_depth": 0.7, "dim_model_base": 32},
        "seed": 4,
    },
    # MoE families. The MoE block is "layers.{i}.mlp" whatever mlx-lm calls
    # it; see the MoE rows of TAPS and check_block_math.
    # Top-2 of 4 experts; the softmax is over the two chosen logits.
    {"name": "mixtral", "model_type": "mixtral", "config": {"rope_theta": 1000000.0}, "seed": 1},
    # Softmax over all 4 experts, top-2 not renormalized; plus the shared
    # expert scaled by sigmoid(shared_expert_gate); q/k/v biases.
    {"name": "qwen2_moe", "model_type": "qwen2_moe", "config": {}, "seed": 1},
    # Every layer sparse (decoder_sparse_step 1, no mlp_only_layers);
    # softmax over all 4, top-2 renormalized (norm_topk_prob).
    {"name": "qwen3_moe", "model_type": "qwen3_moe", "config": {}, "seed": 15},
    # The same model (same seed, same parameters) saved in Hugging Face's
    # per-expert layout (see qwen3_moe_to_hf); mlx-lm stacks it back.
    {"name": "qwen3_moe_hf", "model_type": "qwen3_moe", "config": {}, "seed": 15,
     "hf_layout": "qwen3_moe"},
    # 4-bit, group 32, as mlx_lm.convert quantizes it: the model's own
    # quant_predicate applies (see quantize), so the routers mlp.gate are
    # 8-bit with group 64 and everything else with to_quantized is 4-bit /
    # 32: embed_tokens, lm_head, q/k/v/o, and the stacked experts
    # (SwitchLinear -> QuantizedSwitchLinear, run with gather_qmm). The
    # RMSNorms (q_norm / k_norm included) stay float32.
    {"name": "qwen3_moe_q4", "model_type": "qwen3_moe", "config": {}, "seed": 15,
     "quantize": {"bits": 4, "group_size": 32}},
    # MLA + DeepSeekMoE, 3 layers: layer 0 dense (first_k_dense_replace 1),
    # layers 1 and 2 MoE: 6 routed experts in 2 groups of 3 (8 would not fit
    # the size budget with v2's full q_proj), top-2 from the best group
    # (topk_group 1), scaled by routed_scaling_factor, plus one shared
    # expert. yarn: factor 4 over an original 64 positions (of the 4 rotated
    # pairs, 1 keeps its frequency, 1 is blended, 2 are divided by 4);
    # mscale 1 / mscale_all_dim 0.707 puts a factor 1.037 on q_pe / k_pe and
    # 1.2056 on the softmax scale (DeepSeek-V2's own 0.707 / 0.707 would
    # leave q_pe / k_pe unscaled; this exercises both). v2: q_proj (no
    # q_lora_rank), softmax scores, group_limited_greedy (group score = its
    # best expert's).
    {
        "name": "deepseek_v2",
        "model_type": "deepseek_v2",
        "config": {
            "num_hidden_layers": 3,
            "intermediate_size": 32,
            "moe_intermediate_size": 8,
            "n_routed_experts": 6,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "routed_scaling_factor": 2.5,
            "topk_method": "group_limited_greedy",
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "max_position_embeddings": 256,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 0.707,
            },
        },
        "seed": 0,
    },
    # As deepseek_v2 but 8 experts (2 groups of 4) and: q through the
    # q_lora_rank 32 bottleneck (q_a_proj,
    # q_a_layernorm, q_b_proj); sigmoid scores; the expert choice adds
    # e_score_correction_bias (the weights do not), group score = sum of the
    # group's 2 best biased scores (noaux_tc); the 2 weights are
    # renormalized (norm_topk_prob) before routed_scaling_factor. mscale =
    # mscale_all_dim = 1.0 as DeepSeek-V3's config: q_pe / k_pe unscaled,
    # softmax scale x 1.1386^2. mlx-lm keeps kv_b_proj split per head as
    # embed_q / unembed_out (its sanitize converts HF's kv_b_proj).
    {
        "name": "deepseek_v3",
        "model_type": "deepseek_v3",
        "config": {
            "num_hidden_layers": 3,
            "intermediate_size": 32,
            "moe_intermediate_size": 8,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "routed_scaling_factor": 2.5,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "max_position_embeddings": 256,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        },
        "seed": 1,
    },
    # Hybrids and state-space models: their caches are ArraysCache (conv
    # state, recurrent state), which prefill_decode_logits exercises too.
    # lfm2: short-conv layers 0, 1, 3 and attention at 2 (both keys written,
    # as LFM2's configs do; full_attn_idxs wins). Feed-forward auto-adjusted:
    # int(2 * 44 / 3) = 29, x 1.0, rounded up to a multiple of 8 = 32.
    {
        "name": "lfm2",
        "model_type": "lfm2",
        "config": {
            "num_hidden_layers": 4,
            "layer_types": ["conv", "conv", "full_attention", "conv"],
            "full_attn_idxs": [2],
            "block_ff_dim": 44,
            "intermediate_size": 44,
            "block_auto_adjust_ff_dim": True,
            "block_multiple_of": 8,
        },
        "seed": 0,
    },
    # Mamba-2 (SSD): 8 heads of 16 (mixer 128 wide), state 16, 2 groups (B
    # and C shared by 4 heads each), conv kernel 4. time_step_limit clips dt
    # (range ~0.001..1.5 with DT_MIN / DT_MAX) at both ends, for ~3% of the
    # values each (Mamba-2's configs say [0, inf], which JSON cannot hold).
    {
        "name": "mamba2",
        "model_type": "mamba2",
        "config": {"n_groups": 2, "time_step_limit": [0.005, 1.0]},
        "seed": 1,
    },
    # Gated DeltaNet (layers 0, 1) + gated attention (layer 2:
    # full_attention_interval 3) + MoE with a shared expert (layers 0 and 2;
    # layer 1 is a dense MLP through mlp_only_layers). 2 key heads of 16 and
    # 4 value heads of 16 (each key head serves 2 value heads); attention
    # rope on 4 of 16 dims (partial_rotary_factor 0.25). Tied head (untied in
    # Qwen3-Next itself), to fit the size budget.
    {
        "name": "qwen3_next",
        "model_type": "qwen3_next",
        "config": {
            "num_hidden_layers": 3,
            "full_attention_interval": 3,
            "mlp_only_layers": [1],
            "intermediate_size": 32,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
        "seed": 4,
    },
]


def _derived(base_name, name, config=None, **fields):
    """A case that differs from CASES entry `base_name` in a few keys."""
    base = next(c for c in CASES if c["name"] == base_name)
    case = {**copy.deepcopy(base), "name": name, **fields}
    case["config"] = {**base["config"], **(config or {})}
    return case


# Configs the differential fuzzer (fuzz_configs.py) found misread, pinned.
CASES += [
    # Four experts from one kept group of three: the fourth comes from the
    # dropped group and weighs nothing (mlx-lm zeroed its score).
    _derived("deepseek_v2", "deepseek_v2_group_overflow", {"num_experts_per_tok": 4}),
    # longrope rotates halves, never interleaved, whatever rope_traditional says.
    _derived("phi3", "phi3_longrope_traditional", {"rope_traditional": True}),
    # A checkpoint with its own lm_head keeps it (mlx-lm ties only a missing one).
    _derived("gemma3_text", "gemma3_text_untied", drop_params=None),
    # Quantized position table (mlx-lm quantizes every embedding), in
    # mlx-lm's own layout.
    _derived("gpt2", "gpt2_q4", hf_layout=None, quantize={"bits": 4, "group_size": 32}, seed=1),
    # Quantized per-head projections (QuantizedMultiLinear embed_q / unembed_out).
    _derived("deepseek_v3", "deepseek_v3_q4", quantize={"bits": 4, "group_size": 32}, seed=9),
    # Per-head LayerNorm q/k norms: cohere's LayerNorm2D ([heads, head_dim]
    # weights), stablelm's LayerNormPerHead (one LayerNorm per head).
    _derived("cohere", "cohere_qk_norm", {"use_qk_norm": True}, seed=3),
    _derived("stablelm", "stablelm_qk_layernorm", {"qk_layernorm": True}),
]


def build_config(model_type, overrides):
    """Merge the base config, the type's defaults and the case overrides."""
    config = {"model_type": model_type}
    unused = TYPE_UNUSED_BASE_KEYS.get(model_type, [])
    config.update(copy.deepcopy({k: v for k, v in BASE_CONFIG.items() if k not in unused}))
    config.update(copy.deepcopy(TYPE_DEFAULTS.get(model_type, {})))
    config.update(copy.deepcopy(overrides))
    return config


def _uniform_from_normal(noise, low, high):
    """A uniform draw on [low, high] made from a N(0, 1) draw (through the
    normal CDF), so that every parameter still takes exactly one normal draw
    from the seeded stream."""
    u = 0.5 * (1.0 + mx.erf(noise / math.sqrt(2.0)))
    return low + (high - low) * u


def _inverse_softplus(y):
    return y + mx.log(-mx.expm1(-y))


# Parameters (by their last name component) for which N(0, WEIGHT_STD) would
# be meaningless, each a function of its N(0, 1) draw. No model of the older
# cases has such a parameter, so their draws are unchanged.
SPECIAL_INITS = {
    # mamba2 / qwen3_next: the per-head decay rate is A = -exp(A_log); A
    # uniform in [1, 16] as mamba2's (and HF qwen3_next's) own init. (With
    # A_log ~ N(0, 0.15) every head would decay at the same rate ~1.)
    "A_log": lambda noise: mx.log(_uniform_from_normal(noise, 1.0, 16.0)),
    # mamba2 / qwen3_next: dt = softplus(x + dt_bias) is the step size of the
    # decay exp(-A * dt). As mamba2's init, dt_bias = softplus^-1(dt) with dt
    # log-uniform, here in [DT_MIN, DT_MAX]. The per-token decays then span
    # ~0..0.99 (qwen3_next's g: median ~0.2 and ~0.9 in its two DeltaNet
    # layers): some heads forget at once, some keep the whole prompt. (HF
    # qwen3_next's dt_bias = 1 gives dt ~ 1 and, with A ~ 8, g ~ exp(-8):
    # every token forgotten at once.)
    "dt_bias": lambda noise: _inverse_softplus(
        mx.exp(_uniform_from_normal(noise, math.log(DT_MIN), math.log(DT_MAX)))
    ),
    # mamba2's skip y += D * x: 1 + NORM_STD * N(0, 1) around mamba2's init 1.
    "D": lambda noise: 1.0 + NORM_STD * noise,
    # deepseek_v3's router bias (added to the sigmoid scores for the expert
    # choice only; the weights use the unbiased scores). Against scores
    # spread over ~0.2..0.8, N(0, WEIGHT_STD) (values ~-0.3..0.2) changes the
    # chosen experts at 15 and 30 of the 43 positions in the case's two MoE
    # layers (meta.json "routing": "differs_without_bias"), not everywhere.
    "e_score_correction_bias": lambda noise: WEIGHT_STD * noise,
}


def randomize_parameters(model, seed):
    """Re-initialise every parameter from a seeded normal distribution.

    Norm weights become 1 + NORM_STD * N(0, 1), biases (norm biases included)
    BIAS_STD * N(0, 1), nn.Conv1d weights CONV_STD * N(0, 1), the parameters
    of SPECIAL_INITS their function of a N(0, 1) draw, and all other weights
    WEIGHT_STD * N(0, 1), all float32. A norm is a module whose name ends in
    "norm" or whose class name contains "Norm" (gpt2's ln_1 / ln_2 / ln_f are
    nn.LayerNorm). Every parameter takes one draw, in tree_flatten order.
    """
    modules = dict(model.named_modules())

    def is_norm(module_name):
        module = modules.get(module_name)
        return module_name.split(".")[-1].endswith("norm") or (
            module is not None and "Norm" in type(module).__name__
        )

    mx.random.seed(seed)
    new_params = []
    for name, value in tree_flatten(model.parameters()):
        module_name, _, leaf = name.rpartition(".")
        noise = mx.random.normal(value.shape, dtype=mx.float32)
        if leaf in SPECIAL_INITS:
            new_value = SPECIAL_INITS[leaf](noise)
        elif is_norm(module_name) and leaf != "bias":
            new_value = 1.0 + NORM_STD * noise
        elif leaf == "bias":
            new_value = BIAS_STD * noise
        elif leaf == "weight" and isinstance(modules.get(module_name), nn.Conv1d):
            new_value = CONV_STD * noise
        else:
            new_value = WEIGHT_STD * noise
        new_params.append((name, new_value))
    model.update(tree_unflatten(new_params))
    mx.eval(model.parameters())


def quantize(model, config, bits, group_size, overrides):
    """Quantize like mlx-lm's convert, with optional per-layer overrides.

    ``overrides`` maps a module path to either a dict of quantization
    parameters or False (keep the layer in float). mlx-lm's quantize_model
    only quantizes modules with ``to_quantized`` whose last weight dimension
    is divisible by the group size, and records dict results per layer; the
    False entries are recorded here so the loader sees them explicitly.
    Layers without an override follow the model's ``quant_predicate`` when
    it has one, as in mlx_lm.convert.
    """

    # As mlx_lm.convert (without a recipe): the model's own quant_predicate,
    # if it has one, decides the layers without an override (qwen3_moe: its
    # routers "*.mlp.gate" 8-bit with group 64). llama has none.
    model_predicate = getattr(model, "quant_predicate", None)

    def predicate(path, module):
        if path in overrides:
            return copy.deepcopy(overrides[path])
        if model_predicate is not None:
            return model_predicate(path, module)
        return True

    model, config = quantize_model(
        model, config, group_size=group_size, bits=bits, quant_predicate=predicate
    )
    for path, value in overrides.items():
        if value is False:
            config["quantization"][path] = False
    config["quantization_config"] = config["quantization"]
    mx.eval(model.parameters())
    return model, config


def forward_logits(model, tokens):
    """Logits of a single cache-free forward pass, shape [L, V]."""
    logits = model(mx.array(tokens)[None])[0]
    return np.array(logits.astype(mx.float32))


def prefill_decode_logits(model, tokens, split):
    """Logits from a KV-cached prefill of tokens[:split] then 1-token steps."""
    cache = make_prompt_cache(model)
    outputs = [model(mx.array(tokens[:split])[None], cache=cache)[0]]
    for token in tokens[split:]:
        outputs.append(model(mx.array([[int(token)]]), cache=cache)[0])
    logits = mx.concatenate(outputs, axis=0).astype(mx.float32)
    return np.array(logits)


def greedy_tokens(model, tokens, count):
    """Greedy continuation with mlx-lm's generate_step and an argmax sampler."""

    def argmax_sampler(logprobs):
        return mx.argmax(logprobs, axis=-1)

    generated = []
    for token, _ in generate_step(
        mx.array(tokens), model, max_tokens=count, sampler=argmax_sampler
    ):
        generated.append(int(token))
    return np.array(generated, dtype=np.int32)


# ---------------------------------------------------------------------------
# Taps: intermediate values of the whole-prompt forward, under engine names.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tap:
    """One row of the TAPS table.

    module     mlx-lm module path from the top-level model ("" is the model
               itself, whose output is the logits); "{i}" is a layer index.
    name       the engine's tap name; "{i}" is the same layer index.
    call       which call of the module during the forward (0 = the first),
               for modules called more than once (the rope: queries, keys).
    transform  None, "transpose_heads": [B, T, H, D] -> [B, H, T, D], or
               "first": the first of a module's outputs.
    residual   if set, the tap is not a module output but the module's first
               input plus the output of this child module (the residual
               sum inside a layer).
    detail     a per-head attention tap: omitted first when a case would
               exceed its size budget.
    applies    None (any model), or a predicate (model_type, config) -> bool:
               for rows whose module exists in several families but means
               different things (the residual after attention is not
               x + self_attn(...) in post-norm, scaled-residual or parallel
               blocks).
    """

    module: str
    name: str
    call: int = 0
    transform: Optional[str] = None
    residual: Optional[str] = None
    detail: bool = False
    applies: Optional[Callable[[Optional[str], dict], bool]] = None


# Families whose module names look like llama's but whose layer differs.
# post_attention_layernorm normalizes the attention output (not the MLP input):
POST_NORM_TYPES = frozenset({"gemma2", "gemma3_text", "olmo2"})
# h = x + multiplier * attn:
SCALED_RESIDUAL_TYPES = frozenset({"granite", "minicpm"})
# attention and MLP both read the layer input: there is no h.
PARALLEL_TYPES = frozenset({"phi", "cohere"})
# q_norm / k_norm run on [B, H, T, D] (after the head transpose):
HEAD_MAJOR_QK_NORM_TYPES = frozenset({"gemma3_text"})
# q_norm / k_norm run on the whole projection [B, T, H * D]:
FULL_WIDTH_QK_NORM_TYPES = frozenset({"olmo2"})


def _plain_residual(model_type, config):
    """The layer is x + attn(norm(x)), then h + mlp(norm(h))."""
    return (
        model_type not in POST_NORM_TYPES | SCALED_RESIDUAL_TYPES | PARALLEL_TYPES
        and not config.get("use_parallel_residual", False)
    )


def _post_norm(model_type, config):
    return model_type in POST_NORM_TYPES


def _not_post_norm(model_type, config):
    return model_type not in POST_NORM_TYPES


def _per_head_layernorm(model_type, config):
    """q/k LayerNorms with a weight row per head (cohere's LayerNorm2D,
    stablelm's LayerNormPerHead): the engine's q_head_ln / k_head_ln."""
    return bool((model_type == "cohere" and config.get("use_qk_norm"))
                or (model_type == "stablelm" and config.get("qk_layernorm")))


def _token_major_qk_norm(model_type, config):
    return (model_type not in HEAD_MAJOR_QK_NORM_TYPES | FULL_WIDTH_QK_NORM_TYPES
            and not _per_head_layernorm(model_type, config))


def _untransposed_qk_norm(model_type, config):
    return model_type in HEAD_MAJOR_QK_NORM_TYPES | FULL_WIDTH_QK_NORM_TYPES


# MoE routers that are not a Linear (their output is a tuple): no router tap.
def _rwkv7(model_type, config):
    return model_type == "rwkv7"


NON_LINEAR_ROUTER_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})


def _linear_router(model_type, config):
    return model_type not in NON_LINEAR_ROUTER_TYPES


# One table for every architecture, in forward order. Rows whose module does
# not exist in a model are skipped (q_norm/k_norm outside qwen3), so another
# architecture is added by adding its rows. Consecutive rows with "{i}" and
# the same layer list are expanded for each layer in turn (layer 0's rows,
# then layer 1's, ...). Two rows that exist in one model (and apply to it)
# must not produce the same name.
TAPS = [
    # llama / mistral / qwen2 / qwen3 (mlx_lm.models.llama, qwen2, qwen3), and
    # the families with the same module layout (gemma, gemma2, gemma3_text,
    # phi3, starcoder2, olmo2, cohere, granite, stablelm, smollm3, minicpm;
    # phi and internlm2 in part).
    Tap("model.embed_tokens", "embed"),
    Tap("model.embeddings", "embed", applies=_rwkv7),
    Tap("model.tok_embeddings", "embed"),  # internlm2
    Tap("model.layers.{i}.input_layernorm", "layers.{i}.attn_norm"),
    Tap("model.layers.{i}.attention_norm", "layers.{i}.attn_norm"),  # internlm2
    Tap("model.layers.{i}.operator_norm", "layers.{i}.attn_norm"),  # lfm2 (conv or attention)
    # qwen3_next's q_proj gives [q | gate] per head: [B, T, H * 2D].
    Tap("model.layers.{i}.self_attn.q_proj", "layers.{i}.attn.q", detail=True),
    # deepseek MLA: q through a low-rank bottleneck when q_lora_rank is set
    # (v3), then the joint latent kv: kv_a = [latent (kv_lora_rank) | k_pe
    # (qk_rope_head_dim, one head shared by all)], the latent normed, then
    # expanded per head by kv_b_proj (v2; v3 holds it as embed_q / unembed_out).
    Tap("model.layers.{i}.self_attn.q_a_proj", "layers.{i}.attn.q_a", detail=True),
    Tap("model.layers.{i}.self_attn.q_a_layernorm", "layers.{i}.attn.q_a_norm", detail=True),
    Tap("model.layers.{i}.self_attn.q_b_proj", "layers.{i}.attn.q_b", detail=True),
    Tap("model.layers.{i}.self_attn.kv_a_proj_with_mqa", "layers.{i}.attn.kv_a", detail=True),
    Tap("model.layers.{i}.self_attn.kv_a_layernorm", "layers.{i}.attn.kv_a_norm", detail=True),
    Tap("model.layers.{i}.self_attn.kv_b_proj", "layers.{i}.attn.kv_b", detail=True),
    Tap("model.layers.{i}.self_attn.k_proj", "layers.{i}.attn.k", detail=True),
    Tap("model.layers.{i}.self_attn.v_proj", "layers.{i}.attn.v", detail=True),
    # Fused projections: phi3 [q | k | v]; internlm2 grouped per KV head.
    Tap("model.layers.{i}.self_attn.qkv_proj", "layers.{i}.attn.qkv", detail=True),
    Tap("model.layers.{i}.attention.wqkv", "layers.{i}.attn.qkv", detail=True),
    Tap("model.layers.{i}.self_attn.q_norm", "layers.{i}.attn.q_norm",
        transform="transpose_heads", detail=True, applies=_token_major_qk_norm),
    Tap("model.layers.{i}.self_attn.k_norm", "layers.{i}.attn.k_norm",
        transform="transpose_heads", detail=True, applies=_token_major_qk_norm),
    Tap("model.layers.{i}.self_attn.q_layernorm", "layers.{i}.attn.q_norm",  # lfm2
        transform="transpose_heads", detail=True,
        applies=lambda t, c: not _per_head_layernorm(t, c)),
    Tap("model.layers.{i}.self_attn.k_layernorm", "layers.{i}.attn.k_norm",
        transform="transpose_heads", detail=True,
        applies=lambda t, c: not _per_head_layernorm(t, c)),
    Tap("model.layers.{i}.self_attn.q_norm", "layers.{i}.attn.q_head_ln",
        transform="transpose_heads", detail=True, applies=_per_head_layernorm),
    Tap("model.layers.{i}.self_attn.k_norm", "layers.{i}.attn.k_head_ln",
        transform="transpose_heads", detail=True, applies=_per_head_layernorm),
    Tap("model.layers.{i}.self_attn.q_layernorm", "layers.{i}.attn.q_head_ln",
        transform="transpose_heads", detail=True, applies=_per_head_layernorm),
    Tap("model.layers.{i}.self_attn.k_layernorm", "layers.{i}.attn.k_head_ln",
        transform="transpose_heads", detail=True, applies=_per_head_layernorm),
    # gemma3_text: [B, H, T, D] already; olmo2: [B, T, H * D] (before the split).
    Tap("model.layers.{i}.self_attn.q_norm", "layers.{i}.attn.q_norm",
        detail=True, applies=_untransposed_qk_norm),
    Tap("model.layers.{i}.self_attn.k_norm", "layers.{i}.attn.k_norm",
        detail=True, applies=_untransposed_qk_norm),
    Tap("model.layers.{i}.self_attn.rope", "layers.{i}.attn.q_rope", call=0, detail=True),
    Tap("model.layers.{i}.self_attn.rope", "layers.{i}.attn.k_rope", call=1, detail=True),
    Tap("model.layers.{i}.attention.rope", "layers.{i}.attn.q_rope", call=0, detail=True),
    Tap("model.layers.{i}.attention.rope", "layers.{i}.attn.k_rope", call=1, detail=True),
    Tap("model.layers.{i}.self_attn.o_proj", "layers.{i}.attn.o"),
    Tap("model.layers.{i}.self_attn.o_proj", "layers.{i}.attn"),
    Tap("model.layers.{i}.self_attn.dense", "layers.{i}.attn.o"),  # phi
    Tap("model.layers.{i}.self_attn.dense", "layers.{i}.attn"),
    Tap("model.layers.{i}.attention.wo", "layers.{i}.attn.o"),  # internlm2
    Tap("model.layers.{i}.attention.wo", "layers.{i}.attn"),
    Tap("model.layers.{i}.self_attn.out_proj", "layers.{i}.attn.o"),  # lfm2
    Tap("model.layers.{i}.self_attn.out_proj", "layers.{i}.attn"),
    # Recurrent mixers stand where the attention does: their output is
    # "layers.{i}.attn". lfm2's short conv: in_proj = [B | C | x] (3 x
    # hidden), "conv" the depthwise causal conv of B * x (before C *).
    Tap("model.layers.{i}.conv.in_proj", "layers.{i}.attn.in_proj", detail=True),
    Tap("model.layers.{i}.conv.conv", "layers.{i}.attn.conv", detail=True),
    Tap("model.layers.{i}.conv.out_proj", "layers.{i}.attn.o"),
    Tap("model.layers.{i}.conv", "layers.{i}.attn"),
    # qwen3_next's gated DeltaNet: in_proj_qkvz / in_proj_ba grouped per key
    # head; "conv" = conv1d over [q | k | v] before its silu; "norm" = the
    # gated RMSNorm rms_norm(y) * w * silu(z), [B, T, Hv, Dv].
    Tap("model.layers.{i}.linear_attn.in_proj_qkvz", "layers.{i}.attn.qkvz", detail=True),
    Tap("model.layers.{i}.linear_attn.in_proj_ba", "layers.{i}.attn.ba", detail=True),
    Tap("model.layers.{i}.linear_attn.conv1d", "layers.{i}.attn.conv", detail=True),
    Tap("model.layers.{i}.linear_attn.norm", "layers.{i}.attn.norm", detail=True),
    Tap("model.layers.{i}.linear_attn.out_proj", "layers.{i}.attn.o"),
    Tap("model.layers.{i}.linear_attn", "layers.{i}.attn"),
    # gemma2 / gemma3_text / olmo2: the attention output's own norm.
    Tap("model.layers.{i}.post_attention_layernorm", "layers.{i}.post_attn_norm",
        applies=_post_norm),
    Tap("model.layers.{i}", "layers.{i}.h", residual="self_attn", applies=_plain_residual),
    Tap("model.layers.{i}", "layers.{i}.h", residual="post_attention_layernorm",
        applies=_post_norm),
    Tap("model.layers.{i}", "layers.{i}.h", residual="attention"),  # internlm2
    Tap("model.layers.{i}", "layers.{i}.h", residual="conv"),  # lfm2
    Tap("model.layers.{i}", "layers.{i}.h", residual="linear_attn"),  # qwen3_next
    Tap("model.layers.{i}.post_attention_layernorm", "layers.{i}.mlp_norm",
        applies=_not_post_norm),
    Tap("model.layers.{i}.pre_feedforward_layernorm", "layers.{i}.mlp_norm"),  # gemma2/3
    Tap("model.layers.{i}.ffn_norm", "layers.{i}.mlp_norm"),  # internlm2
    Tap("model.layers.{i}.mlp.gate_proj", "layers.{i}.mlp.gate"),
    Tap("model.layers.{i}.mlp.up_proj", "layers.{i}.mlp.up"),
    Tap("model.layers.{i}.mlp.gate_up_proj", "layers.{i}.mlp.gate_up"),  # phi3 [gate | up]
    # MoE blocks: the router logits (before any softmax / sigmoid) where the
    # router is a plain (or quantized) Linear; deepseek's MoEGate returns
    # (indices, weights) and has no tap. "mlp.shared": the shared expert's
    # output before its sigmoid gate (qwen2_moe / qwen3_next; deepseek's
    # ungated shared_experts), "mlp.shared_gate" that gate's logit [B, T, 1].
    Tap("model.layers.{i}.mlp.gate", "layers.{i}.mlp.router", applies=_linear_router),
    Tap("model.layers.{i}.block_sparse_moe.gate", "layers.{i}.mlp.router"),  # mixtral
    Tap("model.layers.{i}.mlp.shared_expert", "layers.{i}.mlp.shared"),
    Tap("model.layers.{i}.mlp.shared_expert_gate", "layers.{i}.mlp.shared_gate"),
    Tap("model.layers.{i}.mlp.shared_experts", "layers.{i}.mlp.shared"),  # deepseek
    Tap("model.layers.{i}.feed_forward.w1", "layers.{i}.mlp.gate"),  # internlm2
    Tap("model.layers.{i}.feed_forward.w3", "layers.{i}.mlp.up"),
    # Non-gated MLPs: the first linear is "up", the second "down".
    Tap("model.layers.{i}.mlp.fc1", "layers.{i}.mlp.up"),  # phi
    Tap("model.layers.{i}.mlp.c_fc", "layers.{i}.mlp.up"),  # starcoder2
    Tap("model.layers.{i}.mlp.down_proj", "layers.{i}.mlp.down"),
    Tap("model.layers.{i}.feed_forward.w2", "layers.{i}.mlp.down"),  # internlm2
    Tap("model.layers.{i}.mlp.fc2", "layers.{i}.mlp.down"),  # phi
    Tap("model.layers.{i}.mlp.c_proj", "layers.{i}.mlp.down"),  # starcoder2
    Tap("model.layers.{i}.mlp", "layers.{i}.mlp"),
    Tap("model.layers.{i}.block_sparse_moe", "layers.{i}.mlp"),  # mixtral
    Tap("model.layers.{i}.feed_forward", "layers.{i}.mlp"),  # internlm2, lfm2
    # gemma2 / gemma3_text / olmo2: the MLP output's own norm.
    Tap("model.layers.{i}.post_feedforward_layernorm", "layers.{i}.post_mlp_norm"),
    # rwkv7: its layers and time mixing return (output, layer 0's values).
    Tap("model.layers.{i}.attn_norm", "layers.{i}.attn_norm", applies=_rwkv7),
    Tap("model.layers.{i}.attn.o_proj", "layers.{i}.attn.o", applies=_rwkv7),
    Tap("model.layers.{i}.ffn", "layers.{i}.ffn", applies=_rwkv7),
    Tap("model.layers.{i}", "layers.{i}", transform="first", applies=_rwkv7),
    Tap("model.layers.{i}", "layers.{i}", applies=lambda t, c: not _rwkv7(t, c)),
    Tap("model.norm", "norm"),
    Tap("model.final_layernorm", "norm"),  # phi
    Tap("model.embedding_norm", "norm"),  # lfm2: the final norm, despite its name
    # gpt2 (model.wte, model.h) and gpt_neox (model.embed_in, model.h).
    Tap("model.wte", "embed"),
    Tap("model.wpe", "pos_embed"),
    Tap("model.embed_in", "embed"),
    Tap("model.h.{i}.ln_1", "layers.{i}.attn_norm"),
    Tap("model.h.{i}.input_layernorm", "layers.{i}.attn_norm"),
    Tap("model.h.{i}.attn.c_attn", "layers.{i}.attn.qkv", detail=True),
    Tap("model.h.{i}.attention.query_key_value", "layers.{i}.attn.qkv", detail=True),
    Tap("model.h.{i}.attention.rope", "layers.{i}.attn.q_rope", call=0, detail=True),
    Tap("model.h.{i}.attention.rope", "layers.{i}.attn.k_rope", call=1, detail=True),
    Tap("model.h.{i}.attn.c_proj", "layers.{i}.attn.o"),
    Tap("model.h.{i}.attn", "layers.{i}.attn"),
    Tap("model.h.{i}.attention.dense", "layers.{i}.attn.o"),
    Tap("model.h.{i}.attention", "layers.{i}.attn"),
    Tap("model.h.{i}", "layers.{i}.h", residual="attn"),
    Tap("model.h.{i}", "layers.{i}.h", residual="attention", applies=_plain_residual),
    Tap("model.h.{i}.ln_2", "layers.{i}.mlp_norm"),
    Tap("model.h.{i}.post_attention_layernorm", "layers.{i}.mlp_norm"),
    Tap("model.h.{i}.mlp.c_fc", "layers.{i}.mlp.up"),
    Tap("model.h.{i}.mlp.dense_h_to_4h", "layers.{i}.mlp.up"),
    Tap("model.h.{i}.mlp.c_proj", "layers.{i}.mlp.down"),
    Tap("model.h.{i}.mlp.dense_4h_to_h", "layers.{i}.mlp.down"),
    Tap("model.h.{i}.mlp", "layers.{i}.mlp"),
    Tap("model.h.{i}", "layers.{i}"),
    Tap("model.ln_f", "norm"),
    Tap("model.final_layer_norm", "norm"),
    # mamba2 (model.backbone): each layer is x + mixer(norm(x)), no MLP.
    # in_proj = [z (gate) | x B C (conv input) | dt]; "conv" = conv1d output
    # before its silu; "norm" = the gated norm rms_norm(y * silu(z)) * w.
    Tap("backbone.embeddings", "embed"),
    Tap("backbone.layers.{i}.norm", "layers.{i}.attn_norm"),
    Tap("backbone.layers.{i}.mixer.in_proj", "layers.{i}.attn.in_proj", detail=True),
    Tap("backbone.layers.{i}.mixer.conv1d", "layers.{i}.attn.conv", detail=True),
    Tap("backbone.layers.{i}.mixer.norm", "layers.{i}.attn.norm", detail=True),
    Tap("backbone.layers.{i}.mixer.out_proj", "layers.{i}.attn.o"),
    Tap("backbone.layers.{i}.mixer", "layers.{i}.attn"),
    Tap("backbone.layers.{i}", "layers.{i}"),
    Tap("backbone.norm_f", "norm"),
    Tap("", "logits"),
]

TAP_TRANSFORMS = {
    None: lambda x: x,
    "transpose_heads": lambda x: x.transpose(0, 2, 1, 3),
    "first": lambda x: x[0],
}


def walk(root, path):
    """The object at a dotted path of modules and list indices, or None."""
    obj = root
    for part in path.split(".") if path else []:
        if isinstance(obj, (list, tuple)):
            if not part.isdigit() or int(part) >= len(obj):
                return None
            obj = obj[int(part)]
        elif isinstance(obj, nn.Module) and part in obj:
            obj = obj[part]
        else:
            return None
    return obj


@dataclass
class BoundTap:
    """A TAPS row resolved against one model (and one layer)."""

    name: str
    path: str
    module: nn.Module
    row: Tap
    residual_module: Optional[nn.Module] = None


def bind_taps(model, table=TAPS, model_type=None, config=None):
    """The rows of ``table`` that exist in ``model`` (and apply to its
    model_type / config), expanded, in forward order."""
    config = config or {}
    table = [row for row in table if row.applies is None or row.applies(model_type, config)]

    def layer_list(row):
        return row.module.split("{i}")[0]

    expanded = []
    k = 0
    while k < len(table):
        if "{i}" not in table[k].module:
            expanded.append((table[k], None))
            k += 1
            continue
        run = [table[k]]
        k += 1
        while (k < len(table) and "{i}" in table[k].module
               and layer_list(table[k]) == layer_list(run[0])):
            run.append(table[k])
            k += 1
        layers = walk(model, run[0].module.split("{i}")[0].rstrip("."))
        count = len(layers) if isinstance(layers, (list, tuple)) else 0
        expanded += [(row, i) for i in range(count) for row in run]

    bound, names, paths = [], set(), {}
    for row, i in expanded:
        index = "" if i is None else str(i)
        path = row.module.replace("{i}", index)
        name = row.name.replace("{i}", index)
        module = walk(model, path)
        if not isinstance(module, nn.Module):
            continue
        residual_module = None
        if row.residual is not None:
            residual_module = walk(module, row.residual)
            if not isinstance(residual_module, nn.Module):
                continue
        if name in names:
            raise RuntimeError(f"two TAPS rows give the tap name {name!r}")
        names.add(name)
        for m, p in [(module, path), (residual_module, f"{path}.{row.residual}")]:
            if m is not None and paths.setdefault(id(m), p) != p:
                raise RuntimeError(f"{p} and {paths[id(m)]} are one shared module")
        bound.append(BoundTap(name, path, module, row, residual_module))
    return bound


_CALL_LOGS = {}
_RECORDING_CLASSES = {}


def _recording_class(cls):
    """A subclass of ``cls`` whose __call__ logs (first input, output).

    Arrays are logged through a new handle (``mx.array(a)``, no copy of the
    data): the caller may update the returned array in place afterwards
    (gemma3_text's ``h *= scale``, gpt2's ``h += wpe(positions)``), which
    would otherwise change the logged value too.
    """
    if cls not in _RECORDING_CLASSES:

        def handle(a):
            return mx.array(a) if isinstance(a, mx.array) else a

        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            log = _CALL_LOGS.get(id(self))
            if log is not None:
                log.append((handle(args[0]) if args else None, handle(out)))
            return out

        _RECORDING_CLASSES[cls] = type(
            cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__}
        )
    return _RECORDING_CLASSES[cls]


@contextmanager
def recording_calls(modules):
    """Log every call of each module while in the context.

    Yields {id(module): [(first positional input, output), ...]}. Each module
    temporarily gets a subclass of its own class as its class; the original
    classes are restored on exit.
    """
    swapped = []
    try:
        for module in modules:
            if id(module) in _CALL_LOGS:
                continue
            _CALL_LOGS[id(module)] = []
            swapped.append((module, type(module)))
            module.__class__ = _recording_class(type(module))
        yield {id(m): _CALL_LOGS[id(m)] for m in modules}
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            del _CALL_LOGS[id(module)]


def forward_with_taps(model, tokens, taps, dtypes=None):
    """The cache-free forward over ``tokens``, with the bound taps captured.

    Returns (logits [L, V] float32, {tap name: float32 array with batch axis})
    with the taps in the order of ``taps``. ``dtypes``, a dict, if given,
    gets each tap's own dtype (before the float32 copy).
    """
    modules = {}
    for tap in taps:
        for m in (tap.module, tap.residual_module):
            if m is not None:
                modules[id(m)] = m
    with recording_calls(list(modules.values())) as logs:
        logits = model(mx.array(tokens)[None])
        values = {}
        for tap in taps:
            calls = logs[id(tap.module)]
            if tap.row.call >= len(calls):
                raise RuntimeError(
                    f"tap {tap.name}: {tap.path or 'model'} was called "
                    f"{len(calls)} times, the table asks for call {tap.row.call}"
                )
            x, value = calls[tap.row.call]
            if tap.residual_module is not None:
                (_, r), *rest = logs[id(tap.residual_module)]
                if rest:
                    raise RuntimeError(f"tap {tap.name}: residual module called twice")
                value = x + r
            if dtypes is not None:
                dtypes[tap.name] = str(value.dtype).replace("mlx.core.", "")
            values[tap.name] = TAP_TRANSFORMS[tap.row.transform](value).astype(mx.float32)
    mx.eval(logits, *values.values())
    logits = np.array(logits[0].astype(mx.float32))
    return logits, {name: np.array(v) for name, v in values.items()}


# ---------------------------------------------------------------------------
# Consistency checks of the captured taps.
# ---------------------------------------------------------------------------


def _np(a):
    return np.array(a.astype(mx.float32))


def _linear(module, x):
    return _np(module(mx.array(x)))


def _rms_norm(x, weight, eps):
    """RMS norm in numpy (float64), independent of mlx."""
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _embedding_table(embed):
    """The dense embedding matrix of an (optionally quantized) nn.Embedding."""
    if "scales" in embed:
        return _np(
            mx.dequantize(
                embed.weight,
                embed.scales,
                embed.get("biases"),
                group_size=embed.group_size,
                bits=embed.bits,
                mode=getattr(embed, "mode", "affine"),
            )
        )
    return _np(embed.weight)


# Model types with llama's module names whose math differs from llama's
# (norm kind, 1 + w norms, activation, embedding or residual scaling, post
# norms, parallel blocks): the llama checks would not hold for them.
LLAMA_MATH_EXCLUDED = (
    POST_NORM_TYPES | SCALED_RESIDUAL_TYPES | PARALLEL_TYPES
    | {"gemma", "starcoder2", "stablelm"}
    | {"deepseek_v2", "deepseek_v3"}  # MLA attention
)


def _check_generic_taps(model, tokens, taps, model_type, config, bound, compare, have):
    """Checks that hold for any family: each tap is recomputed from the tap
    feeding it with the module that produced it (norms, projections), the
    aliases are equal, and the residual chain adds up where the layer's
    structure is known (plain, post-norm or parallel residual)."""
    modules = {t.name: t.module for t in bound}

    def run(name, x):
        return _np(modules[name](mx.array(x)))

    if have("embed") and isinstance(modules["embed"], (nn.Embedding, nn.QuantizedEmbedding)):
        table = _embedding_table(modules["embed"])
        compare("embed == embedding rows of the tokens", taps["embed"][0], table[tokens])

    parallel = model_type in PARALLEL_TYPES or config.get("use_parallel_residual", False)
    n_layers = 0
    while f"layers.{n_layers}" in taps:
        n_layers += 1
    for i in range(n_layers):
        p = f"layers.{i}"
        # Layer 0's input is not a tap where the embedding is scaled or has
        # positions added.
        x = taps.get(f"layers.{i - 1}") if i > 0 else None
        if have(f"{p}.attn_norm") and x is not None:
            compare(f"{p}.attn_norm == its module(layer input)", taps[f"{p}.attn_norm"],
                    run(f"{p}.attn_norm", x))
        attn_in = taps.get(f"{p}.attn_norm", x)
        for short in ("q", "k", "v", "qkv"):
            if have(f"{p}.attn.{short}") and attn_in is not None:
                compare(f"{p}.attn.{short} == its module(attention input)",
                        taps[f"{p}.attn.{short}"], run(f"{p}.attn.{short}", attn_in))
        for short in ("q", "k"):
            name = f"{p}.attn.{short}_norm"
            if have(name, f"{p}.attn.{short}"):
                src, want_shape = taps[f"{p}.attn.{short}"], taps[name].shape
                if src.shape != want_shape:  # per head, [B, H, T, D]
                    B, H, T, D = want_shape
                    if src.shape[-1] == 2 * H * D:  # qwen3_next: [q | gate] per head
                        src = src.reshape(B, T, H, 2 * D)[..., :D]
                    src = src.reshape(B, T, H, D).transpose(0, 2, 1, 3)
                compare(f"{name} == its module({short})", taps[name], run(name, src))
        if have(f"{p}.attn.o", f"{p}.attn"):
            compare(f"{p}.attn == {p}.attn.o", taps[f"{p}.attn"], taps[f"{p}.attn.o"], exact=True)
        if have(f"{p}.post_attn_norm", f"{p}.attn"):
            compare(f"{p}.post_attn_norm == its module({p}.attn)", taps[f"{p}.post_attn_norm"],
                    run(f"{p}.post_attn_norm", taps[f"{p}.attn"]))
        attn_out = taps.get(f"{p}.post_attn_norm", taps.get(f"{p}.attn"))
        if have(f"{p}.h") and x is not None and attn_out is not None:
            compare(f"{p}.h == layer input + attention output", taps[f"{p}.h"], x + attn_out)
        mlp_in_of_norm = taps.get(f"{p}.h") if not parallel else x
        if have(f"{p}.mlp_norm") and mlp_in_of_norm is not None:
            compare(f"{p}.mlp_norm == its module(its input)", taps[f"{p}.mlp_norm"],
                    run(f"{p}.mlp_norm", mlp_in_of_norm))
        mlp_in = taps.get(f"{p}.mlp_norm")
        if mlp_in is None and parallel:
            mlp_in = taps.get(f"{p}.attn_norm")
        if mlp_in is None and model_type in POST_NORM_TYPES:
            mlp_in = taps.get(f"{p}.h")  # olmo2: no norm before the MLP
        for short in ("gate", "up", "gate_up"):
            if have(f"{p}.mlp.{short}") and mlp_in is not None:
                compare(f"{p}.mlp.{short} == its module(MLP input)", taps[f"{p}.mlp.{short}"],
                        run(f"{p}.mlp.{short}", mlp_in))
        if have(f"{p}.mlp", f"{p}.mlp.down"):
            compare(f"{p}.mlp == {p}.mlp.down", taps[f"{p}.mlp"], taps[f"{p}.mlp.down"], exact=True)
        if have(f"{p}.post_mlp_norm", f"{p}.mlp"):
            compare(f"{p}.post_mlp_norm == its module({p}.mlp)", taps[f"{p}.post_mlp_norm"],
                    run(f"{p}.post_mlp_norm", taps[f"{p}.mlp"]))
        mlp_out = taps.get(f"{p}.post_mlp_norm", taps.get(f"{p}.mlp"))
        if have(p, f"{p}.h") and mlp_out is not None:
            compare(f"{p} == {p}.h + MLP output", taps[p], taps[f"{p}.h"] + mlp_out)
        if parallel and have(p, f"{p}.attn", f"{p}.mlp") and x is not None:
            compare(f"{p} == layer input + {p}.attn + {p}.mlp", taps[p],
                    x + taps[f"{p}.attn"] + taps[f"{p}.mlp"])
        if (have(p, f"{p}.attn") and x is not None and f"{p}.mlp" not in taps
                and f"{p}.h" not in taps):  # mamba2: x + mixer(norm(x))
            compare(f"{p} == layer input + {p}.attn", taps[p], x + taps[f"{p}.attn"])
    last = f"layers.{n_layers - 1}"
    if have("norm", last):
        compare(f"norm == its module({last})", taps["norm"], run("norm", taps[last]))


# ---------------------------------------------------------------------------
# The MoE, MLA and recurrent blocks recomputed independently (numpy, float64)
# from their input taps: each is what an engine has to compute, written out
# from the config and the parameters, and must match mlx-lm's output tap.
# ---------------------------------------------------------------------------


def _f64(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _dense(module):
    """A Linear / SwitchLinear / MultiLinear weight as float64 (dequantized if
    the module is quantized): [out, in], or [E, out, in] for the stacked ones."""
    if "scales" in module:
        return _f64(mx.dequantize(module["weight"], module["scales"], module.get("biases"),
                                  group_size=module.group_size, bits=module.bits,
                                  mode=getattr(module, "mode", "affine")))
    return _f64(module["weight"])


def _apply_linear(module, x):
    y = x @ _dense(module).T
    return y + _f64(module["bias"]) if "bias" in module else y


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _glu_mlp(mlp, x, names=("gate_proj", "up_proj", "down_proj")):
    gate, up, down = (mlp[n] for n in names)
    return _apply_linear(down, _silu(_apply_linear(gate, x)) * _apply_linear(up, x))


def _topk(scores, k):
    """Indices of the k largest along the last axis, and the margin between
    the k-th and the (k+1)-th score (how close the choice was to a tie)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=-1)
    margin = ranked[..., k - 1] - ranked[..., k] if scores.shape[-1] > k else np.inf
    return order[..., :k], np.min(margin)


def _group_limit(scores, n_group, topk_group, group_score):
    """Zero the experts outside the topk_group best groups (mlx-lm fills
    them with 0.0, not -inf, as HF does). Returns (scores, group margin)."""
    grouped = scores.reshape(*scores.shape[:-1], n_group, -1)
    gs = group_score(grouped)  # [..., n_group]
    keep, margin = _topk(gs, topk_group)
    kept = np.zeros(gs.shape, dtype=bool)
    np.put_along_axis(kept, keep, True, axis=-1)
    return np.where(kept[..., None], grouped, 0.0).reshape(scores.shape), margin


def moe_reference(block, model_type, config, x):
    """A MoE block's output for x [B, T, D] (float64).

    Returns (output, routing): routing = {"experts": chosen [B, T, k],
    "margin": smallest gap between the k-th and (k+1)-th selection score,
    "group_margin": the same for the group choice, "differs_without_bias" /
    "differs_without_group_limit": how many tokens would choose other experts
    without deepseek_v3's correction bias / without the group limit}.
    """
    routing = {}
    if model_type == "mixtral":
        k = config["num_experts_per_tok"]
        logits = _apply_linear(block["gate"], x)
        inds, routing["margin"] = _topk(logits, k)
        weights = _softmax(np.take_along_axis(logits, inds, axis=-1))  # over the chosen only
    elif model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        k = config["num_experts_per_tok"]
        probs = _softmax(_apply_linear(block["gate"], x))  # over all experts
        inds, routing["margin"] = _topk(probs, k)
        weights = np.take_along_axis(probs, inds, axis=-1)
        if model_type != "qwen2_moe" and config.get("norm_topk_prob", False):
            weights = weights / weights.sum(axis=-1, keepdims=True)
    elif model_type in ("deepseek_v2", "deepseek_v3"):
        k = config["num_experts_per_tok"]
        gate = block["gate"]
        logits = x @ _f64(gate["weight"]).T
        n_group, topk_group = config.get("n_group") or 1, config.get("topk_group") or 1
        if model_type == "deepseek_v2":
            scores = _softmax(logits)
            choice = scores
            limited = config.get("topk_method") == "group_limited_greedy"
            group_score = lambda g: g.max(axis=-1)  # noqa: E731
        else:
            scores = _sigmoid(logits)
            choice = scores + _f64(gate["e_score_correction_bias"])
            limited = n_group > 1
            group_score = lambda g: np.sort(g, axis=-1)[..., -2:].sum(axis=-1)  # noqa: E731
            plain, _ = _topk(scores, k)
        unlimited, _ = _topk(choice, k)
        if limited:
            choice, routing["group_margin"] = _group_limit(choice, n_group, topk_group, group_score)
        inds, routing["margin"] = _topk(choice, k)
        if model_type == "deepseek_v3":
            if limited:
                plain, _ = _topk(_group_limit(scores, n_group, topk_group, group_score)[0], k)
            routing["differs_without_bias"] = int(np.sum(np.any(
                np.sort(plain, -1) != np.sort(inds, -1), axis=-1)))
        if limited:
            routing["differs_without_group_limit"] = int(np.sum(np.any(
                np.sort(unlimited, -1) != np.sort(inds, -1), axis=-1)))
        # v2 takes the weights from the (group-masked) softmax, v3 from the
        # unbiased sigmoid scores.
        weights = np.take_along_axis(choice if model_type == "deepseek_v2" else scores, inds, -1)
        if model_type == "deepseek_v3" and k > 1 and config.get("norm_topk_prob", False):
            weights = weights / weights.sum(axis=-1, keepdims=True)
        weights = weights * config.get("routed_scaling_factor", 1.0)
    else:
        raise RuntimeError(f"no MoE reference for {model_type}")

    sw = block["switch_mlp"]
    wg, wu, wd = _dense(sw["gate_proj"]), _dense(sw["up_proj"]), _dense(sw["down_proj"])
    # Every expert on every token ([B, T, E, D]), then the chosen ones.
    hidden = _silu(np.einsum("btd,eid->btei", x, wg)) * np.einsum("btd,eid->btei", x, wu)
    experts = np.einsum("btei,edi->bted", hidden, wd)
    chosen = np.take_along_axis(experts, inds[..., None], axis=2)  # [B, T, k, D]
    y = (chosen * weights[..., None]).sum(axis=2)
    if "shared_expert" in block:  # qwen2_moe / qwen3_next: sigmoid-gated
        y = y + _sigmoid(_apply_linear(block["shared_expert_gate"], x)) * _glu_mlp(
            block["shared_expert"], x)
    if "shared_experts" in block:  # deepseek: ungated
        y = y + _glu_mlp(block["shared_experts"], x)
    routing["experts"] = inds
    return y, routing


def _yarn_get_mscale(scale, mscale):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freqs(dims, base, rs):
    """deepseek's yarn: per rotated pair, the inverse frequency
    (angle = position / value), and the factor on q_pe / k_pe."""
    factor = rs["factor"]
    omax = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def correction_dim(rotations):
        return dims * math.log(omax / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency
    freq_extra = base ** (np.arange(0, dims, 2) / dims)
    freq_inter = factor * freq_extra
    inv = freq_inter * freq_extra / (freq_inter * extrapolate + freq_extra * (1 - extrapolate))
    mscale = (_yarn_get_mscale(factor, rs.get("mscale", 1))
              / _yarn_get_mscale(factor, rs.get("mscale_all_dim", 0)))
    return inv, mscale


def _rope_traditional(x, inv_freqs):
    """Interleaved rope on all of x [..., T, dims]: pairs (2i, 2i + 1)."""
    T = x.shape[-2]
    angle = np.arange(T)[:, None] / inv_freqs[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def _rope_half(x, dims, base):
    """Non-traditional rope on the first dims of x [..., T, D] (halves of
    those dims rotated together); the rest passes through."""
    T = x.shape[-2]
    angle = np.arange(T)[:, None] * base ** (-np.arange(0, dims, 2) / dims)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., : dims // 2], x[..., dims // 2: dims]
    out = x.copy()
    out[..., : dims // 2] = a * cos - b * sin
    out[..., dims // 2: dims] = a * sin + b * cos
    return out


def _causal_attention(scores, v):
    """softmax over keys of [H, T, S] scores (causal), times v [H, S, Dv]."""
    T = scores.shape[-2]
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    return _softmax(scores) @ v


def _rms(x, weight, eps):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * _f64(weight) if weight is not None else y


def mla_reference(attn, model_type, config, x):
    """deepseek v2 / v3 multi-head latent attention of x [1, T, D] (the o_proj
    output), computed the plain (unabsorbed) way for every position."""
    x = x[0]
    T = x.shape[0]
    H = config["num_attention_heads"]
    nope, rope_d, vd = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    if config.get("q_lora_rank") is None:
        q = _apply_linear(attn["q_proj"], x)
    else:  # the q_a / kv_a norms use eps 1e-6 whatever rms_norm_eps says
        q_a = _rms(_apply_linear(attn["q_a_proj"], x), attn["q_a_layernorm"]["weight"], 1e-6)
        q = _apply_linear(attn["q_b_proj"], q_a)
    q = q.reshape(T, H, nope + rope_d).transpose(1, 0, 2)  # [H, T, nope + rope]
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    kv_a = _apply_linear(attn["kv_a_proj_with_mqa"], x)
    latent = _rms(kv_a[:, : config["kv_lora_rank"]], attn["kv_a_layernorm"]["weight"], 1e-6)
    k_pe = kv_a[:, config["kv_lora_rank"]:]  # [T, rope], one head for all
    if "kv_b_proj" in attn:  # v2: [T, H * (nope + v)]
        kv = _apply_linear(attn["kv_b_proj"], latent).reshape(T, H, nope + vd).transpose(1, 0, 2)
        k_nope, v = kv[..., :nope], kv[..., nope:]
    else:  # v3: embed_q [H, kv_lora, nope], unembed_out [H, v, kv_lora]
        k_nope = np.einsum("tc,hcn->htn", latent, _dense(attn["embed_q"]))
        v = np.einsum("tc,hvc->htv", latent, _dense(attn["unembed_out"]))
    rs = config["rope_scaling"]
    inv_freqs, mscale = _yarn_inv_freqs(rope_d, config.get("rope_theta", 10000.0), rs)
    q_pe = _rope_traditional(q_pe * mscale, inv_freqs)
    k_pe = _rope_traditional(k_pe * mscale, inv_freqs)
    scale = (nope + rope_d) ** -0.5
    if rs.get("mscale_all_dim", 0):
        scale *= _yarn_get_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    scores = scale * (q_nope @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.T[None])
    out = _causal_attention(scores, v).transpose(1, 0, 2).reshape(T, H * vd)
    return _apply_linear(attn["o_proj"], out)[None]


def gated_attention_reference(attn, config, x):
    """qwen3_next's full-attention layer of x [1, T, D]: q_proj gives [q |
    gate] per head; q / k RMS-normed per head; rope on the first
    head_dim * partial_rotary_factor dims; output * sigmoid(gate) before
    o_proj."""
    x = x[0]
    T = x.shape[0]
    H, KV, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps = config["rms_norm_eps"]
    qg = _apply_linear(attn["q_proj"], x).reshape(T, H, 2 * D)
    q, gate = qg[..., :D], qg[..., D:].reshape(T, H * D)
    k = _apply_linear(attn["k_proj"], x).reshape(T, KV, D)
    v = _apply_linear(attn["v_proj"], x).reshape(T, KV, D).transpose(1, 0, 2)
    q = _rms(q, attn["q_norm"]["weight"], eps).transpose(1, 0, 2)
    k = _rms(k, attn["k_norm"]["weight"], eps).transpose(1, 0, 2)
    dims = int(D * config["partial_rotary_factor"])
    q, k = (_rope_half(t, dims, config["rope_theta"]) for t in (q, k))
    k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)
    out = _causal_attention(D ** -0.5 * q @ k.transpose(0, 2, 1), v)
    out = out.transpose(1, 0, 2).reshape(T, H * D) * _sigmoid(gate)
    return _apply_linear(attn["o_proj"], out)[None]


def _causal_depthwise_conv(x, weight, bias=None):
    """x [T, C], weight [C, K, 1] (mlx Conv1d, groups = C), zero left padding:
    out[t, c] = sum_j weight[c, j] * x[t - K + 1 + j, c]."""
    w = _f64(weight)[:, :, 0]
    K = w.shape[1]
    padded = np.concatenate([np.zeros((K - 1, x.shape[1])), x], axis=0)
    out = sum(w[:, j] * padded[j: j + x.shape[0]] for j in range(K))
    return out + _f64(bias) if bias is not None else out


def short_conv_reference(conv, x):
    """lfm2's short-conv block of x [1, T, D]: in_proj -> B, C, x (thirds);
    out_proj(C * conv(B * x))."""
    b, c, h = np.split(_apply_linear(conv["in_proj"], x[0]), 3, axis=-1)
    y = c * _causal_depthwise_conv(b * h, conv["conv"]["weight"], conv["conv"].get("bias"))
    return _apply_linear(conv["out_proj"], y)[None]


def mamba2_reference(mixer, config, x):
    """mamba2's mixer of x [1, T, D] as the plain recurrence (mlx-lm computes
    it in SSD chunks): per head h (group g = h // (heads / n_groups)),
    S = exp(dt A) S + dt x_h B_g^T, y_h = S C_g + D_h x_h; then
    rms_norm(y * silu(z)) * w over the whole mixer width; out_proj."""
    x = x[0]
    T = x.shape[0]
    nh, hd, ng = config["num_heads"], config["head_dim"], config["n_groups"]
    ds = config.get("ssm_state_size") or config["state_size"]
    inner = nh * hd
    proj = _apply_linear(mixer["in_proj"], x)
    z, xbc, dt = proj[:, :inner], proj[:, inner: -nh], proj[:, -nh:]
    conv = mixer["conv1d"]
    xbc = _silu(_causal_depthwise_conv(xbc, conv["weight"], conv.get("bias")))
    xs = xbc[:, :inner].reshape(T, nh, hd)
    B = xbc[:, inner: inner + ng * ds].reshape(T, ng, ds)
    C = xbc[:, inner + ng * ds:].reshape(T, ng, ds)
    lo, hi = config["time_step_limit"]
    dt = np.clip(_softplus(dt + _f64(mixer["dt_bias"])), lo, hi)
    A = -np.exp(_f64(mixer["A_log"]))
    Dskip = _f64(mixer["D"])
    group = np.arange(nh) // (nh // ng)
    state = np.zeros((nh, hd, ds))
    y = np.zeros((T, nh, hd))
    for t in range(T):
        state = (np.exp(dt[t] * A)[:, None, None] * state
                 + dt[t][:, None, None] * xs[t][:, :, None] * B[t, group][:, None, :])
        y[t] = (state @ C[t, group][:, :, None])[..., 0] + Dskip[:, None] * xs[t]
    y = _rms(y.reshape(T, inner) * _silu(z), mixer["norm"]["weight"], config["layer_norm_epsilon"])
    return _apply_linear(mixer["out_proj"], y)[None]


def gated_delta_reference(la, config, x):
    """qwen3_next's gated DeltaNet of x [1, T, D].

    in_proj_qkvz is grouped per key head: [q (dk) | k (dk) | v (r dv) | z (r dv)]
    for each of nk key heads, r = nv / nk value heads per key head; in_proj_ba
    likewise [b (r) | a (r)]. conv1d (no bias) + silu over [q | k | v]
    (all heads of q, then k, then v). q = l2norm(q) / sqrt(dk), k = l2norm(k)
    (eps 1e-6 on the sum of squares); value head h reads key head h // r.
    beta = sigmoid(b), g = exp(-exp(A_log) softplus(a + dt_bias)); per head
    S [dv, dk]: S = g S; S += beta (v - S k) k^T; y = S q. Output:
    out_proj(rms_norm(y) * w * silu(z)) (norm per value head, then gate).
    """
    x = x[0]
    T = x.shape[0]
    nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
    r = nv // nk
    qkvz = _apply_linear(la["in_proj_qkvz"], x).reshape(T, nk, 2 * dk + 2 * r * dv)
    ba = _apply_linear(la["in_proj_ba"], x).reshape(T, nk, 2 * r)
    q, k = qkvz[..., :dk], qkvz[..., dk: 2 * dk]
    v = qkvz[..., 2 * dk: 2 * dk + r * dv].reshape(T, nv, dv)
    z = qkvz[..., 2 * dk + r * dv:].reshape(T, nv, dv)
    b, a = ba[..., :r].reshape(T, nv), ba[..., r:].reshape(T, nv)
    mixed = np.concatenate([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], axis=-1)
    mixed = _silu(_causal_depthwise_conv(mixed, la["conv1d"]["weight"]))
    q = mixed[:, : nk * dk].reshape(T, nk, dk)
    k = mixed[:, nk * dk: 2 * nk * dk].reshape(T, nk, dk)
    v = mixed[:, 2 * nk * dk:].reshape(T, nv, dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / math.sqrt(dk)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    q, k = np.repeat(q, r, axis=1), np.repeat(k, r, axis=1)
    beta = _sigmoid(b)
    g = np.exp(-np.exp(_f64(la["A_log"])) * _softplus(a + _f64(la["dt_bias"])))
    state = np.zeros((nv, dv, dk))
    y = np.zeros((T, nv, dv))
    for t in range(T):
        state = state * g[t][:, None, None]
        kv_mem = (state * k[t][:, None, :]).sum(-1)
        delta = (v[t] - kv_mem) * beta[t][:, None]
        state = state + k[t][:, None, :] * delta[:, :, None]
        y[t] = (state * q[t][:, None, :]).sum(-1)
    y = _rms(y, la["norm"]["weight"], config["rms_norm_eps"]) * _silu(z)
    return _apply_linear(la["out_proj"], y.reshape(T, nv * dv))[None]


def _is_moe(block):
    return isinstance(block, nn.Module) and "switch_mlp" in block


def routing_stats(model, model_type, config, taps):
    """Per MoE layer, the routing of the tapped forward (see moe_reference)."""
    stats = {}
    layers = walk(model, "model.layers") or []
    for i, layer in enumerate(layers):
        block = layer.get("mlp", layer.get("block_sparse_moe"))
        if _is_moe(block) and f"layers.{i}.mlp_norm" in taps:
            _, routing = moe_reference(block, model_type, config,
                                       taps[f"layers.{i}.mlp_norm"].astype(np.float64))
            stats[i] = routing
    return stats


def check_block_math(model, model_type, config, taps, compare, have):
    """Recompute each MoE, MLA, gated-attention, short-conv, mamba2 and gated
    DeltaNet block from its input tap (numpy, float64) and compare with the
    block's output tap. Other blocks are left to the other checks."""
    blocks = walk(model, "model.layers") or walk(model, "backbone.layers") or []
    for i, layer in enumerate(blocks):
        p = f"layers.{i}"
        moe = layer.get("mlp", layer.get("block_sparse_moe"))
        if _is_moe(moe) and have(f"{p}.mlp_norm", f"{p}.mlp"):
            want, _ = moe_reference(moe, model_type, config,
                                    taps[f"{p}.mlp_norm"].astype(np.float64))
            compare(f"{p}.mlp == MoE reference({p}.mlp_norm)", taps[f"{p}.mlp"], want)
        if not have(f"{p}.attn_norm", f"{p}.attn"):
            continue
        x = taps[f"{p}.attn_norm"].astype(np.float64)
        want = None
        if model_type in ("deepseek_v2", "deepseek_v3"):
            want, what = mla_reference(layer["self_attn"], model_type, config, x), "MLA"
        elif model_type == "qwen3_next" and "self_attn" in layer:
            want, what = gated_attention_reference(layer["self_attn"], config, x), "gated attention"
        elif model_type == "qwen3_next":
            want, what = gated_delta_reference(layer["linear_attn"], config, x), "gated DeltaNet"
        elif model_type == "lfm2" and "conv" in layer:
            want, what = short_conv_reference(layer["conv"], x), "short conv"
        elif model_type == "mamba2":
            want, what = mamba2_reference(layer["mixer"], config, x), "mamba2 recurrence"
        if want is not None:
            compare(f"{p}.attn == {what} reference({p}.attn_norm)", taps[f"{p}.attn"], want)


def check_taps(model, tokens, logits, taps, model_type=None, config=None, bound=None):
    """Check the captured llama-family taps against each other and the model.

    Models whose module layout is llama's but whose layer computes something
    else (LLAMA_MATH_EXCLUDED) and models with another layout get the
    generic checks of _check_generic_taps instead (needs ``bound``, the
    BoundTap list that produced the taps).

    Each check recomputes one tap from other taps (with the model's modules,
    or numpy for the norms and the embedding) and compares. Returns
    {check: max abs difference}; raises if a difference is not tiny. Checks
    whose taps are absent are skipped. Float32 models must match to 1e-5
    (relative to the largest value) and "exact" checks bit for bit; models
    with 16-bit parameters, whose taps were rounded before the float32 cast,
    to 3e-2.
    """
    results = {}
    float32 = parameter_dtypes(model) == "float32"
    rel_tol = 1e-5 if float32 else 3e-2

    def compare(label, got, want, exact=False):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            raise RuntimeError(f"tap check {label}: shape {got.shape} != {want.shape}")
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        tol = 0.0 if exact and float32 else rel_tol * max(1.0, float(np.max(np.abs(want))))
        if diff > tol:
            raise RuntimeError(f"tap check {label}: max abs difference {diff:.3g} > {tol:.3g}")
        results[label] = diff

    def have(*names):
        return all(n in taps for n in names)

    if have("logits"):
        compare("tap.logits == logits", taps["logits"][0], logits, exact=True)
    # MoE, MLA and recurrent blocks recomputed in numpy (other families: none).
    check_block_math(model, model_type, config or {}, taps, compare, have)
    # The remaining checks know the llama-family module names only.
    llama_family = [
        "model.embed_tokens", "model.norm", "model.layers.0.input_layernorm",
        "model.layers.0.self_attn", "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp",
    ]
    if model_type in LLAMA_MATH_EXCLUDED or not all(
        isinstance(walk(model, path), nn.Module) for path in llama_family
    ):
        if bound is None:
            print("note: not a llama-family model; only tap.logits was checked")
            return results
        _check_generic_taps(model, tokens, taps, model_type, config or {}, bound, compare, have)
        return results
    inner = model.model
    if have("embed"):
        table = _embedding_table(inner.embed_tokens)
        compare("embed == embedding rows of the tokens", taps["embed"][0], table[tokens])

    n_layers = len(inner.layers)
    for i, layer in enumerate(inner.layers):
        p = f"layers.{i}"
        x = taps.get("embed") if i == 0 else taps.get(f"layers.{i - 1}")
        attn = layer.self_attn
        if have(f"{p}.attn_norm") and x is not None:
            norm = layer.input_layernorm
            compare(f"{p}.attn_norm == rms_norm(layer input)",
                    taps[f"{p}.attn_norm"], _rms_norm(x, _np(norm.weight), norm.eps))
        if have(f"{p}.attn.o", f"{p}.attn"):
            compare(f"{p}.attn == {p}.attn.o", taps[f"{p}.attn"], taps[f"{p}.attn.o"], exact=True)
        if have(f"{p}.h", f"{p}.attn") and x is not None:
            compare(f"{p}.h == layer input + {p}.attn", taps[f"{p}.h"], x + taps[f"{p}.attn"],
                    exact=True)
        if have(f"{p}.attn_norm"):
            for proj, short in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                if have(f"{p}.attn.{short}"):
                    compare(f"{p}.attn.{short} == {proj}(attn_norm)", taps[f"{p}.attn.{short}"],
                            _linear(attn[proj], taps[f"{p}.attn_norm"]))
        heads_in = {}
        for short, n_heads in (("q", attn.n_heads), ("k", attn.n_kv_heads), ("v", attn.n_kv_heads)):
            if have(f"{p}.attn.{short}"):
                t = taps[f"{p}.attn.{short}"]
                heads_in[short] = t.reshape(t.shape[0], t.shape[1], n_heads, -1)
        for short in ("q", "k"):
            if have(f"{p}.attn.{short}_norm") and short in heads_in:
                norm = attn[f"{short}_norm"]
                compare(f"{p}.attn.{short}_norm == rms_norm({short} heads), [B, H, T, D]",
                        taps[f"{p}.attn.{short}_norm"],
                        _rms_norm(heads_in[short], _np(norm.weight), norm.eps)
                        .transpose(0, 2, 1, 3))
        for short in ("q", "k"):
            src = taps.get(f"{p}.attn.{short}_head_ln", taps.get(f"{p}.attn.{short}_norm"))
            if src is None and short in heads_in:
                src = heads_in[short].transpose(0, 2, 1, 3)
            if have(f"{p}.attn.{short}_rope") and src is not None:
                compare(f"{p}.attn.{short}_rope == rope(its input)", taps[f"{p}.attn.{short}_rope"],
                        _np(attn.rope(mx.array(src))))
        if have(f"{p}.attn.q_rope", f"{p}.attn.k_rope", f"{p}.attn.o") and "v" in heads_in:
            # A "sliding_attention" layer (llama's layer_types) sees the last
            # sliding_window positions only.
            mask = "causal"
            layer_index = int(p.split(".")[1])
            kinds = config.get("layer_types") or []
            if layer_index < len(kinds) and kinds[layer_index] == "sliding_attention":
                T = taps[f"{p}.attn.q_rope"].shape[2]
                rows = np.arange(T)[:, None]
                cols = np.arange(T)[None, :]
                window = config["sliding_window"]
                mask = mx.array((cols <= rows) & (rows - cols < window))
            out = mx.fast.scaled_dot_product_attention(
                mx.array(taps[f"{p}.attn.q_rope"]),
                mx.array(taps[f"{p}.attn.k_rope"]),
                mx.array(heads_in["v"].transpose(0, 2, 1, 3)),
                scale=attn.scale,
                mask=mask,
            )
            B, _, T, _ = out.shape
            merged = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
            compare(f"{p}.attn.o == o_proj(causal sdpa(q_rope, k_rope, v))",
                    taps[f"{p}.attn.o"], _linear(attn.o_proj, merged))
        if have(f"{p}.mlp_norm", f"{p}.h"):
            norm = layer.post_attention_layernorm
            compare(f"{p}.mlp_norm == rms_norm({p}.h)", taps[f"{p}.mlp_norm"],
                    _rms_norm(taps[f"{p}.h"], _np(norm.weight), norm.eps))
        mlp = layer.mlp
        if have(f"{p}.mlp_norm", f"{p}.mlp.gate", f"{p}.mlp.up"):
            compare(f"{p}.mlp.gate == gate_proj(mlp_norm)", taps[f"{p}.mlp.gate"],
                    _linear(mlp.gate_proj, taps[f"{p}.mlp_norm"]))
            compare(f"{p}.mlp.up == up_proj(mlp_norm)", taps[f"{p}.mlp.up"],
                    _linear(mlp.up_proj, taps[f"{p}.mlp_norm"]))
        if have(f"{p}.mlp.gate", f"{p}.mlp.up", f"{p}.mlp.down"):
            gate, up = taps[f"{p}.mlp.gate"], taps[f"{p}.mlp.up"]
            act = gate / (1.0 + np.exp(-gate.astype(np.float64))) * up
            compare(f"{p}.mlp.down == down_proj(silu(gate) * up)", taps[f"{p}.mlp.down"],
                    _linear(mlp.down_proj, act.astype(np.float32)))
        if have(f"{p}.mlp", f"{p}.mlp.down"):
            compare(f"{p}.mlp == {p}.mlp.down", taps[f"{p}.mlp"], taps[f"{p}.mlp.down"], exact=True)
        if have(p, f"{p}.h", f"{p}.mlp"):
            compare(f"{p} == {p}.h + {p}.mlp", taps[p], taps[f"{p}.h"] + taps[f"{p}.mlp"],
                    exact=True)

    last = f"layers.{n_layers - 1}"
    if have("norm", last):
        compare(f"norm == model.norm({last})", taps["norm"],
                _np(inner.norm(mx.array(taps[last]))))
        compare(f"norm == rms_norm({last}) (numpy)", taps["norm"],
                _rms_norm(taps[last], _np(inner.norm.weight), inner.norm.eps))
    if have("norm", "logits"):
        head = model.get("lm_head")
        projected = head(mx.array(taps["norm"])) if head is not None else (
            inner.embed_tokens.as_linear(mx.array(taps["norm"])))
        compare("logits == lm_head(norm)", taps["logits"], _np(projected))
    return results


# ---------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------


def generator_command(name, seed, out_rel, model_type=None, overrides=None, quant=None,
                      model_dir=None, prompt_tokens=None, max_case_bytes=None,
                      hf_layout=None, drop_params=None):
    """The exact command line that regenerates one case."""
    parts = [PYTHON, SCRIPT, "--case", name]
    if model_dir is not None:
        parts += ["--model-dir", model_dir]
    else:
        parts += ["--model-type", model_type, "--config-json", json.dumps(overrides)]
    if quant is not None:
        parts += ["--quantize", str(quant["bits"]), "--group-size", str(quant["group_size"])]
        if quant.get("overrides"):
            parts += ["--quant-overrides", json.dumps(quant["overrides"])]
    if hf_layout is not None:
        parts += ["--hf-layout", hf_layout]
    if drop_params:
        parts += ["--drop-params", ",".join(drop_params)]
    if prompt_tokens is not None:
        parts += ["--prompt-tokens", ",".join(str(t) for t in prompt_tokens)]
    if max_case_bytes is not None:
        parts += ["--max-case-bytes", str(max_case_bytes)]
    parts += ["--seed", str(seed), "--out", out_rel]
    return " ".join(shlex.quote(p) for p in parts)


def directory_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def repo_relative(path):
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(path).resolve())


def vocab_size_of(config):
    for source in (config, config.get("text_config", {})):
        for key in ("vocab_size", "num_vocab"):  # num_vocab: phixtral
            if key in source:
                return int(source[key])
    raise SystemExit("the model config has no vocab_size")


def gpt2_to_hf(weights, config):
    """mlx-lm gpt2 parameters in Hugging Face's layout: the inverse of
    mlx-lm's gpt2 ``sanitize``. Names lose the leading "model.", the four
    Conv1D weights (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are stored
    [in, out], and each layer gets the causal-mask buffer h.{i}.attn.bias
    ([1, 1, n_positions, n_positions] lower-triangular ones, float32) that HF
    checkpoints carry and sanitize drops."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for key, value in weights.items():
        if not key.startswith("model."):
            raise RuntimeError(f"gpt2: unexpected parameter {key}")
        key = key[len("model."):]
        if key.startswith("h.") and key.split(".", 2)[2] in conv1d:
            value = value.transpose(1, 0)
        out[key] = value
    n = config["n_positions"]
    mask = mx.tril(mx.ones((n, n), dtype=mx.float32)).reshape(1, 1, n, n)
    for i in range(config["n_layer"]):
        out[f"h.{i}.attn.bias"] = mask
    return dict(sorted(out.items()))


def qwen3_moe_to_hf(weights, config):
    """mlx-lm qwen3_moe parameters in Hugging Face's per-expert layout: the
    inverse of the expert stacking in mlx-lm's qwen3_moe ``sanitize``. Each
    MoE layer's model.layers.{i}.mlp.switch_mlp.{gate,up,down}_proj.weight
    [E, out, in] becomes E tensors model.layers.{i}.mlp.experts.{e}.
    {gate,up,down}_proj.weight [out, in]; all other names (the router
    mlp.gate, attention, norms, lm_head) are the same in both layouts.
    sanitize finds the MoE layers by their experts.0.up_proj.weight and
    stacks experts 0..num_experts-1 of each projection (weights only: it
    knows no HF quantized layout)."""
    out = {}
    for key, value in weights.items():
        prefix, sep, rest = key.partition(".mlp.switch_mlp.")
        if not sep:
            out[key] = value
            continue
        proj, leaf = rest.split(".")
        if proj not in ("gate_proj", "up_proj", "down_proj") or leaf != "weight":
            raise RuntimeError(f"qwen3_moe: unexpected parameter {key}")
        if value.shape[0] != config["num_experts"]:
            raise RuntimeError(f"qwen3_moe: {key} has {value.shape[0]} experts")
        for e in range(value.shape[0]):
            out[f"{prefix}.mlp.experts.{e}.{proj}.weight"] = mx.contiguous(value[e])
    return dict(sorted(out.items()))


# Per-case "hf_layout": how to store model.safetensors in a Hugging Face
# checkpoint's layout (which mlx-lm's sanitize turns back into its own)
# instead of mlx-lm's names. {name: (function(weights, config), metadata)}.
HF_LAYOUTS = {
    "gpt2": (gpt2_to_hf, {"format": "pt"}),
    "qwen3_moe": (qwen3_moe_to_hf, {"format": "pt"}),
}


def build_random_model(name, model_type, overrides, seed, quant, model_dir,
                       hf_layout=None, drop_params=None):
    """Build, randomize, optionally quantize and save a model; check it reloads.

    drop_params: parameter names left out of the saved file; the model's
    ``sanitize`` is then run on the remaining weights so that the in-memory
    model matches what mlx-lm loads (gemma3_text ties its head this way).
    hf_layout: a key of HF_LAYOUTS.
    """
    config = build_config(model_type, overrides)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float32)
    randomize_parameters(model, seed)

    if drop_params:
        kept = {k: v for k, v in tree_flatten(model.parameters()) if k not in drop_params}
        missing = sorted(set(drop_params) - {k for k, _ in tree_flatten(model.parameters())})
        if missing:
            raise RuntimeError(f"{name}: drop_params {missing} are not parameters")
        if not hasattr(model, "sanitize"):
            raise RuntimeError(f"{name}: drop_params needs a model with sanitize")
        model.sanitize(dict(kept))
        if sorted(k for k, _ in tree_flatten(model.parameters())) != sorted(kept):
            raise RuntimeError(f"{name}: sanitize did not remove {drop_params} from the model")

    if quant is not None:
        model, config = quantize(
            model, config, quant["bits"], quant["group_size"], quant.get("overrides", {})
        )

    # Save as a converted mlx-lm model directory (or in a HF layout).
    model_dir.mkdir(parents=True)
    save_config(copy.deepcopy(config), model_dir / "config.json")
    weights = dict(tree_flatten(model.parameters()))
    if hf_layout is None:
        saved, metadata = weights, {"format": "mlx"}
    else:
        convert, metadata = HF_LAYOUTS[hf_layout]
        saved = convert(weights, config)
    mx.save_safetensors(str(model_dir / "model.safetensors"), saved, metadata=metadata)

    # The saved directory must load back in mlx-lm to the identical model.
    reloaded, _ = load_model(model_dir)
    reloaded_weights = dict(tree_flatten(reloaded.parameters()))
    if sorted(reloaded_weights) != sorted(weights):
        raise RuntimeError(f"{name}: reloaded parameter names differ")
    for key, value in weights.items():
        if not np.array_equal(np.array(value), np.array(reloaded_weights[key])):
            raise RuntimeError(f"{name}: reloaded parameter {key} differs")
    return model, config, reloaded


def parameter_dtypes(model):
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())
                     if mx.issubdtype(v.dtype, mx.floating)})
    return ",".join(dtypes)


def main_dtype(model):
    """The floating dtype holding the most parameter elements ("bfloat16", ...)."""
    counts = {}
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            name = str(v.dtype).replace("mlx.core.", "")
            counts[name] = counts.get(name, 0) + v.size
    return max(counts, key=counts.get)


def make_case(name, out_dir, seed=0, model_type=None, overrides=None, quant=None,
              model_dir=None, prompt_tokens=None, max_case_bytes=None,
              max_case_bytes_flag=None, hf_layout=None, drop_params=None):
    """Build or load, run, check and record one golden case. Returns a summary.

    Either model_type/overrides/quant (a random model, saved under
    out_dir/model) or model_dir (an existing mlx-lm model directory, not
    copied). max_case_bytes: if the case directory would be larger, the
    per-head ("detail") taps are left out; None means no limit.
    max_case_bytes_flag: the --max-case-bytes value given, for the
    recorded command. hf_layout / drop_params: see build_random_model.
    """
    out_dir = Path(out_dir)
    if model_dir is not None:
        model_dir = Path(model_dir).resolve()
        if out_dir.resolve() == model_dir or out_dir.resolve() in model_dir.parents:
            raise SystemExit(f"--out {out_dir} would delete the model directory {model_dir}")
        vocab = vocab_size_of(load_config(model_dir))
    else:
        vocab = vocab_size_of(build_config(model_type, overrides))

    if prompt_tokens is None:
        rng = np.random.RandomState(seed)
        tokens = rng.randint(1, vocab, size=PROMPT_LEN).astype(np.int32)
    else:
        tokens = np.array(prompt_tokens, dtype=np.int32)
        if len(tokens) < 2:
            raise SystemExit("--prompt-tokens needs at least 2 tokens")
        if np.any((tokens < 0) | (tokens >= vocab)):
            raise SystemExit(f"--prompt-tokens must lie in [0, {vocab})")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    built = None  # with hf_layout: the model as built, before the save
    if model_dir is None:
        model, config, reloaded = build_random_model(
            name, model_type, overrides, seed, quant, out_dir / "model",
            hf_layout=hf_layout, drop_params=drop_params,
        )
        if hf_layout is not None:
            # The reference is the model as mlx-lm loads the folder. Its
            # sanitize leaves e.g. gpt2's Conv1D weights as transposed views,
            # for which mlx's CPU addmm rounds differently from the built
            # model's contiguous weights (same values, logits ~1e-6 apart).
            built, model = model, reloaded
    else:
        model, config = load_model(model_dir)
        model_type = config.get("model_type")
        reloaded = None

    prompt_len = len(tokens)
    split = min(PREFILL_SPLIT, prompt_len - 1)

    logits = forward_logits(model, tokens)
    taps = bind_taps(model, model_type=model_type, config=config)
    tap_dtypes = {}
    tap_logits, tap_values = forward_with_taps(model, tokens, taps, tap_dtypes)
    if not np.array_equal(tap_logits, logits):
        raise RuntimeError(f"{name}: the tapped forward gives different logits")
    if tuple(tap_values) != tuple(t.name for t in taps):
        raise RuntimeError(f"{name}: taps out of order")
    tap_checks = check_taps(model, tokens, logits, tap_values, model_type=model_type,
                            config=config, bound=taps)

    pd_logits = prefill_decode_logits(model, tokens, split)
    greedy = greedy_tokens(model, tokens, GREEDY_TOKENS)

    if reloaded is not None and not np.array_equal(forward_logits(reloaded, tokens), logits):
        raise RuntimeError(f"{name}: reloaded model gives different logits")
    if built is not None:
        diff = float(np.max(np.abs(forward_logits(built, tokens) - logits)))
        if diff > 1e-5 * max(1.0, float(np.max(np.abs(logits)))):
            raise RuntimeError(f"{name}: the built model's logits differ from the "
                               f"reloaded one's by {diff:.3g}")
        print(f"{name}: built vs reloaded ({hf_layout} layout) logits: max abs diff {diff:.3g}")

    if len(set(greedy.tolist())) == 1:
        message = f"{name}: greedy continuation is a single repeated token"
        if model_dir is None:
            raise RuntimeError(message)
        print(f"warning: {message}")

    # How close each greedy choice was to a tie: a small margin means another
    # implementation may legitimately pick a different token.
    replay = forward_logits(model, np.concatenate([tokens, greedy[:-1]]))[prompt_len - 1 :]
    top2 = np.sort(replay, axis=-1)[:, -2:]
    greedy_margin = float(np.min(top2[:, 1] - top2[:, 0]))
    if not np.array_equal(np.argmax(replay, axis=-1), greedy):
        print(f"warning: {name}: cached greedy differs from an uncached replay")
    if greedy_margin < MIN_GREEDY_MARGIN:
        print(f"warning: {name}: a greedy step has a top-2 logit gap of {greedy_margin:.4f} "
              f"(< {MIN_GREEDY_MARGIN}); see --search-seeds")

    # MoE models: the expert choices over the prompt and the greedy tokens.
    # A near-tie there (like one in the greedy logits) may flip in another
    # implementation and change everything after it.
    routing = None
    mlp_norm_taps = [t for t in taps if t.name.endswith(".mlp_norm")]
    stats = routing_stats(model, model_type, config, forward_with_taps(
        model, np.concatenate([tokens, greedy[:-1]]), mlp_norm_taps)[1])
    if stats:
        routing = {
            "positions": prompt_len + len(greedy) - 1,
            "min_margin": round(float(min(r["margin"] for r in stats.values())), 6),
        }
        group = [r["group_margin"] for r in stats.values() if "group_margin" in r]
        if group:
            routing["min_group_margin"] = round(float(min(group)), 6)
        for key in ("differs_without_bias", "differs_without_group_limit"):
            if any(key in r for r in stats.values()):
                routing[key] = {f"layers.{i}": r[key] for i, r in stats.items() if key in r}

    def write(tap_names):
        mx.save_safetensors(
            str(out_dir / "golden.safetensors"),
            {
                "tokens": mx.array(tokens, dtype=mx.int32),
                "logits": mx.array(logits, dtype=mx.float32),
                "prefill_decode_logits": mx.array(pd_logits, dtype=mx.float32),
                "greedy": mx.array(greedy, dtype=mx.int32),
                **{f"tap.{n}": mx.array(tap_values[n], dtype=mx.float32) for n in tap_names},
            },
        )
        return directory_size(out_dir)

    tap_names = [t.name for t in taps]
    omitted = []
    size = write(tap_names)
    # Over the budget: leave out the per-head taps, then (still over) the
    # MLP's intermediate-width taps.
    for tier in (lambda t: t.row.detail, lambda t: t.name.endswith(WIDE_TAP_SUFFIXES)):
        if max_case_bytes is None or size <= max_case_bytes:
            break
        omitted += [t.name for t in taps if t.name in tap_names and tier(t)]
        tap_names = [n for n in tap_names if n not in omitted]
        size = write(tap_names)
    if max_case_bytes is not None and size > max_case_bytes:
        print(f"warning: {name}: {size} bytes even without {len(omitted)} taps "
              f"(budget {max_case_bytes})")

    meta = {
        "case": name,
        "model_type": model_type,
        "generator": generator_command(
            name,
            seed,
            repo_relative(out_dir),
            model_type=model_type,
            overrides=overrides,
            quant=quant,
            model_dir=None if model_dir is None else repo_relative(model_dir),
            prompt_tokens=prompt_tokens,
            max_case_bytes=max_case_bytes_flag,
            hf_layout=hf_layout,
            drop_params=drop_params,
        ),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "seed": seed,
        "dtype": "float32" if model_dir is None else main_dtype(model),
        # Half-precision activations (a float16 embedding output) hold the
        # case to that precision's level, whatever the weights' dtype.
        **({"activation_dtype": half} if (half := next(
            (d for d in ("float16", "bfloat16") if d in tap_dtypes.values()), None)) else {}),
        "quantization": config.get("quantization"),
        "prompt_len": prompt_len,
        "prefill_split": split,
        "greedy_tokens": GREEDY_TOKENS,
    }
    if model_dir is not None:
        meta["model_dir"] = repo_relative(model_dir)
    if hf_layout is not None:
        meta["hf_layout"] = hf_layout
    if drop_params:
        meta["dropped_params"] = list(drop_params)
    if routing is not None:
        meta["routing"] = routing
    meta["taps"] = tap_names
    meta["taps_omitted_for_size"] = omitted
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    size = directory_size(out_dir)
    summary = {
        "case": name,
        "bytes": size,
        "taps": len(tap_names),
        "taps_omitted": len(omitted),
        "tap_checks": len(tap_checks),
        "tap_check_max_diff": max(tap_checks.values(), default=0.0),
        "max_abs_prefill_decode_vs_logits": float(np.max(np.abs(pd_logits - logits))),
        "logits_std": float(np.std(logits)),
        "distinct_greedy": len(set(greedy.tolist())),
        "greedy_margin": greedy_margin,
        "routing": routing,
        "greedy": greedy.tolist(),
    }
    print(
        f"{name}: {summary['bytes']} bytes, {summary['taps']} taps"
        + (f" ({len(omitted)} per-head taps omitted for size)" if omitted else "")
        + f", {summary['tap_checks']} tap checks passed "
        f"(max diff {summary['tap_check_max_diff']:.3g}), "
        f"max|prefill_decode - logits| = {summary['max_abs_prefill_decode_vs_logits']:.3g}, "
        f"logits std = {summary['logits_std']:.3f}, "
        f"{summary['distinct_greedy']} distinct greedy tokens, "
        f"min greedy top-2 margin = {summary['greedy_margin']:.4f}"
        + (f", routing: {json.dumps(routing)}" if routing else "")
    )
    return summary


def compare_case(case_dir, before_dir):
    """Check a case's non-tap contents equal those of an earlier copy.

    model/ files must be byte-identical; every golden.safetensors entry of
    the earlier copy must exist with the same dtype, shape and bytes; the
    only new entries may be tap.*. Returns the number of entries compared.
    """
    case_dir, before_dir = Path(case_dir), Path(before_dir)
    for f in sorted((before_dir / "model").glob("*")) if (before_dir / "model").exists() else []:
        if f.read_bytes() != (case_dir / "model" / f.name).read_bytes():
            raise RuntimeError(f"{case_dir}: model/{f.name} differs from {f}")
    old = mx.load(str(before_dir / "golden.safetensors"))
    new = mx.load(str(case_dir / "golden.safetensors"))
    for key, value in old.items():
        if key not in new:
            raise RuntimeError(f"{case_dir}: {key} is missing")
        a, b = np.array(value), np.array(new[key])
        if value.dtype != new[key].dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            raise RuntimeError(f"{case_dir}: {key} differs from {before_dir}")
    extra = [k for k in new if k not in old and not k.startswith("tap.")]
    if extra:
        raise RuntimeError(f"{case_dir}: unexpected new entries {extra}")
    return len(old)


def find_case(name):
    for case in CASES:
        if case["name"] == name:
            return case
    raise SystemExit(f"unknown case {name!r}; known: {[c['name'] for c in CASES]}")


def parse_prompt_tokens(text):
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"--prompt-tokens: expected comma-separated integers, got {text!r}")


def parse_names(text):
    return [n for n in text.replace(" ", "").split(",") if n] if text else None


def case_job(case, args):
    """make_case arguments of a CASES entry; command-line options win."""
    return dict(
        model_type=case["model_type"],
        overrides=case["config"],
        quant=case.get("quantize"),
        seed=args.seed if args.seed is not None else case.get("seed", 0),
        hf_layout=args.hf_layout or case.get("hf_layout"),
        drop_params=parse_names(args.drop_params) or case.get("drop_params"),
    )


def seed_qualifies(summary):
    """Whether a case summary has no greedy or routing near-tie (see
    MIN_GREEDY_MARGIN) and more than one distinct greedy token."""
    routing = summary["routing"] or {}
    return (summary["greedy_margin"] >= MIN_GREEDY_MARGIN
            and summary["distinct_greedy"] > 1
            and routing.get("min_margin", math.inf) >= MIN_ROUTING_MARGIN
            and routing.get("min_group_margin", math.inf) >= MIN_ROUTING_MARGIN)


def search_seeds(job, count, prompt_tokens, budget):
    """Build the case with seeds 0..count-1 in a temporary directory and
    print the first seed that qualifies (seed_qualifies)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(count):
            try:
                summary = make_case(**{**job, "seed": seed, "out_dir": Path(tmp) / job["name"]},
                                    prompt_tokens=prompt_tokens, max_case_bytes=budget)
            except RuntimeError as e:  # e.g. a single repeated greedy token
                print(f"seed {seed}: {e}")
                continue
            if seed_qualifies(summary):
                print(f"{job['name']}: seed {seed} qualifies")
                return seed
    print(f"{job['name']}: no seed in 0..{count - 1} qualifies")
    return None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--all", action="store_true", help="regenerate every case in CASES")
    parser.add_argument("--case", help="case name (default with --model-dir: the directory name)")
    parser.add_argument("--model-type", help="mlx-lm model_type (omit to use the CASES entry)")
    parser.add_argument(
        "--model-dir",
        help="an existing mlx-lm model directory (config.json + safetensors) "
        "instead of a random model; it is not copied into the case",
    )
    parser.add_argument("--config-json", default="{}", help="config overrides as JSON")
    parser.add_argument("--quantize", type=int, metavar="BITS", help="quantize with BITS bits")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size")
    parser.add_argument(
        "--quant-overrides",
        default="{}",
        help="per-layer quantization as JSON: {path: {group_size, bits} | false}",
    )
    parser.add_argument(
        "--seed", type=int,
        help="random seed (default: the CASES entry's \"seed\", else 0)",
    )
    parser.add_argument(
        "--hf-layout", choices=sorted(HF_LAYOUTS),
        help="save model.safetensors in this Hugging Face layout (default: the "
        "CASES entry's \"hf_layout\", else mlx-lm's names)",
    )
    parser.add_argument(
        "--drop-params", metavar="NAMES",
        help="comma-separated parameter names left out of the saved model "
        "(default: the CASES entry's \"drop_params\")",
    )
    parser.add_argument(
        "--prompt-tokens", metavar="IDS", help="the prompt as comma-separated token ids "
        "(default: PROMPT_LEN random ids from the seed)"
    )
    parser.add_argument(
        "--max-case-bytes",
        type=int,
        help="size budget of a case directory; over it the per-head taps are "
        f"omitted (default {MAX_CASE_BYTES} for generated cases, none with "
        "--model-dir; 0: no limit)",
    )
    parser.add_argument(
        "--search-seeds", type=int, metavar="N",
        help="instead of writing the case, try seeds 0..N-1 (in a temporary "
        "directory) and report the first whose greedy continuation has no "
        f"near-tie (top-2 gap >= {MIN_GREEDY_MARGIN}), is not one repeated token "
        f"and, for MoE models, has no routing near-tie (>= {MIN_ROUTING_MARGIN})",
    )
    parser.add_argument("--out", help="output directory (default goldens/CASE)")
    parser.add_argument(
        "--goldens-dir",
        default=str(REPO_ROOT / "goldens"),
        help="root directory for --all and default --out",
    )
    parser.add_argument(
        "--compare-to",
        metavar="DIR",
        help="after writing, check each case's non-tap contents equal DIR/CASE's",
    )
    args = parser.parse_args(argv)
    if not args.all and not args.case and not args.model_dir:
        parser.error("one of --all, --case or --model-dir is required")
    if args.model_dir and (args.all or args.model_type or args.quantize is not None
                           or args.hf_layout or args.drop_params):
        parser.error("--model-dir cannot be combined with --all, --model-type, --quantize, "
                     "--hf-layout or --drop-params")
    if args.all and args.prompt_tokens:
        parser.error("--prompt-tokens cannot be combined with --all")
    if args.search_seeds is not None and (args.all or args.model_dir or args.seed is not None):
        parser.error("--search-seeds needs one generated case (no --all, --model-dir, --seed)")
    return args


def main(argv=None):
    args = parse_args(argv)
    mx.set_default_device(mx.cpu)
    goldens_dir = Path(args.goldens_dir)
    prompt_tokens = parse_prompt_tokens(args.prompt_tokens) if args.prompt_tokens else None
    if args.max_case_bytes is None:
        budget = None if args.model_dir else MAX_CASE_BYTES
    else:
        budget = args.max_case_bytes or None

    jobs = []
    if args.all:
        for case in CASES:
            jobs.append(dict(name=case["name"], out_dir=goldens_dir / case["name"],
                             **case_job(case, args)))
    elif args.model_dir:
        name = args.case or Path(args.model_dir).resolve().name
        jobs.append(dict(name=name, out_dir=Path(args.out) if args.out else goldens_dir / name,
                         model_dir=args.model_dir,
                         seed=args.seed if args.seed is not None else 0))
    else:
        out_dir = Path(args.out) if args.out else goldens_dir / args.case
        if args.model_type is None:
            case = find_case(args.case)
            jobs.append(dict(name=case["name"], out_dir=out_dir, **case_job(case, args)))
        else:
            quant = None
            if args.quantize is not None:
                quant = {
                    "bits": args.quantize,
                    "group_size": args.group_size,
                    "overrides": json.loads(args.quant_overrides),
                }
            jobs.append(dict(name=args.case, out_dir=out_dir, model_type=args.model_type,
                             overrides=json.loads(args.config_json), quant=quant,
                             seed=args.seed if args.seed is not None else 0,
                             hf_layout=args.hf_layout,
                             drop_params=parse_names(args.drop_params)))

    if args.search_seeds is not None:
        search_seeds(jobs[0], args.search_seeds, prompt_tokens, budget)
        return

    summaries = [
        make_case(prompt_tokens=prompt_tokens, max_case_bytes=budget,
                  max_case_bytes_flag=args.max_case_bytes, **job)
        for job in jobs
    ]
    if len(summaries) > 1:
        total = sum(s["bytes"] for s in summaries)
        print(f"{len(summaries)} cases, {total} bytes in total")
    if args.compare_to:
        for job in jobs:
            if not (Path(args.compare_to) / job["name"]).exists():
                print(f"{job['name']}: not in {args.compare_to} (a new case), nothing to compare")
                continue
            count = compare_case(job["out_dir"], Path(args.compare_to) / job["name"])
            print(f"{job['name']}: model/ and {count} golden entries identical to {args.compare_to}")


# Model types whose widths fuzz_configs.py keeps as in the base case (sizes
# tied to many others); case modules add theirs.
FUZZ_FIXED_DIMS = set()


def _register_case_modules():
    """Load `cases/*.py` beside this script. Each module defines
    `register(mg)`, which receives this module and extends its tables in
    place: `mg.CASES`, `mg.TYPE_DEFAULTS`, `mg.TYPE_UNUSED_BASE_KEYS`,
    `mg.TAPS` (insert rows where they belong in forward order), and the
    family sets (`mg.POST_NORM_TYPES = mg.POST_NORM_TYPES | {...}`), so that
    families of model types keep their cases, defaults and tap rows in one
    file each."""
    import importlib.util

    for path in sorted((Path(__file__).resolve().parent / "cases").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"golden_cases_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.register(sys.modules[__name__])
    names = [c["name"] for c in CASES]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RuntimeError(f"two CASES entries named {dupes}")


_register_case_modules()


if __name__ == "__main__":
    main(sys.argv[1:])
