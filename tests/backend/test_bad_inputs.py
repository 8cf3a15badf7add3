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
    return build_models(tmp_path_factory.mktemp("models"), Path(tiny_vae_dir))


def build_models(root: Path, tiny_vae_dir: Path) -> dict[str, Path]:
    """The `models` fixture's files under `root` (also used by the fuzz tests' own fixture)."""
    from neuromf.io.nifti import Preprocessing
    from neuromf.models.adapter_meta import AdapterMeta
    from neuromf.models.flow_model import load_flow_model, save_flow_model
    from neuromf.models.lora import WIDENED_MODULES, inject_lora, save_adapter, widen_io_channels
    from neuromf.models.unet import MeanFlowUNet
    from neuromf.vae import MAISIVAEWrapper

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


# --------------------------------------------------------------------------------------------- round 2 (issue 28)
# One row per CLASS of failure a hostile tester found: data loss, path escape, invalid masks and scans, non-finite
# or out-of-range numbers (config, flags, sidecars), malformed YAML, stale output mixes, shipped files, unreadable
# generated files, BIDS ambiguities, implausible grids. New inputs of a class must fail the same way.
def _zero_affine_nii(path: Path, data: np.ndarray) -> Path:
    """A NIfTI whose sform is all zeros (nibabel cannot write one through an affine)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    zero = np.zeros((4, 4))
    zero[3, 3] = 1
    header.set_sform(zero, code=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, None, header=header), str(path))
    return path


def _subject(image: np.ndarray, mask: np.ndarray | None, affine: np.ndarray = AFFINE,
             keep_good: bool = True) -> Callable[[Env], Path]:
    """sub-02 with this image (and mask) on this affine, beside the good sub-01 (unless `keep_good` is False)."""
    def build(env: Env) -> Path:
        root = env.inp / "data"
        if keep_good:
            good_fcd(root)
        nii(root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz", image, affine)
        if mask is not None:
            nii(root / "sub-02" / "anat" / "sub-02_FLAIR_roi.nii.gz", mask, affine)
        return root
    return build


def _zero_affine(env: Env) -> Path:
    root = good_fcd(env.inp / "data")
    _zero_affine_nii(root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz", brain())
    _zero_affine_nii(root / "sub-02" / "anat" / "sub-02_FLAIR_roi.nii.gz", lesion())
    return root


def _inverted() -> np.ndarray:
    return -lesion().astype(np.int16)  # {-1, 0}: binarising by the larger value made the background the lesion


def _participants(text: str) -> Callable[[Env], Path]:
    def build(env: Env) -> Path:
        root = bids(env.inp / "data", {"01": (brain(), lesion()), "02": (brain(), lesion())})
        (root / "participants.tsv").write_text(text)
        return root
    return build


def _anat_loop(env: Env) -> Path:
    root = good_fcd(env.inp / "data")
    (root / "sub-02").mkdir()
    (root / "sub-02" / "anat").symlink_to(root / "sub-02" / "anat")
    return root


def _user_project(env: Env) -> Path:
    """A user's project folder: their own config.yaml, notes and a results sub-folder (no NeuroMF manifest)."""
    mine = env.inp / "project"
    (mine / "results").mkdir(parents=True)
    (mine / "config.yaml").write_text("experiment: mine\n")
    (mine / "results" / "table.csv").write_text("a,b\n1,2\n")
    return env.config(**{"training.output_dir": str(mine)})


def _sidecar_entry(**entries) -> Callable[[Env], list[str]]:
    """generate with a copy of the joint adapter whose sidecar entries are replaced (a tampered sidecar)."""
    def build(env: Env) -> list[str]:
        import json

        adapter = env.copy("adapter")
        path = adapter / "neuromf_adapter.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **entries}).replace("Infinity", "1e999"))
        return ["generate", "--adapter", str(adapter), "--n", "1", "--device", "cpu", "--out", str(env.out / "g")]
    return build


def _generate_flags(*flags: str) -> Callable[[Env], list[str]]:
    return lambda env: ["generate", "--adapter", str(env.models["adapter"]), "--device", "cpu", *flags, "--out",
                        str(env.out / "g")]


