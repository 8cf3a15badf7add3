"""Bad inputs through the CLI entry points that read data, weights or configs or write outputs (issue 10).

Each row of the table builds one bad input in a fresh folder and runs `neuromf.cli.main([...])` in-process.
Every case must: exit non-zero, print a message that names the offending file and the problem, print no
Python traceback, leave every input file byte-identical (sha256) and leave no output behind (the whole
folder tree, the latent cache aside, is the same before and after). Volumes are 16^3 at 12 mm, models the
`tiny` presets, so a case takes well under a second to a few seconds on CPU.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from neuromf.cli import main

SHAPE = (16, 16, 16)
SPACING = 12.0
AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])
GRID_ARGS = ["--shape", *(str(s) for s in SHAPE), "--spacing", *([str(SPACING)] * 3)]


# --------------------------------------------------------------------------------------------- tiny files
def brain(value: float = 100.0) -> np.ndarray:
    """A bright ball in a dark box: enough structure for the brain-centred crop and intensity scaling."""
    grid = np.indices(SHAPE).astype(np.float32) - (np.array(SHAPE, dtype=np.float32)[:, None, None, None] - 1) / 2
    return np.where((grid ** 2).sum(0) < 36, value, 5.0).astype(np.float32)


def lesion() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[6:10, 6:10, 6:10] = 1
    return mask


def nii(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def pickle_payload(path: Path) -> Path:
    """A pickle that would run code on load (os.system): must be refused, never unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path.write_bytes(pickle.dumps({"weight": Exploit()}))
    return path


