"""Does a refactor change what the model computes? Two commits, one config, the same weights and batch.

    python benchmarks/compare_checkouts.py --ref 5ab49f5 --new 5dc9d51 \
        [--config configs/prototype/proto_R18_FPN_GN_neu_cpu.yaml] [--steps 3] [--name refactor_equivalence]

Each commit is checked out into a temporary git worktree and run in its own process (its own ``steel_fsd``).
The reference builds the model from the config's seed and draws one training batch; every run then loads
those weights and that batch, and takes ``--steps`` plain SGD steps, recording every loss and every
parameter's gradient norm at each step. Four runs: the reference, the reference again (is one checkout
deterministic?), the new commit, and the reference with every weight multiplied by (1 + 1e-7 * noise), the
size of float32 rounding. If the new commit's differences from the reference are of the size of that
perturbation, the refactor only reorders float operations; training from scratch amplifies such differences
into seed-to-seed variation within a few iterations, so a re-trained row cannot repeat its old number to the
digit. Writes ``benchmarks/results/<name>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/prototype/proto_R18_FPN_GN_neu_cpu.yaml"


def child(work: Path, config: str, data: str, mode: str, steps: int, perturb: float) -> dict:
    """One run inside a checkout (cwd and PYTHONPATH are the checkout): ``init`` or ``step``."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from steel_fsd.data import register_all
    from steel_fsd.engine.setup import build_config, finalize_config
    from steel_fsd.engine.trainer import Trainer

    register_all(data)
    cfg = build_config(config, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"])
    finalize_config(cfg)
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    if mode == "init":
        torch.save(model.state_dict(), work / "init.pth")
        torch.save(next(iter(Trainer.build_train_loader(cfg))), work / "batch.pth")
        return {"parameters": len(model.state_dict())}
    weights = torch.load(work / "init.pth")
    if perturb:
        g = torch.Generator().manual_seed(7)
        weights = {k: v * (1 + perturb * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                   for k, v in weights.items()}
    model.load_state_dict(weights)
    batch = torch.load(work / "batch.pth", weights_only=False)
    model.train()
    out = []
    for step in range(steps):
        torch.manual_seed(1000 + step)  # the samplers of proposals and ROIs draw the same numbers in every run
        with EventStorage(step):
            losses = model(batch)
        model.zero_grad()
        sum(losses.values()).backward()
        out.append({"losses": {k: float(v.detach()) for k, v in losses.items()},
                    "grad_norm": {n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}})
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= cfg.SOLVER.BASE_LR * p.grad
    return {"steps": out}


def run_child(checkout: Path, work: Path, args, mode: str, perturb: float = 0.0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--work", str(work),
           "--config", args.config, "--data", args.data, "--steps", str(args.steps), "--perturb", str(perturb)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((work / "child.json").read_text())


def relative_gap(a: dict, b: dict, key: str) -> float:
    """The largest relative difference between two runs' values of one step (losses or gradient norms);
    gradients below 1e-6 (numerically zero) are left out."""
    gaps = [abs(a[key][n] - b[key][n]) / abs(a[key][n]) for n in a[key] if abs(a[key][n]) > 1e-6]
    return max(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", help="the commit before the change")
    ap.add_argument("--new", default="HEAD", help="the commit after it")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--name", default="refactor_equivalence")
    ap.add_argument("--child", choices=("init", "step"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--perturb", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if args.child:
        work = Path(args.work)
        result = child(work, args.config, args.data, args.child, args.steps, args.perturb)
        (work / "child.json").write_text(json.dumps(result))
        return
    if not args.ref:
        ap.error("--ref is required")
    sys.path.insert(0, str(REPO))
    from benchmarks.common import save

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {}
        for role in ("ref", "new"):
            commit = getattr(args, role)
            trees[role] = tmp / role
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(trees[role]), commit],
                           check=True, capture_output=True)
        try:
            work = tmp / "work"
            work.mkdir()
            run_child(trees["ref"], work, args, "init")
            runs = {"ref": run_child(trees["ref"], work, args, "step"),
                    "ref_again": run_child(trees["ref"], work, args, "step"),
                    "new": run_child(trees["new"], work, args, "step"),
                    "ref_perturbed_1e-7": run_child(trees["ref"], work, args, "step", perturb=1e-7)}
        finally:
            for t in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(t)], capture_output=True)
    steps = []
    for i in range(args.steps):
        ref = runs["ref"]["steps"][i]
        row = {"step": i, "losses": {name: r["steps"][i]["losses"] for name, r in runs.items()}}
        for name in ("ref_again", "new", "ref_perturbed_1e-7"):
            other = runs[name]["steps"][i]
            row[f"max_relative_gap_{name}"] = {"losses": relative_gap(ref, other, "losses"),
                                               "grad_norm": relative_gap(ref, other, "grad_norm")}
        steps.append(row)
        print(f"step {i}: " + ", ".join(f"{name} loss gap {row[f'max_relative_gap_{name}']['losses']:.2e}, "
                                        f"grad gap {row[f'max_relative_gap_{name}']['grad_norm']:.2e}"
                                        for name in ("ref_again", "new", "ref_perturbed_1e-7")))
    save(args.name, {"command": "python benchmarks/compare_checkouts.py " + " ".join(sys.argv[1:]),
                     "ref": args.ref, "new": args.new, "config": args.config, "steps": steps})


if __name__ == "__main__":
    main()