def _foreign_output(env: Env) -> list[str]:
    """generate into a folder that holds another run's pairs (seed 7), without --overwrite."""
    folder = env.inp / "generated"
    assert main(["generate", "--checkpoint", str(env.models["base"]), "--n", "1", "--seed", "7", "--device", "cpu",
                 "--out", str(folder)]) == 0
    return ["generate", "--checkpoint", str(env.models["base"]), "--n", "1", "--seed", "8", "--device", "cpu",
            "--out", str(folder)]


def _user_files_output(env: Env) -> list[str]:
    folder = env.inp / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    return ["generate", "--checkpoint", str(env.models["base"]), "--n", "1", "--device", "cpu", "--out", str(folder),
            "--overwrite"]


def _pairs(env: Env, name: str = "g", seed: int = 0) -> Path:
    folder = env.inp / name
    assert main(["generate", "--adapter", str(env.models["adapter"]), "--n", "1", "--seed", str(seed), "--device",
                 "cpu", "--out", str(folder)]) == 0
    return folder


def _evaluate(generated: Callable[[Env], Path], command: str = "evaluate") -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        extra = ["--seeds", "0", "--steps", "1"] if command == "consistency" else []
        return [command, "--adapter", str(env.models["adapter"]), "--generated", str(generated(env)), "--data",
                str(good_fcd(env.inp / "data")), *extra, "--out", str(env.out / "m.json")]
    return build


def _damaged_pair(make: Callable[[Path], None]) -> Callable[[Env], Path]:
    def build(env: Env) -> Path:
        folder = _pairs(env)
        make(folder / "sample_000_flair.nii.gz")
        return folder
    return build


def _mixed(env: Env) -> Path:
    """Two runs' pairs in one folder (a legacy folder without a manifest: the per-sample records disagree)."""
    folder = _pairs(env, "g", seed=0)
    other = _pairs(env, "h", seed=5)
    for path in other.glob("sample_000*"):
        shutil.copy(path, folder / path.name.replace("000", "001"))
    (folder / ".neuromf-owned.json").unlink()
    return folder


def _empty_section_with_set(env: Env) -> list[str]:
    """`training:` left empty in the file, then filled by --set (an empty section used to be None: a traceback)."""
    path = env.inp / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"data_dir": str(env.inp / "nope"), "mask_strategy": "downsample"},
                                    "model": {"preset": "tiny"}})
                    + "training:\n")
    return ["train-lora", "--config", str(path), "--base_checkpoint", str(env.models["base"]), "--set",
            "training.lr=1e-3", "--set", "training.device=cpu", "--output-dir", str(env.out / "run")]


def _shipped_adapter_path(env: Env) -> list[str]:
    from neuromf.weights import embedded_model_dir

    return ["calibrate-guidance", "--adapter", str(embedded_model_dir("lora_demo")), "--store", "--n", "1",
            "--steps", "1", "--scales", "1", "--device", "cpu"]