def torch_pickle(path: Path) -> Path:
    """A torch.save zip archive that holds a Python object besides tensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.zeros(2), "obj": Path("x")}, path)
    return path


def bids(root: Path, subjects: dict[str, tuple[np.ndarray | None, np.ndarray | None]]) -> Path:
    """sub-XX/anat/sub-XX_FLAIR.nii.gz (+ _FLAIR_roi) for each (image, mask); None leaves the file out."""
    for sub, (image, mask) in subjects.items():
        anat = root / f"sub-{sub}" / "anat"
        if image is not None:
            nii(anat / f"sub-{sub}_FLAIR.nii.gz", image)
        if mask is not None:
            nii(anat / f"sub-{sub}_FLAIR_roi.nii.gz", mask)
    return root


def good_fcd(root: Path, sub: str = "01") -> Path:
    return bids(root, {sub: (brain(), lesion())})


# --------------------------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_vae_dir) -> dict[str, Path]:
    """An untrained tiny base model and a LoRA adapter on it, saved in the real formats (no training needed:
    every case fails while loading, before a model would be used)."""
    from neuromf.io.nifti import Preprocessing
    from neuromf.models.adapter_meta import AdapterMeta
    from neuromf.models.flow_model import load_flow_model, save_flow_model
    from neuromf.models.lora import WIDENED_MODULES, inject_lora, save_adapter, widen_io_channels
    from neuromf.models.unet import MeanFlowUNet
    from neuromf.vae import MAISIVAEWrapper

    root = tmp_path_factory.mktemp("models")
    vae = MAISIVAEWrapper.from_file(tiny_vae_dir, preset="tiny")
    prep = Preprocessing(shape=SHAPE, spacing=(SPACING,) * 3)
    latent = [4, *(s // 4 for s in SHAPE)]
    meta = {"vae": str(tiny_vae_dir), "vae_preset": "tiny", "vae_identity": vae.identity, "scale_factor": 1.0,
            "preprocessing": prep.key(), "latent_shape": latent, "channels": {"image": 4, "mask": 0}, "stage": 1}
    torch.manual_seed(0)
    save_flow_model(MeanFlowUNet(4, preset="tiny"), root / "base", meta)
    base, base_meta = load_flow_model(root / "base")
    widen_io_channels(base, 5, 5)
    model = inject_lora(base, rank=2, alpha=2.0, modules_to_save=WIDENED_MODULES)
    sidecar = {"kind": "neuromf_lora_adapter", "strategy": "downsample", "downsample_mode": "nearest",
               "channels": {"image": 4, "mask": 1}, "mask_scale": 1.0, "base_checkpoint": str(root / "base"),
               "base_sha256": base_meta["weights_sha256"], "base_preset": "tiny", "vae": str(tiny_vae_dir),
               "vae_preset": "tiny", "vae_identity": vae.identity, "scale_factor": 1.0,
               "preprocessing": prep.key(), "latent_shape": [5, *latent[1:]], "config": {}}
    save_adapter(model, root / "adapter", AdapterMeta.from_dict(sidecar))
    torch.manual_seed(0)
    save_flow_model(MeanFlowUNet(8, preset="tiny"), root / "base_8ch", {**meta})  # other conv_in/out shapes
    return {"base": root / "base", "adapter": root / "adapter", "vae": Path(tiny_vae_dir),
            "base_8ch": root / "base_8ch"}


# --------------------------------------------------------------------------------------------- harness
@dataclass
class Env:
    tmp: Path
    models: dict[str, Path]

    @property
    def inp(self) -> Path:
        return self.tmp / "in"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def cache(self) -> Path:
        return self.tmp / "cache"

    def copy(self, name: str) -> Path:
        """A private copy of a model folder under in/ (the case may corrupt it)."""
        return Path(shutil.copytree(self.models[name], self.inp / name))

    def blocked_out(self) -> Path:
        """An output location below a regular file: no user can write there, root included."""
        (self.tmp / "blocker").write_text("a regular file, not a folder\n")
        return self.tmp / "blocker" / "out"

    def config(self, data: Path | None = None, **overrides) -> Path:
        """A tiny train-lora/train-base YAML under in/: 2 steps of the tiny UNet on CPU."""
        values = {
            "data": {"data_dir": str(data or self.inp / "data"), "split": None, "group": None, "flip": False,
                     "shape": list(SHAPE), "spacing": [SPACING] * 3, "cache_dir": str(self.cache),
                     "mask_strategy": "downsample"},
            "model": {"preset": "tiny", "vae": str(self.models["vae"]), "vae_preset": "tiny"},
            "lora": {"rank": 2, "alpha": 2.0},
            "training": {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "device": "cpu",
                         "checkpoint_every": 0, "output_dir": str(self.out / "run")},
        }
        for dotted, value in overrides.items():
            section, key = dotted.split(".")
            values[section][key] = value
        path = self.inp / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(values))
        return path


@dataclass
class Bad:
    """One bad input: `build(env)` writes it and returns the argv; `expect` are regexes that must all appear in
    the output (the file's name and the problem in words); `rc` the exit code when it is specific."""

    name: str
    build: Callable[[Env], list[str]]
    expect: list[str]
    rc: int | None = None


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """sha256 of every file under `root` (links by their target text, never followed), `skip` left out."""
    state = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) != skip and not Path(folder, d).is_symlink()]
        for name in files + [d for d in os.listdir(folder) if Path(folder, d).is_symlink() and d not in files]:
            path = Path(folder, name)
            if path.is_symlink():
                state[str(path)] = "link:" + os.readlink(path)
            else:
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        for d in dirs:
            state[str(Path(folder, d)) + "/"] = "dir"
    return state


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    """rc and everything written to stdout/stderr (file-descriptor level: a pickle payload's shell echo too)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse and a bad --set end this way, as they would in a shell
        rc = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            print(exc.code)
    captured = capfd.readouterr()
    return rc, captured.out + captured.err


# --------------------------------------------------------------------------------------------- the table
def _check_data(build: Callable[[Env], Path]) -> Callable[[Env], list[str]]:
    return lambda env: ["check-data", str(build(env))]


def _two_subjects(bad_image=None, bad_mask=None, keep_good=True) -> Callable[[Env], Path]:
    """A BIDS tree with one good FCD subject (sub-01) and sub-02 built from the given arrays."""
    def build(env: Env) -> Path:
        root = env.inp / "data"
        if keep_good:
            good_fcd(root)
        return bids(root, {"02": (brain() if bad_image is None else bad_image,
                                  lesion() if bad_mask is None else bad_mask)})
    return build


def _with_nan() -> np.ndarray:
    data = brain()
    data[3, 4, 5] = np.nan
    return data


def _with_inf() -> np.ndarray:
    data = brain()
    data[3, 4, 5] = np.inf
    return data


def _file_case(make: Callable[[Path], None], name: str = "sub-02_FLAIR.nii.gz") -> Callable[[Env], Path]:
    def build(env: Env) -> Path:
        root = good_fcd(env.inp / "data")
        target = root / "sub-02" / "anat" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        make(target)
        return root
    return build


def _truncated_gz(path: Path) -> None:
    truncate(nii(path, brain()), 0.5)


def _truncated_raw(path: Path) -> None:
    raw = nii(path.with_name(path.name.removesuffix(".gz")), brain())
    truncate(raw, 0.6)


def _zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _loop(path: Path) -> None:
    path.symlink_to(path)


def _overflow(path: Path) -> None:
    img = nib.Nifti1Image(np.full(SHAPE, 30000, np.int16), AFFINE)
    img.header.set_slope_inter(1e36, 0)
    nib.save(img, str(path))


def _mask_shape(env: Env) -> Path:
    root = good_fcd(env.inp / "data")
    return bids(root, {"02": (brain(), np.ones((16, 16, 12), np.uint8))})


def _mask_shifted(env: Env) -> Path:
    root = good_fcd(env.inp / "data")
    bids(root, {"02": (brain(), None)})
    shifted = AFFINE.copy()
    shifted[0, 3] += 10.0  # 10 mm
    nii(root / "sub-02" / "anat" / "sub-02_FLAIR_roi.nii.gz", lesion(), shifted)
    return root


def _orphan(env: Env) -> Path:
    root = good_fcd(env.inp / "data")
    return bids(root, {"02": (None, lesion())})


def _flat_orphan(env: Env) -> Path:
    root = env.inp / "data"
    nii(root / "a_FLAIR.nii.gz", brain())
    nii(root / "a_FLAIR_roi.nii.gz", lesion())
    nii(root / "z_FLAIR_roi.nii.gz", lesion())
    return root


def _flat_loop(env: Env) -> Path:
    root = env.inp / "data"
    nii(root / "a_FLAIR.nii.gz", brain())
    (root / "b_FLAIR.nii.gz").symlink_to(root / "b_FLAIR.nii.gz")
    return root


def _truncated_fcd_flair(env: Env) -> Path:
    root = _two_subjects()(env)
    truncate(root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz", 0.5)
    return root


def _truncated_mask(env: Env) -> Path:
    root = _two_subjects()(env)
    truncate(root / "sub-02" / "anat" / "sub-02_FLAIR_roi.nii.gz", 0.5)
    return root


def _only_orphan(env: Env) -> Path:
    return bids(env.inp / "data", {"02": (None, lesion())})


def _thick_slice(env: Env) -> Path:
    """sub-02's only FLAIR (and its ROI) acquired in 40 mm slices: a 2D acquisition, unusable as a volume."""
    root = good_fcd(env.inp / "data")
    thick = np.diag([SPACING, SPACING, 40.0, 1.0])
    nii(root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz", brain(), thick)
    nii(root / "sub-02" / "anat" / "sub-02_FLAIR_roi.nii.gz", lesion(), thick)
    return root


def _drop_good_after(build: Callable[[Env], Path], env: Env) -> Path:
    build(env)
    return _drop_good(env)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _three_valued() -> np.ndarray:
    mask = lesion()
    mask[1, 1, 1] = 2
    return mask


def _nan_mask() -> np.ndarray:
    mask = lesion().astype(np.float32)
    mask[1, 1, 1] = np.nan
    return mask


CHECK_DATA = [
    Bad("check-data: truncated .nii.gz FLAIR", _check_data(_file_case(_truncated_gz)),
        [r"sub-02_FLAIR\.nii\.gz", r"cannot read|truncated"], rc=1),
    Bad("check-data: truncated .nii FLAIR (header intact)",
        _check_data(_file_case(_truncated_raw, "sub-02_FLAIR.nii")),
        [r"sub-02_FLAIR\.nii", r"truncated or corrupt"], rc=1),
    Bad("check-data: zero-byte FLAIR", _check_data(_file_case(_zero_byte)),
        [r"sub-02_FLAIR\.nii\.gz", r"cannot read"], rc=1),
    Bad("check-data: NaN in FLAIR", _check_data(_two_subjects(_with_nan())),
        [r"sub-02_FLAIR\.nii\.gz", r"NaN or infinite"], rc=1),
    Bad("check-data: Inf in FLAIR", _check_data(_two_subjects(_with_inf())),
        [r"sub-02_FLAIR\.nii\.gz", r"NaN or infinite"], rc=1),
    Bad("check-data: 2D FLAIR", _check_data(_two_subjects(np.ones((16, 16), np.float32))),
        [r"sub-02_FLAIR\.nii\.gz", r"2D image"], rc=1),
    Bad("check-data: single-slice FLAIR", _check_data(_two_subjects(np.ones((16, 16, 1), np.float32))),
        [r"sub-02_FLAIR\.nii\.gz", r"2D image"], rc=1),
    Bad("check-data: thick-slice 2D FLAIR (12x12x40 mm voxels)", _check_data(_thick_slice),
        [r"sub-02_FLAIR\.nii\.gz", r"thick-slice 2D FLAIR \(12\.00x12\.00x40\.00 mm voxels\)",
         r"not a 3D acquisition", r"1 unusable"], rc=1),
    Bad("check-data: 4D FLAIR", _check_data(_two_subjects(np.ones((*SHAPE, 3), np.float32))),
        [r"sub-02_FLAIR\.nii\.gz", r"must be 3D"], rc=1),
    Bad("check-data: int16 FLAIR whose scl_slope overflows float32", _check_data(_file_case(_overflow)),
        [r"sub-02_FLAIR\.nii\.gz", r"overflow"], rc=1),
    Bad("check-data: mask shape differs from image", _check_data(_mask_shape),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"mask shape"], rc=1),
    Bad("check-data: mask shifted 10 mm", _check_data(_mask_shifted),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"affine differs"], rc=1),
    Bad("check-data: three-valued mask", _check_data(_two_subjects(bad_mask=_three_valued())),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"3 distinct values"], rc=1),
    Bad("check-data: empty mask", _check_data(_two_subjects(bad_mask=np.zeros(SHAPE, np.uint8))),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"empty mask"], rc=1),
    Bad("check-data: NaN in mask", _check_data(_two_subjects(bad_mask=_nan_mask())),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"NaN or infinite"], rc=1),
    Bad("check-data: truncated mask", _check_data(_truncated_mask),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"cannot read mask"], rc=1),
    Bad("check-data: orphan ROI in a BIDS tree", _check_data(_orphan),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"lesion ROI without a FLAIR image"], rc=1),
    Bad("check-data: orphan mask in a flat folder", _check_data(_flat_orphan),
        [r"z_FLAIR_roi\.nii\.gz", r"without a matching FLAIR"], rc=1),
    Bad("check-data: FLAIR is a symlink loop (BIDS)", _check_data(_file_case(_loop)),
        [r"sub-02_FLAIR\.nii\.gz", r"symbolic links|cannot read"], rc=1),
    Bad("check-data: FLAIR is a symlink loop (flat folder)", _check_data(_flat_loop),
        [r"b_FLAIR\.nii\.gz", r"looping symbolic link"], rc=1),
    Bad("check-data: data folder missing", lambda env: ["check-data", str(env.inp / "nope")],
        [r"in/nope", r"does not exist"], rc=2),
    Bad("check-data: data folder without cases", lambda env: ["check-data", str(_mkdir(env.inp / "empty"))],
        [r"in/empty", r"no cases found"], rc=2),
]


