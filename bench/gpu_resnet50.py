#!/usr/bin/env python3
"""ResNet-50 training images/s on one GPU: our model under Keras-JAX next to torchvision.

Both sides train on one synthetic batch held on the device (224x224, batch 256,
bfloat16 compute, SGD with momentum), timed after warm-up:

- ``keras_jax``: ``pipeline.models.build("resnet50")`` (keras.applications ResNet50
  with our preprocessing and head) under the ``mixed_bfloat16`` policy, trained by
  one ``jax.jit``-compiled step over Keras's stateless API (what ``model.fit``
  compiles, without its per-step callbacks);
- ``torch_eager`` / ``torch_compile``: torchvision's resnet50, channels_last,
  ``torch.autocast(bfloat16)``, eager and under ``torch.compile`` (where it works).

Needs only JAX, Keras (with optree and namex), NumPy, and PyTorch with torchvision
for the peer: no TensorFlow, no Hydra. Prints one JSON object with each rate and
``ratio`` (keras_jax over the best torch rate). About 3 minutes on an H100/H200:

    python bench/gpu_resnet50.py                 # --batch 256 --size 224 --steps 30
    python bench/gpu_resnet50.py --no-torch      # Keras-JAX only
    python bench/gpu_resnet50.py --batch 2 --size 64 --steps 2 --warmup 1   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"  # before anything imports keras
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's `pipeline`

NUM_CLASSES = 1000
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # on the [0, 1] scale, as pipeline.models expects
IMAGENET_STD = [0.229, 0.224, 0.225]


def keras_jax_rate(*, batch: int, size: int, steps: int, warmup: int) -> dict:
    """Images/s of our ResNet-50 under Keras-JAX, mixed bfloat16, one jitted train step."""
    import jax
    import keras
    import numpy as np

    from pipeline import models
    from pipeline.bench import seed_without_tensorflow

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    seed_without_tensorflow(0)  # keras.utils.set_random_seed would import TensorFlow if present
    model = models.build(
        "resnet50",
        num_classes=NUM_CLASSES,
        input_shape=(size, size, 3),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, weight_decay=5e-5)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_and_state(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits), non_trainable

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    def train_step(trainable, non_trainable, opt_vars, x, y):
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars, loss

    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    y = jax.device_put(rng.integers(0, NUM_CLASSES, batch).astype("int32"))
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    started = time.perf_counter()
    for _ in range(warmup):
        *state, loss = step(*state, x, y)
    loss.block_until_ready()
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        *state, loss = step(*state, x, y)
    loss.block_until_ready()
    seconds = time.perf_counter() - started
    device = jax.devices()[0]
    return {
        "framework": f"keras {keras.__version__}, jax {jax.__version__}",
        "device": getattr(device, "device_kind", str(device)),
        "images_per_s": round(steps * batch / seconds, 1),
        "warmup_s": round(compile_s, 1),
        "final_loss": float(loss),
    }


def torch_rate(*, batch: int, size: int, steps: int, warmup: int, compile: bool) -> dict:
    """Images/s of torchvision's resnet50, channels_last, autocast bfloat16 (as
    /work/shared/bench/torch_resnet50_gpu.py times it)."""
    import torch
    import torchvision

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=NUM_CLASSES)
    model = model.to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    x = torch.rand(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    if compile:
        step = torch.compile(step)

    def timed(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    compile_s, seconds = timed(warmup), timed(steps)
    return {
        "framework": f"torch {torch.__version__}, torchvision {torchvision.__version__}",
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "images_per_s": round(steps * batch / seconds, 1),
        "warmup_s": round(compile_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="pixels, square")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation)")
    p.add_argument("--no-torch", action="store_true", help="Keras-JAX only")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    a = p.parse_args()
    if a.batch < 1 or a.size < 32 or a.steps < 1 or a.warmup < 1:
        p.error(f"need batch >= 1, size >= 32, steps and warmup >= 1; got {vars(a)}")
    shape = {"batch": a.batch, "size": a.size, "steps": a.steps, "warmup": a.warmup}
    result = {**shape, "model": "resnet50", "dtype": "bfloat16"}
    result["keras_jax"] = keras_jax_rate(**shape)
    print(json.dumps({"keras_jax": result["keras_jax"]}), file=sys.stderr, flush=True)
    torch_runs = [] if a.no_torch else [("torch_eager", False)]
    if not a.no_torch and not a.no_compile:
        torch_runs.append(("torch_compile", True))
    for name, compiled in torch_runs:
        try:
            result[name] = torch_rate(**shape, compile=compiled)
        except ImportError as err:
            result[name] = {"skipped": f"{type(err).__name__}: {err}"}
            break
        except Exception as err:  # torch.compile fails on some stacks: report, go on
            result[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    torch_rates = [result.get(name, {}).get("images_per_s") for name, _ in torch_runs]
    torch_rates = [r for r in torch_rates if isinstance(r, float)]
    best = max(torch_rates, default=None)
    result["ratio"] = round(result["keras_jax"]["images_per_s"] / best, 3) if best else None
    result["ratio_is"] = "keras_jax images/s over the best torch images/s"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