ROUND2 = [
    # masks and scans: one shared validator, the same refusal in every command
    Bad("check-data: inverted {-1,0} mask", _check_data(_two_subjects(bad_mask=_inverted())),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"negative labels", r"inverted"], rc=1),
    Bad("check-data: all-ones mask", _check_data(_two_subjects(bad_mask=np.ones(SHAPE, np.uint8))),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"covers 100% of the scan"], rc=1),
    Bad("check-data: all-zero FLAIR", _check_data(_two_subjects(np.zeros(SHAPE, np.float32))),
        [r"sub-02_FLAIR\.nii\.gz", r"constant"], rc=1),
    Bad("check-data: complex-valued FLAIR", _check_data(_two_subjects(brain().astype(np.complex64))),
        [r"sub-02_FLAIR\.nii\.gz", r"complex-valued"], rc=1),
    Bad("check-data: zero affine", _check_data(_zero_affine), [r"sub-02_FLAIR\.nii\.gz", r"singular"], rc=1),
    Bad("check-data: 40 mm voxels", _check_data(_subject(brain(), lesion(), np.diag([40.0, 40, 40, 1]))),
        [r"sub-02_FLAIR\.nii\.gz", r"voxel size 40x40x40 mm is outside"], rc=1),
    Bad("check-data: 0.01 mm voxels", _check_data(_subject(brain(), lesion(), np.diag([0.01, 0.01, 0.01, 1]))),
        [r"sub-02_FLAIR\.nii\.gz", r"voxel size 0\.01x0\.01x0\.01 mm is outside"], rc=1),
    Bad("mask-test: only case's mask is inverted", _mask_test(_only(mask=_inverted())),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"negative labels"], rc=2),
    Bad("train-lora: the only FCD case has an all-ones mask",
        _train_lora(data=_subject(brain(), np.ones(SHAPE, np.uint8), keep_good=False)),
        [r"sub-02_FLAIR_roi\.nii\.gz", r"covers 100%"], rc=2),
    # BIDS ambiguities
    Bad("check-data: conflicting participants.tsv rows",
        _check_data(_participants("participant_id\tgroup\nsub-01\tfcd\nsub-02\tfcd\nsub-01\thc\n")),
        [r"participants\.tsv", r"sub-01 has conflicting rows \(lines 2 and 4: group differ\)"], rc=2),
    Bad("check-data: a subject's anat folder is a symlink loop", _check_data(_anat_loop),
        [r"anat", r"looping or broken symbolic link", r"sub-02"], rc=1),
    # numbers at the boundary: config, flags, sidecars
    Bad("train-lora: --set training.lr=.inf", _train_lora(extra=["--set", "training.lr=.inf"]),
        [r"config\.yaml", r"'training\.lr' must be a finite number"], rc=2),
    Bad("train-lora: max_steps beyond any run", _train_lora(extra=["--set", "training.max_steps=" + "9" * 30]),
        [r"config\.yaml", r"training\.max_steps"], rc=2),
    Bad("train-lora: empty lora.target_modules", _train_lora(extra=["--set", "lora.target_modules=[]"]),
        [r"config\.yaml", r"'lora\.target_modules' must name at least one module"], rc=2),
    Bad("generate: --device cuda:99 (no such GPU here)", _generate_flags("--device", "cuda:99"),
        [r"'cuda:99' requested but (CUDA is not available|only \d+ GPU)"], rc=2),
    Bad("train-lora: --device cuda:99 (checked before any work)", _train_lora(extra=["--device", "cuda:99"]),
        [r"'cuda:99' requested but"], rc=2),
    Bad("generate: --n -3", _generate_flags("--n", "-3"), [r"--n", r"must be >= 1"], rc=2),
    Bad("generate: --n 0", _generate_flags("--n", "0"), [r"--n", r"must be >= 1"], rc=2),
    Bad("generate: --joint-guidance nan", _generate_flags("--joint-guidance", "nan"),
        [r"--joint-guidance", r"finite"], rc=2),
    Bad("calibrate-guidance: --scales nan", lambda env: ["calibrate-guidance", "--adapter", str(env.models["adapter"]),
                                                        "--scales", "1", "nan", "--store"],
        [r"--scales", r"finite"], rc=2),
    Bad("mask-test: --spacing -3", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                              lambda env: ["--vae", str(env.models["vae"]), "--spacing", "-3", "3",
                                                           "3"]),
        [r"--spacing", r"must be >= 0\.1"], rc=2),
    Bad("mask-test: --spacing nan", _mask_test(lambda env: good_fcd(env.inp / "data"),
                                               lambda env: ["--vae", str(env.models["vae"]), "--spacing", "nan", "3",
                                                            "3"]),
        [r"--spacing", r"finite"], rc=2),
    Bad("mask-test: a grid that cannot fit in memory (refused before allocating)",
        lambda env: [*_mask_test(lambda e: good_fcd(e.inp / "data"))(env), "--shape", "1024", "1024", "1024"],
        [r"model grid \(1024, 1024, 1024\)", r"GB of memory"], rc=2),
    Bad("make-phantoms: --spacing 0 (and no folder left)", lambda env: ["make-phantoms", "--out", str(env.out / "p"),
                                                                        "--spacing", "0", "3", "3"],
        [r"--spacing", r"must be >= 0\.1"], rc=2),
    Bad("make-phantoms: --lesion-volume 5 2 (smallest above largest)",
        lambda env: ["make-phantoms", "--out", str(env.out / "p"), "--lesion-volume", "5", "2"],
        [r"--lesion-volume", r"smallest volume 5 is above the largest 2"], rc=2),
    Bad("generate: sidecar scale_factor 0", _sidecar_entry(scale_factor=0),
        [r"neuromf_adapter\.json", r"'scale_factor' must be a finite number"], rc=2),
    Bad("generate: sidecar scale_factor NaN", _sidecar_entry(scale_factor=float("nan")),
        [r"neuromf_adapter\.json", r"'scale_factor' must be a finite number"], rc=2),
    Bad("generate: sidecar grid disagrees with its latent shape",
        _sidecar_entry(preprocessing={"shape": [96, 96, 96], "spacing": [2.0, 2.0, 2.0], "clip_max": 2.0}),
        [r"neuromf_adapter\.json", r"'latent_shape' .* does not match the grid \[96, 96, 96\]"], rc=2),
    Bad("generate: sidecar grid disagrees with the base model",
        _sidecar_entry(preprocessing={"shape": [16, 16, 16], "spacing": [6.0, 6.0, 6.0], "clip_max": 2.0}),
        [r"neuromf_adapter\.json", r"disagrees with its base model's"], rc=2),
    # YAML
    Bad("train-lora: duplicate YAML key", _train_lora(config=_yaml("training:\n  lr: 0.1\n  lr: 0.2\n")),
        [r"config\.yaml", r"duplicate key 'lr' \(first on line 2, again on line 3\)"], rc=2),
    Bad("train-lora: empty section with --set", _empty_section_with_set, [r"in/nope", r"does not exist"], rc=2),
    Bad("train-lora: scalar YAML file with --set", _train_lora(config=_yaml("5\n"), extra=["--set", "training.lr=1"]),
        [r"config\.yaml", r"'top level' must be a mapping"], rc=2),
    Bad("train-lora: --set training=5", _train_lora(extra=["--set", "training=5"]),
        [r"config\.yaml", r"'training' must be a mapping"], rc=2),
    Bad("train-lora: --set into a scalar section",
        _train_lora(extra=["--set", "training=5", "--set", "training.lr=1"]),
        [r"config\.yaml", r"cannot set 'training\.lr'"], rc=2),
    # data loss, shipped files, stale mixes
    Bad("train-lora: --overwrite on a user's project with its own config.yaml",
        _train_lora(config=_user_project, extra=["--overwrite"]),
        [r"in/project", r"not a NeuroMF run folder", r"results"], rc=2),
    Bad("calibrate-guidance: --store on the shipped adapter's path", _shipped_adapter_path,
        [r"lora_demo", r"shipped files of NeuroMF"], rc=2),
    Bad("generate: output folder holds another run's pairs", _foreign_output,
        [r"in/generated", r"another run's files", r"--overwrite"], rc=2),
    Bad("generate: --overwrite into a folder of user files", _user_files_output,
        [r"in/mine", r"NeuroMF did not write", r"notes\.txt"], rc=2),
    Bad("evaluate: zero-byte generated FLAIR", _evaluate(_damaged_pair(_zero_byte)),
        [r"sample_000_flair\.nii\.gz", r"not a readable NIfTI"], rc=2),
    Bad("consistency: truncated generated FLAIR", _evaluate(_damaged_pair(lambda p: truncate(p, 0.5)), "consistency"),
        [r"sample_000_flair\.nii\.gz", r"not a readable NIfTI"], rc=2),
    Bad("evaluate: two runs' pairs in one folder", _evaluate(_mixed),
        [r"in/g", r"two runs", r"seed"], rc=2),
]


