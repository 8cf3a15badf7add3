"""Generation: everything that turns trained models into volumes, pairs and inpainted scans.

    images       base-model volumes, `GeneratedPair`, `write_pairs`, the model grid's affine
    guidance     velocity guidance: against the empty mask's path (joint), by the mask (conditional)
    joint        joint FLAIR + mask pairs: sampling, decoding, two-stage rendering by a conditional adapter,
                 calibrating the joint guidance
    conditional  the loaded conditional adapter; FLAIRs for given or prior-drawn masks
    inpaint      a lesion put into a real healthy scan
    estimates    a generation run's expected time from its settings (the adapters' grid and guidance)

The package sits above `models` and `eval` and below `pipelines` (whose ablation trains, then generates); it
imports no training code. Nothing is imported here: import the submodules.
"""