def _mask_test(data: Callable[[Env], Path], vae: Callable[[Env], list[str]] | None = None,
               out: Callable[[Env], Path] | None = None) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        vae_args = vae(env) if vae else ["--vae", str(env.models["vae"]), "--vae-preset", "tiny"]
        target = out(env) if out else env.out / "mask_vae_test.json"
        return ["mask-test", "--data", str(data(env)), *vae_args, *GRID_ARGS, "--device", "cpu",
                "--out", str(target)]
    return build


def _only(image=None, mask=None) -> Callable[[Env], Path]:
    return _two_subjects(image, mask, keep_good=False)


def _vae_file(make: Callable[[Path], None], name: str = "model.safetensors") -> Callable[[Env], list[str]]:
    """A copy of the tiny VAE folder with its weight file replaced by `make` (or a bare file by that name)."""
    def build(env: Env) -> list[str]:
        if name == "model.safetensors":
            folder = env.copy("vae")
            make(folder / name)
            return ["--vae", str(folder), "--vae-preset", "tiny"]
        path = env.inp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        return ["--vae", str(path), "--vae-preset", "tiny"]
    return build


def _vae_bad_sidecar(env: Env) -> list[str]:
    folder = env.copy("vae")
    (folder / "model.json").write_text('{"kind": "maisi_vae", "preset": ')
    return ["--vae", str(folder), "--vae-preset", "tiny"]


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _tiny_vae_as_small(env: Env) -> list[str]:
    bare = env.inp / "autoencoder.safetensors"
    bare.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(env.models["vae"] / "model.safetensors", bare)
    return ["--vae", str(bare), "--vae-preset", "small"]