CASES = CHECK_DATA + MASK_TEST + GENERATE + TRAIN_LORA + TRAIN_BASE + ROUND2


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Bad, tmp_path: Path, models: dict[str, Path], capfd, monkeypatch) -> None:
    monkeypatch.setenv("NEUROMF_MAX_MEMORY_GB", "16")  # the memory estimate's limit, the same on every machine
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
    # the widget's backend import runs in a worker thread of its own: a test run alone must not end (and tear Qt
    # down) under it, or the thread's last signal aborts the interpreter after the test has passed
    qtbot.waitUntil(lambda: widget.ready, timeout=60_000)


# --------------------------------------------------------------------------------------------- round 2: one per fix
def _job():
    """A stand-in training body for `in_run_dir`: writes a partial file, then a checkpoint per step."""
    from neuromf.train.run_dir import in_run_dir

    @in_run_dir
    def job(cfg, resume: bool = False, overwrite: bool = False):
        out = Path(cfg.training.output_dir)
        (out / "losses.csv").write_text("step\n")
        yield 1
        (out / "checkpoint.safetensors").write_bytes(b"w")
        return "done"

    return job


def _cfg(out: Path):
    from neuromf.config import load_config

    return load_config("base_tiny", {"training.output_dir": str(out)})


def test_overwrite_removes_only_what_the_run_wrote(tmp_path: Path) -> None:
    """Issue 28: --overwrite wiped any folder holding a config.yaml. Now it removes the files the run's manifest
    lists; a folder without one is replaced only when it holds nothing but a run's own names."""
    from neuromf.io.owned import FolderNotOwnedError, read_manifest

    job, run = _job(), tmp_path / "run"
    assert list(job(_cfg(run))) == [1]
    assert sorted(read_manifest(run)["files"]) == ["checkpoint.safetensors", "config.yaml", "losses.csv"]
    (run / "my_notes.txt").write_text("mine\n")  # a user's file dropped into the run folder later
    with pytest.warns(UserWarning, match=r"kept 1 entries NeuroMF did not write: my_notes\.txt"):
        assert list(job(_cfg(run), overwrite=True)) == [1]
    assert (run / "my_notes.txt").read_text() == "mine\n" and (run / "checkpoint.safetensors").is_file()

    legacy = tmp_path / "legacy"  # a run written before manifests: only a run's own names
    legacy.mkdir()
    (legacy / "config.yaml").write_text("x: 1\n")
    (legacy / "checkpoint.safetensors").write_bytes(b"old")
    assert list(job(_cfg(legacy), overwrite=True)) == [1] and read_manifest(legacy) is not None

    project = tmp_path / "project"  # a user's folder: their config.yaml and results
    (project / "results").mkdir(parents=True)
    (project / "config.yaml").write_text("mine: true\n")
    (project / "results" / "r.csv").write_text("1\n")
    before = snapshot(project, tmp_path / "none")
    with pytest.raises(FolderNotOwnedError, match=r"not a NeuroMF run folder .*results"):
        list(job(_cfg(project), overwrite=True))
    assert snapshot(project, tmp_path / "none") == before


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Issue 28: a full disk or file-size limit during a checkpoint write was a SafetensorError traceback. Now it
    is an OSError naming the file, the previous checkpoint stays valid, and non-finite weights are never saved."""
    from safetensors import SafetensorError

    from neuromf.train import checkpoint as ckpt
    from neuromf.train.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema, optimizer = EMA(model, 0.9), torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    weights = ckpt.save_checkpoint(tmp_path, model, ema, optimizer, generator, ckpt.TrainState(step=1), {})
    good = weights.read_bytes()

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, message: No space left on device })")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match=r"checkpoint\.safetensors: cannot write the checkpoint at step 2 .*previous "
                                      r"checkpoint is kept"):
        ckpt.save_checkpoint(tmp_path, model, ema, optimizer, generator, ckpt.TrainState(step=2), {})
    monkeypatch.undo()
    assert weights.read_bytes() == good and int(ckpt.read_checkpoint_meta(tmp_path)["step"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.NonFiniteWeightsError, match=r"1 weight tensors became NaN or infinite by step 3"):
        ckpt.save_checkpoint(tmp_path, model, ema, optimizer, generator, ckpt.TrainState(step=3), {})
    assert weights.read_bytes() == good


def test_fine_tune_callback_failure_leaves_no_half_made_run(tmp_path: Path, models: dict[str, Path]) -> None:
    """Issue 28: an exception in fine_tune's on_event left config.yaml behind, and the same call was then refused."""
    from neuromf.api import fine_tune

    env = Env(tmp_path, models)
    good_fcd(env.inp / "data")
    config = str(env.config())

    def boom(event) -> None:
        if event.kind == "step":
            raise RuntimeError("the caller's plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        fine_tune(config, models["base"], on_event=boom)
    assert not (env.out / "run").exists()
    result = fine_tune(config, models["base"])  # the same call now simply works
    assert result.step == 2 and (result.out_dir / "adapter").is_dir()


def test_train_conditional_accepts_lesions_at_one_site(tmp_path: Path, models: dict[str, Path], capfd) -> None:
    """Issue 28: two training lesions at the same site gave an empty site/depth range ("no voxel ... to place a
    lesion") and train-conditional refused valid data."""
    env = Env(tmp_path, models)
    bids(env.inp / "data", {"01": (brain(), lesion()), "02": (brain(120.0), lesion()), "03": (brain(), None)})
    rc, output = run_cli(["train-conditional", "--config", str(env.config()), "--base_checkpoint",
                          str(models["base"])], capfd)
    assert rc == 0 and (env.out / "run" / "adapter" / "mask_prior.safetensors").is_file(), output


def test_generate_owns_its_output_folder(tmp_path: Path, models: dict[str, Path], capfd) -> None:
    """The same run may write its folder again; another run needs --overwrite, which removes only NeuroMF's files;
    a second writer is locked out."""
    from neuromf.io.owned import owner_of
    from neuromf.train.run_dir import RunLock

    out = tmp_path / "g"
    argv = ["generate", "--checkpoint", str(models["base"]), "--n", "2", "--device", "cpu", "--out", str(out)]
    for _ in range(2):
        rc, output = run_cli(argv, capfd)
        assert rc == 0, output
    rc, output = run_cli([*argv, "--seed", "4", "--n", "1", "--overwrite"], capfd)
    assert rc == 0 and owner_of(out)["seed"] == 4, output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["sample_000_flair.nii.gz"]
    lock = RunLock(out, "generate").acquire()
    try:
        rc, output = run_cli([*argv, "--seed", "4"], capfd)
    finally:
        lock.release()
    assert rc == 2 and "another generate is running in this output folder" in output, output


def test_stage2_warns_about_settings_it_ignores() -> None:
    """Issue 28: stage 2 silently ignored data.shape / data.spacing / model.vae that disagree with the base model."""
    from neuromf.config import load_config
    from neuromf.pipelines.conditional import stage2_preprocessing

    base_meta = {"preprocessing": {"shape": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]}, "vae": "/models/vae"}
    cfg = load_config("demo_lora", {"data.shape": [32, 32, 32], "model.vae": "/elsewhere/vae"})
    with pytest.warns(UserWarning, match=r"ignored: data\.shape=\[32, 32, 32\] .*model\.vae=/elsewhere/vae"):
        prep = stage2_preprocessing(base_meta, cfg)
    assert prep.shape == (16, 16, 16)


def test_preprocess_mask_refuses_an_inverted_mask(tmp_path: Path) -> None:
    """generate --mask reads masks through the same validator as check-data: an inverted mask is refused."""
    from neuromf.io.bids import DataError
    from neuromf.io.nifti import Preprocessing, preprocess_mask

    path = nii(tmp_path / "roi.nii.gz", -lesion().astype(np.int16))
    with pytest.raises(DataError, match=r"roi\.nii\.gz: mask values \{-1, 0\} include negative labels"):
        preprocess_mask(path, Preprocessing(shape=SHAPE, spacing=(SPACING,) * 3))
