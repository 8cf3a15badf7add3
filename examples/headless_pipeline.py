"""Headless NeuroMF from Python: mask test -> LoRA fine-tuning -> generate pairs -> evaluate them.

As is, it runs on the shipped 3 mm data and weights (`embedded-3mm`, about 5 minutes on 2 CPU cores). For your
own data, pass a config whose `data.data_dir`, `model.vae` and grid name your files (see backend/neuromf/configs/).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import neuromf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="joint_3mm", help="YAML file or packaged config name")
    parser.add_argument("--base", default="embedded-3mm",
                        help="stage-1 model folder, 'embedded-3mm' (the 3 mm set of joint_3mm) or 'embedded' (2 mm)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
    parser.add_argument("--n", type=int, default=4, help="pairs to generate")
    parser.add_argument("--out", default="runs/example", help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)

    cfg = neuromf.load_config(args.config)
    cases = neuromf.discover_cases(cfg.data.data_dir)
    print(f"{len(cases)} cases, {sum(c.mask is not None for c in cases)} with a lesion mask")

    # the mask test: which mask representation round-trips best through this VAE on this grid
    result = neuromf.mask_test(cfg.data.data_dir, vae=cfg.model.vae, vae_preset=cfg.model.vae_preset,
                               shape=tuple(cfg.data.shape), spacing=tuple(cfg.data.spacing),
                               out=out / "mask_vae_test.json")
    print(f"mask test decision: {result['decision']} ({result['reason']})")

    # stage 2 with a progress callback; another thread (a GUI, a timer) may set `stop` to end it early
    stop = threading.Event()

    def on_event(event: neuromf.TrainEvent) -> None:
        if event.kind == "epoch":
            print(f"  step {event.step}/{event.total_steps}: loss {event.loss:.4f}")

    run = neuromf.fine_tune(args.config, args.base, on_event=on_event, stop=stop, overwrite=True,
                            overrides={"data.mask_test": str(out / "mask_vae_test.json"),
                                       "training.max_steps": args.steps, "training.output_dir": str(out / "run")})
    print(f"adapter: {run.export} (step {run.step})")

    pairs = neuromf.generate_pairs(run.export, n=args.n, out=out / "generated", seed=0)
    print(f"generated {len(pairs)} pairs; mask voxels: {[int(p.mask.sum()) for p in pairs]}")

    metrics = neuromf.evaluate(out / "generated", adapter=run.export, data=cfg.data.data_dir,
                               out=out / "metrics.json")
    like = metrics["lesion_like"]
    print(f"lesion-like: {like['summary']['n_lesion_like']}/{like['summary']['n']}; wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