MASK_TEST = [
    Bad("mask-test: only case has an empty mask", _mask_test(_only(mask=np.zeros(SHAPE, np.uint8))),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"empty mask", r"no usable FCD case"], rc=2),
    Bad("mask-test: only case's mask shifted 10 mm", _mask_test(lambda env: _mask_shifted(env) and _drop_good(env)),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"affine differs"], rc=2),
    Bad("mask-test: only case has NaN in its FLAIR", _mask_test(_only(_with_nan())),
        [r"sub-02_FLAIR\.nii\.gz", r"NaN or infinite"], rc=2),
    Bad("mask-test: only case has a three-valued mask", _mask_test(_only(mask=_three_valued())),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"3 distinct values"], rc=2),
    Bad("mask-test: only FLAIR is 2D", _mask_test(_only(np.ones((16, 16), np.float32))),
        [r"sub-02_FLAIR\.nii\.gz", r"2D image"], rc=2),
    Bad("mask-test: only subject is an orphan ROI", _mask_test(_only_orphan),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"lesion ROI without a FLAIR"], rc=2),
    Bad("mask-test: output below a regular file", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                              out=lambda env: env.blocked_out() / "r.json"),
        [r"blocker", r"is a file, not a folder"], rc=2),
    Bad("mask-test: output is an existing folder", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                               out=lambda env: env.inp / "data"),
        [r"in/data", r"existing folder"], rc=2),
    Bad("mask-test: truncated VAE safetensors", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                            _vae_file(lambda p: truncate(p, 0.5))),
        [r"vae/model\.safetensors", r"truncated"], rc=2),
    Bad("mask-test: zero-byte VAE safetensors", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                            _vae_file(_zero_byte)),
        [r"vae/model\.safetensors", r"empty"], rc=2),
    Bad("mask-test: random bytes as VAE safetensors", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                                  _vae_file(_garbage)),
        [r"vae/model\.safetensors", r"corrupt or not a safetensors"], rc=2),
    Bad("mask-test: pickle under .safetensors", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                            _vae_file(pickle_payload)),
        [r"vae/model\.safetensors", r"not a readable safetensors"], rc=2),
    Bad("mask-test: code-running pickle under .pt", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                                _vae_file(pickle_payload, "autoencoder.pt")),
        [r"autoencoder\.pt", r"pickled Python objects"], rc=2),
    Bad("mask-test: torch archive with objects under .ckpt", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                                         _vae_file(torch_pickle, "vae.ckpt")),
        [r"vae\.ckpt", r"pickled Python objects"], rc=2),
    Bad("mask-test: zero-byte .pth", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                _vae_file(_zero_byte, "vae.pth")),
        [r"vae\.pth", r"empty"], rc=2),
    Bad("mask-test: VAE weights of another architecture", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                                      _tiny_vae_as_small),
        [r"autoencoder\.safetensors", r"do not match"], rc=2),
    Bad("mask-test: VAE file missing", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                                  lambda env: ["--vae", str(env.inp / "none.pt"), "--vae-preset",
                                                               "tiny"]),
        [r"none\.pt", r"does not exist"], rc=2),
    Bad("mask-test: --vae-preset disagrees with the VAE's sidecar",
        _mask_test(lambda env: good_fcd(env.inp / "data"),
                   lambda env: ["--vae", str(env.models["vae"]), "--vae-preset", "small"]),
        [r"vae_tiny/model\.safetensors", r"preset mismatch", r"model\.json says 'tiny'", r"'small' was asked for"],
        rc=2),
    Bad("mask-test: VAE sidecar is not JSON", _mask_test(lambda env: good_fcd(env.inp / "data"), _vae_bad_sidecar),
        [r"vae/model\.json", r"not readable JSON"], rc=2),
    Bad("mask-test: only FLAIR is thick-slice 2D", _mask_test(lambda env: _drop_good_after(_thick_slice, env)),
        [r"sub-02_FLAIR\.nii\.gz", r"thick-slice 2D FLAIR", r"no cases found|no usable FCD case"], rc=2),
]


