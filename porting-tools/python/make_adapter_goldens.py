"""Adapter goldens: mlx-lm's LoRA / DoRA / QLoRA training on tiny models.

For each case this loads a tiny golden model with mlx-lm, turns its linear
layers into LoRA (or DoRA) layers with `linear_to_lora_layers` under a fixed
seed, saves that initial adapter, then runs mlx-lm's own trainer
(`mlx_lm.tuner.trainer.train`) for a few steps over fixed batches (token
sequences made with a fixed NumPy seed, padded and masked by mlx-lm's
`iterate_batches`) and records:

- `init.safetensors`: the adapter before training (lmspec starts from it);
- `adapters.safetensors` + `adapter_config.json`: the trained adapter in
  mlx-lm's layout (what `mlx_lm.lora` writes);
- `golden.safetensors`: the batches (`batch.K`, `lengths.K`), the loss of
  every step (`losses`), a probe sequence and the adapted and fused models'
  logits for it (`probe`, `adapted_logits`, `fused_logits`);
- `meta.json`: the command, versions and training settings.

Run from the repository root:

    .venv/bin/python porting-tools/python/make_adapter_goldens.py --out goldens/adapters

`--check-lmspec DIR` instead loads lmspec-written files in mlx-lm and prints
the largest logit difference against lmspec's own (see docs/adapters.md):
DIR holds `adapter/` (an lmspec-trained adapter), optionally `fused/` (an
lmspec-fused model folder), `base` (a file naming the base model folder)
and `logits.safetensors` with `probe`, `adapted_logits` and `fused_logits`.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import mlx_lm
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, iterate_batches, train
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers, load_adapters
from mlx_lm.utils import load_model

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    # name: base model, fine-tune type, optimizer, its settings
    "lora": dict(base="goldens/llama/model", kind="lora", optimizer="adam",
                 optimizer_config={}, learning_rate=2e-3, num_layers=2, rank=4, scale=10.0),
    "dora": dict(base="goldens/llama/model", kind="dora", optimizer="adamw",
                 optimizer_config={"weight_decay": 0.05}, learning_rate=2e-3, num_layers=2,
                 rank=4, scale=10.0),
    "qlora": dict(base="goldens/llama_q4/model", kind="lora", optimizer="sgd",
                  optimizer_config={"momentum": 0.9}, learning_rate=1e-2, num_layers=1,
                  rank=8, scale=20.0),
    # A mixture of experts: the router and the stacked experts take
    # adapters too (LoRALinear and LoRASwitchLinear).
    "moe": dict(base="goldens/qwen3_moe/model", kind="lora", optimizer="adam",
                optimizer_config={}, learning_rate=2e-3, num_layers=2, rank=4, scale=10.0),
    # Gradients accumulated over 2 batches; a warmup then cosine schedule.
    "lora_accum": dict(base="goldens/llama/model", kind="lora", optimizer="adam",
                       optimizer_config={}, learning_rate=2e-3, num_layers=1, rank=4, scale=10.0,
                       grad_accumulation_steps=2,
                       lr_schedule={"name": "cosine_decay", "arguments": [4e-3, 8, 1e-4],
                                    "warmup": 2, "warmup_init": 1e-4}),
}

STEPS = 20
BATCH = 2
N_SEQS = 8
SEED = 0


def make_sequences(rng, vocab):
    """(tokens, offset) pairs; every second one masks a prompt."""
    out = []
    for k in range(N_SEQS):
        n = int(rng.integers(6, 24))
        toks = [int(t) for t in rng.integers(1, vocab, size=n)]
        offset = int(rng.integers(1, n // 2)) if k % 2 else 0
        out.append((toks, offset))
    return out


def record_batches(seqs):
    """The batches mlx-lm's iterate_batches makes (sorted by length, grouped,
    shuffled with NumPy's seed), STEPS of them."""
    np.random.seed(SEED)
    it = iterate_batches(seqs, BATCH, 2048, loop=True)
    return [next(it) for _ in range(STEPS)]


def adapter_config(case):
    return {
        "fine_tune_type": case["kind"],
        "num_layers": case["num_layers"],
        "lora_parameters": {"rank": case["rank"], "scale": case["scale"], "dropout": 0.0},
    }


