"""Dataset builders: DICOM pairs by position, file pairs, simulated pairs, the format, the patient split."""

import json
import shutil

import numpy as np
import pytest

from LTDiffPPLib.datasets import (
    _slice_positions,
    load_dataset,
    pair_from_dicom,
    pair_from_files,
    pairs_from_simulation,
    split_by_patient,
    write_dataset,
)
from LTDiffPPLib.errors import InputError, OutputError
from LTDiffPPLib.io import CTVolume, write_dicom_series, write_image
from LTDiffPPLib.phantom import qa_phantom

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def _vol(n_slices=4, n=64, origin_z=10.0, seed=0):
    return CTVolume(hu=qa_phantom((n_slices, n, n), spacing_mm=3.2, seed=seed), spacing=(3.2, 3.2, 2.5),
                    origin=(-100.0, -100.0, origin_z), direction=IDENTITY, source=f"vol{seed}")


def _patient_folder(tmp_path, smooth: CTVolume, sharp: CTVolume, name="patient"):
    """One folder with two DICOM series of one scan (kernels Br40d and Bl64d), as a scanner exports them."""
    folder = tmp_path / name
    folder.mkdir()
    for vol, kernel in ((smooth, "Br40d"), (sharp, "Bl64d")):
        series = write_dicom_series(vol, tmp_path / f"_{name}_{kernel}", series_description=kernel,
                                    convolution_kernel=kernel)
        for f in series.iterdir():
            shutil.copy(f, folder / f"{kernel}_{f.name}")
    return folder


def test_dicom_pair_by_position_keeps_the_common_slices(tmp_path):
    res = pairs_from_simulation(_vol(6), "p", "B30f", "B70f", workers=1)[0]
    sharp_part = CTVolume(hu=res.target.hu[1:5], spacing=res.target.spacing, origin=(-100.0, -100.0, 12.5),
                          direction=IDENTITY)  # the sharp series covers slices 1..4 only
    folder = _patient_folder(tmp_path, res.source, sharp_part)
    pair = pair_from_dicom(folder, "Br40", "Bl64")
    assert pair.kind == "dicom" and pair.source_kernel == "Br40d" and pair.target_kernel == "Bl64d"
    assert pair.source.hu.shape == pair.target.hu.shape == (4, 64, 64)
    np.testing.assert_array_equal(pair.source.hu, res.source.hu[1:5])
    np.testing.assert_array_equal(pair.target.hu, res.target.hu[1:5])
    assert pair.source.origin[2] == pytest.approx(12.5) and pair.patient == "LTDiffPP"


def test_dicom_pair_refuses_what_is_not_one_scan(tmp_path):
    a = _vol(4)
    shifted = CTVolume(hu=a.hu, spacing=a.spacing, origin=(-90.0, -100.0, 10.0), direction=IDENTITY)
    with pytest.raises(InputError, match="origin"):
        pair_from_dicom(_patient_folder(tmp_path, a, shifted, "p1"), "Br40", "Bl64")
    far = CTVolume(hu=a.hu, spacing=a.spacing, origin=(-100.0, -100.0, 500.0), direction=IDENTITY)
    with pytest.raises(InputError, match="share no slice position"):
        pair_from_dicom(_patient_folder(tmp_path, a, far, "p2"), "Br40", "Bl64")
    with pytest.raises(InputError, match="no series with kernel matching 'B70f'"):
        pair_from_dicom(_patient_folder(tmp_path, a, a, "p3"), "Br40", "B70f")


def test_file_pairs_check_the_grid(tmp_path):
    a = _vol(2)
    write_image(a, tmp_path / "a.nrrd")
    lost = CTVolume(hu=a.hu, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=IDENTITY)
    write_image(lost, tmp_path / "b.mha")
    with pytest.raises(InputError, match="spacing"):
        pair_from_files(tmp_path / "a.nrrd", tmp_path / "b.mha", "B30f", "B70f")
    pair = pair_from_files(tmp_path / "a.nrrd", tmp_path / "b.mha", "B30f", "B70f", assume_same_grid=True)
    assert pair.target.spacing == a.spacing and pair.provenance["geometry_copied_from_source"]


def test_split_is_by_patient_seeded_and_complete():
    patients = [f"p{i}" for i in range(20)]
    s = split_by_patient(patients * 3, val=0.1, test=0.2, seed=3)
    assert set(s) == set(patients)
    assert sorted(s.values()).count("test") == 4 and sorted(s.values()).count("val") == 2
    assert s == split_by_patient(reversed(patients), val=0.1, test=0.2, seed=3)
    assert s != split_by_patient(patients, val=0.1, test=0.2, seed=4)
    assert set(split_by_patient(["a", "b", "c"]).values()) == {"train", "val", "test"}
    with pytest.raises(InputError):
        split_by_patient(patients, val=0.6, test=0.5)