def _drop_good(env: Env) -> Path:
    shutil.rmtree(env.inp / "data" / "sub-01")
    return env.inp / "data"


def _generate_ckpt(make: Callable[[Path], None] | None, file: str = "model.safetensors",
                   out: Callable[[Env], Path] | None = None) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        base = env.copy("base")
        if make is not None:
            make(base / file)
        target = out(env) if out else env.out / "generated"
        return ["generate", "--checkpoint", str(base), "--n", "1", "--device", "cpu", "--out", str(target)]
    return build


def _generate_adapter(make: Callable[[Path], None], file: str = "adapter_model.safetensors") -> Callable:
    def build(env: Env) -> list[str]:
        adapter = env.copy("adapter")
        make(adapter / file)
        return ["generate", "--adapter", str(adapter), "--n", "1", "--device", "cpu", "--out",
                str(env.out / "generated")]
    return build


def _wrong_arch(env: Env) -> list[str]:
    base = env.copy("base")
    shutil.copy(env.models["base_8ch"] / "model.safetensors", base / "model.safetensors")
    return ["generate", "--checkpoint", str(base), "--n", "1", "--device", "cpu", "--out", str(env.out / "g")]


def _unlink(path: Path) -> None:
    path.unlink()


def _bad_json(path: Path) -> None:
    path.write_text('{"kind": "meanflow_unet", "arch": ')


GENERATE = [
    Bad("generate: truncated checkpoint", _generate_ckpt(lambda p: truncate(p, 0.5)),
        [r"base/model\.safetensors", r"truncated"], rc=2),
    Bad("generate: zero-byte checkpoint", _generate_ckpt(_zero_byte),
        [r"base/model\.safetensors", r"empty"], rc=2),
    Bad("generate: code-running pickle as checkpoint", _generate_ckpt(pickle_payload),
        [r"base/model\.safetensors", r"not a readable safetensors"], rc=2),
    Bad("generate: torch archive renamed .safetensors", _generate_ckpt(torch_pickle),
        [r"base/model\.safetensors", r"pickle/zip archive"], rc=2),
    Bad("generate: checkpoint of another architecture", _wrong_arch,
        [r"base/model\.safetensors", r"do not match"], rc=2),
    Bad("generate: malformed checkpoint sidecar", _generate_ckpt(_bad_json, "model.json"),
        [r"base/model\.json", r"not readable JSON"], rc=2),
    Bad("generate: checkpoint sidecar missing", _generate_ckpt(_unlink, "model.json"),
        [r"model\.json", r"missing sidecar"], rc=2),
    Bad("generate: checkpoint missing", lambda env: ["generate", "--checkpoint", str(env.inp / "nope"), "--out",
                                                     str(env.out / "g")],
        [r"in/nope", r"not found"], rc=2),
    Bad("generate: truncated adapter", _generate_adapter(lambda p: truncate(p, 0.5)),
        [r"adapter/adapter_model\.safetensors", r"truncated"], rc=2),
    Bad("generate: zero-byte adapter", _generate_adapter(_zero_byte),
        [r"adapter/adapter_model\.safetensors", r"empty"], rc=2),
    Bad("generate: code-running pickle as adapter", _generate_adapter(pickle_payload),
        [r"adapter/adapter_model\.safetensors", r"not a readable safetensors"], rc=2),
    Bad("generate: malformed adapter sidecar", _generate_adapter(_bad_json, "neuromf_adapter.json"),
        [r"neuromf_adapter\.json", r"not readable JSON"], rc=2),
    Bad("generate: adapter without adapter_config.json", _generate_adapter(_unlink, "adapter_config.json"),
        [r"in/adapter", r"missing adapter_config\.json"], rc=2),
    Bad("generate: output below a regular file", _generate_ckpt(None, out=lambda env: env.blocked_out()),
        [r"blocker", r"is a file, not a folder"], rc=2),
    Bad("generate: output is an existing file",
        _generate_ckpt(None, out=lambda env: env.blocked_out().parent),
        [r"blocker", r"existing file"], rc=2),
]