def make_optimizer(case):
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[case["optimizer"]]
    lr = build_schedule(case["lr_schedule"]) if "lr_schedule" in case else case["learning_rate"]
    return cls(learning_rate=lr, **case["optimizer_config"])


def fuse(model):
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return model


def make_case(name, case, out):
    dest = out / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    base = ROOT / case["base"]
    model, _ = load_model(base)
    vocab = model.args.vocab_size
    mx.random.seed(SEED)
    model.freeze()
    lp = adapter_config(case)
    linear_to_lora_layers(model, case["num_layers"], lp["lora_parameters"],
                          use_dora=case["kind"] == "dora")
    init = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(dest / "init.safetensors"), init)

    rng = np.random.default_rng(SEED)
    seqs = make_sequences(rng, vocab)
    batches = record_batches(seqs)
    fixed = iter(batches)

    def fixed_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        yield from fixed

    losses = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            losses.append(info["train_loss"])

    args = TrainingArgs(batch_size=BATCH, iters=STEPS, steps_per_report=1, steps_per_eval=10**6,
                        steps_per_save=10**6, adapter_file=str(dest / "adapters.safetensors"),
                        grad_accumulation_steps=case.get("grad_accumulation_steps", 1))
    train(model=model, optimizer=make_optimizer(case), train_dataset=seqs, val_dataset=None,
          args=args, iterate_batches=fixed_batches, training_callback=Record())
    assert len(losses) == STEPS, losses
    with open(dest / "adapter_config.json", "w") as f:
        json.dump(adapter_config(case), f, indent=4)

    probe = mx.array(rng.integers(1, vocab, size=(1, 16)).astype(np.int32))
    model.eval()
    adapted = model(probe)
    # The trained adapter as mlx-lm loads it into a fresh base.
    fresh, _ = load_model(base)
    load_adapters(fresh, str(dest))
    reloaded = fresh(probe)
    assert mx.allclose(adapted, reloaded, atol=1e-5).item()
    fused = fuse(fresh)(probe)

    golden = {"losses": mx.array(np.array(losses, dtype=np.float32)), "probe": probe,
              "adapted_logits": adapted, "fused_logits": fused}
    for k, (b, lengths) in enumerate(batches):
        golden[f"batch.{k}"] = b
        golden[f"lengths.{k}"] = lengths
    mx.save_safetensors(str(dest / "golden.safetensors"), golden)
    meta = {
        "case": name,
        "generator": f".venv/bin/python porting-tools/python/make_adapter_goldens.py --out {out}",
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "base": case["base"],
        "seed": SEED,
        "steps": STEPS,
        "batch_size": BATCH,
        "optimizer": case["optimizer"],
        "optimizer_config": case["optimizer_config"],
        "learning_rate": case["learning_rate"],
        "lr_schedule": case.get("lr_schedule"),
        "grad_accumulation_steps": case.get("grad_accumulation_steps", 1),
        **adapter_config(case),
    }
    with open(dest / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    print(name, "losses", [round(x, 5) for x in losses])


def check_lmspec(d):
    d = Path(d)
    base = Path((d / "base").read_text().strip())
    ref = mx.load(str(d / "logits.safetensors"))
    probe = ref["probe"]
    model, _ = load_model(base)
    load_adapters(model, str(d / "adapter"))
    model.eval()
    diff = mx.abs(model(probe) - ref["adapted_logits"]).max().item()
    print(f"adapter: max |mlx-lm - lmspec| = {diff:.3g}")
    worst = diff
    if (d / "fused").exists():
        fused, _ = load_model(d / "fused")
        diff = mx.abs(fused(probe) - ref["fused_logits"]).max().item()
        print(f"fused: max |mlx-lm - lmspec| = {diff:.3g}")
        worst = max(worst, diff)
    return worst


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "goldens/adapters"))
    p.add_argument("--case", action="append")
    p.add_argument("--check-lmspec")
    p.add_argument("--tolerance", type=float, default=1e-4)
    a = p.parse_args()
    if a.check_lmspec:
        worst = check_lmspec(a.check_lmspec)
        sys.exit(0 if worst <= a.tolerance else 1)
    out = Path(a.out)
    for name in a.case or CASES:
        make_case(name, CASES[name], out)


if __name__ == "__main__":
    main()
