"""How long a generation run should take, from its settings as `neuromf generate` and the Generate dock take
them: `neuromf.estimates.generation_estimate` with the adapters' grid and network calls per FLAIR step read from
their sidecars (here, above `models`, where the sidecars are understood)."""

from __future__ import annotations

from pathlib import Path

from neuromf.estimates import Estimate, GenerationWork, generation_estimate, generation_work


def adapter_grid(adapter: str | Path, mode: str) -> tuple[int, ...] | None:
    """The model grid (voxels per axis) an adapter draws on, read from its sidecar; None when it cannot be read
    (a half-typed field, a missing adapter: the run itself reports it)."""
    from neuromf.models.adapter_meta import AdapterMeta, resolve_adapter_dir

    try:
        return tuple(AdapterMeta.load(resolve_adapter_dir(adapter, "joint" if mode == "joint" else
                                                          "conditional")).prep.shape)
    except Exception:  # any unreadable or half-typed adapter: no grid, no scaling
        return None


def flair_calls_per_step(adapter: str | Path, mode: str, render: str | Path | None, guidance: float | None) -> int:
    """Network calls per step of a run's FLAIR pass: 2 under mask guidance (the given one, else the conditional
    adapter's own: its inpainting guidance in the inpaint mode), else 1; 1 when the sidecar cannot be read."""
    from neuromf.generation.inpaint import network_calls_per_run
    from neuromf.models.adapter_meta import AdapterMeta, resolve_adapter_dir

    conditional = render if mode == "joint" else adapter
    if not conditional:
        return 1
    try:
        meta = AdapterMeta.load(resolve_adapter_dir(conditional, "conditional"))
    except Exception:  # any unreadable or half-typed adapter: the plain rate
        return 1
    scale = {"inpaint": meta.inpaint_guidance_scale, "joint": meta.render_guidance_scale}.get(
        mode, meta.guidance_scale)(guidance)
    return network_calls_per_run(1, scale)


def pace_recordable(adapter: str | Path, mode: str, device: str) -> bool:
    """Whether a finished generation run may record this machine's pace (`neuromf.estimates.record_pace`): a CPU
    run on the grid the rates were measured on, whose work is then counted in the rates' seconds."""
    from neuromf.estimates import measured_rates, runs_on_cpu

    grid = adapter_grid(adapter, mode)
    rate = measured_rates().get("generation") or {}
    return runs_on_cpu(device) and grid is not None and list(grid) == list(rate.get("grid") or [])


def _run_settings(adapter: str | Path, mode: str, render: str | Path | None, guidance: float | None,
                  prior_lesions: bool) -> dict:
    """`generation_work`'s settings of a run, read from its adapters' sidecars."""
    return {"render": bool(render), "grid": adapter_grid(adapter, mode),
            "flair_calls": flair_calls_per_step(adapter, mode, render, guidance),
            "flair_passes": 2 if mode == "conditional" and prior_lesions else 1}


def generation_run_work(adapter: str | Path, mode: str, pairs: int, steps: int, render: str | Path | None = None,
                        guidance: float | None = None, prior_lesions: bool = False) -> GenerationWork | None:
    """`generation_work` of a run with these settings, as `generate` and the Generate widget take them: the
    adapter's grid and its FLAIR pass's network calls read from the sidecars (`render`: the conditional adapter of
    a rendered joint run); `prior_lesions`: conditional pairs whose lesions are drawn from the prior (two passes)."""
    return generation_work(pairs, steps, mode, **_run_settings(adapter, mode, render, guidance, prior_lesions))


def generation_run_estimate(adapter: str | Path, mode: str, pairs: int, steps: int, render: str | Path | None = None,
                            guidance: float | None = None, prior_lesions: bool = False,
                            load: tuple[float, int] | None = None) -> Estimate | None:
    """`generation_run_work` at `load` (default: now) and this machine's recorded pace, as `generation_estimate`
    says it."""
    return generation_estimate(pairs, steps, mode, load=load,
                               **_run_settings(adapter, mode, render, guidance, prior_lesions))


__all__ = ["adapter_grid", "flair_calls_per_step", "generation_run_estimate", "generation_run_work",
           "pace_recordable"]