def test_write_and_load_a_dataset(tmp_path):
    pairs = []
    for i in range(4):  # 4 patients, 2 doses each: both volumes of a patient must land in one subset
        pairs += pairs_from_simulation(_vol(2, seed=i), f"patient{i}", "B30f", "B70f", doses=(1e5, 4e5), seed=i,
                                       workers=1)
    out = write_dataset(pairs, tmp_path / "ds", val=0.25, test=0.25, seed=0)
    ds = load_dataset(out)
    assert len(ds.pairs) == 8
    by_patient = {}
    for p in ds.pairs:
        by_patient.setdefault(p["patient"], set()).add(p["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert {p["split"] for p in ds.pairs} == {"train", "val", "test"}
    p0 = ds.pairs[0]
    src, tgt = ds.arrays(p0)
    assert src.dtype == np.int16 and isinstance(src, np.memmap) and src.shape == tuple(p0["shape"])
    np.testing.assert_array_equal(src, pairs[0].source.hu)
    assert p0["dose"] == 1e5 and p0["provenance"]["kernels"] == ["B30f", "B70f"]
    assert not np.array_equal(src, tgt)
    with pytest.raises(OutputError):
        write_dataset(pairs, out)
    (out / ds.pairs[1]["target"]).unlink()
    with pytest.raises(InputError, match="incomplete"):
        load_dataset(out)


def test_failed_write_leaves_nothing(tmp_path):
    good = pairs_from_simulation(_vol(2), "a", "B30f", "B70f", workers=1)[0]
    bad = pairs_from_simulation(_vol(2), "b", "B30f", "B70f", workers=1)[0]
    bad.target = CTVolume(hu=bad.target.hu[:1], spacing=bad.target.spacing, origin=bad.target.origin,
                          direction=IDENTITY)
    with pytest.raises(InputError, match="same voxel grid"):
        write_dataset([good, bad], tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_fixed_splits_override_the_random_ones(tmp_path):
    pairs = []
    for i in range(3):
        pairs += pairs_from_simulation(_vol(1, seed=i), f"p{i}", "B30f", "B70f", workers=1)
    out = write_dataset(pairs, tmp_path / "ds", val=0, test=0, splits={"p1": "test", "p2": "val"})
    m = json.loads((out / "manifest.json").read_text())
    assert [p["split"] for p in m["pairs"]] == ["train", "test", "val"]
    assert m["split"]["fixed"] == {"p1": "test", "p2": "val"}
    with pytest.raises(InputError, match="unknown subsets"):
        write_dataset(pairs, tmp_path / "ds2", splits={"p1": "holdout"})


def test_default_recipe_interleaves_slices_with_their_positions():
    """Training.default_dataset gives each dose every third slice; positions must stay those of the CT."""
    from Training.default_dataset import _every

    v = _vol(7)
    part = _every(v, 3, 1)
    np.testing.assert_array_equal(part.hu, v.hu[1::3])
    np.testing.assert_allclose(_slice_positions(part), _slice_positions(v)[1::3])


def test_manifest_is_plain_json(tmp_path):
    pairs = pairs_from_simulation(_vol(2), "a", "B30f", "B70f", workers=1)
    out = write_dataset(pairs, tmp_path / "ds", val=0, test=0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "ltdiffpp-dataset" and m["split"]["by"] == "patient"
    assert m["pairs"][0]["split"] == "train"


def test_cli_build_dataset_from_files_and_simulation(tmp_path):
    from LTDiffPPLib.cli import main

    a = _vol(2, seed=1)
    write_image(a, tmp_path / "ct.nrrd")
    write_image(a, tmp_path / "smooth.nrrd")
    write_image(a.with_hu(a.hu + 5), tmp_path / "sharp.nrrd")
    out = tmp_path / "ds"
    rc = main(["build-dataset", str(out), "--simulate", str(tmp_path / "ct.nrrd"), "--doses", "1e5,2e5",
               "--file-pair", f"{tmp_path / 'smooth.nrrd'}={tmp_path / 'sharp.nrrd'}", "--val", "0", "--test", "0.5",
               "--workers", "1"])
    assert rc == 0
    ds = load_dataset(out)
    assert [p["kind"] for p in ds.pairs] == ["files", "simulated", "simulated"]
    assert {p["dose"] for p in ds.pairs} == {None, 1e5, 2e5}
    assert main(["build-dataset", str(out), "--simulate", str(tmp_path / "ct.nrrd")]) == 2  # exists


def test_cli_build_dataset_from_phantoms(tmp_path):
    from LTDiffPPLib.cli import main

    out = tmp_path / "ph"
    assert main(["build-dataset", str(out), "--phantoms", "3", "--phantom-shape", "2,192,192", "--doses", "1e5",
                 "--workers", "1"]) == 0
    ds = load_dataset(out)
    assert [p["patient"] for p in ds.pairs] == ["phantom-0", "phantom-1", "phantom-2"]
    assert {p["split"] for p in ds.pairs} == {"train", "val", "test"}
    src, tgt = ds.arrays(ds.pairs[0])
    assert src.shape == (2, 192, 192)  # 1.9 mm pixels: fine enough for the kernels to differ
    from LTDiffPPLib.kernels import kernel_ratio

    pixel = ds.pairs[0]["spacing_mm"][0]
    ratio = kernel_ratio(np.asarray(tgt[0], np.float32), np.asarray(src[0], np.float32), pixel, [0.2], crop=64)
    assert ratio[0] > 1.2  # B70f/B30f at 0.2 mm^-1 is ~1.4 on the real pair
