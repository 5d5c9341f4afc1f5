"""``ltdiffpp demo``: the whole job on the built-in sample, no external data needed.

1. build a digital chest phantom (:mod:`LTDiffPPLib.phantom`);
2. scan it once and reconstruct with the smooth (source) and sharp (reference) kernels
   (:mod:`LTDiffPPLib.simulation`);
3. standardize the smooth scan with the registry's default model and — where a model for the reverse
   direction is shipped — the sharp scan back to the smooth kernel, each through the domain guard
   (:func:`LTDiffPPLib.inference.standardize_volume`; the simulated scans name their kernels);
4. radiomic concordance (CCC by feature class) of unconverted and converted images against the other
   kernel's reconstruction, beside the Fourier-ratio and ComBat baselines (:mod:`LTDiffPPLib.evaluation`);
5. write the volumes, the reports and a PNG panel (source / converted / reference, zoomed lung crop).

While no trained model is shipped (it arrives with the Training issue) the demo says so and uses a
randomly initialised model file it writes itself: every stage runs for real, but its "converted" row
measures an untrained network, not a kernel conversion.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .guard import model_for_pair
from .inference import standardize_volume
from .io import CTVolume, write_volume
from .kernels import get_kernel
from .modelfile import LoadedModel, init_model, load_model, registry
from .phantom import chest_phantom_volume
from .simulation import ScanProtocol, simulate


#: the demo's phantom seed: the default model was trained on phantoms 0–13 (Training.default_dataset),
#: so the demo shows a body it has never seen
DEMO_PHANTOM_SEED = 1000


def run_demo(out_dir: Path, *, shape: tuple[int, int, int] = (4, 512, 512), rois: int = 100,
             steps: int | None = None, seed: int = 0) -> dict[str, float]:
    """Run the demo into ``out_dir`` (created; files in it are replaced). Returns timings in seconds.

    The phantom spans a 360 mm field of view, so 512² gives 0.70 mm pixels, the default model's.
    ``seed`` seeds the scan noise and the sampling.
    """
    from .evaluation import evaluate

    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    model = _model(out_dir)
    src_k, tgt_k = model.metadata["source_kernel"], model.metadata["target_kernel"]

    t = time.perf_counter()
    phantom = chest_phantom_volume(shape, seed=DEMO_PHANTOM_SEED)
    print(f"[1/5] digital chest phantom {shape[0]}x{shape[1]}x{shape[2]} voxels, {phantom.spacing[0]:.2f} mm pixels")
    with tqdm(total=shape[0], unit="slice", desc=f"[2/5] scan, reconstruct {src_k} and {tgt_k}") as bar:
        scans = simulate(phantom, [src_k, tgt_k], protocol=ScanProtocol(dose=2e5), seed=seed,
                         progress=lambda d, n: bar.update(d - bar.n)).volumes
    timings["phantom+simulation"] = time.perf_counter() - t

    directions = [(src_k, tgt_k, model)] + [(tgt_k, src_k, m) for m in _reverse_model(src_k, tgt_k)]
    paths = {name: write_volume(vol, out_dir / f"{name}.nrrd", overwrite=True)
             for name, vol in (("phantom", phantom), (f"source_{src_k}", scans[src_k]),
                               (f"reference_{tgt_k}", scans[tgt_k]))}
    timings["standardize"] = timings["evaluation"] = 0.0
    panels = []
    for i, (a, b, m) in enumerate(directions):
        t = time.perf_counter()
        source, reference = scans[a], scans[b]
        with tqdm(total=shape[0], unit="slice", desc=f"[3/5] standardize {a} -> {b}") as bar:
            converted, _plan = standardize_volume(source, b, source_kernel=a, model=m, steps=steps, seed=seed,
                                                  progress=lambda d, n: bar.update(d - bar.n))
        timings["standardize"] += time.perf_counter() - t
        suffix = "" if i == 0 else f"_{a}_to_{b}"
        paths[f"converted{suffix}"] = write_volume(converted, out_dir / f"converted{suffix}.nrrd", overwrite=True)
        t = time.perf_counter()
        with tqdm(total=0, unit="ROI", desc=f"[4/5] radiomics against {b}") as bar:

            def progress(done: int, total: int) -> None:  # counts ROIs of every image
                bar.total = total
                bar.update(done - bar.n)

            result = evaluate(reference, {f"unconverted {a}": source, "LTDiffPP": converted}, source=source,
                              rois=rois, seed=seed, out_dir=out_dir / f"evaluation{suffix}", overwrite=True,
                              progress=progress)
        timings["evaluation"] += time.perf_counter() - t
        panels.append(_panel(out_dir / f"panel{suffix}.png", source, converted, reference, a, b))
        print(f"[5/5] {a} -> {b}: CCC of radiomic features against the {b} reconstruction ({rois} ROIs):\n")
        print(result.tables_markdown)
    if len(directions) == 1:
        print(f"(no model for {tgt_k} -> {src_k} is shipped, so only {src_k} -> {tgt_k} is shown)")
    if model.metadata.get("training", {}).get("status") == "untrained":
        print("NOTE: the LTDiffPP row is an UNTRAINED network (no trained default model is shipped yet).")
    print(f"\nwrote {', '.join(p.name for p in paths.values())}, the evaluation folders and "
          f"{', '.join(p.name for p in panels)} to {out_dir}")
    return timings


def _reverse_model(src_k: str, tgt_k: str) -> list[LoadedModel]:
    """The shipped model converting ``tgt_k`` back to ``src_k``, if there is one (the domain guard's choice)."""
    name = model_for_pair(get_kernel(tgt_k), get_kernel(src_k))
    if name is None:
        return []
    print(f"model: {name} ({tgt_k} -> {src_k})")
    return [load_model(name)]


def _model(out_dir: Path) -> LoadedModel:
    _, default = registry()
    if default is not None:
        model = load_model(default)
        print(f"model: {default} ({model.metadata['source_kernel']} -> {model.metadata['target_kernel']})")
        return model
    path = out_dir / "untrained-model.safetensors"
    init_model(path, seed=0, overwrite=True)
    print("NOTE: no trained default model is shipped yet (it arrives with the Training issue). Using a randomly\n"
          f"      initialised model ({path.name}): every stage runs for real, but the conversion is meaningless.")
    return load_model(path)


def _panel(path: Path, source: CTVolume, converted: CTVolume, reference: CTVolume, src_k: str, tgt_k: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = source.hu.shape[0] // 2
    n = source.hu.shape[1]
    crop = np.s_[n // 4 : n // 4 + n // 4, n // 6 : n // 6 + n // 4]  # the patient's right lung
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.4))
    for col, (vol, title) in enumerate(((source, f"source ({src_k})"), (converted, "converted (LTDiffPP)"),
                                        (reference, f"reference ({tgt_k})"))):
        axes[0, col].imshow(vol.hu[z], cmap="gray", vmin=-1000, vmax=400)
        axes[0, col].set_title(title)
        axes[1, col].imshow(vol.hu[z][crop], cmap="gray", vmin=-1100, vmax=100)
        axes[1, col].set_title("lung crop")
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