def _train_lora(base: Callable[[Env], Path] | None = None, data: Callable[[Env], Path] | None = None,
                config: Callable[[Env], Path] | None = None, extra: list[str] | None = None) -> Callable:
    def build(env: Env) -> list[str]:
        (data or (lambda e: good_fcd(e.inp / "data")))(env)
        base_dir = base(env) if base else env.models["base"]
        cfg = config(env) if config else env.config()
        return ["train-lora", "--config", str(cfg), "--base_checkpoint", str(base_dir), *(extra or [])]
    return build


def _base_file(make: Callable[[Path], None]) -> Callable[[Env], Path]:
    def build(env: Env) -> Path:
        base = env.copy("base")
        make(base / "model.safetensors")
        return base
    return build


def _base_wrong_arch(env: Env) -> Path:
    base = env.copy("base")
    shutil.copy(env.models["base_8ch"] / "model.safetensors", base / "model.safetensors")
    return base


def _yaml(text: str) -> Callable[[Env], Path]:
    def build(env: Env) -> Path:
        path = env.inp / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    return build


def _user_files(env: Env) -> Path:
    (env.inp / "mine").mkdir(parents=True, exist_ok=True)
    (env.inp / "mine" / "thesis.txt").write_text("not a run\n")
    return env.config(**{"training.output_dir": str(env.inp / "mine")})


TRAIN_LORA = [
    Bad("train-lora: truncated base checkpoint", _train_lora(_base_file(lambda p: truncate(p, 0.5))),
        [r"base/model\.safetensors", r"truncated"], rc=2),
    Bad("train-lora: zero-byte base checkpoint", _train_lora(_base_file(_zero_byte)),
        [r"base/model\.safetensors", r"empty"], rc=2),
    Bad("train-lora: code-running pickle as base", _train_lora(_base_file(pickle_payload)),
        [r"base/model\.safetensors", r"not a readable safetensors"], rc=2),
    Bad("train-lora: base of another architecture", _train_lora(_base_wrong_arch),
        [r"base/model\.safetensors", r"do not match"], rc=2),
    Bad("train-lora: base checkpoint missing", _train_lora(lambda env: env.inp / "nope"),
        [r"in/nope", r"not found"], rc=2),
    Bad("train-lora: mask shifted 10 mm", _train_lora(data=lambda env: _mask_shifted(env) and _drop_good(env)),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"affine differs"], rc=2),
    Bad("train-lora: NaN in a FLAIR", _train_lora(data=_two_subjects(_with_nan())),
        [r"sub-02_FLAIR\.nii\.gz", r"NaN or infinite"], rc=2),
    Bad("train-lora: truncated FLAIR", _train_lora(data=_truncated_fcd_flair),
        [r"sub-02_FLAIR\.nii\.gz", r"not a readable NIfTI"], rc=2),
    Bad("train-lora: malformed YAML", _train_lora(config=_yaml("training: {max_steps: 2\n")),
        [r"config\.yaml", r"not valid YAML"], rc=2),
    Bad("train-lora: wrong type in config", _train_lora(config=_yaml("training:\n  lr: fast\n")),
        [r"config\.yaml", r"'training\.lr' must be a number"], rc=2),
    Bad("train-lora: unknown key in config", _train_lora(config=_yaml("training:\n  learning_rate: 0.1\n")),
        [r"config\.yaml", r"unknown key 'training\.learning_rate'"], rc=2),
    Bad("train-lora: config is a list", _train_lora(config=_yaml("- training\n- lr\n")),
        [r"config\.yaml", r"must be a mapping"], rc=2),
    Bad("train-lora: config section is a number", _train_lora(config=_yaml("training: 5\n")),
        [r"config\.yaml", r"'training' must be a mapping"], rc=2),
    Bad("train-lora: invalid choice in config", _train_lora(config=_yaml("loss:\n  kind: diffusion\n")),
        [r"config\.yaml", r"'loss\.kind' must be one of"], rc=2),
    Bad("train-lora: config file missing", _train_lora(config=lambda env: env.inp / "none.yaml"),
        [r"none\.yaml", r"config file not found"], rc=2),
    Bad("train-lora: --set without a value", _train_lora(extra=["--set", "training.lr"]),
        [r"training\.lr", r"KEY=VALUE"], rc=1),
    Bad("train-lora: output below a regular file",
        _train_lora(config=lambda env: env.config(**{"training.output_dir": str(env.blocked_out())})),
        [r"blocker", r"is a file, not a folder"], rc=2),
    Bad("train-lora: --overwrite on a folder of user files", _train_lora(config=_user_files, extra=["--overwrite"]),
        [r"in/mine", r"not a NeuroMF run folder"], rc=2),
]


