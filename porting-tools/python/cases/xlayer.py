"""Golden cases of cross-layer dataflow: nanbeige (the layer stack looped
with shared weights).

Registered last (file-name order): a looped stack calls each mlx-lm layer
module more than once, so per-layer taps, which bind one call of one
module, are turned off for these types; the logits and the cached path
are what the cases check.
"""
import dataclasses

# Types whose layer stack is not one pass of llama's layers.
OWN_LAYOUT = {"nanbeige"}

TYPE_DEFAULTS = {
    "nanbeige": {"head_dim": 16},
}

CASES = [
    # Two loops over two layers: four layer calls, four caches, the final
    # norm between the loops and at the end.
    {"name": "nanbeige", "model_type": "nanbeige", "config": {"num_loops": 2}, "seed": 1},
    # Three loops given as per-loop loss weights, no norm between loops.
    {"name": "nanbeige_loss_weights", "model_type": "nanbeige",
     "config": {"loop_loss_weights": [0.5, 0.5], "skip_loop_final_norm": True}, "seed": 1},
]


def register(mg):
    mg.TYPE_DEFAULTS.update(TYPE_DEFAULTS)
    mg.CASES += CASES
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | OWN_LAYOUT

    def one_pass_only(row):
        before = row.applies

        def applies(model_type, config):
            if model_type in OWN_LAYOUT:
                return False
            return before is None or before(model_type, config)

        return dataclasses.replace(row, applies=applies)

    mg.TAPS[:] = [one_pass_only(r) if "{i}" in r.module else r for r in mg.TAPS]
