"""A training checkpoint's state, written without pickle: tensors in safetensors, the rest JSON.

    step-N/model.safetensors        the learner's weights (tied ones stored once)
    step-N/optimizer.safetensors    AdamW's per-parameter tensors (state.<param>.<name>)
    step-N/trainer.json             AdamW's param groups and scalar state, the LR scheduler's
                                    state, the gradient scaler's (fp16), and the run's identity
    step-N/process-R.safetensors    process R's RNG states (torch, CUDA) and AdaSPEC's window
    step-N/process-R.json           process R's Python and NumPy RNG states
    step-N/progress.json            the data position, written last (`runs.save_checkpoint`)

accelerate's `save_state` pickles what is registered with it (the scheduler becomes
custom_checkpoint_0.pkl, read back with weights_only=False: a crafted file runs code on
--resume); nothing here can hold code, so a checkpoint from anywhere is data, and damage is a
one-line error naming the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from adaspec.errors import UserError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"


def process_files(rank: int) -> tuple[str, str]:
    return f"process-{rank}.safetensors", f"process-{rank}.json"


def damaged(path: Path, err: BaseException | str) -> UserError:
    reason = err if isinstance(err, str) else \
        f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:100]}"
    return UserError(f"checkpoint file {path} is damaged ({reason}); delete the checkpoint "
                     f"folder {path.parent} to resume from an earlier one, or start a new run")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise damaged(path, err) from None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged(path, err) from None
    if not isinstance(data, dict):
        raise damaged(path, "not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# Saving


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (its tensors by flat name, everything else as JSON)."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalar_state": scalars}


def save(accelerator, path: Path, model: torch.nn.Module, optimizer, scheduler, window,
         identity: dict) -> None:
    """Write process `accelerator.process_index`'s part of a checkpoint into `path` (the main
    process writes the shared weights and optimizer state; every process its RNG and window)."""
    path.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index
    if accelerator.is_main_process:
        save_model(model, str(path / MODEL_FILE))
        tensors, rest = _split_optimizer(optimizer.state_dict())
        save_file(tensors, str(path / OPTIMIZER_FILE))
        scaler = getattr(accelerator, "scaler", None)
        (path / TRAINER_FILE).write_text(json.dumps({
            "identity": identity,
            "optimizer": rest,
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "scaler": scaler.state_dict() if scaler is not None else None,
        }))
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    for i, delta in enumerate(window):
        tensors[f"window.{i}"] = delta.detach().cpu().contiguous()
    tensor_file, json_file = process_files(rank)
    save_file(tensors, str(path / tensor_file))
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    (path / json_file).write_text(json.dumps({
        "python": [version, list(py_state), py_gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }))


# ---------------------------------------------------------------------------------------------
# Loading


def read_identity(path: Path) -> dict:
    """The identity a checkpoint was written with (run id and config hash), from trainer.json."""
    if not (path / TRAINER_FILE).is_file():
        raise UserError(
            f"checkpoint {path} has no {TRAINER_FILE}: written by an adaspec that pickled its "
            "state (refused: a pickle can run code), or damaged; start a new run (new --out)")
    identity = _json(path / TRAINER_FILE).get("identity")
    if not isinstance(identity, dict):
        raise damaged(path / TRAINER_FILE, "no run identity")
    return identity


def _optimizer_state(path: Path) -> dict:
    tensors = _tensors(path / OPTIMIZER_FILE)
    rest = _json(path / TRAINER_FILE).get("optimizer")
    if not isinstance(rest, dict) or not isinstance(rest.get("param_groups"), list):
        raise damaged(path / TRAINER_FILE, "no optimizer param groups")
    state: dict[int, dict] = {}
    for param, values in (rest.get("scalar_state") or {}).items():
        state.setdefault(int(param), {}).update(values)
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def load(accelerator, path: Path, model: torch.nn.Module, optimizer, scheduler, window) -> None:
    """Restore what `save` wrote into the live learner and this process's RNG and window."""
    trainer = _json(path / TRAINER_FILE)
    try:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False,
                                         device=str(next(model.parameters()).device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise damaged(path / MODEL_FILE, err) from None
    if missing or unexpected:
        raise damaged(path / MODEL_FILE, f"its weights do not fit this model: missing "
                      f"{sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]}")
    try:
        optimizer.load_state_dict(_optimizer_state(path))
        scheduler.load_state_dict({**trainer["scheduler"],
                                   "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and trainer.get("scaler") is not None:
            scaler.load_state_dict(trainer["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise damaged(path / TRAINER_FILE, err) from None
    tensor_file, json_file = process_files(accelerator.process_index)
    tensors = _tensors(path / tensor_file)
    rngs = _json(path / json_file)
    try:
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                               key=lambda k: int(k.rsplit(".", 1)[1]))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        version, py_state, py_gauss = rngs["python"]
        random.setstate((version, tuple(py_state), py_gauss))
        name, keys, pos, has_gauss, gauss = rngs["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise damaged(path / json_file, err) from None
    device = next(model.parameters()).device
    n = sum(1 for k in tensors if k.startswith("window."))
    window.extend(tensors[f"window.{i}"].to(device) for i in range(n))