TRAIN_BASE = [
    Bad("train-base: NaN in a healthy FLAIR",
        lambda env: ["train-base", "--config", str(env.config(_two_subjects(_with_nan(), keep_good=True)(env)))],
        [r"sub-02_FLAIR\.nii\.gz", r"NaN or infinite"], rc=2),
    Bad("train-base: truncated VAE file in the config",
        lambda env: ["train-base", "--config",
                     str(env.config(good_fcd(env.inp / "data"),
                                    **{"model.vae": str(_vae_path(env, lambda p: truncate(p, 0.5)))}))],
        [r"vae/model\.safetensors", r"truncated"], rc=2),
    Bad("train-base: model.vae_preset disagrees with the VAE's sidecar",
        lambda env: ["train-base", "--config",
                     str(env.config(good_fcd(env.inp / "data"), **{"model.vae_preset": "small"}))],
        [r"vae_tiny/model\.safetensors", r"model\.json says 'tiny'", r"'small' was asked for"], rc=2),
    Bad("evaluate: malformed adapter sidecar",
        lambda env: ["evaluate", "--adapter", str(_corrupt_sidecar(env)), "--generated", str(env.inp / "g"),
                     "--data", str(good_fcd(env.inp / "data")), "--out", str(env.out / "metrics.json")],
        [r"neuromf_adapter\.json", r"not (readable|valid) JSON"], rc=2),
]


def _vae_path(env: Env, make: Callable[[Path], None]) -> Path:
    folder = env.copy("vae")
    make(folder / "model.safetensors")
    return folder


def _corrupt_sidecar(env: Env) -> Path:
    adapter = env.copy("adapter")
    _bad_json(adapter / "neuromf_adapter.json")
    return adapter


CASES = CHECK_DATA + MASK_TEST + GENERATE + TRAIN_LORA + TRAIN_BASE


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Bad, tmp_path: Path, models: dict[str, Path], capfd) -> None:
    env = Env(tmp_path, models)
    env.inp.mkdir()
    argv = case.build(env)
    before = snapshot(tmp_path, env.cache)
    rc, output = run_cli(argv, capfd)
    assert rc != 0, f"exit 0 for a bad input; output:\n{output}"
    assert "pwned" not in output, "a pickled payload was executed"
    if case.rc is not None:
        assert rc == case.rc, output
    assert "Traceback" not in output, output
    for pattern in case.expect:
        assert re.search(pattern, output), f"{pattern!r} not in output:\n{output}"
    after = snapshot(tmp_path, env.cache)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"inputs changed or outputs left behind: {changed}"


# --------------------------------------------------------------------------------------------- controls
def test_controls_succeed(tmp_path: Path, models: dict[str, Path], capfd) -> None:
    """The unmodified inputs of the table work, so each case fails for its bad input and nothing else."""
    env = Env(tmp_path, models)
    data = good_fcd(env.inp / "data")
    assert run_cli(["check-data", str(data)], capfd)[0] == 0
    rc, output = run_cli(_mask_test(lambda e: data)(env), capfd)
    assert rc == 0 and (env.out / "mask_vae_test.json").is_file(), output
    rc, output = run_cli(_generate_ckpt(None)(env), capfd)
    assert rc == 0 and len(list((env.out / "generated").glob("*.nii.gz"))) == 1, output
    rc, output = run_cli(["generate", "--adapter", str(models["adapter"]), "--n", "1", "--device", "cpu",
                          "--out", str(env.out / "pairs")], capfd)
    assert rc == 0 and len(list((env.out / "pairs").glob("*.nii.gz"))) == 2, output
    rc, output = run_cli(_train_lora()(env), capfd)
    assert rc == 0 and (env.out / "run" / "adapter" / "adapter_model.safetensors").is_file(), output


# --------------------------------------------------------------------------------------------- one per fix
def test_failed_start_leaves_nothing_and_the_command_can_be_rerun(tmp_path: Path, models: dict[str, Path],
                                                                  capfd) -> None:
    """Issue 10: a train-lora that fails on bad data used to leave config.yaml, so the same command was then
    refused ("already holds a run") and --resume found nothing to resume."""
    env = Env(tmp_path, models)
    _mask_shifted(env)
    argv = _train_lora()(env)
    for _ in range(2):  # the same error both times, never "already holds a run"
        rc, output = run_cli(argv, capfd)
        assert rc == 2 and "affine differs" in output and "already holds" not in output, output
        assert not env.out.exists()
    _drop_good(env)
    nii(env.inp / "data" / "sub-02" / "anat" / "sub-02_FLAIR_roi.nii.gz", lesion())  # fixed: back on the grid
    rc, output = run_cli(argv, capfd)
    assert rc == 0 and (env.out / "run" / "config.yaml").is_file(), output


def test_in_run_dir_undoes_only_a_failed_fresh_start(tmp_path: Path) -> None:
    from neuromf.config import load_config
    from neuromf.train.run_dir import in_run_dir

    @in_run_dir
    def job(cfg, resume: bool = False, overwrite: bool = False, fail_at: int = 0):
        out = Path(cfg.training.output_dir)
        (out / "partial.bin").write_bytes(b"x")
        for step in range(1, 3):
            if step == fail_at:
                raise ValueError("bad data")
            yield step
            (out / "checkpoint.safetensors").write_bytes(b"w")
        return "done"

    def cfg(out: Path):
        return load_config("base_tiny", {"training.output_dir": str(out)})

    nested = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError, match="bad data"):
        list(job(cfg(nested), fail_at=1))
    assert not (tmp_path / "a").exists()  # the parents it created went too
    existing = tmp_path / "empty"
    existing.mkdir()
    with pytest.raises(ValueError):
        list(job(cfg(existing), fail_at=1))
    assert existing.is_dir() and not list(existing.iterdir())  # a folder the user made stays, emptied
    with pytest.raises(ValueError):  # failing after the first event: a real run, kept for --resume
        list(job(cfg(nested), fail_at=2))
    assert (nested / "config.yaml").is_file() and (nested / "checkpoint.safetensors").is_file()
    with pytest.raises(ValueError):  # a failed resume never deletes the run it resumes
        list(job(cfg(nested), resume=True, fail_at=1))
    assert (nested / "checkpoint.safetensors").is_file()
    gen = job(cfg(tmp_path / "ok"))
    assert list(gen) == [1, 2] and (tmp_path / "ok" / "config.yaml").is_file()


def test_ensure_writable(tmp_path: Path) -> None:
    from neuromf.utils import OutputNotWritableError, ensure_writable

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert ensure_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert ensure_writable(tmp_path / "new" / "result.json", file=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # probing creates nothing
    with pytest.raises(OutputNotWritableError, match=r"file\.txt/sub: .*file\.txt is a file, not a folder"):
        ensure_writable(blocker / "sub")
    with pytest.raises(OutputNotWritableError, match=r"file\.txt: output folder is an existing file"):
        ensure_writable(blocker)
    with pytest.raises(OutputNotWritableError, match="output file is an existing folder"):
        ensure_writable(tmp_path, file=True)
    if os.geteuid() != 0:  # root writes through chmod 0o555
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(OutputNotWritableError, match=r"locked.*not writable"):
            ensure_writable(locked / "out")


def test_mask_test_checks_its_output_before_any_work(tmp_path: Path, models: dict[str, Path], capfd,
                                                     monkeypatch) -> None:
    from neuromf.vae import MAISIVAEWrapper

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the output location was checked")

    monkeypatch.setattr(MAISIVAEWrapper, "resolve", no_vae)
    env = Env(tmp_path, models)
    rc, output = run_cli(_mask_test(lambda e: good_fcd(e.inp / "data"),
                                    out=lambda e: e.blocked_out() / "r.json")(env), capfd)
    assert rc == 2 and "is a file, not a folder" in output and "AssertionError" not in output, output


def test_mask_test_skips_empty_masks_and_orphans(tmp_path: Path, models: dict[str, Path], capfd) -> None:
    """One empty mask or orphan ROI is skipped with a problem row; the decision comes from the usable cases."""
    import json

    env = Env(tmp_path, models)
    root = bids(good_fcd(env.inp / "data"), {"02": (brain(), np.zeros(SHAPE, np.uint8)), "03": (None, lesion())})
    rc, output = run_cli(_mask_test(lambda e: root)(env), capfd)
    assert rc == 0, output
    result = json.loads((env.out / "mask_vae_test.json").read_text())
    assert [c["id"] for c in result["cases"]] == ["sub-01"] and result["summary"]["n_cases"] == 1
    problems = {r["id"]: " ".join(r["problems"]) for r in result["skipped"]}
    assert "empty mask" in problems["sub-02"] and "without a FLAIR image" in problems["sub-03"]
    assert "skipped sub-02" in output and "skipped sub-03" in output


def test_preprocess_pair_refuses_a_shifted_mask(tmp_path: Path) -> None:
    from neuromf.io.nifti import Preprocessing, VolumeError, preprocess_pair

    image = nii(tmp_path / "a_FLAIR.nii.gz", brain())
    shifted = AFFINE.copy()
    shifted[1, 3] -= 10.0
    mask = nii(tmp_path / "a_roi.nii.gz", lesion(), shifted)
    prep = Preprocessing(shape=SHAPE, spacing=(SPACING,) * 3)
    with pytest.raises(VolumeError, match=r"a_roi\.nii\.gz: mask affine differs .* by up to 10 mm"):
        preprocess_pair(image, mask, prep)
    nearly = AFFINE.copy()
    nearly[1, 3] += 1e-4  # float rounding between tools: accepted
    _, volume = preprocess_pair(image, nii(tmp_path / "b_roi.nii.gz", lesion(), nearly), prep)
    assert volume is not None and volume.data.sum() > 0


def test_data_widget_scan_shows_broken_subjects_as_rows(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    """Issue 10: a 2D image made the FCD data widget's Scan raise an IndexError out of a Qt slot."""
    from napari_neuromf._widgets import FCDDataWidget

    root = bids(good_fcd(tmp_path / "data"), {"02": (np.ones((16, 16), np.float32), None),
                                               "03": (None, lesion())})
    widget = FCDDataWidget(make_napari_viewer())
    widget.folder.setText(str(root))
    widget.scan()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    rows = {widget.table.item(r, 0).text(): widget.table.item(r, 6).text() for r in range(widget.table.rowCount())}
    assert sorted(rows) == ["sub-01", "sub-02", "sub-03"] and len(widget.cases) == 1
    assert "UNUSABLE" in rows["sub-02"] and "2D image" in rows["sub-02"]
    assert "lesion ROI without a FLAIR image" in rows["sub-03"] and not rows["sub-01"].startswith("UNUSABLE")
